"""Planning is pure: recipe in, exact Olive config and build step out."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder import contract
from builder.recipe import format as recipe
from builder.recipe import plan

REPO = Path(__file__).resolve().parent.parent
IMAGE = "olive-builder-cpu:test"


def load_text(tmp_path: Path, text: str, target: str = "cpu-int4", model: str = "m") -> recipe.LoadedRecipe:
    path = tmp_path / model / f"{target}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return recipe.load(path)


BASE = "name: m\nversion: 1.0.0\nmodel:\n  hub: org/m\ntarget:\n  device: {device}\n  precision: {precision}\n"


def step_for(tmp_path: Path, device: str = "cpu", precision: str = "int4", extra: str = "") -> contract.BuildStep:
    text = BASE.format(device=device, precision=precision) + extra
    return plan.plan(load_text(tmp_path, text, f"{device}-{precision}"), IMAGE)


BUILDER_METHOD = "quantize:\n  method: builder\n"


def test_cpu_int4_and_int8_default_to_block_quantization_of_an_fp32_conversion(tmp_path: Path) -> None:
    for precision, bits in (("int4", 4), ("int8", 8)):
        step = step_for(tmp_path / precision, precision=precision)
        assert step.olive_config["passes"] == {"builder": {"type": "ModelBuilder", "precision": "fp32"}}
        assert step.quantize == {"bits": bits, "block_size": 32, "lm_head_bits": 8, "accuracy_level": 4,
                                 "exact_offsets": True}
    tuned = step_for(tmp_path / "t", extra="quantize:\n  block_size: 16\n  lm_head: fp32\n  accuracy_level: 0\n")
    assert tuned.quantize == {"bits": 4, "block_size": 16, "lm_head_bits": None, "accuracy_level": 0,
                              "exact_offsets": True}
    # a recipe that tunes the model builder keeps the model builder's int4
    kept = step_for(tmp_path / "k", extra="olive:\n  extra_options:\n    int4_accuracy_level: 4\n")
    assert kept.quantize is None and kept.olive_config["passes"]["builder"]["precision"] == "int4"
    assert step_for(tmp_path / "c", device="cuda", precision="int4").quantize is None


def test_int4_cpu_is_one_modelbuilder_pass(tmp_path: Path) -> None:
    step = step_for(tmp_path, extra=BUILDER_METHOD)
    assert step.quantize is None
    config = step.olive_config
    assert config["passes"] == {"builder": {"type": "ModelBuilder", "precision": "int4"}}
    assert config["input_model"] == {"type": "HfModel", "model_path": plan.MODEL_DIR}
    assert config["systems"]["target_system"]["accelerators"] == [
        {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}
    ]
    assert config["output_dir"] == plan.OUTPUT_DIR and config["cache_dir"] == plan.CACHE_DIR
    assert step.gpus is False and step.builder_image == IMAGE
    assert step.tags == ("m:1.0.0-cpu-int4",)
    assert step.model == contract.ModelRef(hub="org/m", revision="main", path=None, trust_remote_code=False)


def test_int8_is_fp32_modelbuilder_then_dynamic_quantization(tmp_path: Path) -> None:
    passes = step_for(tmp_path, precision="int8", extra=BUILDER_METHOD).olive_config["passes"]
    assert list(passes.items()) == [
        ("builder", {"type": "ModelBuilder", "precision": "fp32"}),
        ("quantize", {"type": "OnnxDynamicQuantization", "precision": "int8"}),
    ]


def test_cuda_uses_the_gpu_accelerator_and_asks_for_gpus(tmp_path: Path) -> None:
    step = step_for(tmp_path, device="cuda", precision="fp16")
    assert step.olive_config["systems"]["target_system"]["accelerators"] == [
        {"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}
    ]
    assert step.gpus is True and step.execution_provider == "CUDAExecutionProvider"


def test_generation_defaults_and_extra_options_reach_modelbuilder(tmp_path: Path) -> None:
    extra = "generation:\n  max_length: 128\n  top_k: 5\nolive:\n  extra_options:\n    int4_block_size: 32\n"
    builder = step_for(tmp_path, extra=extra).olive_config["passes"]["builder"]
    assert builder["search"] == {"max_length": 128, "top_k": 5}
    assert builder["extra_options"] == {"int4_block_size": 32}


def test_remote_code_only_when_asked(tmp_path: Path) -> None:
    assert "load_kwargs" not in step_for(tmp_path).olive_config["input_model"]
    text = BASE.format(device="cpu", precision="int4").replace("  hub: org/m\n", "  hub: org/m\n  trust_remote_code: true\n")
    config = plan.plan(load_text(tmp_path, text), IMAGE).olive_config
    assert config["input_model"]["load_kwargs"] == {"trust_remote_code": True}


def test_escape_hatch_passes_replace_the_generated_ones(tmp_path: Path) -> None:
    extra = "olive:\n  passes:\n    mb:\n      type: ModelBuilder\n      precision: int4\n      int4_block_size: 64\n"
    assert step_for(tmp_path, extra=extra).olive_config["passes"] == {
        "mb": {"type": "ModelBuilder", "precision": "int4", "int4_block_size": 64}
    }


def test_plan_does_no_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_text(tmp_path, BASE.format(device="cpu", precision="int4"))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("plan() touched the filesystem")

    monkeypatch.setattr("builtins.open", forbidden)
    monkeypatch.setattr(Path, "read_text", forbidden)
    monkeypatch.setattr(Path, "exists", forbidden)
    assert plan.plan(loaded, IMAGE).id == "m/cpu-int4"


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: recipe.recipe_id(p))
def test_every_shipped_recipe_plans(path: Path) -> None:
    step = plan.plan(recipe.load(path), IMAGE)
    assert step.olive_config["passes"]["builder"]["type"] == "ModelBuilder"
    assert step.gpus == (step.device == "cuda")
