"""What a finetune recipe costs against a plain build of the same model, and what it delivers.

    python benchmarks/bench_finetune.py [--model tiny|qwen0.5b] [--precision int4] [--steps 30] [--runs 1]

For the model (tiny: the tests' random Qwen2, hidden 64, 2 layers; qwen0.5b: random weights in
Qwen2.5-0.5B's full architecture, 24 layers, hidden 896, vocabulary 151936) it builds, with the
local engine, the cache off and the evaluation off (tests/test_finetune and bench_eval cover it):

1. the plain recipe (baseline), and
2. the same recipe with `finetune:` (LoRA rank 8 on q/k/v/o over tests/data/finetune/colors.jsonl,
   --steps steps, adapter mode),

in the same process, alternating, and prints the medians, the ratio, the training and
conversion seconds Olive reports for the finetune build, and the adapter file's size against
the base model folder's. Each build is asserted to be a real build (no cache hit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from builder.build import observed  # noqa: E402

DATASET = REPO / "tests" / "data" / "finetune" / "colors.jsonl"


def make_model(kind: str, folder: Path) -> Path:
    from tinymodel import make_tiny_model

    if kind == "tiny":
        return make_tiny_model(folder)
    return make_tiny_model(folder, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                           intermediate_size=4864, max_position_embeddings=32768, model_vocab_size=151936,
                           tie_word_embeddings=True)


def recipe(root: Path, model: Path, precision: str, steps: int | None) -> Path:
    folder = root / "recipes" / ("ft" if steps else "plain")
    folder.mkdir(parents=True, exist_ok=True)
    text = (f"name: bench-ft\nversion: 0.1.0\nmodel:\n  path: {model}\ntarget:\n  device: cpu\n"
            f"  precision: {precision}\nevaluate: false\n")
    if steps:
        text += ("finetune:\n  adapter: colors\n  dataset:\n    path: " + str(DATASET) + "\n"
                 '  template: "### Question: {instruction}\\n### Answer: {response}"\n'
                 f"  max_steps: {steps}\n  learning_rate: 0.001\n  max_seq_len: 64\n"
                 "  lora:\n    r: 8\n    target_modules: [q_proj, k_proj, v_proj, o_proj]\n")
    path = folder / f"cpu-{precision}.yaml"
    path.write_text(text)
    return path


def build(path: Path, out: Path, store: Path) -> tuple[float, dict]:
    from builder import pipeline

    started = time.perf_counter()
    outcome = pipeline.build(path, pipeline.BuildOptions(
        engine="local", output=out, use_cache=False, force=True,
        package=pipeline.PackageOptions(store=store, runnable_image=False)))
    seconds = time.perf_counter() - started
    assert outcome.built is not None, "a cache hit: this benchmark must build"
    return seconds, observed.full_record(out)  # the record and what the run observed (speed, seconds)


def folder_bytes(folder: Path, skip: str | None = None) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (skip is None or skip not in p.parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "qwen0.5b"), default="tiny")
    ap.add_argument("--precision", default="int4", choices=("int4", "fp32"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        root = Path(tmp)
        for var in ("XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
            os.environ[var] = str(root / "xdg")
        t0 = time.perf_counter()
        model = make_model(args.model, root / "model")
        print(f"model {args.model} made in {time.perf_counter() - t0:.1f} s ({folder_bytes(model) / 1e6:.1f} MB)")
        plain, tuned = recipe(root, model, args.precision, None), recipe(root, model, args.precision, args.steps)
        times: dict[str, list[float]] = {"plain": [], "finetune": []}
        info: dict = {}
        for i in range(args.runs):
            for kind, path in (("plain", plain), ("finetune", tuned)):
                seconds, record = build(path, root / "out" / kind, root / "store")
                times[kind].append(seconds)
                if kind == "finetune":
                    info = record
                print(f"run {i + 1}: {kind} build {seconds:.1f} s", flush=True)
        p, f = statistics.median(times["plain"]), statistics.median(times["finetune"])
        entry = info["finetune"]["adapters"][0]
        training = entry["training"]
        out = root / "out" / "finetune"
        base = folder_bytes(out, skip="adapters")
        print(f"\nmodel {args.model}, {args.precision}, {args.steps} LoRA steps, medians of {args.runs}:")
        print(f"  plain build        {p:8.1f} s")
        print(f"  finetune build     {f:8.1f} s   ratio {f / p:.2f}x")
        print(f"  of which training  {training['seconds']:8.1f} s   ({training['seconds'] / args.steps:.2f} s/step, "
              f"final loss {training['loss']})")
        print(f"  conversion+extract {training['conversion_seconds']:8.1f} s")
        print(f"  adapter file       {entry['size']:>10,} bytes")
        print(f"  base model folder  {base:>10,} bytes   adapter/base {entry['size'] / base:.4f}")
        plain_base = folder_bytes(root / "out" / "plain")
        print(f"  plain model folder {plain_base:>10,} bytes   (the base with LoRA inputs is "
              f"{(base - plain_base) / max(plain_base, 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
