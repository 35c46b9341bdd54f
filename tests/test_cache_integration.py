"""The build cache with real parts: real Olive builds, the local store, a real registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder.oci.registry import Registry
from conftest import run_cli, tiny_recipe

pytestmark = pytest.mark.integration
TAG = "tiny-qwen2:0.1.0-cpu-int4"


def build(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "recipe", *argv)


def olive_runs() -> int:
    """Builds that ran (each writes a log); a cache hit writes none."""
    logs = Path(os.environ["XDG_STATE_HOME"]) / "olive-builder" / "logs"
    return len(list(logs.glob("*.log"))) if logs.exists() else 0


def digest_of_line(out: str, label: str) -> str:
    return next(line.split()[-1] for line in out.splitlines() if line.strip().startswith(label))


def test_a_second_build_of_the_same_inputs_comes_from_the_local_store(capsys, tmp_path, tiny_model,  # type: ignore[no-untyped-def]
                                                                      local_engine_ready):
    recipe = tiny_recipe(tmp_path, tiny_model)
    out = tmp_path / "out"
    code, first, err = build(capsys, str(recipe), "--engine", "local", "-q", "--no-image", "-o", str(out))
    assert code == 0, err
    assert olive_runs() == 1
    key = json.loads((out / "olive-builder.json").read_text())["cache_key"]
    assert key.startswith("sha256:")

    code, second, err = build(capsys, str(recipe), "--engine", "local", "-q", "--no-image", "-o", str(out))
    assert code == 0, err
    assert olive_runs() == 1, "Olive ran again for unchanged inputs"
    assert "was built before" in err and "is already this build" in err and second.startswith("Cached ")
    assert digest_of_line(second, "model artifact") == digest_of_line(first, "model artifact")

    # another output folder: unpacked from the store, the very same files
    code, third, err = build(capsys, str(recipe), "--engine", "local", "-q", "--no-image", "-o", str(tmp_path / "o2"))
    assert code == 0, err and olive_runs() == 1
    for f in out.iterdir():
        assert (tmp_path / "o2" / f.name).read_bytes() == f.read_bytes()

    # --no-cache builds; a changed input builds
    code, _, err = build(capsys, str(recipe), "--engine", "local", "-q", "--no-image", "--no-cache", "--force",
                         "-o", str(out))
    assert code == 0, err and olive_runs() == 2
    changed = tiny_recipe(tmp_path / "changed", tiny_model)
    changed.write_text(changed.read_text() + "olive:\n  extra_options:\n    int4_block_size: 16\n")
    code, _, err = build(capsys, str(changed), "--engine", "local", "-q", "--no-image", "-o", str(tmp_path / "o3"))
    assert code == 0, err
    assert olive_runs() == 3
    assert json.loads((tmp_path / "o3" / "olive-builder.json").read_text())["cache_key"] != key


@pytest.mark.docker
def test_a_fresh_machine_finds_the_build_in_the_registry(capsys, tmp_path, tiny_model, local_engine_ready,  # type: ignore[no-untyped-def]
                                                         runtime_image, registry, monkeypatch):
    recipe = tiny_recipe(tmp_path, tiny_model)
    dest = f"{registry.host}/team"
    code, first, err = build(capsys, str(recipe), "--engine", "local", "-q", "-o", str(tmp_path / "out"), "--push", dest)
    assert code == 0, err
    assert olive_runs() == 1
    artifact, image = digest_of_line(first, "model artifact"), digest_of_line(first, "runnable image")

    # a second machine: empty local store, empty state; only the registry is shared. A version bump
    # is a new tag for the same model.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "machine-2" / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "machine-2" / "state"))
    bumped = tiny_recipe(tmp_path / "bumped", tiny_model)
    bumped.write_text(bumped.read_text().replace("version: 0.1.0", "version: 0.1.1"))
    code, out, err = build(capsys, str(bumped), "--engine", "local", "-q", "-o", str(tmp_path / "out2"), "--push", dest)
    assert code == 0, err
    assert olive_runs() == 0, "Olive ran on the second machine"
    assert "nothing downloaded" in out and not (tmp_path / "out2").exists()
    reg = Registry(registry.host)
    assert reg.get_manifest("team/tiny-qwen2", "0.1.1-cpu-int4")[2] == artifact
    assert reg.get_manifest("team/tiny-qwen2", "0.1.1-cpu-int4-serve")[2] == image
    assert reg.get_manifest("team/tiny-qwen2", "0.1.0-cpu-int4")[2] == artifact
