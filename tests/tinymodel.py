"""Make a tiny, randomly initialised Hugging Face causal LM folder, offline, in seconds.

No model can be downloaded on our machines, so tests and benchmarks build their own:
a real architecture (Qwen2 by default) with a byte-level BPE tokenizer trained here and a
ChatML chat template, saved with ``save_pretrained`` exactly as a Hub snapshot would be.
The same folder goes through the same Olive code path a real recipe takes.

    python tests/tinymodel.py OUT_DIR [--hidden 64] [--layers 2] [--vocab 1024]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = ["the", "a", "model", "build", "onnx", "runtime", "olive", "token", "cache", "layer", "image", "container", "recipe", "target", "cpu", "cuda", "quantize", "weight", "tensor", "python", "docker", "registry", "artifact", "digest", "hello", "world", "answer", "question", "small", "fast", "check", "output", "folder", "config", "chat", "user", "assistant", "system"]


def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n_lines)]


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 1024,
    max_position_embeddings: int = 512,
    seed: int = 0,
    train_text: str | None = None,
    train_steps: int = 0,
    model_vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny Qwen2ForCausalLM plus tokenizer into ``out_dir`` and return it.

    With ``train_text`` the tokenizer is trained on that text and, for ``train_steps`` steps,
    the model too: its next-token distributions become peaked like a real model's, so
    quantization error shows in perplexity and agreement as it would on a real model
    (a random model's distributions are near uniform, where quantization changes nothing
    measurable). ``model_vocab_size`` gives the model a real model's vocabulary size (its cost
    lies in the embedding and the LM head) while the tokenizer keeps its small vocabulary.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = train_text.splitlines() if train_text else _corpus(2000, seed)
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=max_position_embeddings,
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)

    config = Qwen2Config(
        # The trained vocabulary can be smaller than asked for: every model id must be a token
        # (unless model_vocab_size asks for a real model's size, for benchmarks).
        vocab_size=max(model_vocab_size or 0, len(fast)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    if train_text and train_steps > 0:
        _train(model, fast(train_text)["input_ids"], train_steps, seed)
    model.eval()
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


def _train(model: object, ids: list[int], steps: int, seed: int) -> None:
    """Next-token training on random windows of ``ids``: a fixed number of steps, so the model
    (and its figures) are the same on every machine, however busy."""
    import torch

    rng = random.Random(seed)
    data = torch.tensor(ids)
    seq, batch = 64, 16
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # type: ignore[attr-defined]
    model.train()  # type: ignore[attr-defined]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other, slower on a busy machine
    for _ in range(steps):
        starts = [rng.randrange(0, len(ids) - seq - 1) for _ in range(batch)]
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss  # type: ignore[operator]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)


def eval_text() -> str:
    """The evaluation text committed with the package (what a trained tiny model learns)."""
    return (Path(__file__).resolve().parents[1] / "builder" / "data" / "eval-text.txt").read_text(encoding="utf-8")


def make_trained_tiny_model(out_dir: str | Path, *, steps: int = 200, **kwargs: object) -> Path:
    """A tiny model trained for a few seconds (200 steps) on the evaluation text: its next-token
    distributions are peaked."""
    # A 1024-token context fits the speed measurement's 512-token prompt and 128 new tokens.
    kwargs.setdefault("max_position_embeddings", 1024)
    return make_tiny_model(out_dir, train_text=eval_text(), train_steps=steps, **kwargs)  # type: ignore[arg-type]


def damage_weights(folder: Path, strength: float, seed: int = 0) -> None:
    """Add noise to every float weight of the converted model (as a bad conversion or a flipped
    bit would), in place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=True)
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype in (np.float32, np.float16) and a.size >= 256:
            noise = rng.standard_normal(a.shape).astype(np.float32) * float(np.abs(a).mean()) * strength
            init.CopyFrom(numpy_helper.from_array((a.astype(np.float32) + noise).astype(a.dtype), init.name))
    for old in folder.glob("model.onnx*"):
        old.unlink()
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--train-steps", type=int, default=0,
                        help="train this many steps on the committed evaluation text (peaked distributions)")
    args = parser.parse_args()
    path = make_tiny_model(
        args.out_dir,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        train_text=eval_text() if args.train_steps > 0 else None,
        train_steps=args.train_steps,
    )
    print(path)


if __name__ == "__main__":
    main()
