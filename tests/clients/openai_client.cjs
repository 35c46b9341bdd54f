'use strict';
// The npm `openai` client against a running server, for tests/test_clients.py.
//
// Reads a plan on stdin: {baseURL, apiKey, chat, completion, tool, bad}, each a request body the
// test also sends raw to get its reference answer. Sends them with the client's own calls (plain,
// streamed, through the stream helper) and prints what came back as one JSON object on stdout.
// The package is found through NODE_PATH (.ci/run installs it with `npm ci` into .ci-state).

const fs = require('fs');
const OpenAI = require('openai');

function version() {
  try {
    return require('openai/version').VERSION;
  } catch {
    return null; // not every release exports it; the test reads the installed package.json too
  }
}

async function main() {
  const plan = JSON.parse(fs.readFileSync(0, 'utf8'));
  const client = new OpenAI({ baseURL: plan.baseURL, apiKey: plan.apiKey, maxRetries: 0, timeout: 60_000 });
  const out = { version: version(), node: process.version };

  out.models = (await client.models.list()).data.map((m) => m.id);

  const chat = await client.chat.completions.create(plan.chat);
  out.chat = {
    object: chat.object,
    model: chat.model,
    role: chat.choices[0].message.role,
    content: chat.choices[0].message.content,
    finishReason: chat.choices[0].finish_reason,
    usage: chat.usage,
  };

  const stream = await client.chat.completions.create({
    ...plan.chat,
    stream: true,
    stream_options: { include_usage: true },
  });
  const streamed = { firstRole: null, text: '', finishReasons: [], usage: null, chunks: 0 };
  for await (const chunk of stream) {
    streamed.chunks += 1;
    if (chunk.usage) streamed.usage = chunk.usage;
    if (!chunk.choices.length) continue;
    const [choice] = chunk.choices;
    if (streamed.chunks === 1) streamed.firstRole = choice.delta.role ?? null;
    streamed.text += choice.delta.content ?? '';
    if (choice.finish_reason) streamed.finishReasons.push(choice.finish_reason);
  }
  out.stream = streamed;

  // The SDK's stream helper assembles the chunks into a completion of its own.
  const runner = client.chat.completions.stream(plan.chat);
  const deltas = [];
  runner.on('content', (delta) => deltas.push(delta));
  const final = await runner.finalChatCompletion();
  out.helper = {
    content: final.choices[0].message.content,
    finishReason: final.choices[0].finish_reason,
    deltas: deltas.join(''),
  };

  const completion = await client.completions.create(plan.completion);
  out.completion = {
    text: completion.choices[0].text,
    finishReason: completion.choices[0].finish_reason,
    usage: completion.usage,
  };

  const tool = await client.chat.completions.create(plan.tool);
  out.tool = {
    finishReason: tool.choices[0].finish_reason,
    content: tool.choices[0].message.content,
    calls: (tool.choices[0].message.tool_calls ?? []).map((c) => ({
      id: c.id,
      type: c.type,
      name: c.function.name,
      arguments: c.function.arguments,
    })),
  };

  try {
    await client.chat.completions.create(plan.bad);
    out.bad = null;
  } catch (e) {
    if (!(e instanceof OpenAI.BadRequestError)) throw e;
    out.bad = { status: e.status, param: e.param, type: e.type, message: e.message };
  }

  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
