"""Packaging: a checked model folder becomes OCI content in the local store.

Two manifests share the very same model layer blobs:

- the model artifact (CNCF ModelPack): artifactType ``application/vnd.cncf.model.manifest.v1+json``,
  a ModelPack config, one layer per weight file, one small layer with the tokenizer and
  other files that every target of a model shares, and one with the target's own
  ``genai_config.json`` and ``olive-builder.json``. Tag ``<name>:<version>-<target>``.
- the runnable image: the runtime image's layers plus those model layers (they unpack
  under ``/model``, where the runtime's server reads), with the runtime's entrypoint.
  Tag ``<name>:<version>-<target>-serve``.

Layers are deterministic tars (sorted names, mtime 0, uid/gid 0, fixed modes) and every
JSON document is written in one canonical form, so the same folder and the same creation
time always give the same digests. Digests are computed while the tars are written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import oci
from .contract import CHECK_NATIVE, INFO_FILE, NS, SERVE_SUFFIX, TOOLS, BuildRecord, RecordError
from .errors import ImageError, PackageError, UsageError

MODEL_ROOT = "model"  # tar entries are model/<file>: a container layer unpacks them at /model
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
class Packaged:
    artifact_ref: str
    artifact: oci.Descriptor
    image_ref: str | None
    image: oci.Descriptor | None
    layers: tuple[oci.Descriptor, ...]
    written_bytes: int  # model bytes written into new blobs (0 when every layer was already stored)
    annotations: dict[str, str] = field(default_factory=dict)


# ---- what goes where ------------------------------------------------------------------------

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


def group_files(model_dir: Path, files: list[str]) -> list[LayerGroup]:
    weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES) or (model_dir / f).stat().st_size >= BIG_FILE]
    target = [f for f in files if f in TARGET_FILES]
    shared = [f for f in files if f not in weights and f not in target]
    groups = [LayerGroup("weight", (f,), oci.MODEL_WEIGHT) for f in weights]
    if shared:
        groups.append(LayerGroup("shared", tuple(shared), oci.MODEL_WEIGHT_CONFIG))
    if target:
        groups.append(LayerGroup("target", tuple(target), oci.MODEL_WEIGHT_CONFIG))
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


def created_time(recipe_path: Path | None = None, model_dir: Path | None = None, *,
                 source_dir: Path | None = None, source_time: dt.datetime | None = None,
                 recorded: str | None = None) -> dt.datetime:
    """The creation time recorded in manifests, from the build's inputs only, so the same inputs
    give the same digests with no settings: ``SOURCE_DATE_EPOCH`` if set, else the newest of
    the recipe's last git commit, the source model's commit time (``source_time``, for Hub
    models) and the newest file of a local source model (``source_dir``, else the recipe's
    ``model.path``); 1970-01-01 when none is known. Never the clock and never the output:
    ``model_dir`` (what was built) is not looked at, since its files are as new as the build.
    ``recorded``: the time the build record holds (computed from the inputs at build time),
    used when no SOURCE_DATE_EPOCH overrides it, so a folder packaged again keeps its digests."""
    del model_dir  # kept for callers: the output folder's times are the build's, not the inputs'
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return dt.datetime.fromtimestamp(int(epoch), dt.UTC)
        except (ValueError, OverflowError, OSError):
            raise UsageError(f"SOURCE_DATE_EPOCH={epoch!r} is not a number of seconds.",
                             hint="Set it to a Unix time (e.g. `git log -1 --format=%ct`) or unset it.") from None
    if recorded:
        return parse_rfc3339(recorded)
    times: list[float] = []
    if source_time is not None:
        times.append(source_time.timestamp())
    if recipe_path is not None:
        try:
            out = subprocess.run(["git", "log", "-1", "--format=%ct", "--", recipe_path.name], cwd=recipe_path.parent,
                                 capture_output=True, text=True, timeout=10, check=False)
            if out.returncode == 0 and out.stdout.strip():
                times.append(float(int(out.stdout.strip())))
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        if source_dir is None:
            source_dir = _local_source(recipe_path)
    if source_dir is not None:
        try:
            times.append(max((p.stat().st_mtime for p in Path(source_dir).rglob("*") if p.is_file()), default=0.0))
        except OSError:
            pass
    return dt.datetime.fromtimestamp(int(max(times, default=0.0)), dt.UTC)


def _local_source(recipe_path: Path) -> Path | None:
    """The local model folder a recipe names (``model.path``), if it names one and still loads."""
    from . import recipe
    from .errors import BuilderError

    try:
        return recipe.load(recipe_path).model_dir
    except BuilderError:  # a recipe that no longer loads just adds no time
        return None


RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime(RFC3339)


def parse_rfc3339(text: str) -> dt.datetime:
    """A time ``rfc3339`` wrote (a build record's ``created``)."""
    try:
        return dt.datetime.strptime(text, RFC3339).replace(tzinfo=dt.UTC)
    except ValueError:
        raise PackageError(f"The build record's creation time {text!r} is not an RFC 3339 UTC time.",
                           hint="Rebuild the model with `build recipe`.") from None


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
        "source.model": source.get("hub") or ("local folder" if source.get("local") else None),
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
    # The evaluation's figures, gates and text digest (eval.*) and speed (bench.*); builds made
    # before the stage existed carry none.
    from .evaluate import manifest_annotations as evaluation_annotations

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
            extra: dict[str, Any] | None = None, attestations: bool = True, sign_key: Any = None,
            recipe_path: Path | None = None) -> Packaged:
    """Put ``model_dir`` into ``store`` as a ModelPack artifact and (with ``runtime``) a runnable image,
    with their SBOMs, provenance and evaluation attached as referrers (``attestations``) and, with
    ``sign_key`` (a ``sign.SigningKey``), signed (see ``attest.attach_build``)."""
    from . import attest

    model_dir = Path(model_dir)
    info = {**read_info(model_dir), **(extra or {})}
    created = created or created_time(model_dir=model_dir)
    files = model_files(model_dir)
    digests = attest.BackgroundDigests(model_dir, files) if attestations else None
    layers, written = write_layers(store, model_dir, group_files(model_dir, files), on_bytes)
    ann = manifest_annotations(info, created)
    config = store.put_json(modelpack_config(info, model_dir, created, [d.digest for d in layers]), oci.MODEL_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MANIFEST,
        "artifactType": oci.MODEL_ARTIFACT,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
        "annotations": ann,
    }
    artifact = store.put_json(manifest, oci.MANIFEST, artifact_type=oci.MODEL_ARTIFACT)
    artifact_ref = str(info["tags"][0])
    image_ref = image = None
    if runtime is not None:
        image = compose_image(store, runtime, layers, ann, created)
        image_ref = artifact_ref + SERVE_SUFFIX
        store.tag(image_ref, image)
    store.tag(artifact_ref, artifact)
    packaged = Packaged(artifact_ref, artifact, image_ref, image, tuple(layers), written, ann)
    if digests is not None:
        attest.attach_packaged(store, model_dir, packaged, info=info, created=created, runtime=runtime,
                               digests=digests, sign_key=sign_key, recipe_path=recipe_path)
    return packaged


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
        history.append({"created": rfc3339(created), "created_by": f"olive-builder: {d.annotations.get(oci.ANN_TITLE)}",
                        "comment": "model layer (the same blob as in the model artifact)"})
    config["history"] = history
    inner = config.setdefault("config", {})
    labels = dict(inner.get("Labels") or {})
    genai = labels.get(RUNTIME_GENAI_LABEL)
    labels.update(ann)
    inner["Labels"] = labels
    for stale in ("container", "container_config"):  # the runtime build's last step, not ours
        config.pop(stale, None)
    config_desc = store.put_json(config, oci.IMAGE_CONFIG)
    image_ann = dict(ann)
    image_ann["org.opencontainers.image.base.name"] = runtime.ref
    image_ann["org.opencontainers.image.base.digest"] = runtime.manifest.digest
    if genai:
        image_ann[RUNTIME_GENAI_LABEL] = genai
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in runtime.layers]
        + [oci.Descriptor(oci.IMAGE_LAYER, d.digest, d.size, d.annotations).to_json() for d in model_layers],
        "annotations": image_ann,
    }
    return store.put_json(manifest, oci.MANIFEST)


