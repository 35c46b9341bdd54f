"""Packaging: a checked model folder becomes OCI content in the local store.

Two manifests share the very same model layer blobs:

- the model artifact (CNCF ModelPack): artifactType ``application/vnd.cncf.model.manifest.v1+json``,
  a ModelPack config, one layer per weight file, one small layer with the tokenizer and
  other files that every target of a model shares, and one with the target's own
  ``genai_config.json`` and ``olive-builder.json``. Tag ``<name>:<version>-<target>``.
- the runnable image: the runtime image's layers plus those model layers (they unpack
  under ``/model``, where the runtime's server reads), with the runtime's entrypoint.
  Tag ``<name>:<version>-<target>-serve``.

A finetuned build in adapter mode adds one artifact per LoRA adapter (``<tag>--<adapter>``,
``subject``: the model artifact), and its runnable image one layer per adapter (under
``/model/adapters``); the model artifact itself leaves adapters/ out (see "LoRA adapters" below).

Layers are deterministic tars (sorted names, mtime 0, uid/gid 0, fixed modes) and every
JSON document is written in one canonical form, so the same folder and the same creation
time always give the same digests. Digests are computed while the tars are written. Nothing
a build's run observed (its speed, seconds, the CPU) is in the folder, the config or the
annotations: it is read from beside the folder (``builder.build.observed``) into the
evaluation attestation alone, so a rebuild of the same inputs gives the same digests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from builder.build import observed as observations
from builder.build.evaluate import manifest_annotations as evaluation_annotations
from builder.contract import (
    ADAPTER_ANNOTATION,
    ADAPTER_BASE_ANNOTATION,
    ADAPTER_NAME_MAX,
    ADAPTER_NAME_RULE,
    ADAPTER_SUFFIX,
    ADAPTERS_ANNOTATION,
    ADAPTERS_DIR,
    CHECK_NATIVE,
    CHUNK,
    INFO_FILE,
    MODEL_ROOT,
    NS,
    OCI_TAG_RULE,
    RFC3339,
    SERVE_SUFFIX,
    TOOLS,
    BuildRecord,
    RecipeInputs,
    RecordError,
    adapter_tag,
    model_files,
    reproducible_time,
    rfc3339,
    sha256_file,
    valid_adapter_name,
)
from builder.errors import ImageError, PackageError, StoreError, UsageError
from builder.oci import layout as oci
from builder.oci import referrers
from builder.oci.media import (
    ADAPTER_ARTIFACT_TYPE,
    ADAPTER_CONFIG,
    ADAPTER_MEDIA_TYPE,
    IMAGE_CONFIG,
    IMAGE_LAYER,
    IMAGE_LAYER_GZIP,
    MANIFEST,
    MODEL_ARTIFACT,
    MODEL_CONFIG,
    MODEL_WEIGHT,
    MODEL_WEIGHT_CONFIG,
)
from builder.publish.distribute import local_manifest, materialize
from builder.trust import attach
from builder.trust.facts import BackgroundDigests
from builder.trust.sign import SigningKey

WEIGHT_SUFFIXES = (".onnx", ".onnx.data", ".data", ".bin", ".safetensors", ".pb", ".ort")
BIG_FILE = 64 << 20  # any file this large gets a layer of its own
TARGET_FILES = ("genai_config.json", INFO_FILE)  # differ between targets of one model
RUNTIME_GENAI_LABEL = NS + "runtime.onnxruntime-genai"
_PRECISION_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int4": "int4", "int8": "int8"}


@dataclass(frozen=True)
class LayerGroup:
    kind: str  # weight | shared | target
    files: tuple[str, ...]
    media_type: str

    @property
    def title(self) -> str:
        # What ORAS names the downloaded blob: it is a tar that unpacks to model/...
        return f"{self.files[0]}.tar" if self.kind == "weight" else f"{self.kind}-files.tar"


@dataclass(frozen=True)
class PackagedAdapter:
    """A LoRA adapter's artifact in the store: its tag, its manifest and the adapter file's blob."""

    name: str
    ref: str  # <name>:<base tag>--<adapter>
    manifest: oci.Descriptor
    layer: oci.Descriptor


@dataclass(frozen=True)
class Packaged:
    artifact_ref: str
    artifact: oci.Descriptor
    image_ref: str | None
    image: oci.Descriptor | None
    layers: tuple[oci.Descriptor, ...]
    written_bytes: int  # model bytes written into new blobs (0 when every layer was already stored)
    annotations: dict[str, str] = field(default_factory=dict)
    adapters: tuple[PackagedAdapter, ...] = ()


# ---- what goes where ------------------------------------------------------------------------

def group_files(model_dir: Path, files: list[str]) -> list[LayerGroup]:
    weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES) or (model_dir / f).stat().st_size >= BIG_FILE]
    target = [f for f in files if f in TARGET_FILES]
    shared = [f for f in files if f not in weights and f not in target]
    groups = [LayerGroup("weight", (f,), MODEL_WEIGHT) for f in weights]
    if shared:
        groups.append(LayerGroup("shared", tuple(shared), MODEL_WEIGHT_CONFIG))
    if target:
        groups.append(LayerGroup("target", tuple(target), MODEL_WEIGHT_CONFIG))
    return groups


def read_record(model_dir: Path) -> BuildRecord:
    """The build record of a folder that `build recipe` made."""
    try:
        return BuildRecord.read(model_dir)
    except FileNotFoundError:
        raise PackageError(f"{model_dir} has no {INFO_FILE}, so it was not made by `build recipe`.",
                           hint="Package folders that `build recipe` produced: it records what the artifact needs.") from None
    except OSError as e:
        raise PackageError(f"{model_dir / INFO_FILE} cannot be read: {e.strerror or e}.") from None
    except RecordError as e:
        raise PackageError(f"{model_dir / INFO_FILE} is not a build record: {e}.",
                           hint="Rebuild the model with `build recipe`.") from None


def read_info(model_dir: Path) -> dict[str, Any]:
    """The build record as JSON (what annotations and the ModelPack config are made from)."""
    return read_record(model_dir).to_json()


def _gguf_label(gguf: dict[str, Any]) -> str:
    """How an artifact names a GGUF source: ``package==version:file`` or the file's name."""
    file = str(gguf.get("file") or "model.gguf")
    return f"{gguf['package']}=={gguf.get('version')}:{file}" if gguf.get("package") else file


