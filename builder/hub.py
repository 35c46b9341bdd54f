"""The Hugging Face Hub, from the driver's side: resolving a revision to a commit before a
build, and the file hashes of a cached snapshot (for lock files).

The worker downloads models itself (``builder.worker.fetch_model``); this module never
downloads weights. It asks the Hub API (``HF_ENDPOINT``, with ``HF_TOKEN`` when set) or,
offline, the Hugging Face cache's refs.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from .contract import hf_home, hf_token, sha256_file

COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Never fetched from the Hub: original checkpoints, other formats. The worker uses the same list.
HUB_IGNORE = ("original/*", "*.gguf", "onnx/*", "*.msgpack", "*.h5", "*.ot", "*.pth")


def is_commit(revision: str | None) -> bool:
    return bool(revision) and bool(COMMIT.match(revision or ""))


def cache_folder(hub: str) -> Path:
    return hf_home() / "hub" / ("models--" + hub.replace("/", "--"))


def folder_files(folder: Path) -> dict[str, str]:
    """name -> sha256:... of every file under ``folder`` (Hugging Face's own .cache excluded)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def resolve(hub: str, revision: str) -> str | None:
    """The commit ``revision`` of ``hub`` names now, or None when it cannot be known here."""
    if COMMIT.match(revision):
        return revision
    cached_ref = cache_folder(hub) / "refs" / revision
    cached = cached_ref.read_text().strip() if cached_ref.is_file() else None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return cached
    import requests

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    token = hf_token()
    try:
        r = requests.get(f"{endpoint}/api/models/{hub}/revision/{revision}", timeout=10,
                         headers={"Authorization": f"Bearer {token}"} if token else {})
        if r.status_code == 200:
            sha = r.json().get("sha")
            return sha if isinstance(sha, str) and COMMIT.match(sha) else cached
    except (requests.RequestException, ValueError, AttributeError):
        pass
    return cached


def snapshot_files(hub: str, commit: str) -> dict[str, str]:
    """sha256 of each file of ``hub@commit`` that a build downloads, from the local Hugging Face
    cache (empty if the snapshot is not cached)."""
    snapshot = cache_folder(hub) / "snapshots" / commit
    if not snapshot.is_dir():
        return {}
    return {name: digest for name, digest in folder_files(snapshot).items()
            if not any(fnmatch.fnmatch(name, pattern) for pattern in HUB_IGNORE)}
