"""The build cache and the matrix, timed.

1. `build recipe` of a tiny model (local engine, pushed to a real registry started here),
   then the same recipe again: wall time of the second run and how many Olive runs it made
   (each run writes a build log; a cache hit writes none). Then the same from a second,
   empty machine state (fresh local store, state and cache folders) with only the
   registry shared. The first build is the baseline the ratio is taken against.
2. `build matrix` over 100 recipes in a git repository: wall time of the whole CLI
   process, plain and with --changed-since (one recipe changed).

    python benchmarks/bench_cache.py [--runs 5]

Needs Olive here (pip install -e '.[local]') and docker-registry on PATH.
"""

from __future__ import annotations

import argparse
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

from conftest import RegistryProcess  # noqa: E402  (a real docker-registry process, as in the tests)
from tinymodel import make_tiny_model  # noqa: E402


def cli(args: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, env=env, cwd=cwd)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"build {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return took, proc


def machine(root: Path) -> dict[str, str]:
    """A private machine state: local store, logs, caches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLIVE_BUILDER_")}
    env.update({"PYTHONPATH": str(REPO), "XDG_DATA_HOME": str(root / "data"), "XDG_STATE_HOME": str(root / "state"),
                "XDG_CACHE_HOME": str(root / "cache"), "DOCKER_CONFIG": str(root / "docker")})
    return env


def olive_runs(root: Path) -> int:
    logs = root / "state" / "olive-builder" / "logs"
    return len(list(logs.glob("*.log"))) if logs.exists() else 0


def bench_cache(scratch: Path, runs: int) -> None:
    model = make_tiny_model(scratch / "tiny-hf")
    recipe = scratch / "recipes" / "tiny" / "cpu-int4.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(f"name: tiny\nversion: \"1.0\"\nmodel:\n  path: {model}\ntarget:\n  device: cpu\n  precision: int4\n")
    registry = RegistryProcess(scratch / "registry").start()
    host = registry.host
    try:
        one = scratch / "machine-1"
        args = [str(recipe), "--engine", "local", "-q", "--no-image", "--push", f"{host}/bench", "-o", str(one / "out")]
        first, _ = cli(["recipe", *args], machine(one))
        print(f"first build (Olive ran {olive_runs(one)}x): {first:.2f}s")
        again = []
        for _ in range(runs):
            took, out = cli(["recipe", *args], machine(one))
            again.append(took)
        print(f"same inputs again, same machine: median {statistics.median(again):.2f}s of {runs} "
              f"(min {min(again):.2f}, max {max(again):.2f}); Olive runs in total: {olive_runs(one)}; "
              f"ratio to the first build {statistics.median(again) / first:.3f}")
        fresh = []
        for i in range(runs):
            other = scratch / f"machine-{i + 2}"
            took, out = cli(["recipe", *args[:-1], str(other / "out")], machine(other))
            fresh.append(took)
            assert olive_runs(other) == 0, "Olive ran on a fresh machine"
        print(f"same inputs, fresh machine (empty store/state/caches, shared registry): median "
              f"{statistics.median(fresh):.2f}s of {runs}; Olive runs: 0; last said: {out.stdout.splitlines()[0]}")
    finally:
        registry.stop()


def bench_matrix(scratch: Path, runs: int) -> None:
    repo = scratch / "many"
    for i in range(50):
        for device, precision in (("cpu", "int4"), ("cuda", "fp16")):
            folder = repo / "recipes" / f"model-{i:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{device}-{precision}.yaml").write_text(
                f"name: model-{i:03d}\nversion: \"1.0\"\nmodel:\n  hub: org/model-{i:03d}\n"
                f"target:\n  device: {device}\n  precision: {precision}\n")
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=repo, check=True)
    base = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    changed = repo / "recipes" / "model-007" / "cpu-int4.yaml"
    changed.write_text(changed.read_text().replace("int4", "int8"))
    env = machine(scratch / "matrix-machine")
    plain = [cli(["matrix"], env, repo)[0] for _ in range(runs)]
    since = []
    for _ in range(runs):
        took, out = cli(["matrix", "--changed-since", base], env, repo)
        since.append(took)
    n = out.stdout.count('"id"')
    startup = [cli(["--version"], env, repo)[0] for _ in range(runs)]
    print(f"build matrix over 100 recipes: median {statistics.median(plain):.2f}s; --changed-since "
          f"(1 changed, {n} listed): median {statistics.median(since):.2f}s; `build --version` alone: "
          f"{statistics.median(startup):.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        if shutil.which("docker-registry"):
            bench_cache(scratch, args.runs)
        else:
            print("cache: skipped (docker-registry is not installed)")
        bench_matrix(scratch, args.runs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
