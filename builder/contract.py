"""Names and records shared across stages and across the container boundary.

Stdlib only: the worker (inside builder images), the check and the runtime server import
this module without the build stack. Anything two stages must agree on lives here once:
file names, the placeholders in a planned Olive config, the annotation namespace and keys,
the in-toto predicate types, the tool list, XDG paths, atomic writes and file hashing, and the
typed records that cross a process boundary (the worker's spec and result, the build record
``olive-builder.json``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import __version__
from builder.errors import PackageError, UsageError

# The builder package folder: mounted into builder containers, its parent put on PYTHONPATH.
PACKAGE_DIR = Path(__file__).resolve().parent

# ---- file names -------------------------------------------------------------------------------

INFO_FILE = "olive-builder.json"  # the build record, next to the model files
GENAI_CONFIG = "genai_config.json"
LOCK_FILE = "olive-builder.lock"
RESULT_FILE = "result.json"  # WORK/meta/result.json: the worker's result
SPEC_FILE = "spec.json"  # WORK/spec.json: the worker's spec

# ---- placeholders the worker fills in a planned Olive config (paths differ per engine) -------

MODEL_DIR = "${MODEL_DIR}"
OUTPUT_DIR = "${OUTPUT_DIR}"
CACHE_DIR = "${CACHE_DIR}"
DATA_DIR = "${DATA_DIR}"  # where a finetune recipe's dataset files are (see plan.finetune_plan)

# Lines the worker prints with this prefix are progress events for the driver, not log lines.
EVENT_PREFIX = "::olive-builder::"

# ---- OCI names --------------------------------------------------------------------------------

NS = "org.olive-builder."  # this project's annotation (and image label) namespace
KEY_ANNOTATION = NS + "cache-key"
TOOL_LABEL = NS + "tools."  # builder image labels: org.olive-builder.tools.<tool>
SERVE_SUFFIX = "-serve"  # the runnable image's tag is the artifact's tag plus this
KEY_TAG_PREFIX = "cache-"  # registries also tag every pushed artifact cache-<hex>


def key_tag(key: str) -> str:
    """The registry tag of a build cache key (``sha256:<hex>`` -> ``cache-<hex>``)."""
    return KEY_TAG_PREFIX + key.split(":", 1)[1]


MODEL_ROOT = "model"  # model layers' tar entries are model/<file>: a container layer unpacks them at /model

# The one time format of manifests, attestations and the build record's `created`.
RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime(RFC3339)


def parse_rfc3339(text: str) -> dt.datetime:
    """A time ``rfc3339`` wrote (a build record's ``created``, a manifest's creation annotation)."""
    try:
        return dt.datetime.strptime(text, RFC3339).replace(tzinfo=dt.UTC)
    except ValueError:
        raise PackageError(f"The build record's creation time {text!r} is not an RFC 3339 UTC time.",
                           hint="Rebuild the model with `build recipe`.") from None


def reproducible_time(recorded: str | None = None) -> dt.datetime:
    """The creation time to record when the recipe is not at hand: ``SOURCE_DATE_EPOCH`` if set,
    else ``recorded`` (the build record's, RFC 3339), else 1970-01-01. Never the clock."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return dt.datetime.fromtimestamp(int(epoch), dt.UTC)
        except (ValueError, OverflowError, OSError):
            raise UsageError(f"SOURCE_DATE_EPOCH={epoch!r} is not a number of seconds.",
                             hint="Set it to a Unix time (e.g. `git log -1 --format=%ct`) or unset it.") from None
    return parse_rfc3339(recorded) if recorded else dt.datetime.fromtimestamp(0, dt.UTC)


@dataclass(frozen=True)
class RecipeInputs:
    """What the provenance records of a build's recipe, resolved once by the pipeline
    (``builder.recipe.inputs.resolve``): its path within its git repository (else its file
    name), its text and its lock entry; None where it could not be read."""

    path: str | None
    text: str | None
    lock_entry: dict[str, Any] | None = None


# ---- supply chain: in-toto names, and the annotations of attestations and signatures ----------
#
# The in-toto Statement and the predicate types of the documents every packaged build carries
# (builder.trust: sbom, provenance, evaluation_statement); verifiers match on these strings.
INTOTO_STATEMENT_V1 = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
TEST_RESULT_V01 = "https://in-toto.io/attestation/test-result/v0.1"
CYCLONEDX_PREDICATE = "https://cyclonedx.org/bom"
# Two annotations name a document's predicate type, each under the key its own readers look for:
# on an attestation referrer (its manifest and its layer), the in-toto key that BuildKit's
# attestation manifests use; on each DSSE layer of cosign's sha256-<hex>.att manifest, cosign's.
INTOTO_PREDICATE_TYPE_ANNOTATION = "in-toto.io/predicate-type"
COSIGN_PREDICATE_TYPE_ANNOTATION = "predicateType"
COSIGN_SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"  # cosign's: a simple-signing layer's signature
SIGNATURE_KEY_ANNOTATION = NS + "signature.key-id"  # sha256 of the signer's public key PEM
REFERRER_KIND_ANNOTATION = NS + "referrer"  # sbom | provenance | evaluation | model-signature


# ---- LoRA adapters (recipes with `finetune:`) ------------------------------------------------
#
# A finetuned build in adapter mode delivers the base model (its graph takes the LoRA weights as
# optional inputs, so with no adapter active it is the base model) plus one onnxruntime-genai
# adapter file per adapter, inside the model folder:
#
#     OUT/model.onnx, OUT/genai_config.json, ...      the base model
#     OUT/adapters/<name>.onnx_adapter                 each adapter (og.Adapters loads it)
#
# The build record lists them in its `finetune` section (see ``adapters_in``). Each adapter is
# published as its own OCI artifact whose `subject` is the base manifest, tagged
# ``adapter_tag(base_tag, name)``; a request picks one with ``model: "<base>:<adapter>"``.
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
ADAPTER_NAME_RULE = r"[a-z0-9]+(?:-[a-z0-9]+)*"  # also a valid part of an OCI tag
ADAPTER_NAME_MAX = 32
ADAPTER_TAG_SEPARATOR = "--"  # <version>-<target>--<adapter>
ADAPTER_ANNOTATION = NS + "adapter"  # on an adapter manifest: the adapter's name
ADAPTER_BASE_ANNOTATION = NS + "adapter.base"  # on an adapter manifest: the base manifest's digest
ADAPTERS_ANNOTATION = NS + "adapters"  # on a base or image manifest: comma-separated adapter names


_ADAPTER_NAME = re.compile(f"^{ADAPTER_NAME_RULE}$")


def valid_adapter_name(name: str) -> bool:
    return len(name) <= ADAPTER_NAME_MAX and _ADAPTER_NAME.match(name) is not None


def adapter_names(manifest: Mapping[str, Any]) -> list[str]:
    """The adapter names a base manifest lists (``ADAPTERS_ANNOTATION``), sorted; [] for a plain model."""
    text = (manifest.get("annotations") or {}).get(ADAPTERS_ANNOTATION) or ""
    return sorted(n for n in str(text).split(",") if n)


def adapter_tag(base_tag: str, name: str) -> str:
    """The tag of adapter ``name`` of the artifact tagged ``base_tag``."""
    return f"{base_tag}{ADAPTER_TAG_SEPARATOR}{name}"


def adapter_file(model_dir: Path, name: str) -> Path:
    return model_dir / ADAPTERS_DIR / f"{name}{ADAPTER_SUFFIX}"


def adapters_in(model_dir: Path) -> dict[str, Path]:
    """The adapters a model folder carries, name -> file (sorted by name); {} for none."""
    folder = model_dir / ADAPTERS_DIR
    if not folder.is_dir():
        return {}
    return {p.name[: -len(ADAPTER_SUFFIX)]: p for p in sorted(folder.iterdir())
            if p.name.endswith(ADAPTER_SUFFIX) and p.is_file() and not p.is_symlink()}


# ---- targets ----------------------------------------------------------------------------------

# How a build was checked (`check.mode` in the build record, and the CHECK_ANNOTATION):
# natively on the target's own execution provider, or, where its hardware is missing, by
# loading and generating with the very same graph on the CPU provider.
CHECK_NATIVE = "native"
CHECK_CPU_CROSS = "cpu-cross-check"
CHECK_ANNOTATION = NS + "check"

# OCI distribution naming rules (distribution-spec "Pulling manifests"): a repository path
# component, a whole repository path, and a tag.
OCI_COMPONENT_RULE = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
OCI_REPOSITORY_RULE = rf"{OCI_COMPONENT_RULE}(?:/{OCI_COMPONENT_RULE})*"
OCI_TAG_RULE = "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"

# The tools whose versions decide a build's output: in the cache key, the annotations and the labels.
TOOLS = ("olive-ai", "onnxruntime-genai", "onnxruntime", "transformers", "torch", "peft")
# Distributions whose versions a build records; alternatives for the same tool come later.
TOOL_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "olive-ai": ("olive-ai",),
    "onnxruntime-genai": ("onnxruntime-genai", "onnxruntime-genai-cuda"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "transformers": ("transformers",),
    "torch": ("torch",),
    "peft": ("peft",),
}


def tool_versions_here() -> dict[str, str]:
    """The versions of TOOLS installed in this Python ("none" for a missing one)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for tool, dists in TOOL_DISTRIBUTIONS.items():
        out[tool] = "none"
        for dist in dists:
            try:
                out[tool] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


# ---- compute threads: what the server, the check and the evaluation give onnxruntime ----------

THREADS_ENV = "OLIVE_BUILDER_THREADS"  # a number of compute threads; unset: the usable CPUs


def usable_cpus() -> int:
    """The CPUs this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's ``--cpus``, a pod's CPU limit), at least 1."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="ascii").split()[:2]
        if quota != "max":
            count = min(count, -(-int(quota) // int(period)))  # a quota of 1.5 CPUs still runs 2 threads
    except (OSError, ValueError):
        pass
    return max(1, count)


def compute_threads(model_dir: Path) -> int | None:
    """The intra-op thread count to give a model's decoder session: None when its
    genai_config.json names one itself (the build's choice stands), else ``OLIVE_BUILDER_THREADS``
    or the usable CPUs. onnxruntime's own default (one thread per physical core as its CPU probe
    sees it) ran one thread on the 2-vCPU machines here: 175 instead of 310 prompt tokens/s."""
    try:
        config = json.loads((model_dir / GENAI_CONFIG).read_text(encoding="utf-8"))
        named = config["model"]["decoder"].get("session_options", {}).get("intra_op_num_threads")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        named = None
    if named:
        return None
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        if not text.isdigit() or not 1 <= int(text) <= 1024:
            raise UsageError(f"{THREADS_ENV}={text!r} is not a thread count.", hint="Set a whole number from 1 "
                             "to 1024, or unset it to use every usable CPU.")
        return int(text)
    return usable_cpus()


def og_config(og: Any, model_dir: Path, *, force_cpu: bool = False) -> Any:
    """An ``og.Config`` of ``model_dir`` (``og``: the onnxruntime_genai module, imported by the
    caller) with the compute threads of ``compute_threads`` overlaid; ``force_cpu`` drops the
    providers (a cuda build measured without a GPU)."""
    config = og.Config(str(model_dir))
    threads = compute_threads(model_dir)
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    if force_cpu:
        config.clear_providers()
    return config


def og_model(model_dir: Path | str, *, force_cpu: bool = False) -> Any:
    """The loaded ``og.Model`` of ``model_dir``, with the thread count of ``og_config``."""
    import onnxruntime_genai as og

    return og.Model(og_config(og, Path(model_dir), force_cpu=force_cpu))


# ---- XDG paths --------------------------------------------------------------------------------

def _xdg(var: str, *default: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home().joinpath(*default)


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local", "state") / "olive-builder"


def log_dir() -> Path:
    return state_dir() / "logs"


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "olive-builder"


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local", "share") / "olive-builder"


HF_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def hf_home() -> Path:
    """The Hugging Face cache folder, as huggingface_hub finds it."""
    value = os.environ.get("HF_HOME")
    return Path(value) if value else Path.home() / ".cache" / "huggingface"


def hf_token() -> str | None:
    for name in HF_TOKEN_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


# ---- files ------------------------------------------------------------------------------------

CHUNK = 4 << 20


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def model_files(model_dir: Path) -> list[str]:
    """Every regular file under ``model_dir``, relative, sorted. Links and odd files are refused."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(model_dir):
        dirnames.sort()
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise PackageError(f"{path} is a symbolic link; a model folder to package holds plain files only.",
                                   hint="Replace the link with the file it points to.")
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_file():
                raise PackageError(f"{path} is not a regular file; a model folder to package holds plain files only.")
            out.append(path.relative_to(model_dir).as_posix())
    return sorted(out)


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``path`` so that readers see the old content or the new, never a part. ``mode``
    as for a plain write (mkstemp's own 0600 would hide a model's files from a container user)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---- records that cross a process boundary ---------------------------------------------------

class RecordError(ValueError):
    """A record file is missing fields or has fields of the wrong type."""


def _str(data: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    value = data.get(key, default)
    if value is not None and not isinstance(value, str):
        raise RecordError(f"`{key}` must be a string, not {type(value).__name__}")
    return value


def _dict(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecordError(f"`{key}` must be an object, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Target:
    device: str
    execution_provider: str
    precision: str


@dataclass(frozen=True)
class Source:
    hub: str | None
    revision: str | None
    resolved_revision: str | None
    local: bool
    trust_remote_code: bool = False
    # A GGUF source (sha256, file, package, version, architecture): the model was converted from
    # it, and the evaluation's reference is its dequantized weights.
    gguf: dict[str, Any] | None = None


@dataclass(frozen=True)
class BuilderInfo:
    version: str | None
    engine: str | None
    image: str | None
    image_id: str | None


@dataclass(frozen=True)
class BuildRecord:
    """``olive-builder.json``: what was built from what, by which tools, and how it was checked.

    One writer (``execute``) and one reader (``read``); package, distribute, the CLI and
    the server use the fields. Sections this version does not know are kept in ``extra``.
    """

    id: str
    name: str
    version: str
    tags: tuple[str, ...]
    target: Target
    source: Source
    builder: BuilderInfo
    recipe_digest: str | None = None
    cache_key: str | None = None
    created: str | None = None  # RFC 3339, from the inputs (see builder.recipe.inputs.created_time): what manifests record
    description: str | None = None
    license: str | None = None
    tools: dict[str, str] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        out["tags"] = list(self.tags)
        if out["source"].get("gguf") is None:  # only GGUF builds have it: other records read as before
            del out["source"]["gguf"]
        return {**extra, **out}

    @classmethod
    def from_json(cls, data: Any) -> BuildRecord:
        if not isinstance(data, dict):
            raise RecordError("the record must be a JSON object")
        for key in ("name", "version", "tags", "target"):
            if key not in data:
                raise RecordError(f"`{key}` is missing")
        tags = data["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise RecordError("`tags` must be a list of strings")
        t, s, b = _dict(data, "target"), _dict(data, "source"), _dict(data, "builder")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            id=_str(data, "id", "") or "",
            name=_str(data, "name") or "",
            version=_str(data, "version") or "",
            tags=tuple(tags),
            target=Target(device=_str(t, "device", "cpu") or "cpu",
                          execution_provider=_str(t, "execution_provider", "") or "",
                          precision=_str(t, "precision", "") or ""),
            source=Source(hub=_str(s, "hub"), revision=_str(s, "revision"),
                          resolved_revision=_str(s, "resolved_revision"), local=bool(s.get("local")),
                          trust_remote_code=bool(s.get("trust_remote_code")),
                          gguf=s.get("gguf") if isinstance(s.get("gguf"), dict) else None),
            builder=BuilderInfo(version=_str(b, "version"), engine=_str(b, "engine"), image=_str(b, "image"),
                                image_id=_str(b, "image_id")),
            recipe_digest=_str(data, "recipe_digest"),
            cache_key=_str(data, "cache_key"),
            created=_str(data, "created"),
            description=_str(data, "description"),
            license=_str(data, "license"),
            tools={str(k): str(v) for k, v in _dict(data, "tools").items()},
            check=_dict(data, "check"),
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def read(cls, model_dir: Path) -> BuildRecord:
        """The record in ``model_dir``; OSError if unreadable, RecordError if malformed."""
        try:
            data = json.loads((model_dir / INFO_FILE).read_text(encoding="utf-8"))
        except ValueError as e:
            raise RecordError(f"not valid JSON: {e}") from None
        return cls.from_json(data)

    def write(self, model_dir: Path) -> None:
        write_json(model_dir / INFO_FILE, self.to_json())


@dataclass(frozen=True)
class WorkerResult:
    """WORK/meta/result.json: what the worker reports back to the driver."""

    ok: bool
    kind: str | None = None  # on failure: model_not_found | olive_failed | check_failed | internal | ...
    message: str = ""
    hint: str = ""
    resolved_revision: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)
    olive_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # further stages' results (e.g. evaluation)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        return {**extra, **out}

    @classmethod
    def from_json(cls, data: Any) -> WorkerResult:
        if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
            raise RecordError("a worker result must be an object with a boolean `ok`")
        known = {f.name for f in dataclasses.fields(cls)}
        seconds = data.get("olive_seconds")
        return cls(
            ok=data["ok"],
            kind=_str(data, "kind"),
            message=_str(data, "message", "") or "",
            hint=_str(data, "hint", "") or "",
            resolved_revision=_str(data, "resolved_revision"),
            versions={str(k): str(v) for k, v in _dict(data, "versions").items()},
            check=_dict(data, "check"),
            olive_seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True)
class ModelRef:
    """Where a step's model comes from: a Hub repository at a revision, or a local folder."""

    hub: str | None
    revision: str | None
    path: str | None  # absolute host path of a local model folder
    trust_remote_code: bool
    resolved: str | None = None  # the commit `revision` resolved to, before the build (see publish/cache.py)
    files: dict[str, str] | None = None  # name -> sha256:..., from a lock file: the download must match
    # A GGUF source: the file `path` was converted from (sha256, file, package); its weights are the
    # GGUF's, dequantized, and the evaluation measures against them.
    gguf: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: Any) -> ModelRef:
        if not isinstance(data, dict):
            raise RecordError("a step's `model` must be an object")
        files = data.get("files")
        if files is not None and not (isinstance(files, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
            raise RecordError("a step's `model.files` must map names to digests")
        return cls(hub=_str(data, "hub"), revision=_str(data, "revision"), path=_str(data, "path"),
                   trust_remote_code=bool(data.get("trust_remote_code")), resolved=_str(data, "resolved"),
                   files=files, gguf=data.get("gguf") if isinstance(data.get("gguf"), dict) else None)


@dataclass(frozen=True)
class BuildStep:
    """One planned build (``builder.recipe.plan.plan``): everything the worker needs, and the
    tags and cache key the driver needs. It crosses into the builder container as JSON
    (``WorkerSpec``) and comes back typed on the other side."""

    id: str
    recipe: str
    recipe_digest: str
    name: str
    version: str
    device: str
    execution_provider: str
    precision: str
    builder_image: str
    gpus: bool
    model: ModelRef
    olive_config: dict[str, Any]
    expected_outputs: tuple[str, ...]
    tokenizer_files: tuple[str, ...]
    tags: tuple[str, ...]
    cache_key: str | None  # set by the driver before the build (see publish/cache.py): it needs the resolved inputs
    builder_version: str = field(default=__version__)
    license: str | None = None
    description: str | None = None
    # What the worker's evaluation stage does (the evaluation's Settings as JSON); None: the defaults.
    evaluate: dict[str, Any] | None = None
    # LoRA finetuning before conversion (see builder.recipe.plan.finetune_plan); None: a plain conversion.
    finetune: dict[str, Any] | None = None
    # Block quantization of the fp32 conversion (builder.build.quantize.Settings as JSON); None: none.
    quantize: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> BuildStep:
        if not isinstance(data, dict):
            raise RecordError("a build step must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecordError(f"a build step has unknown fields: {', '.join(unknown)}")
        try:
            values = dict(data)
            values["model"] = ModelRef.from_json(data.get("model"))
            for name in ("expected_outputs", "tokenizer_files", "tags"):
                values[name] = tuple(data.get(name) or ())
            return cls(**values)
        except TypeError as e:
            raise RecordError(f"a build step is incomplete: {e}") from None


@dataclass(frozen=True)
class WorkerSpec:
    """WORK/spec.json: the planned step and the paths the worker sees."""

    step: BuildStep
    work_dir: str
    model_dir: str | None = None  # where a local model is mounted; None for Hub models

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> WorkerSpec:
        if not isinstance(data, dict) or not isinstance(data.get("step"), dict) \
                or not isinstance(data.get("work_dir"), str):
            raise RecordError("a worker spec must be an object with `step` (object) and `work_dir` (string)")
        return cls(step=BuildStep.from_json(data["step"]), work_dir=data["work_dir"], model_dir=_str(data, "model_dir"))

    def write(self, path: Path) -> None:
        # Not write_json: its sorted keys would reorder the planned Olive passes, which run in order.
        atomic_write(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> WorkerSpec:
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