def manifest_annotations(info: dict[str, Any], created: dt.datetime) -> dict[str, str]:
    """The manifest annotations: standard OCI ones, then this project's (what ModelPack cannot say)."""
    source = info.get("source") or {}
    target = info.get("target") or {}
    tools = info.get("tools") or {}
    builder = info.get("builder") or {}
    a: dict[str, str] = {
        "org.opencontainers.image.title": str(info["name"]),
        "org.opencontainers.image.version": str(info["version"]),
        "org.opencontainers.image.created": rfc3339(created),
    }
    if info.get("description"):
        a["org.opencontainers.image.description"] = str(info["description"])
    if info.get("license"):
        a["org.opencontainers.image.licenses"] = str(info["license"])
    if source.get("hub"):
        a["org.opencontainers.image.source"] = f"https://huggingface.co/{source['hub']}"
        if source.get("resolved_revision"):
            a["org.opencontainers.image.revision"] = str(source["resolved_revision"])
    ours = {
        "target": info.get("id"),
        "device": target.get("device"),
        "execution-provider": target.get("execution_provider"),
        "precision": target.get("precision"),
        "source.model": source.get("hub") or (_gguf_label(source["gguf"]) if source.get("gguf") else None)
        or ("local folder" if source.get("local") else None),
        # A GGUF source: its digest (the weights the evaluation measured against, dequantized).
        "source.gguf-digest": f"sha256:{source['gguf']['sha256']}" if (source.get("gguf") or {}).get("sha256") else None,
        "source.revision": source.get("resolved_revision") or source.get("revision"),
        "recipe.digest": info.get("recipe_digest"),
        "cache-key": info.get("cache_key"),
        "builder.version": builder.get("version"),
        "builder.image": builder.get("image"),
        "builder.image-digest": builder.get("image_id"),
        # Models are written by the builder's onnxruntime-genai; older runtimes cannot read them.
        "runtime.min-onnxruntime-genai": tools.get("onnxruntime-genai"),
        # native, or cpu-cross-check: how the check ran (builds from before the field were native).
        "check": (info.get("check") or {}).get("mode") or CHECK_NATIVE,
    }
    for tool in TOOLS:
        ours[f"tools.{tool}"] = tools.get(tool)
    a.update({NS + k: str(v) for k, v in ours.items() if v not in (None, "")})
    # The evaluation's figures, gates and text digest (eval.*); builds made before the stage existed
    # carry none. Its speed is what one machine observed: the evaluation attestation has it.
    a.update(evaluation_annotations(info.get("evaluation"), NS))
    return a


