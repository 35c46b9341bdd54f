"""The evaluation of a finetuned build (issue 15): the adapted ONNX model against the finetuned
PyTorch model (the Hugging Face base with the PEFT adapter merged).

The finetuned model is made here with Olive itself, as a finetune recipe makes it: LoRA on a
small JSONL written by the test, ModelBuilder at fp32, ExtractAdapters (about 20 s on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.build import evaluate as ev
from builder.build import source_figures
from conftest import need
from tinymodel import make_trained_tiny_model

pytestmark = pytest.mark.integration

COLOURS = ("blue", "red", "green")


def _dataset(path: Path) -> Path:
    lines = [{"instruction": f"what color is item {i}?", "response": f"the item is {' '.join([COLOURS[i % 3]] * 3)}"}
             for i in range(48)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _olive_finetune(root: Path, base: Path) -> tuple[Path, Path]:
    """(the ONNX output folder with adapters/colors.onnx_adapter, the PEFT adapter folder)."""
    config = {
        "input_model": {"type": "HfModel", "model_path": str(base)},
        "systems": {"s": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [{
            "name": "train_data", "type": "HuggingfaceContainer",
            "load_dataset_config": {"data_name": "json", "split": "train",
                                    "data_files": [str(_dataset(root / "data.jsonl"))]},
            "pre_process_data_config": {"text_template": "### Question: {instruction}\n### Answer: {response}",
                                        "chat_template": False, "max_seq_len": 64, "add_special_tokens": False,
                                        "max_samples": 256},
            "dataloader_config": {"batch_size": 1}}],
        "passes": {
            "finetune": {"type": "LoRA", "train_data_config": "train_data", "torch_dtype": "float32",
                         "training_args": {"max_steps": 30, "seed": 0, "learning_rate": 0.003},
                         "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "builder": {"type": "ModelBuilder", "precision": "fp32"},
            "extract": {"type": "ExtractAdapters", "save_format": "onnx_adapter"},
        },
        "host": "s", "target": "s", "evaluate_input_model": False,
        "cache_dir": str(root / "olive-cache"), "output_dir": str(root / "out"), "log_severity_level": 3,
    }
    (root / "olive.json").write_text(json.dumps(config))
    env = {**os.environ, "CI": "1", "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(root / "hf-hub"), "XDG_CACHE_HOME": str(root / "xdg")}
    proc = subprocess.run([sys.executable, "-m", "olive", "run", "--config", str(root / "olive.json")], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and (root / "out" / "genai_config.json").is_file(), proc.stderr[-3000:]
    out = root / "out"
    (out / "adapters").mkdir()
    (out / "adapter_weights.onnx_adapter").rename(out / "adapters" / "colors.onnx_adapter")
    # Olive keeps the LoRA pass's output (the PEFT adapter folder) in its cache only.
    peft = [p.parent for p in (root / "olive-cache").rglob("adapter_config.json")]
    assert len(peft) == 1, peft
    return out, peft[0]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the HF base, the ONNX output folder, the PEFT adapter folder)."""
    for module in ("torch", "peft", "olive", "onnxruntime_genai"):
        need(importlib.util.find_spec(module) is not None, f"{module} is not installed")
    root = tmp_path_factory.mktemp("finetuned")
    # Trained on the evaluation text, so its top-1 choices mean something and the agreement gates apply.
    base = make_trained_tiny_model(root / "base-hf")
    out, peft = _olive_finetune(root, base)
    return base, out, peft


