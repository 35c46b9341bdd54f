"""The online Hugging Face path, against a fake Hub (tests/fake_hub.py, a real server process on
127.0.0.1 reached through HF_ENDPOINT) that serves the tiny model: revision resolution,
downloads through huggingface_hub in the worker, lock-file hashes, a gated model with HF_TOKEN,
and 401/404/429/5xx and slow answers. Each failure is a clear error in bounded time, with
nothing left behind and no token printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from builder.source import hub  # noqa: E402
from conftest import no_partials, run_cli, write_recipe  # noqa: E402

SERVER = Path(__file__).parent / "fake_hub.py"
COMMIT = "1234567890abcdef1234567890abcdef12345678"
GATED_COMMIT = "fedcba0987654321fedcba0987654321fedcba09"
TOKEN = "hf_GatedTokenNeverPrinted0123456789"


class FakeHub:
    def __init__(self, root: Path, model: Path):
        self.model = model
        self.log = root / "hub-requests.jsonl"
        self.log.touch()
        config = {"repos": {
            "acme/tiny": {"dir": str(model), "commit": COMMIT, "branches": ["main", "v1"]},
            "acme/gated": {"dir": str(model), "commit": GATED_COMMIT, "token": TOKEN},
            "acme/busy": {"dir": str(model), "commit": COMMIT, "fail": 429},
            "acme/down": {"dir": str(model), "commit": COMMIT, "fail": 503},
            "acme/locked": {"dir": str(model), "commit": COMMIT, "fail": 401},
            "acme/slow": {"dir": str(model), "commit": COMMIT, "slow": 30},
        }}
        (root / "hub.json").write_text(json.dumps(config))
        with (root / "hub.err").open("w") as err:
            self.proc = subprocess.Popen([sys.executable, str(SERVER), str(root / "hub.json"), str(self.log)],
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        assert self.proc.stdout is not None
        self.endpoint = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def requests(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def fake_hub(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = FakeHub(tmp_path, tiny_model)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield server
    server.stop()


def _recipe(tmp_path: Path, repo: str, revision: str = "main", target: str = "cpu-fp32") -> Path:
    return write_recipe(tmp_path / "recipes" / "tiny-hub", target, f"""
        name: tiny-hub
        version: 0.1.0
        model:
          hub: {repo}
          revision: {revision}
        target:
          device: cpu
          precision: fp32
        generation:
          max_length: 64
        """)


def test_revisions_resolve_through_the_hub_api(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub.resolve("acme/tiny", "main") == COMMIT
    assert hub.resolve("acme/tiny", "v1") == COMMIT
    assert hub.resolve("acme/tiny", "no-such-branch") is None
    assert hub.resolve("acme/nothing", "main") is None
    assert hub.resolve("acme/gated", "main") is None  # 401 without a token
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub.resolve("acme/gated", "main") == GATED_COMMIT
    for repo in ("acme/busy", "acme/down", "acme/locked"):
        start = time.monotonic()
        assert hub.resolve(repo, "main") is None
        assert time.monotonic() - start < 5
    start = time.monotonic()
    assert hub.resolve("acme/slow", "main") is None  # a Hub that does not answer: given up on, not waited for
    assert time.monotonic() - start < 15
    gated = [r for r in fake_hub.requests() if "gated" in str(r["path"])]
    assert [r["token"] for r in gated] == [False, True]


def test_a_hub_model_builds_locks_and_rebuilds_from_the_cache(fake_hub: FakeHub, tmp_path: Path, local_engine_ready: None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, "acme/tiny")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "recipe", str(recipe), "--engine", "local", "-o", str(out), "-q",
                                "--store", str(tmp_path / "store"))
    assert code == 0, err
    record = json.loads((out / "olive-builder.json").read_text())
    assert record["source"]["resolved_revision"] == COMMIT
    downloads = [r["path"] for r in fake_hub.requests() if "/resolve/" in str(r["path"])]
    assert any(p.endswith("/config.json") for p in downloads)
    # the lock file records the commit and the hash of every file the build downloaded
    lock_file = recipe.parent / "olive-builder.lock"
    code, stdout, err = run_cli(capsys, "lock", str(recipe.parent), "--lock", str(lock_file))
    assert code == 0, err
    entry = json.loads(lock_file.read_text())["recipes"]["tiny-hub/cpu-fp32"]
    assert entry["commit"] == COMMIT and entry["revision"] == "main"
    from builder.contract import sha256_file

    assert entry["files"]["config.json"] == sha256_file(fake_hub.model / "config.json")
    assert entry["files"].keys() >= {"config.json", "tokenizer.json"}
    # the same inputs again: a cache hit, no Olive and no download
    before = len(fake_hub.requests())
    code, stdout, err = run_cli(capsys, "recipe", str(recipe), "--engine", "local", "-o", str(tmp_path / "again"),
                                "--store", str(tmp_path / "store"))
    assert code == 0, err
    assert "was built before" in stdout + err
    assert not any("/resolve/" in str(r["path"]) for r in fake_hub.requests()[before:])


@pytest.mark.parametrize("repo,token,expect", [
    ("acme/gated", None, "is gated"),
    ("acme/gated", "hf_WrongTokenAlsoNeverPrinted99", "is gated"),
    ("acme/nothing", None, "was not found on the Hugging Face Hub"),
    ("acme/busy", None, "The Hugging Face Hub answered 429 for acme/busy"),
    ("acme/down", None, "The Hugging Face Hub answered 503 for acme/down"),
], ids=["gated-no-token", "gated-wrong-token", "404", "429", "503"])
def test_hub_failures_are_clear_and_quick(fake_hub: FakeHub, tmp_path: Path, local_engine_ready: None,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                          repo: str, token: str | None, expect: str) -> None:
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    recipe = _recipe(tmp_path, repo)
    out = tmp_path / "out"
    start = time.monotonic()
    code, stdout, err = run_cli(capsys, "recipe", str(recipe), "--engine", "local", "-o", str(out),
                                "--store", str(tmp_path / "store"))
    took = time.monotonic() - start
    assert code == 4, stdout + err
    assert expect in err and "Traceback (most recent call last)" not in err.split("Cause:")[0]
    assert took < 60, f"took {took:.0f} s"
    assert not out.exists() and no_partials(tmp_path) == []
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "state").rglob("*.log"))
    for secret in (TOKEN, token or TOKEN):
        assert secret not in stdout + err + logs


def test_a_gated_model_downloads_with_its_token(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """What the worker does (huggingface_hub's snapshot_download), without building; in a child
    process, since huggingface_hub reads HF_ENDPOINT when it is imported."""
    code = ("import json; from builder.build.worker import fetch_model; from builder.contract import ModelRef; "
            "print(json.dumps(fetch_model(ModelRef(hub='acme/gated', revision=None, path=None, "
            f"trust_remote_code=False, resolved={GATED_COMMIT!r}), None)))")
    env = {**os.environ, "HF_TOKEN": TOKEN}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, commit = json.loads(proc.stdout.strip().splitlines()[-1])
    assert commit == GATED_COMMIT and (Path(path) / "config.json").is_file()
    assert Path(path).is_relative_to(Path(os.environ["HF_HOME"]))
    assert all(r["token"] for r in fake_hub.requests() if "gated" in str(r["path"]))
    assert TOKEN not in proc.stdout + proc.stderr
    assert time.monotonic() - start < 60
