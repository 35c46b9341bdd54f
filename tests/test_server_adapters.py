"""The server with LoRA adapters (issue 15): a tiny model finetuned by Olive in this session
(LoRA, ModelBuilder fp32, ExtractAdapters), served by a real server process, used through the
real `openai` client. A request naming `<base>:<adapter>` gets the adapted greedy output (equal
to onnxruntime-genai's with the adapter active, and to the PEFT PyTorch model's), one naming the
base gets the base's."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, need, wait_healthy
from test_server import Running, serve, serve_python, server_env

pytestmark = pytest.mark.integration

BASE_ID = "tiny-ft:0.1.0-cpu-fp32"  # a build tag has a colon of its own: `<base>:<adapter>` still parses
ADAPTER = "colors"
ADAPTED_ID = f"{BASE_ID}:{ADAPTER}"
TEMPLATE = "### Question: {instruction}\n### Answer: {response}"
PROMPT = "### Question: what color is item 2?\n### Answer:"
MESSAGES = [{"role": "user", "content": "what color is item 2?"}]
N = 12  # tokens per request
COLORS = ["blue", "red", "green"]


@dataclass
class Finetuned:
    model: Path  # the converted base model with adapters/colors.onnx_adapter
    base_hf: Path  # the Hugging Face base model it was trained from
    peft: Path  # the LoRA adapter as PEFT saved it (Olive's LoRA pass output)


def make_finetuned(root: Path, *, steps: int = 60, learning_rate: float = 0.003) -> Finetuned:
    """Finetune a tiny Qwen2 with Olive on a small JSONL dataset (CPU, 60 steps, ~20-35 s) and lay the
    result out as a finetuned build in adapter mode does: the base model plus adapters/<name>.onnx_adapter.

    60 steps at 3e-3 make the adapted model answer mostly in the dataset's words and marks (the
    random base answers in stray bytes, which decode to little text); 30 at 1e-3 change the output
    too, but only to other stray bytes."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tinymodel import make_tiny_model

    rows = [{"instruction": f"what color is item {i}?", "response": f"the item is {' '.join([COLORS[i % 3]] * 3)}"}
            for i in range(40)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The tokenizer learns the dataset's words, so that a few steps of training move whole words.
    base_hf = make_tiny_model(root / "base-hf", train_text="\n".join(TEMPLATE.format(**r) for r in rows))
    out, cache = root / "olive-out", root / "olive-cache"
    config = {
        "input_model": {"type": "HfModel", "model_path": str(base_hf)},
        "systems": {"local": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [{
            "name": "train_data", "type": "HuggingfaceContainer",
            "load_dataset_config": {"data_name": "json", "split": "train", "data_files": [str(data)]},
            "pre_process_data_config": {"text_template": TEMPLATE, "chat_template": False, "max_seq_len": 64,
                                        "add_special_tokens": False, "max_samples": 256},
            "dataloader_config": {"batch_size": 1}}],
        "passes": {
            "lora": {"type": "LoRA", "train_data_config": "train_data", "torch_dtype": "float32",
                     "training_args": {"max_steps": steps, "seed": 0, "learning_rate": learning_rate}, "r": 8, "alpha": 16,
                     "target_modules": ["q_proj", "v_proj"]},
            "builder": {"type": "ModelBuilder", "precision": "fp32"},
            "extract": {"type": "ExtractAdapters", "save_format": "onnx_adapter"},
        },
        "host": "local", "target": "local", "evaluate_input_model": False,
        "cache_dir": str(cache), "output_dir": str(out), "log_severity_level": 3,
    }
    config_path = root / "olive.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "CI": "1", "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(cache / "hf-hub"), "XDG_CACHE_HOME": str(cache / "xdg")}
    proc = subprocess.run([sys.executable, "-m", "olive", "run", "--config", str(config_path)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    produced = out / "adapter_weights.onnx_adapter"
    # Olive exits 0 when a pass fails: the files tell.
    assert proc.returncode == 0 and produced.is_file() and (out / "genai_config.json").is_file(), \
        f"olive run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    peft = [p.parent for p in cache.rglob("adapter_config.json")]
    assert len(peft) == 1, f"expected one PEFT adapter in Olive's cache, found {peft}"
    model = root / "model"
    model.mkdir()
    for item in out.iterdir():  # the model's files; Olive's bookkeeping stays out
        if item.is_file() and item.suffix != ".onnx_adapter" and not item.name.endswith("footprint.json") \
                and item.name != "run_history.txt":
            shutil.copy2(item, model / item.name)
    (model / "adapters").mkdir()
    shutil.copy2(produced, model / "adapters" / f"{ADAPTER}.onnx_adapter")
    return Finetuned(model=model, base_hf=base_hf, peft=peft[0])


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory: pytest.TempPathFactory, local_engine_ready: None) -> Finetuned:
    need(_has("peft") and _has("torch"), "peft and torch are not installed (pip install -e '.[local]')")
    return make_finetuned(tmp_path_factory.mktemp("finetuned"))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def server(finetuned: Finetuned, tmp_path_factory: pytest.TempPathFactory) -> Any:
    with serve(finetuned.model, tmp_path_factory.mktemp("adapter-server"), "--model-id", BASE_ID,
               "--max-concurrency", "3", "--queue-size", "16") as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Running) -> Any:
    need(_has("openai"), "the openai package is not installed")
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# ----------------------------------------------------------------------------- references


@functools.cache
def _og(model: str) -> tuple[Any, Any, Any]:
    import onnxruntime_genai as og

    m = og.Model(model)
    adapters = og.Adapters(m)
    for path in sorted((Path(model) / "adapters").glob("*.onnx_adapter")):
        adapters.load(str(path), path.name.removesuffix(".onnx_adapter"))
    return m, og.Tokenizer(m), adapters


def og_tokens(model: Path, ids: list[int], adapter: str | None, n: int = N) -> list[int]:
    """onnxruntime-genai's own greedy loop in this process (EOS masked: exactly ``n`` tokens)."""
    import onnxruntime_genai as og

    m, _, adapters = _og(str(model))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    gen = og.Generator(m, params)
    if adapter:
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def text_of(model: Path, tokens: list[int]) -> str:
    _, tok, _ = _og(str(model))
    stream = tok.create_stream()
    return "".join(stream.decode(t) for t in tokens)


def prompt_ids(model: Path) -> list[int]:
    _, tok, _ = _og(str(model))
    return [int(t) for t in tok.encode(PROMPT)]


def chat_ids(model: Path) -> list[int]:
    _, tok, _ = _og(str(model))
    return [int(t) for t in tok.encode(tok.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True))]


