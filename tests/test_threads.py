"""Compute threads: what the server, the check and the evaluation give onnxruntime
(``builder.contract.compute_threads``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder import contract
from builder.errors import UsageError


def _folder(tmp_path: Path, session_options: dict[str, object] | None) -> Path:
    decoder: dict[str, object] = {"filename": "model.onnx"}
    if session_options is not None:
        decoder["session_options"] = session_options
    (tmp_path / contract.GENAI_CONFIG).write_text(json.dumps({"model": {"decoder": decoder}}))
    return tmp_path


def test_usable_cpus_is_the_affinity_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    assert 1 <= contract.usable_cpus() <= len(os.sched_getaffinity(0))


def test_a_cgroup_quota_caps_the_threads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_read = Path.read_text

    def fake(self: Path, *a: object, **k: object) -> str:
        if str(self) == "/sys/fs/cgroup/cpu.max":
            return "150000 100000\n"  # 1.5 CPUs: two threads, not one
        return real_read(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(Path, "read_text", fake)
    assert contract.usable_cpus() == 2


def test_unset_gives_the_usable_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(contract.THREADS_ENV, raising=False)
    assert contract.compute_threads(_folder(tmp_path, {"log_id": "x"})) == contract.usable_cpus()
    assert contract.compute_threads(_folder(tmp_path, None)) == contract.usable_cpus()


def test_a_build_that_names_its_threads_keeps_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(contract.THREADS_ENV, "3")
    assert contract.compute_threads(_folder(tmp_path, {"intra_op_num_threads": 6})) is None


def test_the_env_names_the_threads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(contract.THREADS_ENV, "3")
    assert contract.compute_threads(_folder(tmp_path, None)) == 3


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", "100000"])
def test_a_bad_thread_count_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bad: str) -> None:
    monkeypatch.setenv(contract.THREADS_ENV, bad)
    with pytest.raises(UsageError, match=contract.THREADS_ENV):
        contract.compute_threads(_folder(tmp_path, None))


def test_the_overlay_is_what_onnxruntime_genai_is_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    overlays: list[str] = []

    class Config:
        def __init__(self, path: str) -> None:
            self.path = path

        def overlay(self, text: str) -> None:
            overlays.append(text)

        def clear_providers(self) -> None:
            overlays.append("cleared")

    class Og:
        pass

    og = Og()
    og.Config = Config  # type: ignore[attr-defined]
    monkeypatch.setenv(contract.THREADS_ENV, "2")
    contract.og_config(og, _folder(tmp_path, None), force_cpu=True)
    assert json.loads(overlays[0]) == {"model": {"decoder": {"session_options": {"intra_op_num_threads": 2}}}}
    assert overlays[1:] == ["cleared"]
    overlays.clear()
    contract.og_config(og, _folder(tmp_path, {"intra_op_num_threads": 1}))
    assert overlays == []


def test_a_measured_child_reports_its_own_peak_memory_not_its_parents() -> None:
    """The speed child is started by the build process (1 GB with torch). Linux carries
    ``ru_maxrss`` across exec, so the child reported the build's size; VmHWM is its own."""
    import subprocess
    import sys

    ballast = bytearray(400 << 20)  # the parent at 400+ MiB resident
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    code = ("import resource\nfrom builder.build.measure import _peak_rss_kb\n"
            "print(_peak_rss_kb(-1), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    own, inherited = int(out[0]) >> 10, int(out[1]) >> 10
    assert inherited >= 400, "ru_maxrss no longer carries the parent's peak here: the guard below proves nothing"
    assert 0 < own < 200, f"the child's own peak is {own} MiB"
    del ballast