RUNTIME_GZIP_LEVEL = 1  # ~90 MB/s here; level 6 is 3x slower for ~9% smaller runtime layers


def _gzip_layer(store: oci.Store, f: Any) -> tuple[oci.Descriptor, str]:
    """Store a runtime layer gzip-compressed (deterministically: no name, mtime 0); returns (blob, diff id)."""
    diff = hashlib.sha256()
    packer = zlib.compressobj(RUNTIME_GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: gzip header, mtime 0, no name
    with store.writer() as w:
        while chunk := f.read(oci.CHUNK):
            diff.update(chunk)
            w.write(packer.compress(chunk))
        w.write(packer.flush())
        digest = w.commit()
        size = w.size
    return oci.Descriptor(oci.IMAGE_LAYER_GZIP, digest, size), "sha256:" + diff.hexdigest()


def compose_from_artifact(store: oci.Store, runtime: RuntimeImage, manifest: dict[str, Any]) -> oci.Descriptor:
    """The runnable image of a stored model artifact (for builds packaged without one)."""
    ann = manifest.get("annotations") or {}
    created = dt.datetime.fromtimestamp(0, dt.UTC)
    if ann.get("org.opencontainers.image.created"):
        created = dt.datetime.strptime(ann["org.opencontainers.image.created"], RFC3339).replace(tzinfo=dt.UTC)
    layers = [oci.Descriptor.from_json(d) for d in manifest["layers"]]
    return compose_image(store, runtime, layers, ann, created)


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
        stream = image.save(chunk_size=oci.CHUNK, named=True)
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
    config_desc = store.put_bytes(config_bytes, oci.IMAGE_CONFIG)
    config = json.loads(config_bytes)
    if config.get("rootfs", {}).get("diff_ids") != [diff_id for _, diff_id in found]:
        raise ImageError(f"Docker's export of {image_ref} does not match its own layer list.")
    layers = tuple(desc for desc, _ in found)
    manifest_desc = store.put_json({"schemaVersion": 2, "mediaType": oci.MANIFEST, "config": config_desc.to_json(),
                                    "layers": [d.to_json() for d in layers]}, oci.MANIFEST)
    store.tag(image_ref, manifest_desc)
    return RuntimeImage(image_ref, manifest_desc, config, layers)
