"""The build cache: a key for everything that decides a build's output, where to find a
build with that key, and how to reuse it.

The key digests (canonical JSON, sha256):

    recipe           the normalized recipe, without what cannot change the model: `version`,
                     `description`, `registry`, and a local `model.path` (its content is
                     the model revision instead)
    model_revision   the commit a Hub revision resolves to, or the digest of a local
                     model folder's files
    builder_image    the builder image's digest (its id), or "local" for --engine local
                     (a finetune recipe's dataset file and evaluation text: their content)
    tools            olive-ai, onnxruntime-genai, onnxruntime, transformers, torch, peft versions
    builder_version  olive-builder's own version

Every artifact records its key (annotation org.olive-builder.cache-key). Before Olive runs,
the pipeline looks for the key in the local store (``reuse_local``), then in the target
registry (``reuse_remote``), where each push also tags the artifact ``cache-<hex>`` (and
the image ``cache-<hex>-serve``). A hit skips the build and tags what exists.

Hub revisions are pinned before the build: by the lock file (``builder.recipe.lock``), a commit
in the recipe, the Hub API or, offline, the Hugging Face cache's refs (``builder.source.hub``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder import __version__
from builder.contract import (
    KEY_ANNOTATION,
    SERVE_SUFFIX,
    BuildRecord,
    RecordError,
    adapter_file,
    adapter_names,
    key_tag,
    sha256_file,
)
from builder.oci import layout as oci
from builder.oci.media import MODEL_ARTIFACT
from builder.oci.reference import repository
from builder.recipe.format import LoadedRecipe, dataset_path, digest_of, evaluation_text, normalized
from builder.recipe.lock import Entry
from builder.source import hub

if TYPE_CHECKING:  # lazy: the type alone; packaging (and the registry client, requests) loads when a hit is reused
    from builder.publish.package import RuntimeImage


@dataclass(frozen=True)
class KeyInputs:
    recipe: dict[str, Any]
    model_revision: str
    builder_image: str
    tools: dict[str, str]
    builder_version: str = __version__

    def key(self) -> str:
        return digest_of(asdict(self))


@dataclass(frozen=True)
class Pinned:
    """What a build is pinned to before it runs. ``key`` is None when the model revision
    cannot be resolved here (then the build runs without the cache)."""

    key: str | None
    commit: str | None  # the commit a Hub revision resolved to
    files: dict[str, str] | None  # from the lock file: what the download must hold


def pin(loaded: LoadedRecipe, entry: Entry | None, *, builder_image: str, tools: dict[str, str]) -> Pinned:
    """Resolve the model revision (lock entry, commit, Hub, HF cache; or a local folder's digest) and the key."""
    m = loaded.recipe.model
    commit: str | None = None
    files: dict[str, str] | None = None
    revision: str | None
    if m.hub:
        commit = entry.commit if entry else hub.resolve(m.hub, m.revision or "main")
        files = (entry.files if entry else None) or None
        revision = commit
    elif m.gguf is not None:  # the file's digest is its content: known before it is fetched or converted
        revision = f"gguf:sha256:{m.gguf.sha256}"
    else:
        folder = loaded.model_dir
        revision = local_revision(folder) if folder is not None and folder.is_dir() else None
    key = KeyInputs(recipe_inputs(loaded), revision, builder_image, tools).key() if revision else None
    return Pinned(key, commit, files)


def recipe_inputs(loaded: LoadedRecipe) -> dict[str, Any]:
    data = {k: v for k, v in normalized(loaded.recipe).items() if k not in ("version", "description", "registry")}
    model = dict(data.get("model") or {})
    model.pop("path", None)  # where a local model lies does not matter; its content does
    if "gguf" in model:  # likewise a local GGUF file: its sha256 stays
        model["gguf"] = {k: v for k, v in model["gguf"].items() if k != "path"}
    data["model"] = model
    data["target"] = {**(data.get("target") or {}), "provider": loaded.recipe.target.execution_provider}
    data_file = dataset_path(loaded.recipe, loaded.path)
    if data_file is not None and data_file.is_file():  # the training data's content, not its path
        finetune = dict(data.get("finetune") or {})
        finetune["dataset"] = {"sha256": sha256_file(data_file)}
        data["finetune"] = finetune
    text = evaluation_text(loaded.recipe, loaded.path)
    if text is not None and text.is_file():  # a recipe's own evaluation text: its content, not its path
        data["evaluate"] = {**(data.get("evaluate") or {}), "text": sha256_file(text)}
    return data


def local_revision(folder: Path) -> str:
    return digest_of(hub.folder_files(folder))


# ---- where built things are -----------------------------------------------------------------

def find_local(store: oci.Store, key: str) -> tuple[str, oci.Descriptor] | None:
    """A complete model artifact in ``store`` whose cache key is ``key``."""
    for ref, desc in sorted(store.refs().items()):
        if desc.artifact_type not in (None, MODEL_ARTIFACT) or not store.has(desc.digest):
            continue
        try:
            manifest = store.read_json(desc.digest)
        except (ValueError, OSError):
            continue
        if not isinstance(manifest, dict) or manifest.get("artifactType") != MODEL_ARTIFACT:
            continue
        if (manifest.get("annotations") or {}).get(KEY_ANNOTATION) != key:
            continue
        try:
            blobs = [manifest["config"], *manifest["layers"]]
            complete = all(store.has(b["digest"]) for b in blobs)
        except (KeyError, TypeError):
            continue
        if complete:
            return ref, desc
    return None


@dataclass(frozen=True)
class Hit:
    """A build found by its key. ``where`` is "local store" or the registry host."""

    where: str
    found_as: str  # the reference that had the key
    tag: str  # the tag the hit was given now
    artifact_digest: str
    image_digest: str | None
    output_current: bool = False  # the output folder already held this build
    remote: tuple[tuple[str, str], ...] = ()  # registry hits: (reference, digest) tagged there


def _holds_build(folder: Path, key: str) -> bool:
    try:
        return BuildRecord.read(folder).cache_key == key
    except (OSError, RecordError):
        return False


def reuse_local(store: oci.Store, key: str, tag: str, out_dir: Path, *, force: bool,
                runtime: Callable[[], RuntimeImage | None]) -> Hit | None:
    """A build with ``key`` in ``store``: tag it ``tag`` (and its image ``tag-serve``, composed now
    with ``runtime()`` if it was packaged without one) and make ``out_dir`` hold it."""
    # lazy: packaging and distribution bring the registry client (requests); `build matrix` needs only the key
    from builder.publish import distribute, package
    from builder.trust.verify import AdapterInfo  # lazy: as above (it reads content from registries too)

    found = find_local(store, key)
    if found is None:
        return None
    found_as, artifact = found
    manifest = store.read_json(artifact.digest)
    # A finetuned build's adapters are artifacts of their own: a hit needs every one its base names.
    adapters = package.stored_adapters(store, found_as, artifact.digest)
    if [a.name for a in adapters] != adapter_names(manifest):
        return None
    store.tag(tag, artifact)
    package.tag_adapters(store, tag, artifact, adapters)
    image = store.resolve(found_as + SERVE_SUFFIX)
    if image is None and (rt := runtime()) is not None:
        image = package.compose_from_artifact(store, rt, manifest, adapters)
    if image is not None:
        store.tag(tag + SERVE_SUFFIX, image)
    current = _holds_build(out_dir, key) and not force and \
        all(adapter_file(out_dir, a.name).is_file() for a in adapters)
    if not current:
        distribute.materialize(store, manifest, out_dir, force=force, shown=tag,
                               adapters=[AdapterInfo(a.name, a.layer, artifact) for a in adapters])
    return Hit("local store", found_as, tag, artifact.digest, image.digest if image else None, current)


def reuse_remote(host: str, namespace: str, key: str, tag: str, *, with_image: bool,
                 insecure: bool | None = None) -> Hit | None:
    """A build with ``key`` in the registry: tag its manifests with ``tag`` there (nothing is
    downloaded). None if the registry lacks it."""
    from builder.oci.registry import Registry  # lazy: the registry client (requests), as in reuse_local
    from builder.publish.distribute import retag_adapters  # lazy: as above; a hit's adapters get the new tag too

    name, _, version = tag.rpartition(":")
    repo = repository(namespace, name)
    registry = Registry(host, insecure=insecure)
    try:
        tagged: list[tuple[str, str]] = []
        for suffix in ("", SERVE_SUFFIX) if with_image else ("",):
            found = registry.get_manifest(repo, key_tag(key) + suffix)
            if found is None:
                if not suffix:
                    return None
                continue
            data, media, digest = found
            registry.put_manifest(repo, version + suffix, data, media)
            tagged.append((f"{host}/{repo}:{version}{suffix}", digest))
        image = tagged[1][1] if len(tagged) > 1 else None
        tagged += retag_adapters(registry, repo, tagged[0][1], version)
    finally:
        registry.close()
    return Hit(host, f"{host}/{repo}:{key_tag(key)}", tag, tagged[0][1], image, remote=tuple(tagged))

