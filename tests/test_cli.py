"""The CLI: exit codes and messages for users, no tracebacks for their mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder import __version__
from conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
QWEN = REPO / "recipes" / "qwen2.5-0.5b-instruct" / "cpu-int4.yaml"


run = run_cli


def stub_model_recipe(tmp_path: Path) -> Path:
    """A valid recipe whose local model folder exists (enough to get past every preflight)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    recipe = tmp_path / "m" / "cpu-int4.yaml"
    recipe.parent.mkdir()
    recipe.write_text(f"name: m\nversion: '1'\nmodel:\n  path: {model}\ntarget:\n  device: cpu\n  precision: int4\n")
    return recipe


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and __version__ in out


def test_dry_run_prints_the_step_and_olive_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "recipe", str(QWEN), "--dry-run")
    assert code == 0, err
    step = json.loads(out)
    assert step["id"] == "qwen2.5-0.5b-instruct/cpu-int4"
    assert step["tags"] == ["qwen2.5-0.5b-instruct:1.0.0-cpu-int4"]
    # int4 by the block method: the model builder converts at fp32, the worker quantizes to 4 bits
    assert step["olive_config"]["passes"]["builder"]["precision"] == "fp32"
    assert step["quantize"]["bits"] == 4 and step["quantize"]["lm_head_bits"] == 8
    assert step["builder_image"].startswith("olive-builder-cpu:")


def test_dry_run_with_image_override(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "recipe", str(QWEN), "--dry-run", "--image", "mine:1")
    assert code == 0 and json.loads(out)["builder_image"] == "mine:1"


def test_missing_recipe_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "recipe", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert f"error: Recipe file {tmp_path / 'nope.yaml'} does not exist." in err
    assert "Traceback" not in err + out


def test_invalid_recipe_names_file_line_key(capsys: pytest.CaptureFixture[str]) -> None:
    bad = REPO / "tests" / "bad_recipes" / "unknown-nested-key.yaml"
    code, _, err = run(capsys, "recipe", str(bad), "--dry-run")
    assert code == 2
    assert f"{bad}:7: target.precison: unknown key. Perhaps you meant `precision`?" in err
    assert "Traceback" not in err


def test_list_shows_every_recipe_id(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", str(REPO / "recipes"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "DEVICE", "PRECISION", "MODEL", "TAG"]
    ids = [line.split()[0] for line in lines[1:]]
    assert ids == sorted(ids) and "qwen2.5-0.5b-instruct/cuda-fp16" in ids
    assert len(ids) == len(list((REPO / "recipes").glob("*/*.yaml")))


def test_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "--json", str(REPO / "recipes"))
    rows = json.loads(out)
    assert code == 0 and {r["id"] for r in rows} >= {"smollm2-135m-instruct/cpu-int4"}
    assert all(set(r) == {"id", "recipe", "device", "precision", "model", "tag"} for r in rows)


def test_list_reports_invalid_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "list", str(REPO / "tests" / "bad_recipes" / "fp16-on-cpu.yaml"))
    assert code == 2 and "fp16 needs device cuda" in err


def test_schema_command_matches_committed_copy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "schema")
    assert code == 0
    assert json.loads(out) == json.loads((REPO / "recipes" / "recipe.schema.json").read_text())


def test_no_docker_engine_suggests_local(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    code, out, err = run(capsys, "recipe", str(QWEN), "-o", str(tmp_path / "out"))
    assert code == 3
    assert f"No Docker engine answers at unix://{tmp_path}/no-such.sock" in err
    assert "--engine local" in err and "Traceback" not in err + out
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    recipe = stub_model_recipe(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "recipe", str(recipe), "--engine", "local", "-o", str(out_dir))
    assert code == 2 and f"The output folder {out_dir} already exists." in err and "--force" in err
    assert (out_dir / "keep.txt").read_text() == "mine"


def test_missing_local_model_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    recipe = tmp_path / "m" / "cpu-int4.yaml"
    recipe.parent.mkdir()
    recipe.write_text("name: m\nversion: '1'\nmodel:\n  path: ../nowhere\ntarget:\n  device: cpu\n  precision: int4\n")
    code, _, err = run(capsys, "recipe", str(recipe), "--engine", "local", "-o", str(tmp_path / "out"))
    assert code == 4
    assert f"The model folder {(tmp_path / 'nowhere').resolve()} does not exist." in err
    assert "model.path" in err and not (tmp_path / "out").exists()


def test_local_engine_without_olive_explains(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olive" else real(name, *a))
    recipe = stub_model_recipe(tmp_path)
    code, _, err = run(capsys, "recipe", str(recipe), "--engine", "local", "-o", str(tmp_path / "out"))
    assert code == 3 and "olive is not installed here" in err and "pip install" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "recipe", str(QWEN), "--precision", "int4")
    assert code == 2 and "No such option '--precision'" in err


def test_images_print_tags_are_content_derived(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "images", "--target", "all", "--print-tags")
    tags = out.split()
    assert code == 0 and [t.split(":")[0] for t in tags] == [
        "olive-builder-cpu", "olive-builder-cuda", "olive-builder-runtime-cpu", "olive-builder-runtime-cuda"]
    code, out2, _ = run(capsys, "images", "--print-tags", "--base-image", "other:1")
    assert out2.split()[0] != tags[0]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "x-1-py3-none-any.whl").write_bytes(b"x")
    code, out3, _ = run(capsys, "images", "--print-tags", "--wheels", str(wheels))
    assert out3.split()[0] not in (tags[0], out2.split()[0])


def test_serve_refuses_a_folder_that_is_not_a_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "serve", str(tmp_path))
    assert code == 4 and "holds no genai_config.json" in err and "Traceback" not in err
