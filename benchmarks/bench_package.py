"""Packaging and push, measured against baselines in the same process.

1. Packaging a ~1 GB model folder into a fresh local store (tars written, digests computed
   while writing) against `tar -cf - DIR | sha256sum` of the same folder. Runs alternate;
   medians and their ratio are printed (goal <= 1.2x).
2. Pushes to a real registry (docker-registry on loopback, started and stopped here):
   first push, re-push of the unchanged build (goal: 0 bytes), push of a second target of
   the same model (goal: the tokenizer/config layer is not uploaded again).
3. Determinism: the same folder packaged into two fresh stores (digests shown), and, with
   --rebuild, the tiny model built twice by `build recipe --engine local` with the same
   SOURCE_DATE_EPOCH (artifact digests shown).

    python benchmarks/bench_package.py [--runs 5] [--size-mb 1024] [--rebuild]

Set TMPDIR to a folder with room for ~3x the size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from builder.oci import layout as oci  # noqa: E402
from builder.publish import (  # noqa: E402
    distribute,  # noqa: E402
    package,
)
from builder.reporting import NullReporter  # noqa: E402
from conftest import RegistryProcess  # noqa: E402  (a real docker-registry process, as in the tests)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)



class _Events(NullReporter):
    """Keeps the push's event lines."""

    def __init__(self, seen: list[str]):
        self.seen = seen

    def event(self, message: str) -> None:
        self.seen.append(message)

def synthetic_model(folder: Path, size_mb: int, target: str, seed: int) -> Path:
    folder.mkdir(parents=True)
    block = os.urandom(1 << 20)
    with (folder / "model.onnx.data").open("wb") as f:
        for i in range(size_mb):
            f.write(block[:-8] + (seed * 100000 + i).to_bytes(8, "big"))  # distinct per target, cheap to make
    (folder / "model.onnx").write_bytes(os.urandom(200_000))
    (folder / "genai_config.json").write_text(json.dumps({"model": {"type": "qwen2", "decoder": {"filename": "model.onnx"}}}))
    (folder / "tokenizer.json").write_bytes(os.urandom(3_000_000).hex().encode())  # like a 6 MB tokenizer
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "olive-builder.json").write_text(json.dumps({
        "id": f"bench/{target}", "name": "bench", "version": "1.0", "tags": [f"bench:1.0-{target}"],
        "target": {"device": "cpu", "execution_provider": "CPUExecutionProvider", "precision": "int4"},
        "source": {"hub": "acme/bench", "resolved_revision": "0" * 40}, "tools": {"onnxruntime-genai": "0.14.1"}}))
    return folder


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_packaging(model: Path, runs: int, scratch: Path) -> None:
    def baseline() -> None:
        subprocess.run(f"tar -cf - -C {model.parent} {model.name} | sha256sum > /dev/null", shell=True, check=True)

    def ours() -> None:
        store = scratch / "store-run"
        shutil.rmtree(store, ignore_errors=True)
        package.package(model, oci.Store(store), created=T0)

    baseline(), ours()  # warm the page cache for both
    base, mine = [], []
    for i in range(runs):
        base.append(timed(baseline))
        mine.append(timed(ours))
        print(f"  run {i + 1}: tar|sha256sum {base[-1]:.2f}s  package {mine[-1]:.2f}s  ratio {mine[-1] / base[-1]:.2f}")
    b, m = statistics.median(base), statistics.median(mine)
    size = sum(p.stat().st_size for p in model.iterdir()) / 1e9
    print(f"packaging {size:.2f} GB: median tar|sha256sum {b:.2f}s, package {m:.2f}s -> ratio {m / b:.2f} (goal <= 1.2)")
    shutil.rmtree(scratch / "store-run", ignore_errors=True)


def bench_push(first: Path, second: Path, scratch: Path) -> None:
    if not shutil.which("docker-registry"):
        print("push: skipped (docker-registry is not installed)")
        return
    store = oci.Store(scratch / "store-push")
    a = package.package(first, store, created=T0)
    b = package.package(second, store, created=T0)
    registry = RegistryProcess(scratch / "registry").start()
    host = registry.host
    try:
        for label, ref in (("first push", a.artifact_ref), ("re-push, unchanged", a.artifact_ref),
                           ("second target", b.artifact_ref)):
            seen: list[str] = []
            t = time.perf_counter()
            r = distribute.push(store, [ref], host, "bench", reporter=_Events(seen))
            took = time.perf_counter() - t
            uploaded = [m.split()[-1] for m in seen if m.startswith("uploaded")]
            print(f"{label:20} {took:6.2f}s  uploaded {r.uploaded_bytes:>11} bytes in {r.uploaded} blob(s) "
                  f"{uploaded}; {r.existing} already there")
    finally:
        registry.stop()


def bench_determinism(model: Path, scratch: Path, rebuild: bool) -> None:
    one = package.package(model, oci.Store(scratch / "det-1"), created=T0)
    two = package.package(model, oci.Store(scratch / "det-2"), created=T0)
    print(f"same folder, two stores:  {one.artifact.digest}\n                          {two.artifact.digest}"
          f"  identical={one.artifact.digest == two.artifact.digest}")
    if not rebuild:
        return
    from tinymodel import make_tiny_model

    tiny = make_tiny_model(scratch / "tiny-hf")
    recipe = scratch / "recipes" / "tiny" / "cpu-int4.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(f"name: tiny\nversion: \"1.0\"\nmodel:\n  path: {tiny}\ntarget:\n  device: cpu\n  precision: int4\n")
    digests = []
    for i in (1, 2):
        env = {**os.environ, "SOURCE_DATE_EPOCH": "1767225600", "OLIVE_BUILDER_STORE": str(scratch / f"rebuild-{i}"),
               "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-m", "builder", "recipe", str(recipe), "--engine", "local", "-q",
                              "--no-image", "--no-push", "-o", str(scratch / f"rebuild-out-{i}")],
                             capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if "model artifact" in x), "")
        digests.append(line.split()[-1] if line else f"(build failed: {out.stderr[-300:]})")
    print(f"rebuilt twice (Olive ran twice): {digests[0]}\n                                 {digests[1]}"
          f"  identical={digests[0] == digests[1] and digests[0].startswith('sha256:')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rebuild", action="store_true", help="also build the tiny model twice (needs Olive here)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-package-"))
    try:
        first = synthetic_model(scratch / "bench-cpu-int4", args.size_mb, "cpu-int4", 1)
        bench_packaging(first, args.runs, scratch)
        second = synthetic_model(scratch / "bench-cpu-int8", args.size_mb // 4, "cpu-int8", 2)
        shutil.copyfile(first / "tokenizer.json", second / "tokenizer.json")  # same model: same tokenizer
        bench_push(first, second, scratch)
        bench_determinism(first, scratch, args.rebuild)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