def torch_tokens(ft: Finetuned, ids: list[int], with_adapter: bool, n: int = N) -> list[int]:
    """The PyTorch model's greedy output: the HF base, or the base with the PEFT adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft.base_hf, dtype=torch.float32)
    if with_adapter:
        model = PeftModel.from_pretrained(model, ft.peft)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, len(ids):]]


# ----------------------------------------------------------------------------- with the openai client


def test_the_adapter_changes_the_output_and_equals_the_peft_model(finetuned: Finetuned) -> None:
    ids = prompt_ids(finetuned.model)
    base, adapted = og_tokens(finetuned.model, ids, None), og_tokens(finetuned.model, ids, ADAPTER)
    assert base != adapted
    # fp32: the converted base and adapter reproduce PyTorch token for token.
    assert base == torch_tokens(finetuned, ids, with_adapter=False)
    assert adapted == torch_tokens(finetuned, ids, with_adapter=True)


def test_models_lists_the_base_and_its_adapters(client: Any) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [BASE_ID, ADAPTED_ID]
    assert models[1].model_extra.get("parent") == BASE_ID


def test_completions_base_and_adapter(client: Any, finetuned: Finetuned) -> None:
    ids = prompt_ids(finetuned.model)
    for model_id, adapter in ((BASE_ID, None), (ADAPTED_ID, ADAPTER)):
        expected = text_of(finetuned.model, og_tokens(finetuned.model, ids, adapter))
        r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=N, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert (r.model, r.choices[0].text, r.usage.completion_tokens) == (model_id, expected, N)
        streamed = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=N, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
        assert {c.model for c in streamed} == {model_id}
    assert text_of(finetuned.model, og_tokens(finetuned.model, ids, None)) != \
        text_of(finetuned.model, og_tokens(finetuned.model, ids, ADAPTER))


def test_chat_base_and_adapter(client: Any, finetuned: Finetuned) -> None:
    ids = chat_ids(finetuned.model)
    answers = {}
    for model_id, adapter in ((BASE_ID, None), (ADAPTED_ID, ADAPTER)):
        expected = text_of(finetuned.model, og_tokens(finetuned.model, ids, adapter))
        r = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=N, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert (r.model, r.choices[0].message.content) == (model_id, expected)
        assert r.usage.prompt_tokens == len(ids)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model_id, messages=MESSAGES, max_tokens=N, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices)
        assert streamed == expected
        answers[model_id] = expected
    assert answers[BASE_ID] != answers[ADAPTED_ID]


def test_concurrent_base_and_adapter_requests_do_not_mix(server: Running, finetuned: Finetuned) -> None:
    """Base requests (engine) and adapter requests (one generator each) at once: each gets its own output."""
    ids = prompt_ids(finetuned.model)
    expected = {m: text_of(finetuned.model, og_tokens(finetuned.model, ids, a))
                for m, a in ((BASE_ID, None), (ADAPTED_ID, ADAPTER))}
    before = server.metric("olive_server_adapter_generations_total")

    def ask(model_id: str) -> tuple[str, str]:
        status, _, body = server.post("/v1/completions", {"model": model_id, "prompt": PROMPT, "max_tokens": N,
                                                          "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        return model_id, body["choices"][0]["text"]

    order = [ADAPTED_ID, BASE_ID] * 6  # 12 requests, 3 generate at once, the rest wait
    with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
        results = list(pool.map(ask, order))
    assert all(text == expected[model_id] for model_id, text in results), results
    assert server.metric("olive_server_adapter_generations_total") - before == 6


def _scaled_adapter(source: Path, target: Path, factor: float) -> None:
    """Another valid adapter of the same base: the LoRA B matrices scaled."""
    import onnxruntime as ort

    params = ort.AdapterFormat.read_adapter(str(source)).get_parameters()
    scaled = {name: ort.OrtValue.ortvalue_from_numpy(value.numpy() * (factor if "lora_B" in name else 1.0))
              for name, value in params.items()}
    out = ort.AdapterFormat()
    out.set_adapter_version(1)
    out.set_model_version(1)
    out.set_parameters(scaled)
    out.export_adapter(str(target))


def test_two_adapters_and_the_base_at_once_each_get_their_own(finetuned: Finetuned, tmp_path: Path) -> None:
    """One generator per request, each with its own adapter: 12 requests over 3 models, 4 at a time."""
    model = tmp_path / "model"
    shutil.copytree(finetuned.model, model)
    ids = prompt_ids(model)
    expected = {BASE_ID: text_of(model, og_tokens(model, ids, None)),
                ADAPTED_ID: text_of(model, og_tokens(model, ids, ADAPTER))}
    # The session trains its adapter afresh: how far x3 moves a greedy answer varies from run to
    # run (once, x3 answered as x1 did), so the smallest scale that gives a third answer is taken.
    for scale in (3.0, 10.0, 30.0):
        _scaled_adapter(model / "adapters" / f"{ADAPTER}.onnx_adapter", model / "adapters" / "strong.onnx_adapter",
                        scale)
        _og.cache_clear()  # the reference model loads the adapters it finds: this one is new
        expected[f"{BASE_ID}:strong"] = text_of(model, og_tokens(model, ids, "strong"))
        if len(set(expected.values())) == 3:
            break
    assert len(set(expected.values())) == 3  # three different answers
    with serve(model, tmp_path, "--model-id", BASE_ID, "--max-concurrency", "4") as running:
        status, _, body = running.request("GET", "/v1/models")
        assert [m["id"] for m in json.loads(body)["data"]] == [BASE_ID, ADAPTED_ID, f"{BASE_ID}:strong"]

        def ask(model_id: str) -> tuple[str, str]:
            status, _, answer = running.post("/v1/completions", {"model": model_id, "prompt": PROMPT, "max_tokens": N,
                                                                 "temperature": 0, "ignore_eos": True})
            assert status == 200, answer
            return model_id, answer["choices"][0]["text"]

        order = list(expected) * 4
        with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
            results = list(pool.map(ask, order))
        assert all(text == expected[model_id] for model_id, text in results), results


def test_sampling_with_a_seed_on_an_adapter_is_reproducible(client: Any) -> None:
    def sample(model_id: str) -> str:
        return str(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=N, temperature=1.0,
                                             seed=11, extra_body={"ignore_eos": True}).choices[0].text)

    assert sample(ADAPTED_ID) == sample(ADAPTED_ID)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("model_id", [f"{BASE_ID}:nope", f"{BASE_ID}:", f"{BASE_ID}:{ADAPTER}:x",
                                      f"other:{ADAPTER}", ADAPTER])
def test_an_unknown_adapter_is_a_404(server: Running, model_id: str) -> None:
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": MESSAGES, "stream": True})):
        status, _, answer = server.post(path, {"model": model_id, "max_tokens": 2, **body})
        assert status == 404, answer
        assert answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"
        assert ADAPTED_ID in answer["error"]["message"]  # it says what is served


def test_an_unknown_adapter_through_the_client(client: Any) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=f"{BASE_ID}:nope", messages=MESSAGES, max_tokens=2)
    assert info.value.code == "model_not_found"


def test_health_names_the_adapters(server: Running) -> None:
    status, _, body = server.request("GET", "/health")
    assert status == 200 and json.loads(body)["adapters"] == [ADAPTED_ID]


def _start_fails(model: Path) -> str:
    proc = subprocess.run([serve_python(), "-m", "builder.serve", "--model", str(model), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120, env=server_env())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    return out


def _copy(finetuned: Finetuned, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(finetuned.model, model)
    return model


def test_a_corrupt_adapter_stops_the_start(finetuned: Finetuned, tmp_path: Path) -> None:
    model = _copy(finetuned, tmp_path)
    (model / "adapters" / "broken.onnx_adapter").write_bytes(b"not an adapter")
    out = _start_fails(model)
    assert "the adapter `broken`" in out and "cannot be loaded" in out and "remove it from" in out


def test_an_adapter_of_another_base_stops_the_start(finetuned: Finetuned, tmp_path: Path) -> None:
    """It loads (the file is valid) but its LoRA weights do not fit the graph: found by the warm-up."""
    import numpy as np
    import onnxruntime as ort

    model = _copy(finetuned, tmp_path)
    source = ort.AdapterFormat.read_adapter(str(model / "adapters" / f"{ADAPTER}.onnx_adapter"))
    wrong = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros([2 * d for d in value.shape()], dtype=np.float32))
             for name, value in source.get_parameters().items()}
    other = ort.AdapterFormat()
    other.set_adapter_version(1)
    other.set_model_version(1)
    other.set_parameters(wrong)
    other.export_adapter(str(model / "adapters" / "other.onnx_adapter"))
    out = _start_fails(model)
    assert "the adapter `other` loads but cannot generate with this model" in out
    assert "another base model" in out


def test_an_adapter_file_with_an_invalid_name_stops_the_start(finetuned: Finetuned, tmp_path: Path) -> None:
    model = _copy(finetuned, tmp_path)
    shutil.copy2(model / "adapters" / f"{ADAPTER}.onnx_adapter", model / "adapters" / "Bad:Name.onnx_adapter")
    out = _start_fails(model)
    assert "Bad:Name.onnx_adapter" in out and "invalid name" in out


def test_a_model_without_adapters_serves_only_the_base(finetuned: Finetuned, tmp_path: Path) -> None:
    model = _copy(finetuned, tmp_path)
    shutil.rmtree(model / "adapters")
    with serve(model, tmp_path, "--model-id", BASE_ID) as running:
        status, _, body = running.request("GET", "/v1/models")
        assert [m["id"] for m in json.loads(body)["data"]] == [BASE_ID]
        status, _, answer = running.post("/v1/completions", {"model": ADAPTED_ID, "prompt": PROMPT, "max_tokens": 2})
        assert status == 404 and answer["error"]["code"] == "model_not_found"


def test_the_build_sides_onnxruntime_genai_serves_adapters_too(finetuned: Finetuned, tmp_path: Path) -> None:
    """`build serve` on a host with the build side's 0.14.1 (no og.Engine): everything on the Generator path."""
    ids = prompt_ids(finetuned.model)
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "builder.serve", "--model", str(finetuned.model), "--port",
                                 str(port), "--model-id", BASE_ID], stdout=sink, stderr=subprocess.STDOUT,
                                env=server_env())
    try:
        wait_healthy(port, lambda: proc.poll() is None, log.read_text)
        running = Running(proc, port, log)
        for model_id, adapter in ((BASE_ID, None), (ADAPTED_ID, ADAPTER)):
            status, _, body = running.post("/v1/completions", {"model": model_id, "prompt": PROMPT, "max_tokens": N,
                                                               "temperature": 0, "ignore_eos": True})
            assert status == 200, body
            assert body["choices"][0]["text"] == text_of(finetuned.model, og_tokens(finetuned.model, ids, adapter))
        assert running.metric('olive_server_generations_total{path="generator"}') == 2
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.docker
def test_the_runtime_image_serves_the_adapters(finetuned: Finetuned, runtime_image: str, docker_client: Any) -> None:
    """The runtime image (trimmed stdlib, stripped onnxruntime-genai, uid 1000) runs the same server."""
    ids = prompt_ids(finetuned.model)
    port = free_port()
    container = docker_client.containers.run(
        runtime_image, detach=True, ports={"8000/tcp": ("127.0.0.1", port)},
        environment={"OLIVE_MODEL_ID": BASE_ID},
        volumes={str(finetuned.model): {"bind": "/model", "mode": "ro"}},
    )
    try:
        wait_healthy(port, lambda: container.reload() or container.status == "running",
                     lambda: container.logs().decode()[-2000:])
        running = Running(None, port, Path("/dev/null"))  # type: ignore[arg-type]
        status, _, body = running.request("GET", "/v1/models")
        assert [m["id"] for m in json.loads(body)["data"]] == [BASE_ID, ADAPTED_ID]
        for model_id, adapter in ((BASE_ID, None), (ADAPTED_ID, ADAPTER)):
            status, _, answer = running.post("/v1/completions", {"model": model_id, "prompt": PROMPT, "max_tokens": N,
                                                                 "temperature": 0, "ignore_eos": True})
            assert status == 200, answer
            assert answer["choices"][0]["text"] == text_of(finetuned.model, og_tokens(finetuned.model, ids, adapter))
        container.stop(timeout=30)
        assert container.wait(timeout=60)["StatusCode"] == 0
    finally:
        container.remove(force=True)