def modelpack_config(info: dict[str, Any], model_dir: Path, created: dt.datetime, diff_ids: list[str]) -> dict[str, Any]:
    source = info.get("source") or {}
    precision = (info.get("target") or {}).get("precision", "")
    descriptor: dict[str, Any] = {
        "name": str(info["name"]),
        "version": str(info["version"]),
        "createdAt": rfc3339(created),
        "title": f"{info['name']} {info['version']} ({info.get('id', '')})".replace(" ()", ""),
    }
    if source.get("hub"):
        descriptor["sourceURL"] = f"https://huggingface.co/{source['hub']}"
        descriptor["family"] = str(source["hub"]).split("/")[0]
    if source.get("resolved_revision"):
        descriptor["revision"] = str(source["resolved_revision"])
    if info.get("license"):
        descriptor["licenses"] = [str(info["license"])]
    if info.get("description"):
        descriptor["description"] = str(info["description"])
    config: dict[str, Any] = {"format": "onnx", "capabilities": {"inputTypes": ["text"], "outputTypes": ["text"]}}
    try:
        model_type = json.loads((model_dir / "genai_config.json").read_text())["model"]["type"]
        config["architecture"] = str(model_type)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if precision:
        config["precision"] = _PRECISION_NAMES.get(precision, precision)
        if precision in ("int4", "int8"):
            config["quantization"] = {"int4": "onnx-matmulnbits-int4", "int8": "onnx-dynamic-int8"}[precision]
    return {"descriptor": descriptor, "config": config, "modelfs": {"type": "layers", "diffIds": diff_ids}}


# ---- writing --------------------------------------------------------------------------------

def write_layers(store: oci.Store, model_dir: Path, groups: list[LayerGroup],
                 on_bytes: Callable[[int], None] = lambda n: None) -> tuple[list[oci.Descriptor], int]:
    layers: list[oci.Descriptor] = []
    written = 0
    for group in groups:
        with store.writer() as w:
            oci.write_tar(w, model_dir, list(group.files), MODEL_ROOT, on_bytes)
            digest = w.commit()
            size = w.size
        written += size
        ann = {oci.ANN_TITLE: group.title, oci.ANN_UNTESTED: "false"}
        if group.kind == "weight":
            name = group.files[0]
            ann[oci.ANN_FILEPATH] = f"{MODEL_ROOT}/{name}"
            ann[oci.ANN_FILE_METADATA] = oci.file_metadata(f"{MODEL_ROOT}/{name}", (model_dir / name).stat().st_size)
        else:
            ann[oci.ANN_FILEPATH] = MODEL_ROOT
            ann[NS + "files"] = ",".join(group.files)
        layers.append(oci.Descriptor(group.media_type, digest, size, ann))
    return layers, written


def package(model_dir: Path, store: oci.Store, *, created: dt.datetime | None = None,
            runtime: RuntimeImage | None = None, on_bytes: Callable[[int], None] = lambda n: None,
            extra: dict[str, Any] | None = None, attestations: bool = True, sign_key: SigningKey | None = None,
            recipe: RecipeInputs | None = None) -> Packaged:
    """Put ``model_dir`` into ``store`` as a ModelPack artifact and (with ``runtime``) a runnable image,
    with their SBOMs, provenance and evaluation attached as referrers (``attestations``) and, with
    ``sign_key``, signed (see ``attach.attach_build``).

    A finetuned folder in adapter mode (``adapters/<name>.onnx_adapter``) gives the base model's
    artifact without its adapters/ folder, and one adapter artifact per adapter (``package_adapter``)
    whose ``subject`` is that base; the runnable image carries the base and every adapter.

    What the build's run observed (``<folder>.observed.json`` beside ``model_dir``, when it belongs
    to this folder's record) goes into the evaluation attestations only."""
    model_dir = Path(model_dir)
    adapters = adapter_files(model_dir)
    check_adapters(model_dir, adapters)
    observed = observations.read(model_dir)
    if not adapters:
        return _package(model_dir, store, created=created, runtime=runtime, on_bytes=on_bytes, extra=extra,
                        attestations=attestations, sign_key=sign_key, recipe=recipe, observed=observed)
    with base_view(model_dir) as base:
        packaged = _package(base, store, created=created, runtime=runtime, on_bytes=on_bytes, extra=extra,
                            attestations=attestations, sign_key=sign_key, recipe=recipe,
                            adapters=adapters, observed=observed)
    record = read_record(model_dir)
    info = {**record.to_json(), **(extra or {})}
    when = created or reproducible_time()
    done = tuple(package_adapter(store, packaged, name, path, info, adapter_entry(record, name), when,
                                 sign_key=sign_key, attestations=attestations, observed=observed)
                 for name, path in adapters.items())
    return dataclasses.replace(packaged, adapters=done)


