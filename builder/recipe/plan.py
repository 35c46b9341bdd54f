"""Planning: a validated recipe becomes one BuildStep. Pure: no files, no network, no engine.

The Olive config in a step is exact except for three placeholders that the worker fills
with the paths it sees (they differ between a container and the host):
``${MODEL_DIR}``, ``${OUTPUT_DIR}`` and ``${CACHE_DIR}``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.build.check import REQUIRED_FILES, TOKENIZER_FILES  # what the check will demand of the output
from builder.contract import CACHE_DIR, DATA_DIR, MODEL_DIR, OUTPUT_DIR, BuildStep, ModelRef
from builder.errors import PlanError
from builder.recipe.format import Finetune, LoadedRecipe, dataset_path, evaluation_text, quantization
from builder.targets import DEVICES


def olive_passes(loaded: LoadedRecipe) -> dict[str, dict[str, Any]]:
    """The Olive passes for a recipe: ModelBuilder at the target precision (int8: fp32 + dynamic quantization)."""
    r = loaded.recipe
    if r.olive is not None and r.olive.passes is not None:
        return copy.deepcopy(dict(r.olive.passes))
    passes: dict[str, dict[str, Any]] = {}
    ft = r.finetune
    if ft is not None:
        passes["finetune"] = lora_pass(ft)
        if ft.merge:  # a plain HF model with the adapter in its weights, converted as any model
            passes["merge"] = {"type": "MergeAdapterWeights"}
    precision = r.target.precision
    block = quantization(r) is not None  # ModelBuilder at fp32; the worker block-quantizes its graph
    mb: dict[str, Any] = {"type": "ModelBuilder", "precision": "fp32" if precision == "int8" or block else precision}
    if r.generation is not None:
        search = r.generation.model_dump(exclude_none=True)
        if search:
            mb["search"] = search
    if r.olive is not None and r.olive.extra_options:
        mb["extra_options"] = dict(r.olive.extra_options)
    passes["builder"] = mb
    if precision == "int8" and not block:
        passes["quantize"] = {"type": "OnnxDynamicQuantization", "precision": "int8"}
    if ft is not None and not ft.merge:
        # The LoRA weights become optional graph inputs (the graph alone is the base model) and
        # go to adapter_weights.onnx_adapter, which og.Adapters loads.
        passes["extract"] = {"type": "ExtractAdapters", "save_format": "onnx_adapter"}
    return passes


TRAIN_DATA = "train_data"


def lora_pass(ft: Finetune) -> dict[str, Any]:
    """Olive's LoRA (or QLoRA) pass for a recipe's `finetune:` section."""
    spec: dict[str, Any] = {
        "type": "QLoRA" if ft.method == "qlora" else "LoRA",
        "train_data_config": TRAIN_DATA,
        # LoRA trains in fp32 (exact, and the CPU's kernels); QLoRA computes in bf16 on its 4-bit base.
        "torch_dtype": "bfloat16" if ft.method == "qlora" else "float32",
        "training_args": {
            "max_steps": ft.max_steps,
            "learning_rate": ft.learning_rate,
            "seed": ft.seed,
            "data_seed": ft.seed,
            "per_device_train_batch_size": ft.batch_size,
        },
        "r": ft.lora.r,
        "alpha": ft.lora.alpha,
        "lora_dropout": ft.lora.dropout,
    }
    if ft.lora.target_modules is not None:
        spec["target_modules"] = list(ft.lora.target_modules)
    return spec


def data_configs(loaded: LoadedRecipe) -> list[dict[str, Any]]:
    """The training data for Olive: the dataset's files as DATA_DIR/<i><suffix> (execute mounts them)."""
    ft = loaded.recipe.finetune
    if ft is None:
        return []
    names = dataset_names(loaded)
    loader = "csv" if names and names[0].lower().endswith(".csv") else "json"
    return [{
        "name": TRAIN_DATA,
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": loader, "split": "train",
                                "data_files": [f"{DATA_DIR}/{i}{Path(n).suffix.lower()}" for i, n in enumerate(names)]},
        "pre_process_data_config": {"text_template": ft.template, "chat_template": False,
                                    "max_seq_len": ft.max_seq_len, "add_special_tokens": False},
        "dataloader_config": {"batch_size": ft.batch_size},
    }]


def dataset_names(loaded: LoadedRecipe) -> list[str]:
    """The dataset's files as the recipe names them (a local file, or files of the Hub dataset)."""
    ft = loaded.recipe.finetune
    if ft is None:
        return []
    if ft.dataset.path is not None:
        return [ft.dataset.path]
    return list(ft.dataset.files or [])


def finetune_plan(loaded: LoadedRecipe) -> dict[str, Any] | None:
    """What the worker needs beyond the Olive config: the adapter's name and mode, and the
    settings and dataset to record. ``files`` are host paths of local datasets (execute mounts
    them); a Hub dataset's are filled in by the pipeline once it is downloaded."""
    ft = loaded.recipe.finetune
    if ft is None:
        return None
    local = dataset_path(loaded.recipe, loaded.path)
    ds = ft.dataset
    return {
        "adapter": ft.adapter,
        "mode": "merged" if ft.merge else "adapter",
        "method": ft.method,
        "dataset": {"source": "file" if local is not None else "hub", "hub": ds.hub, "revision": ds.revision,
                    "names": dataset_names(loaded), "files": [str(local)] if local is not None else []},
        "settings": ft.model_dump(mode="json", exclude={"dataset", "adapter", "merge"}),
    }


