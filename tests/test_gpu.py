"""CUDA targets on a real GPU. Skipped ("no GPU") where there is none, as in CI here."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from builder.cli import main
from conftest import write_recipe

pytestmark = [pytest.mark.integration, pytest.mark.gpu]


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")  # session: set up before the session-wide Docker fixture, so "no GPU" wins
def gpu() -> None:
    if not _has_gpu():
        pytest.skip("no GPU: nvidia-smi finds none")


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_cuda_build_generates_on_the_gpu(gpu, capsys, tmp_path, tiny_model, docker_client, precision):  # type: ignore[no-untyped-def]
    from builder.build import images

    spec = images.image_spec("cuda")
    try:
        docker_client.images.get(spec.tag)
    except Exception:  # noqa: BLE001
        images.build_image(docker_client, spec, lambda line: None)
    recipe = write_recipe(
        tmp_path / "recipes" / "tiny-qwen2",
        f"cuda-{precision}",
        f"name: tiny-qwen2\nversion: 0.1.0\nmodel:\n  path: {tiny_model}\ntarget:\n  device: cuda\n  precision: {precision}\n",
    )
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["recipe", str(recipe), "-o", str(out)])
    stdout, err = capsys.readouterr()
    assert info.value.code == 0, err
    assert "generated 8 tokens" in stdout  # the check ran with the CUDA execution provider
    provider_options = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"][
        "provider_options"
    ]
    assert any("cuda" in option for option in provider_options), provider_options