def _package(model_dir: Path, store: oci.Store, *, created: dt.datetime | None, runtime: RuntimeImage | None,
             on_bytes: Callable[[int], None], extra: dict[str, Any] | None, attestations: bool,
             sign_key: SigningKey | None, recipe: RecipeInputs | None, adapters: dict[str, Path] | None = None,
             observed: dict[str, Any] | None = None) -> Packaged:
    info = {**read_info(model_dir), **(extra or {})}
    created = created or reproducible_time()
    files = model_files(model_dir)
    digests = BackgroundDigests(model_dir, files) if attestations else None
    layers, written = write_layers(store, model_dir, group_files(model_dir, files), on_bytes)
    ann = manifest_annotations(info, created)
    if adapters:
        ann[ADAPTERS_ANNOTATION] = ",".join(adapters)
    config = store.put_json(modelpack_config(info, model_dir, created, [d.digest for d in layers]), MODEL_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "artifactType": MODEL_ARTIFACT,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
        "annotations": ann,
    }
    artifact = store.put_json(manifest, MANIFEST, artifact_type=MODEL_ARTIFACT)
    artifact_ref = str(info["tags"][0])
    image_ref = image = None
    if runtime is not None:
        extra_layers = [adapter_image_layer(store, name, path) for name, path in (adapters or {}).items()]
        image = compose_image(store, runtime, layers + extra_layers, ann, created)
        image_ref = artifact_ref + SERVE_SUFFIX
        store.tag(image_ref, image)
    store.tag(artifact_ref, artifact)
    packaged = Packaged(artifact_ref, artifact, image_ref, image, tuple(layers), written, ann)
    if digests is not None:
        attach.attach_build(store, model_dir, artifact_ref=artifact_ref, artifact=artifact, image_ref=image_ref,
                            image=image, runtime=runtime, created=created, info=info, recipe=recipe, key=sign_key,
                            precomputed=digests.result(), observed=observed,
                            image_files=attach.adapter_file_digests(adapters or {}) if image is not None else ())
    return packaged


def attach_stored(store: oci.Store, artifact_ref: str, *, key: SigningKey | None = None,
                  image_ref: str | None = None) -> attach.Attached:
    """``attach.attach_build`` for a model artifact already in the store (a cache hit, or `build push
    --sign-key` of something packaged unsigned): its files are unpacked into a temporary folder
    (the build record travels inside the artifact), attested and, with ``key``, signed."""
    desc, manifest = local_manifest(store, artifact_ref)
    if manifest.get("artifactType") != MODEL_ARTIFACT:
        raise StoreError(f"{artifact_ref} is not a model artifact; sign the artifact, and its image comes along.")
    image = store.resolve(image_ref) if image_ref else None
    name = artifact_ref.rpartition(":")[0]
    # Nothing to do (and no unpacking) when every subject already has its attestations and signature.
    if all(attach.attached_and_signed(store, name, subject.digest, key)
           for subject in [desc] + ([image] if image is not None else [])):
        return attach.Attached((), key is not None)
    created_text = (manifest.get("annotations") or {}).get("org.opencontainers.image.created")
    created = (dt.datetime.strptime(created_text, RFC3339).replace(tzinfo=dt.UTC)
               if created_text else dt.datetime.fromtimestamp(0, dt.UTC))
    with tempfile.TemporaryDirectory(prefix="olive-builder-attest-") as tmp:
        folder = materialize(store, manifest, Path(tmp) / "model", force=False, shown=artifact_ref)
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        runtime = attach.stored_runtime(store, image) if image is not None else None
        return attach.attach_build(store, folder, artifact_ref=artifact_ref, artifact=desc,
                                   image_ref=image_ref if image else None, image=image, runtime=runtime,
                                   created=created, info=info, key=key,
                                   image_files=attach.image_adapter_files(store, image) if image is not None else ())