def olive_config(loaded: LoadedRecipe) -> dict[str, Any]:
    r = loaded.recipe
    input_model: dict[str, Any] = {"type": "HfModel", "model_path": MODEL_DIR}
    if r.model.trust_remote_code:
        input_model["load_kwargs"] = {"trust_remote_code": True}
    return {
        "input_model": input_model,
        "systems": {
            "target_system": {
                "type": "LocalSystem",
                "accelerators": [
                    {"device": DEVICES[r.target.device].olive_device, "execution_providers": [r.target.execution_provider]}
                ],
            }
        },
        **({"data_configs": data_configs(loaded)} if r.finetune is not None else {}),
        "passes": olive_passes(loaded),
        "host": "target_system",
        "target": "target_system",
        "evaluate_input_model": False,
        "cache_dir": CACHE_DIR,
        "output_dir": OUTPUT_DIR,
        "log_severity_level": 1,
    }


def quantize_plan(loaded: LoadedRecipe) -> dict[str, Any] | None:
    """The worker's block quantization after the fp32 conversion (``builder.build.quantize.Settings``
    as JSON); None where the model builder or Olive quantizes."""
    q = quantization(loaded.recipe)
    if q is None:
        return None
    return {"bits": 4 if loaded.recipe.target.precision == "int4" else 8, "block_size": q.block_size,
            "lm_head_bits": {"int8": 8, "int4": 4, "fp32": None}[q.lm_head], "accuracy_level": q.accuracy_level,
            "exact_offsets": q.exact_offsets}


def evaluate_settings(loaded: LoadedRecipe) -> dict[str, Any]:
    """The recipe's `evaluate:` section as the worker reads it (builder.build.evaluate.gates.Settings.from_json)."""
    ev = loaded.recipe.evaluate
    if ev is not None and not ev.enabled:
        return {"enabled": False}
    out: dict[str, Any] = {"enabled": True}
    if ev is not None:
        if ev.gates is not None:
            out["gates"] = ev.gates.model_dump(exclude_none=True)
        text = evaluation_text(loaded.recipe, loaded.path)
        if text is not None:
            out["text"] = str(text)  # a host path: execute mounts it into the builder
        elif ev.text is not None and not isinstance(ev.text, str):
            out["text_hub"] = ev.text.model_dump()  # fetched on the host before the build (pipeline)
        if ev.max_tokens is not None:
            out["max_tokens"] = ev.max_tokens
        out["speed"] = ev.speed
    return out


@dataclass(frozen=True)
class Resolved:
    """What the pipeline found out before planning, so that the plan is final when made: the
    model's commit (and locked file digests) or its local folder, the cache key, and the
    fetched and checked evaluation text and training data. Empty for a dry run."""

    commit: str | None = None  # the commit a Hub revision resolved to
    files: dict[str, str] | None = None  # name -> sha256:..., from a lock file: the download must match
    model_dir: Path | None = None  # a GGUF file's converted folder (a local `path` is the recipe's own)
    gguf: dict[str, Any] | None = None  # the GGUF the model_dir was converted from (sha256, file, package)
    cache_key: str | None = None
    eval_text: tuple[Path, str] | None = None  # a Hub evaluation text, fetched: (local file, label)
    dataset: dict[str, Any] | None = None  # the training data, checked: files, digest, rows, columns


def plan(loaded: LoadedRecipe, builder_image: str, resolved: Resolved | None = None) -> BuildStep:
    """Turn a recipe into the one container run that builds it."""
    r = loaded.recipe
    resolved = resolved or Resolved()
    if not builder_image:
        raise PlanError("No builder image given for the plan.")
    model_dir = resolved.model_dir or loaded.model_dir
    model = ModelRef(
        hub=r.model.hub,
        revision=(r.model.revision or "main") if r.model.hub else None,
        path=str(model_dir) if model_dir is not None else None,
        trust_remote_code=r.model.trust_remote_code,
        resolved=resolved.commit,
        files=resolved.files,
        gguf=resolved.gguf,
    )
    config = olive_config(loaded)
    evaluate = evaluate_settings(loaded)
    if resolved.eval_text is not None:
        text, label = resolved.eval_text
        evaluate = {**{k: v for k, v in evaluate.items() if k != "text_hub"}, "text": str(text.resolve()),
                    "text_source": label}
    finetune = finetune_plan(loaded)
    if finetune is not None and resolved.dataset is not None:
        finetune = {**finetune, "dataset": {**finetune["dataset"], **resolved.dataset}}
    return BuildStep(
        id=loaded.id,
        recipe=str(loaded.path),
        recipe_digest=loaded.digest,
        name=r.name,
        version=r.version,
        device=r.target.device,
        execution_provider=r.target.execution_provider,
        precision=r.target.precision,
        builder_image=builder_image,
        gpus=r.target.device == "cuda",
        model=model,
        olive_config=config,
        expected_outputs=REQUIRED_FILES,
        tokenizer_files=TOKENIZER_FILES,
        tags=(loaded.tag,),
        cache_key=resolved.cache_key,
        license=r.model.license,
        description=r.description,
        evaluate=evaluate,
        finetune=finetune,
        quantize=quantize_plan(loaded),
    )
