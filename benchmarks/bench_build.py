"""Orchestration overhead of `build recipe` (Docker engine) against a bare `olive run`.

Both sides use the same builder image, the same tiny model and the same Olive config:

  baseline  docker run IMAGE python -m olive run --config C.json   (docker-py, container removed)
  measured  pipeline.build(RECIPE, use_cache=False)                (the library `build recipe` calls)

The measured side is a real build every time (the cache is off: with it, every run after the
first would be a cache hit and this would measure the cache). It also does what the baseline
does not: recipe validation, pinning the inputs (the cache key), log streaming, the check
(load + generate with onnxruntime-genai), the atomic rename and packaging the model artifact
into a fresh store (no runnable image: that is one export per runtime image, not per build).
Runs alternate baseline/measured so drift hits both; medians and their ratio are printed.

    python benchmarks/bench_build.py [--runs 5] [--precision int4] [--evaluate]

The recipe says `evaluate: false` unless --evaluate is given: the evaluation stage (accuracy
against the source model and speed, builder/evaluate.py) is work `olive run` does not do, and
benchmarks/bench_eval.py measures it on its own. With --evaluate the ratio shows its cost.

Needs a Docker engine (DOCKER_HOST) and the CPU builder image (built if missing, from
OLIVE_BUILDER_BASE_IMAGE / OLIVE_BUILDER_WHEELS like `build images`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from builder import pipeline  # noqa: E402
from builder.build import images  # noqa: E402
from builder.build.engine import DockerEngine  # noqa: E402
from builder.build.worker import substitute  # noqa: E402
from builder.contract import CACHE_DIR, MODEL_DIR, OUTPUT_DIR  # noqa: E402
from builder.recipe import format as recipe  # noqa: E402
from builder.recipe import plan  # noqa: E402
from tinymodel import make_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--precision", default="int4", choices=["int4", "fp32", "int8"])
    parser.add_argument("--evaluate", action="store_true", help="keep the evaluation stage on")
    args = parser.parse_args()

    engine = DockerEngine()
    engine.preflight()
    spec = images.image_spec("cpu")
    if not engine.has_image(spec.tag):
        print(f"building {spec.tag} ...", flush=True)
        images.build_image(engine.client, spec, lambda line: None)
    client = engine.client

    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        tmp_path = Path(tmp)
        model = make_tiny_model(tmp_path / "tiny-qwen2")
        recipe_path = tmp_path / "recipes" / "tiny-qwen2" / f"cpu-{args.precision}.yaml"
        recipe_path.parent.mkdir(parents=True)
        recipe_path.write_text(
            f"name: tiny-qwen2\nversion: 0.1.0\nmodel:\n  path: {model}\n"
            f"target:\n  device: cpu\n  precision: {args.precision}\n"
            + ("" if args.evaluate else "evaluate: false\n")
        )
        step = plan.plan(recipe.load(recipe_path), spec.tag)
        config = substitute(
            step.olive_config,
            {MODEL_DIR: "/model", OUTPUT_DIR: "/work/out", CACHE_DIR: "/work/cache"},
        )
        env = {"CI": "1", "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "HOME": "/tmp",
               "XDG_CACHE_HOME": "/work/cache/xdg", "HF_HUB_CACHE": "/work/cache/hf-hub"}

        def baseline(i: int) -> float:
            work = tmp_path / f"base-{i}"
            work.mkdir()
            (work / "olive.json").write_text(json.dumps(config))
            t0 = time.perf_counter()
            client.containers.run(
                spec.tag,
                ["python", "-m", "olive", "run", "--config", "/work/olive.json"],
                volumes={str(model): {"bind": "/model", "mode": "ro"}, str(work): {"bind": "/work", "mode": "rw"}},
                environment=env,
                user=f"{os.getuid()}:{os.getgid()}",
                remove=True,
            )
            seconds = time.perf_counter() - t0
            assert (work / "out" / "genai_config.json").is_file(), "baseline produced no model"
            shutil.rmtree(work)
            return seconds

        os.environ["XDG_STATE_HOME"] = str(tmp_path / "state")  # build logs stay out of the user's state

        def measured(i: int) -> float:
            out, store = tmp_path / f"out-{i}", tmp_path / f"store-{i}"
            options = pipeline.BuildOptions(
                engine=engine, output=out, use_cache=False, builder_image=spec.tag,
                package=pipeline.PackageOptions(store=store, runnable_image=False))
            t0 = time.perf_counter()
            outcome = pipeline.build(recipe_path, options)
            seconds = time.perf_counter() - t0
            assert outcome.built is not None and not outcome.cached, "a cache hit is not a build"
            assert (out / "genai_config.json").is_file()
            shutil.rmtree(out)
            shutil.rmtree(store)
            return seconds

        baseline(-1)  # warm the page cache and the image layers for both sides
        base_times, build_times = [], []
        for i in range(args.runs):
            base_times.append(baseline(i))
            build_times.append(measured(i))
            print(f"run {i + 1}/{args.runs}: olive run {base_times[-1]:.2f}s  build recipe {build_times[-1]:.2f}s",
                  flush=True)

    b, m = statistics.median(base_times), statistics.median(build_times)
    print(f"\nprecision {args.precision}, {args.runs} runs, image {spec.tag}, "
          f"evaluation {'on' if args.evaluate else 'off'}")
    print(f"median docker run + olive run : {b:.2f}s  (min {min(base_times):.2f}, max {max(base_times):.2f})")
    print(f"median pipeline.build (docker): {m:.2f}s  (min {min(build_times):.2f}, max {max(build_times):.2f})")
    print(f"ratio build/olive             : {m / b:.2f}x  (goal <= 1.05x)")


if __name__ == "__main__":
    main()