# ---- LoRA adapters ---------------------------------------------------------------------------
#
# The base artifact of a finetuned build holds every file of the output folder but adapters/, so
# its weight and shared layers (the heavy blobs) are the very blobs of any other adapter trained on
# the same base: pushing a second adapter uploads its adapter file, and of the base only what
# names the build (the target layer with olive-builder.json, the ModelPack config, the manifest).
# Each adapter is an artifact of its own: one layer (the .onnx_adapter file as it is, so ORAS
# and other clients get the file itself), a config describing it, and ``subject`` = the base.

_TAG = re.compile(f"^{OCI_TAG_RULE}$")


def adapter_files(model_dir: Path) -> dict[str, Path]:
    """The adapters of an output folder, name -> file; {} without adapters/. Anything else in
    adapters/ (another file, a folder, a link, a name the adapter rule refuses) is a PackageError:
    packaging would otherwise drop or mis-tag it silently."""
    folder = model_dir / ADAPTERS_DIR
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise PackageError(f"{folder} is not a folder; a finetuned build writes its adapters into one.")
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = path.name[: -len(ADAPTER_SUFFIX)] if path.name.endswith(ADAPTER_SUFFIX) else ""
        if path.is_symlink() or not path.is_file() or not valid_adapter_name(name):
            raise PackageError(f"{path} is not an adapter: {ADAPTERS_DIR}/ holds only plain files named "
                               f"<name>{ADAPTER_SUFFIX}, <name> matching {ADAPTER_NAME_RULE} (at most "
                               f"{ADAPTER_NAME_MAX} characters).",
                               hint="Remove it, or rebuild the model with `build recipe`.")
        out[name] = path
    if not out:
        raise PackageError(f"{folder} holds no adapter.", hint="Remove the empty folder, or rebuild the model.")
    return out


def adapter_entry(record: BuildRecord, name: str) -> dict[str, Any]:
    """The build record's ``finetune.adapters`` entry of adapter ``name``."""
    section = record.extra.get("finetune")
    entries = section.get("adapters") if isinstance(section, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    raise PackageError(f"The build record {INFO_FILE} does not list the adapter {name!r} of "
                       f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX} in its finetune section.",
                       hint="Package only folders `build recipe` made, as it made them.")


def check_adapters(model_dir: Path, adapters: dict[str, Path]) -> None:
    """Every adapter file is the one the build record lists (name and sha256), and every adapter
    the record lists is there."""
    record = read_record(model_dir)
    section = record.extra.get("finetune")
    listed = section.get("adapters") if isinstance(section, dict) else None
    # entries with no file: adapters merged into the weights (``merge: true``)
    names = {e.get("name") for e in listed if isinstance(e, dict) and e.get("file")} if isinstance(listed, list) else set()
    missing = sorted(str(n) for n in names if n not in adapters)
    if missing:
        raise PackageError(f"{model_dir} lacks the adapter(s) {', '.join(missing)} that its build record lists.",
                           hint="A folder pulled from a base model's tag holds the base alone: pull the adapter's "
                                "tag (<tag>--<adapter>) to get both, or rebuild the model with `build recipe`.")
    for name, path in adapters.items():
        want = adapter_entry(record, name).get("sha256")
        if want and sha256_file(path) != want:
            raise PackageError(f"{path} is not the adapter the build made: its sha256 differs from the build "
                               "record's.", hint="Rebuild the model with `build recipe`.")


@contextmanager
def base_view(model_dir: Path) -> Iterator[Path]:
    """A folder with every file of ``model_dir`` but adapters/: hard links (copies where the
    filesystem has none), so the base's layers, file digests and model signature cover exactly
    what the base artifact holds. Removed afterwards."""
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.base-view-", dir=model_dir.parent))
    except OSError:
        work = Path(tempfile.mkdtemp(prefix="olive-builder-base-view-"))
    try:
        view = work / "model"
        view.mkdir()
        for rel in model_files(model_dir):
            if rel.split("/", 1)[0] == ADAPTERS_DIR:
                continue
            dst = view / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(model_dir / rel, dst)
            except OSError:
                shutil.copyfile(model_dir / rel, dst)
        yield view
    finally:
        shutil.rmtree(work, ignore_errors=True)


