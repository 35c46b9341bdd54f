"""The build cache: a key for everything that decides a build's output, and where to find it.

The key digests (canonical JSON, sha256):

    recipe           the normalized recipe, without what cannot change the model: `version`,
                     `description`, `registry`, and a local `model.path` (its content is
                     the model revision instead)
    model_revision   the commit a Hub revision resolves to, or the digest of a local
                     model folder's files
    builder_image    the builder image's digest (its id), or "local" for --engine local
    tools            olive-ai, onnxruntime-genai, onnxruntime, transformers, torch versions
    builder_version  olive-builder's own version

Every artifact records its key (annotation org.olive-builder.cache-key). Before Olive runs,
`build recipe` looks for the key in the local store, then in the target registry, where
each push also tags the artifact `cache-<hex>` (and the image `cache-<hex>-serve`). A hit
skips the build and tags what exists.

Hub revisions are resolved before the build: from the lock file (`build lock`), a commit
in the recipe, the Hub API, or (offline) the Hugging Face cache's refs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__, oci
from .errors import PlanError
from .package import KEY_ANNOTATION, NS, TOOLS
from .recipe import LoadedRecipe, digest_of, normalized

TOOL_LABEL = NS + "tools."  # builder image labels (Dockerfile.cpu, Dockerfile.cuda)
KEY_TAG_PREFIX = "cache-"
LOCK_FILE = "olive-builder.lock"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


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


def pin(loaded: LoadedRecipe, entry: dict[str, Any] | None, *, builder_image: str, tools: dict[str, str]) -> Pinned:
    """Resolve the model revision (lock entry, commit, Hub, HF cache; or a local folder's digest) and the key."""
    m = loaded.recipe.model
    commit, files = None, None
    if m.hub:
        commit = entry["commit"] if entry else resolve_hub(m.hub, m.revision or "main")
        files = (entry or {}).get("files") or None
        revision = commit
    else:
        folder = loaded.model_dir
        revision = local_revision(folder) if folder is not None and folder.is_dir() else None
    key = KeyInputs(recipe_inputs(loaded), revision, builder_image, tools).key() if revision else None
    return Pinned(key, commit, files)


def recipe_inputs(loaded: LoadedRecipe) -> dict[str, Any]:
    data = {k: v for k, v in normalized(loaded.recipe).items() if k not in ("version", "description", "registry")}
    model = dict(data.get("model") or {})
    model.pop("path", None)  # where a local model lies does not matter; its content does
    data["model"] = model
    data["target"] = {**(data.get("target") or {}), "provider": loaded.recipe.target.execution_provider}
    return data


def key_tag(key: str) -> str:
    return KEY_TAG_PREFIX + key.split(":", 1)[1]


# ---- tools ----------------------------------------------------------------------------------

def tools_of_image(client: Any, image: str) -> tuple[str, dict[str, str]]:
    """(image id, tool versions) of a builder image: from its labels, else by asking Python inside it."""
    img = client.images.get(image)
    labels = img.labels or {}
    tools = {t: labels[TOOL_LABEL + t] for t in TOOLS if TOOL_LABEL + t in labels}
    if len(tools) < len(TOOLS):  # an image not built from our Dockerfiles: ask its Python
        probe = ("import importlib.metadata as m, json\n"
                 "def v(*names):\n"
                 "    for n in names:\n"
                 "        try: return m.version(n)\n"
                 "        except m.PackageNotFoundError: pass\n"
                 "print(json.dumps({'olive-ai': v('olive-ai'), 'onnxruntime-genai': v('onnxruntime-genai', "
                 "'onnxruntime-genai-cuda'), 'onnxruntime': v('onnxruntime', 'onnxruntime-gpu'), "
                 "'transformers': v('transformers'), 'torch': v('torch')}))")
        out = client.containers.run(image, ["python", "-c", probe], remove=True, stdout=True, stderr=False)
        tools = {k: str(v) for k, v in json.loads(out.decode().strip().splitlines()[-1]).items()}
    return str(img.id), tools


def tools_here() -> dict[str, str]:
    import importlib.metadata as md

    def version(*names: str) -> str:
        for name in names:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                continue
        return "none"

    return {"olive-ai": version("olive-ai"), "onnxruntime-genai": version("onnxruntime-genai", "onnxruntime-genai-cuda"),
            "onnxruntime": version("onnxruntime", "onnxruntime-gpu"), "transformers": version("transformers"),
            "torch": version("torch")}


# ---- model revisions ------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(oci.CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def folder_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def local_revision(folder: Path) -> str:
    return digest_of(folder_files(folder))


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


def _cache_folder(hub: str) -> Path:
    return _hf_home() / "hub" / ("models--" + hub.replace("/", "--"))


def resolve_hub(hub: str, revision: str) -> str | None:
    """The commit ``revision`` of ``hub`` names now, or None when it cannot be known here."""
    if _COMMIT.match(revision):
        return revision
    cached_ref = _cache_folder(hub) / "refs" / revision
    cached = cached_ref.read_text().strip() if cached_ref.is_file() else None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return cached
    import requests

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    try:
        r = requests.get(f"{endpoint}/api/models/{hub}/revision/{revision}", timeout=10,
                         headers={"Authorization": f"Bearer {token}"} if token else {})
        if r.status_code == 200:
            return str(r.json().get("sha") or "") or cached
    except (requests.RequestException, ValueError):
        pass
    return cached


def hub_files(hub: str, commit: str) -> dict[str, str]:
    """sha256 of each file of ``hub@commit`` that a build downloads, from the local Hugging Face
    cache (empty if the snapshot is not cached)."""
    import fnmatch

    from .worker import HUB_IGNORE

    snapshot = _cache_folder(hub) / "snapshots" / commit
    if not snapshot.is_dir():
        return {}
    return {name: digest for name, digest in folder_files(snapshot).items()
            if not any(fnmatch.fnmatch(name, pattern) for pattern in HUB_IGNORE)}


# ---- lock files -----------------------------------------------------------------------------

def find_lock(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        if (folder / LOCK_FILE).is_file():
            return folder / LOCK_FILE
    return None


def read_lock(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        assert isinstance(data.get("recipes"), dict)
        return data
    except (OSError, ValueError, AssertionError):
        raise PlanError(f"{path} is not a lock file written by `build lock`.",
                        hint="Delete it and run `build lock` again.") from None


def lock_entry(loaded: LoadedRecipe, lock: Path | None) -> dict[str, Any] | None:
    if lock is None or not loaded.recipe.model.hub:
        return None
    entry = read_lock(lock)["recipes"].get(loaded.id)
    revision = loaded.recipe.model.revision or "main"
    if entry and entry.get("hub") == loaded.recipe.model.hub and entry.get("revision") == revision:
        return dict(entry)
    return None  # stale: the recipe names another model or revision than the lock recorded


def require_locked(loaded: LoadedRecipe, entry: dict[str, Any] | None, lock: Path | None) -> None:
    m = loaded.recipe.model
    if not m.hub or _COMMIT.match(m.revision or "") or entry is not None:
        return
    where = f"{lock} has no current entry for it" if lock else f"no {LOCK_FILE} was found above {loaded.path.parent}"
    raise PlanError(
        f"{loaded.id} is not pinned: revision {m.revision or 'main'!r} of {m.hub} can move, and {where}.",
        hint="Run `build lock` and commit olive-builder.lock, or set model.revision to a commit; "
             "--require-locked refuses unpinned recipes.",
    )


# ---- where built things are -----------------------------------------------------------------

def find_local(store: oci.Store, key: str) -> tuple[str, oci.Descriptor] | None:
    """A complete model artifact in ``store`` whose cache key is ``key``."""
    for ref, desc in sorted(store.refs().items()):
        if desc.artifact_type not in (None, oci.MODEL_ARTIFACT) or not store.has(desc.digest):
            continue
        try:
            manifest = store.read_json(desc.digest)
        except (ValueError, OSError):
            continue
        if manifest.get("artifactType") != oci.MODEL_ARTIFACT:
            continue
        if (manifest.get("annotations") or {}).get(KEY_ANNOTATION) != key:
            continue
        blobs = [manifest["config"], *manifest["layers"]]
        if all(store.has(b["digest"]) for b in blobs):
            return ref, desc
    return None
