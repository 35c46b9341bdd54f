"""The evaluation gates on a real model: a noise ladder of an fp32 conversion, measured against its source.

    OLIVE_BUILDER_EVAL_CACHE=DIR python benchmarks/calibrate_real.py --source HF_DIR --fp32 ONNX_DIR \
        [--levels 0.005,0.01,0.02,0.05,0.1,0.2] [--seed 0] [--scope linear|all] [--out DIR] \
        [--also DIR ...] [--json]

This regenerates the table behind builder/build/evaluate/gates.py DEFAULT_GATES (README
"Evaluation"). For each noise level k it copies the fp32 ONNX Runtime GenAI folder, adds seeded
Gaussian noise of standard deviation k x the tensor's own standard deviation to the weights in
``--scope``, writes the model back with onnx (external data, one model.onnx.data) and evaluates
it against ``--source`` on the committed text, without the speed part. Printed per level: the
perplexity ratio, top-1 agreement, mean KL, mean greedy prefix, and which precisions' default gates
the figures pass. The figures do not depend on ``--precision`` (only the limits do), so one
evaluation per level serves every precision's column.

``--scope linear`` (the default) noises every 2-D float initializer that a MatMul consumes (the
projections, the MLP and lm_head). A tensor that another node reads too (the embedding, when the
model ties it to lm_head) is untied: the MatMul gets the noisy copy, the embedding keeps the
original. Norms, rotary caches and the embedding are left alone. ``--scope all`` also noises
every other float initializer except the rotary caches (norms and the embedding).

``--also DIR`` evaluates existing conversions as they are (e.g. an int4 or int8 build), as
rows of the same table. Set OLIVE_BUILDER_EVAL_CACHE to a folder that already holds the source's
figures (or let the first evaluation fill it) so each row runs only the ONNX side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.build import evaluate  # noqa: E402
from builder.build.evaluate.gates import DEFAULT_GATES, check_gates, gates_for  # noqa: E402

LEVELS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
MODEL, DATA = "model.onnx", "model.onnx.data"
ROTARY = ("cos_cache", "sin_cache")  # precomputed tables, not weights: noise there would measure nothing useful


def make_noisy(fp32: Path, dest: Path, k: float, seed: int, scope: str) -> int:
    """Copy ``fp32`` into ``dest`` with noise of std k x each chosen tensor's std; returns how many tensors."""
    import numpy as np  # lazy: only the ladder needs numpy and onnx
    import onnx
    from onnx import numpy_helper

    dest.mkdir(parents=True, exist_ok=True)
    for f in fp32.iterdir():
        if f.name not in (MODEL, DATA) and f.is_file():
            shutil.copy2(f, dest / f.name)
    model = onnx.load(str(fp32 / MODEL), load_external_data=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    matmul_inputs = {x for n in graph.node if n.op_type == "MatMul" for x in n.input[1:2] if x in inits}
    other_inputs = {x for n in graph.node if n.op_type != "MatMul" for x in n.input if x in inits}
    if scope == "linear":
        chosen = sorted(x for x in matmul_inputs if len(inits[x].dims) == 2 and inits[x].data_type in floats)
    else:
        chosen = sorted(x for x, t in inits.items() if t.data_type in floats and x not in ROTARY)

    noisy: dict[str, str] = {}  # original name -> the noisy tensor's name
    for i, name in enumerate(chosen):
        tensor = inits[name]
        w = numpy_helper.to_array(tensor)
        # One generator per tensor, seeded by (seed, its index in name order): the same ladder every run.
        rng = np.random.default_rng([seed, i])
        std = float(w.astype(np.float64).std())
        out = (w.astype(np.float32) + rng.standard_normal(w.shape, dtype=np.float32) * np.float32(k * std))
        new_name = name
        if scope == "linear" and name in other_inputs:
            new_name = f"{name}.noisy"  # tied: the other consumer (the embedding) keeps the original
            graph.initializer.append(numpy_helper.from_array(out.astype(w.dtype), new_name))
        else:
            tensor.CopyFrom(numpy_helper.from_array(out.astype(w.dtype), name))
        noisy[name] = new_name
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and noisy.get(node.input[1], node.input[1]) != node.input[1]:
            node.input[1] = noisy[node.input[1]]
    onnx.save_model(model, str(dest / MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA, size_threshold=1024)
    return len(chosen)


def figures(folder: Path, source: Path) -> dict[str, Any]:
    """The evaluation's accuracy figures of ``folder`` and the precisions whose default gates they pass."""
    t0 = time.perf_counter()
    record = evaluate.evaluate(folder, source, precision="fp32", settings=evaluate.Settings(speed=False))
    acc = dict(record.accuracy)
    passes = [p for p in DEFAULT_GATES if not check_gates(acc, gates_for(p))]
    return {"accuracy": acc, "passes": passes, "seconds": round(time.perf_counter() - t0, 1)}


def row(label: str, r: dict[str, Any]) -> str:
    a = r["accuracy"]
    return (f"{label:<24} {a['perplexity_ratio']:<9.5g} {a['top1_agreement']:<7.4g} {a['mean_kl']:<9.4g} "
            f"{a['greedy_prefix_mean']:<7g} {','.join(r['passes']) or '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the source Hugging Face model folder")
    parser.add_argument("--fp32", type=Path, required=True, help="its fp32 ONNX Runtime GenAI conversion")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="noise levels k (x each tensor's std)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scope", choices=["linear", "all"], default="linear",
                        help="linear: MatMul weights only; all: also norms and the embedding")
    parser.add_argument("--out", type=Path, help="keep the noisy copies here as noise_<k>/ (default: a temporary folder)")
    parser.add_argument("--also", type=Path, action="append", default=[], help="also evaluate this conversion as is")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()

    levels = [float(x) for x in args.levels.split(",") if x]
    rows: list[dict[str, Any]] = []
    gates = "; ".join(f"{p} {', '.join(f'{k}={v:g}' for k, v in g.items())}" for p, g in DEFAULT_GATES.items())
    print(f"default gates: {gates}\n")
    print(f"{'model':<24} {'ppl_ratio':<9} {'top1':<7} {'mean_kl':<9} {'greedy':<7} passes (default gates of)")
    with tempfile.TemporaryDirectory(prefix="calibrate-real-") as tmp:
        root = args.out or Path(tmp)
        for folder in [args.fp32, *args.also]:
            r = {"model": str(folder), **figures(folder, args.source)}
            rows.append(r)
            print(row(folder.name, r), flush=True)
        for k in levels:
            dest = root / f"noise_{k:g}"
            if dest.exists():
                shutil.rmtree(dest)
            n = make_noisy(args.fp32, dest, k, args.seed, args.scope)
            r = {"model": f"noise {k:g} ({args.scope}, {n} tensors)", "k": k, **figures(dest, args.source)}
            rows.append(r)
            print(row(f"noise k={k:g} ({args.scope})", r), flush=True)
            if args.out is None:
                shutil.rmtree(dest)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