def adapter_ref(base_ref: str, name: str) -> str:
    repo, _, tag = base_ref.rpartition(":")
    full = adapter_tag(tag, name)
    if not _TAG.match(full):
        raise PackageError(f"The adapter tag {full!r} is not a valid OCI tag (at most 128 characters).",
                           hint="Shorten the recipe's version or the adapter's name.")
    return f"{repo}:{full}"


def adapter_annotations(info: dict[str, Any], entry: dict[str, Any], name: str, base: oci.Descriptor,
                        created: dt.datetime) -> dict[str, str]:
    a: dict[str, str] = {
        "org.opencontainers.image.title": f"{info['name']} adapter {name}",
        "org.opencontainers.image.version": str(info["version"]),
        "org.opencontainers.image.created": rfc3339(created),
        "org.opencontainers.image.description": f"LoRA adapter {name!r} of {info['tags'][0]} ({base.digest})",
        ADAPTER_ANNOTATION: name,
        ADAPTER_BASE_ANNOTATION: base.digest,
    }
    if info.get("license"):
        a["org.opencontainers.image.licenses"] = str(info["license"])
    source = info.get("source") or {}
    if source.get("hub"):
        a["org.opencontainers.image.source"] = f"https://huggingface.co/{source['hub']}"
    for key in ("target", "cache-key"):
        value = {"target": info.get("id"), "cache-key": info.get("cache_key")}[key]
        if value:
            a[NS + key] = str(value)
    dataset = entry.get("dataset")
    if isinstance(dataset, dict) and dataset.get("sha256"):
        a[NS + "adapter.dataset.digest"] = str(dataset["sha256"])
    a.update(evaluation_annotations(entry.get("evaluation") if isinstance(entry.get("evaluation"), dict) else None, NS))
    return a


def package_adapter(store: oci.Store, base: Packaged, name: str, path: Path, info: dict[str, Any],
                    entry: dict[str, Any], created: dt.datetime, *, sign_key: SigningKey | None = None,
                    attestations: bool = True, observed: dict[str, Any] | None = None) -> PackagedAdapter:
    """Store adapter ``name`` (file ``path``) as an artifact whose subject is ``base``'s manifest, tag it
    ``adapter_ref(base, name)`` and list it among the base's referrers (``build inspect`` shows it;
    a push takes it along), with its SBOM, provenance and evaluation (``attach.attach_adapter``)."""
    with store.writer() as w, path.open("rb") as f:
        while chunk := f.read(CHUNK):
            w.write(chunk)
        digest = w.commit()
        size = w.size
    layer = oci.Descriptor(ADAPTER_MEDIA_TYPE, digest, size, {oci.ANN_TITLE: f"{name}{ADAPTER_SUFFIX}"})
    config = store.put_json({"name": name, "file": f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}",
                             "base": {"reference": base.artifact_ref, "digest": base.artifact.digest},
                             "finetune": entry}, ADAPTER_CONFIG)
    ann = adapter_annotations(info, entry, name, base.artifact, created)
    manifest = referrers.referrer_manifest(base.artifact, ADAPTER_ARTIFACT_TYPE, [layer], ann, config)
    desc = store.put_json(manifest, MANIFEST, artifact_type=ADAPTER_ARTIFACT_TYPE, annotations=ann)
    ref = adapter_ref(base.artifact_ref, name)
    repo = base.artifact_ref.rpartition(":")[0]
    referrers.add_local(store, repo, base.artifact.digest, desc)
    store.tag(ref, desc)
    if attestations:
        attach.attach_adapter(store, ref, desc, info=info, key=sign_key, observed=observed)
    elif sign_key is not None:
        attach.sign_adapter(store, ref, desc, sign_key, created)
    return PackagedAdapter(name, ref, desc, layer)


def is_adapter(store: oci.Store, ref: str) -> bool:
    desc = store.resolve(ref)
    return desc is not None and desc.artifact_type == ADAPTER_ARTIFACT_TYPE


def sign_stored_adapter(store: oci.Store, ref: str, key: SigningKey | None) -> None:
    """`build push --sign-key` of an adapter packaged unsigned (or a cache hit's): its manifest and
    its attestations (attached first where they are missing), as packaging with the key does."""
    desc = store.resolve(ref)
    if desc is None:
        raise UsageError(f"{ref} is not in the local store {store.root}.")
    attach.attach_adapter(store, ref, desc, key=key)


