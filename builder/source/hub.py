"""The Hugging Face Hub, from the driver's side: resolving a revision to a commit before a
build, and the file hashes of a cached snapshot (for lock files).

The worker downloads models itself (``builder.build.worker.fetch_model``); this module never
downloads weights. It asks the Hub API (``HF_ENDPOINT``, with ``HF_TOKEN`` when set) or,
offline, the Hugging Face cache's refs.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from builder.contract import cache_dir, hf_home, hf_token, sha256_file
from builder.errors import DatasetError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Never fetched from the Hub: original checkpoints, other formats. The worker uses the same list.
HUB_IGNORE = ("original/*", "*.gguf", "onnx/*", "*.msgpack", "*.h5", "*.ot", "*.pth")


def inside_repository(name: str) -> bool:
    """A file path that stays inside a Hub repository: relative, no '.', '..' or empty parts, no '\\'."""
    return bool(name) and not name.startswith("/") and "\\" not in name \
        and all(part not in ("", ".", "..") for part in name.split("/"))


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


# A dataset file larger than this is refused while it downloads (the check reads it row by row).
MAX_DATASET_FILE = 4 << 30
STALL_SECONDS = float(os.environ.get("OLIVE_BUILDER_HUB_STALL_SECONDS", "60"))


def dataset_folder(hub: str, commit: str) -> Path:
    """Where files of Hub dataset ``hub`` at ``commit`` are kept: a commit never changes, so a
    file there is never fetched twice."""
    return cache_dir() / "datasets" / hub.replace("/", "--") / commit


def fetch_dataset(hub: str, commit: str, files: list[str], *, max_bytes: int = MAX_DATASET_FILE) -> list[Path]:
    """The local paths of ``files`` of the Hub dataset ``hub`` at ``commit``, downloaded once
    (from ``HF_ENDPOINT``, with ``HF_TOKEN`` when set) into ``dataset_folder``, atomically."""
    import tempfile

    import requests

    from builder.transport import Watchdog, watched_session  # lazy: requests, which the worker lacks

    folder = dataset_folder(hub, commit)
    out: list[Path] = []
    # The watchdog the registry client uses too: a Hub (or proxy) that drips bytes is cut once it moves
    # less than MIN_PROGRESS bytes in a window, which a per-read timeout alone would not do.
    watchdog = Watchdog()
    session = watched_session(watchdog)
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    token = hf_token()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    for name in files:
        dest = folder / name
        if not inside_repository(name) or folder.resolve() not in dest.resolve().parents:
            raise DatasetError(f"{name!r} is not a path inside the dataset {hub}.")
        out.append(dest)
        if dest.is_file():
            continue
        if offline:
            raise DatasetError(f"{hub}@{commit[:12]}: {name} is not in the dataset cache ({folder}) and "
                               "HF_HUB_OFFLINE is set.",
                               hint="Build once with Hub access, or point `finetune.dataset.path` at a local copy.")
        url = f"{endpoint}/datasets/{hub}/resolve/{commit}/{name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        try:
            watchdog.arm(STALL_SECONDS, window=True)
            with os.fdopen(fd, "wb") as f, session.get(
                    url, stream=True, timeout=30, headers={"Authorization": f"Bearer {token}"} if token else {}) as r:
                if r.status_code in (401, 403):
                    raise DatasetError(f"The Hub refused {hub} ({r.status_code}): it is private or gated.",
                                       hint="Accept its terms on the Hub and set HF_TOKEN to a token of that account.")
                if r.status_code == 404:
                    raise DatasetError(f"The Hub has no {name} in the dataset {hub} at {commit[:12]} (404).",
                                       hint="Check `finetune.dataset` hub, revision and files.")
                if r.status_code != 200:
                    raise DatasetError(f"The Hub answered {r.status_code} for {name} of the dataset {hub}.",
                                       hint="Wait a minute and build again (HF_TOKEN gets a higher rate limit).")
                size = 0
                for chunk in r.iter_content(1 << 16):
                    watchdog.progress(len(chunk))
                    size += len(chunk)
                    if size > max_bytes:
                        raise DatasetError(f"{name} of the dataset {hub} is larger than {max_bytes >> 20} MiB.",
                                           hint="Train on a smaller file of the dataset.")
                    f.write(chunk)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except requests.RequestException as e:
            if watchdog.expired:
                raise DatasetError(f"Fetching {name} of the dataset {hub} stalled: less than 64 KiB in "
                                   f"{STALL_SECONDS:.0f} s.", hint="Check the network (or HF_ENDPOINT) and build "
                                   "again.") from None
            raise DatasetError(f"Fetching {name} of the dataset {hub} failed: {type(e).__name__}",
                               hint="Check the network (or HF_ENDPOINT) and build again.") from None
        finally:
            watchdog.disarm()
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out