def test_the_adapted_onnx_model_matches_the_finetuned_pytorch_model(finetuned) -> None:  # type: ignore[no-untyped-def]
    base, out, peft = finetuned
    onnx_adapter = out / "adapters" / "colors.onnx_adapter"
    adapter = ev.AdapterUnderTest("colors", peft, onnx_adapter)
    result = ev.evaluate(out, base, precision="fp32", adapter=adapter,
                         settings=ev.Settings(max_tokens=512))
    acc = result.accuracy
    assert result.passed, result.failures
    assert abs(acc["perplexity_ratio"] - 1.0) <= 1e-3
    assert acc["top1_agreement"] == 1.0 and acc["greedy_prefix_min"] == source_figures.GREEDY_TOKENS
    assert "min_top1_agreement" in result.gates  # the trained base: agreement is gated, not skipped
    assert result.adapter is not None
    assert result.adapter["name"] == "colors" and result.adapter["mode"] == "adapter"
    assert result.adapter["file"] == "colors.onnx_adapter"
    assert result.adapter["sha256"].startswith("sha256:") and len(result.adapter["sha256"]) == 71
    assert result.speed["measured"] and result.speed["decode_tokens_per_s"] > 0  # with the adapter active
    # the record, the table and the annotations name the adapter
    data = result.to_json()
    assert "colors (colors.onnx_adapter, sha256:" in ev.format_table(data)
    assert ev.manifest_annotations(data)["org.olive-builder.eval.adapter"].startswith("colors (colors.onnx_adapter")


def test_an_adapter_that_is_not_applied_on_one_side_is_caught(finetuned) -> None:  # type: ignore[no-untyped-def]
    base, out, peft = finetuned
    settings = ev.Settings(max_tokens=256, speed=False)
    # the adapted ONNX model against the plain base: the adapter moved the model
    moved = ev.evaluate(out, base, precision="fp32", settings=settings,
                        adapter=ev.AdapterUnderTest("colors", None, out / "adapters" / "colors.onnx_adapter"))
    # merged mode on a model that does not hold the adapter: nothing is loaded, so the
    # ONNX base is measured against the finetuned model
    missing = ev.evaluate(out, base, precision="fp32", settings=settings,
                          adapter=ev.AdapterUnderTest("colors", peft, None))
    assert missing.adapter == {"name": "colors", "mode": "merged"}
    for result in (moved, missing):
        assert not result.passed, result.accuracy
        assert result.accuracy["top1_agreement"] < 0.95 or result.accuracy["greedy_prefix_mean"] < source_figures.GREEDY_TOKENS
        assert abs(result.accuracy["perplexity_ratio"] - 1.0) > 1e-3


def test_evaluate_command_line_with_an_adapter(finetuned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, out, peft = finetuned
    env = {**os.environ, "PYTHONPATH": str(Path(ev.__file__).resolve().parents[3])}
    cmd = [sys.executable, "-m", "builder.build.evaluate", str(out), "--against", str(base), "--precision", "fp32",
           "--max-tokens", "256", "--no-speed", "--json"]
    proc = subprocess.run([*cmd, "--adapter", "colors", "--peft", str(peft)], capture_output=True, text=True,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["adapter"]["name"] == "colors" and data["accuracy"]["top1_agreement"] == 1.0
    # a missing adapter file or a folder that is not a PEFT adapter: a clear error, no traceback
    for extra, message in ((["--adapter", "nope", "--peft", str(peft)], "has no file"),
                           (["--adapter", "colors", "--peft", str(tmp_path)], "holds no adapter_config.json")):
        proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.docker
def test_the_adapter_is_evaluated_the_same_in_the_builder_image(finetuned, cpu_builder_image) -> None:  # type: ignore[no-untyped-def]
    """`evaluate_in_image` (hosts without the build stack): the adapter file and the PEFT folder
    are mounted read-only beside the model and the source; the figures are those measured here."""
    from builder.build.engine import DockerEngine

    base, out, peft = finetuned
    adapter = ev.AdapterUnderTest("colors", peft, out / "adapters" / "colors.onnx_adapter")
    settings = ev.Settings(max_tokens=256, speed=False)
    lines: list[str] = []
    there = ev.evaluate_in_image(DockerEngine(), cpu_builder_image, out, base, precision="fp32", device="cpu",
                                 settings=settings, text_path=None, on_line=lines.append, adapter=adapter)
    here = ev.evaluate(out, base, precision="fp32", settings=settings, adapter=adapter)
    assert there.passed, (there.failures, lines[-20:])
    assert there.adapter == here.adapter and there.adapter is not None and there.adapter["name"] == "colors"
    assert there.accuracy["top1_agreement"] == here.accuracy["top1_agreement"] == 1.0
    assert there.accuracy["perplexity_ratio"] == pytest.approx(here.accuracy["perplexity_ratio"], abs=1e-4)