def adapter_image_layer(store: oci.Store, name: str, path: Path) -> oci.Descriptor:
    """The runnable image's layer of one adapter: a tar of model/adapters/<name>.onnx_adapter."""
    arcname = f"{MODEL_ROOT}/{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}"
    with store.writer() as w:
        oci.write_tar_of(w, {arcname: path}, MODEL_ROOT)
        digest = w.commit()
        size = w.size
    return oci.Descriptor(MODEL_WEIGHT, digest, size, {
        oci.ANN_TITLE: f"{name}{ADAPTER_SUFFIX}.tar", oci.ANN_UNTESTED: "false", oci.ANN_FILEPATH: arcname,
        oci.ANN_FILE_METADATA: oci.file_metadata(arcname, path.stat().st_size)})


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    manifest: oci.Descriptor
    layer: oci.Descriptor


def stored_adapters(store: oci.Store, base_ref: str, base_digest: str) -> list[StoredAdapter]:
    """The adapters the store holds for the base manifest ``base_digest`` (of repository
    ``base_ref``'s name), whose blobs are all there, by name."""
    out: dict[str, StoredAdapter] = {}
    for d in referrers.list_local(store, base_ref.rpartition(":")[0] if ":" in base_ref else base_ref, base_digest):
        if d.artifact_type != ADAPTER_ARTIFACT_TYPE or not store.has(d.digest):
            continue
        try:
            manifest = store.read_json(d.digest)
            layer = oci.Descriptor.from_json(manifest["layers"][0])
            name = str(manifest["annotations"][ADAPTER_ANNOTATION])
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if valid_adapter_name(name) and store.has(layer.digest) and store.has(manifest["config"]["digest"]):
            out.setdefault(name, StoredAdapter(name, d, layer))
    return [out[n] for n in sorted(out)]


def tag_adapters(store: oci.Store, base_ref: str, base: oci.Descriptor, adapters: list[StoredAdapter]) -> None:
    """Give ``adapters`` of ``base`` the tags that go with the base's new tag ``base_ref`` (a cache hit)."""
    for a in adapters:
        referrers.add_local(store, base_ref.rpartition(":")[0], base.digest, a.manifest)
        store.tag(adapter_ref(base_ref, a.name), a.manifest)


def stored_adapter_image_layers(store: oci.Store, adapters: list[StoredAdapter]) -> list[oci.Descriptor]:
    return [adapter_image_layer(store, a.name, store.blob_path(a.layer.digest)) for a in adapters]


# ---- the runnable image ---------------------------------------------------------------------

@dataclass(frozen=True)
class RuntimeImage:
    """A runtime image in the local store: its manifest, config and layers."""

    ref: str
    manifest: oci.Descriptor
    config: dict[str, Any]
    layers: tuple[oci.Descriptor, ...]


def compose_image(store: oci.Store, runtime: RuntimeImage, model_layers: list[oci.Descriptor],
                  ann: dict[str, str], created: dt.datetime) -> oci.Descriptor:
    config = json.loads(json.dumps(runtime.config))
    config["created"] = rfc3339(created)
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    config["rootfs"]["diff_ids"] = list(config["rootfs"]["diff_ids"]) + [d.digest for d in model_layers]
    history = list(config.get("history") or [])
    for d in model_layers:
        title = str(d.annotations.get(oci.ANN_TITLE))
        history.append({"created": rfc3339(created), "created_by": f"olive-builder: {title}",
                        "comment": "LoRA adapter (its file is the adapter artifact's layer)"
                        if title.endswith(ADAPTER_SUFFIX + ".tar") else
                        "model layer (the same blob as in the model artifact)"})
    config["history"] = history
    inner = config.setdefault("config", {})
    labels = dict(inner.get("Labels") or {})
    genai = labels.get(RUNTIME_GENAI_LABEL)
    labels.update(ann)
    inner["Labels"] = labels
    for stale in ("container", "container_config"):  # the runtime build's last step, not ours
        config.pop(stale, None)
    config_desc = store.put_json(config, IMAGE_CONFIG)
    image_ann = dict(ann)
    image_ann["org.opencontainers.image.base.name"] = runtime.ref
    image_ann["org.opencontainers.image.base.digest"] = runtime.manifest.digest
    if genai:
        image_ann[RUNTIME_GENAI_LABEL] = genai
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in runtime.layers]
        + [oci.Descriptor(IMAGE_LAYER, d.digest, d.size, d.annotations).to_json() for d in model_layers],
        "annotations": image_ann,
    }
    return store.put_json(manifest, MANIFEST)


RUNTIME_GZIP_LEVEL = 1  # ~90 MB/s here; level 6 is 3x slower for ~9% smaller runtime layers


def _gzip_layer(store: oci.Store, f: IO[bytes]) -> tuple[oci.Descriptor, str]:
    """Store a runtime layer gzip-compressed (deterministically: no name, mtime 0); returns (blob, diff id)."""
    diff = hashlib.sha256()
    packer = zlib.compressobj(RUNTIME_GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: gzip header, mtime 0, no name
    with store.writer() as w:
        while chunk := f.read(CHUNK):
            diff.update(chunk)
            w.write(packer.compress(chunk))
        w.write(packer.flush())
        digest = w.commit()
        size = w.size
    return oci.Descriptor(IMAGE_LAYER_GZIP, digest, size), "sha256:" + diff.hexdigest()


def compose_from_artifact(store: oci.Store, runtime: RuntimeImage, manifest: dict[str, Any],
                          adapters: list[StoredAdapter] | None = None) -> oci.Descriptor:
    """The runnable image of a stored model artifact (for builds packaged without one), with
    ``adapters`` (``stored_adapters``) in its model folder."""
    ann = manifest.get("annotations") or {}
    created = dt.datetime.fromtimestamp(0, dt.UTC)
    if ann.get("org.opencontainers.image.created"):
        created = dt.datetime.strptime(ann["org.opencontainers.image.created"], RFC3339).replace(tzinfo=dt.UTC)
    layers = [oci.Descriptor.from_json(d) for d in manifest["layers"]]
    return compose_image(store, runtime, layers + stored_adapter_image_layers(store, adapters or []), ann, created)


class _ChunkReader:
    """A file-like reader over an iterator of byte chunks (docker-py's image save stream)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                break
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


def import_runtime(client: Any, image_ref: str, store: oci.Store) -> RuntimeImage:
    """Copy a runtime image from the Docker engine into the store (once per image id)."""
    import docker.errors

    try:
        image = client.images.get(image_ref)
    except docker.errors.ImageNotFound:
        raise ImageError(f"The runtime image {image_ref} is not in the Docker engine.",
                         hint="Build it with `build images --target runtime-cpu` (or runtime-cuda).") from None
    existing = store.resolve(image_ref)
    if existing is not None:
        manifest = store.read_json(existing.digest)
        if manifest["config"]["digest"] == image.id and all(store.has(d["digest"]) for d in manifest["layers"]):
            return RuntimeImage(image_ref, existing, store.read_json(image.id),
                                tuple(oci.Descriptor.from_json(d) for d in manifest["layers"]))
    try:
        stream = image.save(chunk_size=CHUNK, named=True)
        layers_by_name: dict[str, tuple[oci.Descriptor, str]] = {}  # name in the save tar -> (gzip blob, diff id)
        small: dict[str, bytes] = {}
        with tarfile.open(fileobj=_ChunkReader(iter(stream)), mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                if not member.isfile():
                    continue
                f = tar.extractfile(member)
                assert f is not None
                if member.size < (1 << 20):  # documents and tiny layers: stored only if used
                    small[member.name] = f.read()
                else:
                    layers_by_name[member.name] = _gzip_layer(store, f)
    except docker.errors.APIError as e:
        raise ImageError(f"Docker could not export {image_ref}: {e.explanation or e}") from None
    try:
        entry = json.loads(small["manifest.json"])[0]
        config_bytes = small[entry["Config"]]
        found = [layers_by_name[name] if name in layers_by_name else _gzip_layer(store, io.BytesIO(small[name]))
                 for name in entry["Layers"]]
    except (KeyError, IndexError, ValueError) as e:
        raise ImageError(f"Docker exported {image_ref} in a form this version does not understand ({e}).") from None
    config_desc = store.put_bytes(config_bytes, IMAGE_CONFIG)
    config = json.loads(config_bytes)
    if config.get("rootfs", {}).get("diff_ids") != [diff_id for _, diff_id in found]:
        raise ImageError(f"Docker's export of {image_ref} does not match its own layer list.")
    layers = tuple(desc for desc, _ in found)
    manifest_desc = store.put_json({"schemaVersion": 2, "mediaType": MANIFEST, "config": config_desc.to_json(),
                                    "layers": [d.to_json() for d in layers]}, MANIFEST)
    store.tag(image_ref, manifest_desc)
    return RuntimeImage(image_ref, manifest_desc, config, layers)
