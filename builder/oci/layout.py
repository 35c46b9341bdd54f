"""OCI content: descriptors, deterministic tar layers and the local store.

The local store is an OCI image layout (https://github.com/opencontainers/image-spec/blob/main/image-layout.md):
``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``. Every blob is written to a
temporary file in ``ingest/`` while its digest is computed, and renamed into ``blobs/``
only when complete, so a crash or Ctrl-C never leaves a blob whose name lies about its
content. ``index.json`` names manifests with ``org.opencontainers.image.ref.name`` set to
``<name>:<tag>`` and is replaced atomically under a lock.

An ingest file is named ``blob-<pid>-<random>`` and its writer holds an exclusive ``flock``
on it while it writes; opening a store removes ingest files nobody holds (their writer died,
even by ``kill -9``), so an interrupted packaging never leaves gigabytes behind. ``gc``
removes blobs that no tag reaches.

The default store is ``$OLIVE_BUILDER_STORE``, else ``$XDG_DATA_HOME/olive-builder/store``
(``~/.local/share/olive-builder/store``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from builder.contract import CHUNK, write_json
from builder.errors import ContentError, StoreError
from builder.oci.media import ADAPTER_ARTIFACT_TYPE, INDEX

# Annotation keys of the formats this store holds (their media types: builder.oci.media)
ANN_FILEPATH = "org.cncf.model.filepath"
ANN_FILE_METADATA = "org.cncf.model.file.metadata+json"
ANN_UNTESTED = "org.cncf.model.file.mediatype.untested"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_TITLE = "org.opencontainers.image.title"
ENV_STORE = "OLIVE_BUILDER_STORE"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if missing) for the ``with`` block. flock does not
    nest within a process: code that holds one lock and needs another uses another file."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """``data`` parsed as a JSON object, or ContentError("<what> is not JSON" / "... a JSON object")."""
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        raise ContentError(f"{what} is not JSON.") from None
    if not isinstance(parsed, dict):
        raise ContentError(f"{what} is not a JSON object.")
    return parsed


def canonical_json(obj: Any) -> bytes:
    """The one byte form this project writes JSON documents in: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Descriptor:
        return cls(media_type=d["mediaType"], digest=d["digest"], size=int(d["size"]),
                   annotations=dict(d.get("annotations") or {}), artifact_type=d.get("artifactType"))


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def valid_digest(digest: str) -> bool:
    algo, _, hexpart = digest.partition(":")
    return algo == "sha256" and len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart)


class BlobWriter:
    """A file-like sink that hashes what is written; ``commit`` moves it into the store."""

    def __init__(self, store: Store):
        self._store = store
        fd, name = tempfile.mkstemp(prefix=f"blob-{os.getpid()}-", dir=store.ingest)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: the sign of a live writer (see clean_ingest)
        self._file: BinaryIO = os.fdopen(fd, "wb", buffering=0)
        self._path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None

    def write(self, data: bytes | memoryview) -> int:
        self._hash.update(data)
        view = memoryview(data)
        while view:  # an unbuffered write may be short
            n = self._file.write(view)
            view = view[n:]
        self.size += len(data)
        return len(data)

    def commit(self, expected: str | None = None) -> str:
        """Finish the blob. With ``expected``, a mismatch discards it and raises StoreError."""
        self._file.close()
        digest = "sha256:" + self._hash.hexdigest()
        if expected is not None and digest != expected:
            self._path.unlink(missing_ok=True)
            raise StoreError(f"content does not match its digest: expected {expected}, got {digest}")
        target = self._store.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            self._path.unlink(missing_ok=True)
            self._store.touch(digest)  # in use again: gc's grace period protects it until it is tagged
        else:
            os.chmod(self._path, 0o444)
            os.replace(self._path, target)
        self.digest = digest
        return digest

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._path.unlink(missing_ok=True)


class Store:
    """A local OCI image layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.blobs = self.root / "blobs" / "sha256"
        self.ingest = self.root / "ingest"
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.ingest.mkdir(parents=True, exist_ok=True)
            layout = self.root / "oci-layout"
            if not layout.exists():
                layout.write_text('{"imageLayoutVersion":"1.0.0"}')
            if not (self.root / "index.json").exists():
                self._write_index({"schemaVersion": 2, "mediaType": INDEX, "manifests": []})
        except OSError as e:
            raise StoreError(f"Cannot use {self.root} as the local OCI store: {e.strerror or e}",
                             hint=f"Choose a writable folder with --store or {ENV_STORE}.") from None
        self.clean_ingest()

    def clean_ingest(self, min_age: float = 10.0) -> int:
        """Remove ingest files whose writer is gone; returns the bytes freed.

        A writer holds an exclusive flock on its file from creation to commit or abort, and the
        kernel drops it when the process dies however it dies. A file we can lock has no live
        writer; ``min_age`` covers the instant between a writer's mkstemp and its flock."""
        freed = 0
        try:
            names = os.listdir(self.ingest)
        except OSError:
            return 0
        now = time.time()
        for name in names:
            path = self.ingest / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if now - st.st_mtime < min_age:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live writer holds it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    freed += st.st_size
            finally:
                os.close(fd)
        return freed

    def touch(self, digest: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.blob_path(digest))

    # blobs
    def blob_path(self, digest: str) -> Path:
        if not valid_digest(digest):
            raise StoreError(f"{digest!r} is not a sha256 digest.")
        return self.blobs / digest.split(":", 1)[1]

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    @contextlib.contextmanager
    def writer(self) -> Iterator[BlobWriter]:
        w = BlobWriter(self)
        try:
            yield w
        except BaseException:
            w.abort()
            raise
        if w.digest is None:
            w.commit()

    def put_bytes(self, data: bytes, media_type: str, annotations: dict[str, str] | None = None,
                  artifact_type: str | None = None) -> Descriptor:
        digest = digest_bytes(data)
        if self.has(digest):
            self.touch(digest)
        else:
            with self.writer() as w:
                w.write(data)
        return Descriptor(media_type, digest, len(data), annotations or {}, artifact_type)

    def put_json(self, obj: Any, media_type: str, **kw: Any) -> Descriptor:
        return self.put_bytes(canonical_json(obj), media_type, **kw)

    def read_bytes(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"The local store {self.root} lacks blob {digest}.",
                             hint="The store is incomplete; build or pull the model again.") from None

    def read_json(self, digest: str) -> Any:
        return json.loads(self.read_bytes(digest))

    def open_blob(self, digest: str) -> BinaryIO:
        return self.blob_path(digest).open("rb")

    # refs
    def locked(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.root / ".lock")

    def _read_index(self) -> dict[str, Any]:
        index: dict[str, Any] = json.loads((self.root / "index.json").read_text())
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        write_json(self.root / "index.json", index)

    def tag(self, ref: str, desc: Descriptor) -> None:
        """Point ``ref`` (``name:tag``) at a manifest whose blobs are all in the store."""
        entry = desc.to_json()
        entry["annotations"] = {**desc.annotations, ANN_REF_NAME: ref}
        with self.locked():
            index = self._read_index()
            index["manifests"] = [m for m in index["manifests"]
                                  if (m.get("annotations") or {}).get(ANN_REF_NAME) != ref] + [entry]
            index["manifests"].sort(key=lambda m: m["annotations"][ANN_REF_NAME])
            self._write_index(index)

    def resolve(self, ref: str) -> Descriptor | None:
        return self.refs().get(ref)

    def refs(self) -> dict[str, Descriptor]:
        out = {}
        for m in self._read_index()["manifests"]:
            ref = (m.get("annotations") or {}).get(ANN_REF_NAME)
            if ref:
                d = Descriptor.from_json(m)
                out[ref] = Descriptor(d.media_type, d.digest, d.size,
                                      {k: v for k, v in d.annotations.items() if k != ANN_REF_NAME}, d.artifact_type)
        return out


def default_store_path() -> Path:
    if os.environ.get(ENV_STORE):
        return Path(os.environ[ENV_STORE])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "olive-builder" / "store"


def open_store(path: str | Path | None = None) -> Store:
    return Store(path if path is not None else default_store_path())


# ---- deterministic tar layers -------------------------------------------------------------

_ZERO_BLOCK = b"\0" * tarfile.BLOCKSIZE


def _tarinfo(name: str, *, size: int = 0, is_dir: bool = False, mode: int | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = mode if mode is not None else (0o755 if is_dir else 0o644)
    info.size = 0 if is_dir else size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def file_metadata(name: str, size: int, mode: int = 0o644) -> str:
    """The ModelPack ``org.cncf.model.file.metadata+json`` value for a file written by ``write_tar``."""
    return json.dumps({"name": name, "mode": mode, "uid": 0, "gid": 0, "size": size,
                       "mtime": "1970-01-01T00:00:00Z", "typeflag": 0}, sort_keys=True, separators=(",", ":"))


def write_tar(out: Any, root: Path, files: list[str], prefix: str,
              on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Write a tar of ``root/<file>`` as ``<prefix>/<file>`` to ``out``: sorted names, zero mtimes,
    uid/gid 0, no user names, fixed modes. Every byte of every file is read once, in large chunks."""
    write_tar_of(out, {f"{prefix}/{f}": root / f for f in files}, prefix, on_bytes)


def write_tar_of(out: Any, members: dict[str, Path], prefix: str,
                 on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """``write_tar`` with each entry's name chosen apart from where its bytes are (``name -> file``,
    every name under ``prefix``/): a stored blob goes into a layer under its model file name, and
    the same bytes under the same name give the same tar whether they come from a folder or a store."""
    dirs: set[str] = {prefix}
    for name in members:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    entries: list[tuple[str, Path | None]] = sorted([(d + "/", None) for d in dirs] + list(members.items()))
    for arcname, path in entries:
        if path is None:
            out.write(_tarinfo(arcname, is_dir=True).tobuf(tarfile.PAX_FORMAT, "utf-8", "strict"))
            continue
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            out.write(_tarinfo(arcname, size=size).tobuf(tarfile.PAX_FORMAT, "utf-8", "strict"))
            left = size
            while left:
                n = f.readinto(view[: min(CHUNK, left)])
                if not n:
                    raise StoreError(f"{path} shrank while it was being packaged.")
                out.write(view[:n])
                left -= n
                on_bytes(n)
            if f.read(1):
                raise StoreError(f"{path} grew while it was being packaged.")
        pad = -size % tarfile.BLOCKSIZE
        if pad:
            out.write(_ZERO_BLOCK[:pad])
    out.write(_ZERO_BLOCK * 2)


# ---- manifests from elsewhere -------------------------------------------------------------

MAX_DESCRIPTORS = 4096  # a model has one layer per weight file; a runtime image a dozen more
MAX_ANNOTATIONS_BYTES = 256 << 10
ENV_MAX_MODEL = "OLIVE_BUILDER_MAX_MODEL_BYTES"
DEFAULT_MAX_MODEL = 1 << 40  # 1 TiB: the largest models published today are a few hundred GB


def max_model_bytes() -> int:
    raw = os.environ.get(ENV_MAX_MODEL, "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return DEFAULT_MAX_MODEL


def _descriptor(d: Any, where: str, shown: str) -> Descriptor:
    if not isinstance(d, dict):
        raise ContentError(f"{shown}: {where} is not a descriptor (a JSON object).")
    media, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
    if not isinstance(media, str) or not media or len(media) > 255:
        raise ContentError(f"{shown}: {where} has no valid mediaType.")
    if not isinstance(digest, str) or not valid_digest(digest):
        raise ContentError(f"{shown}: {where} has no valid sha256 digest.")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > max_model_bytes():
        raise ContentError(f"{shown}: {where} has no valid size (a whole number of bytes up to {max_model_bytes()}).")
    ann = d.get("annotations")
    if ann is not None and (not isinstance(ann, dict) or
                            not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items())):
        raise ContentError(f"{shown}: {where} has annotations that are not strings.")
    art = d.get("artifactType")
    if art is not None and not isinstance(art, str):
        raise ContentError(f"{shown}: {where} has an artifactType that is not a string.")
    return Descriptor.from_json(d)


def parse_manifest(data: bytes, shown: str) -> dict[str, Any]:
    """An OCI image manifest from anywhere, checked for shape and size before anything uses it:
    a JSON object, schemaVersion 2, a config and at most MAX_DESCRIPTORS layers, each a
    descriptor with a media type, a sha256 digest and a size, the sizes together under the
    model size limit (``OLIVE_BUILDER_MAX_MODEL_BYTES``). Raises ContentError."""
    manifest = json_object(data, f"{shown}: the manifest")
    if manifest.get("schemaVersion") != 2:
        raise ContentError(f"{shown}: the manifest's schemaVersion is not 2.")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ContentError(f"{shown}: the manifest has no list of layers.")
    if len(layers) > MAX_DESCRIPTORS:
        raise ContentError(f"{shown}: the manifest lists {len(layers)} layers, more than the {MAX_DESCRIPTORS} "
                           "allowed; refused.")
    blobs = [_descriptor(manifest.get("config"), "config", shown)]
    blobs += [_descriptor(d, f"layer {i}", shown) for i, d in enumerate(layers)]
    total = sum(b.size for b in blobs)
    if total > max_model_bytes():
        raise ContentError(f"{shown}: the manifest's blobs add up to {total} bytes, more than the "
                           f"{max_model_bytes()} allowed ({ENV_MAX_MODEL}); refused.")
    ann = manifest.get("annotations")
    if ann is not None and (not isinstance(ann, dict) or
                            not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items())):
        raise ContentError(f"{shown}: the manifest's annotations are not strings.")
    for key in ("mediaType", "artifactType"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise ContentError(f"{shown}: the manifest's {key} is not a string.")
    return manifest


# ---- garbage collection ------------------------------------------------------------------

@dataclass(frozen=True)
class GcReport:
    removed: int  # blobs
    freed_bytes: int  # blobs and dead ingest files
    kept: int  # blobs still reachable (or too young to judge)


def reachable(store: Store) -> set[str]:
    """Every blob a tag in ``store`` reaches: manifests, their configs and layers, index children."""
    seen: set[str] = set()
    todo = [d.digest for d in store.refs().values()]
    while todo:
        digest = todo.pop()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            doc = store.read_json(digest)
        except (StoreError, ValueError):
            continue  # a missing or non-JSON blob reaches nothing further
        if not isinstance(doc, dict):
            continue
        children = [doc.get("config")] + list(doc.get("layers") or []) + list(doc.get("manifests") or [])
        if doc.get("artifactType") == ADAPTER_ARTIFACT_TYPE:  # a pulled adapter keeps its (maybe untagged) base
            children.append(doc.get("subject"))
        todo += [c["digest"] for c in children
                 if isinstance(c, dict) and isinstance(c.get("digest"), str) and valid_digest(c["digest"])]
    return seen


def gc(store: Store, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcReport:
    """Remove blobs no tag reaches, and ingest files no live writer holds.

    Packaging and pulls write blobs before they tag them, so a blob younger than
    ``grace_seconds`` (writers refresh the time of a blob they reuse) is kept: a gc beside a
    running build never takes what that build is about to tag. The mark runs under the
    store lock, so no tag changes between mark and sweep."""
    removed = freed = kept = 0
    now = time.time()
    with store.locked():
        live = reachable(store)
        for entry in os.scandir(store.blobs):
            digest = "sha256:" + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if digest in live or now - st.st_mtime < grace_seconds:
                kept += 1
                continue
            if not dry_run:
                try:
                    os.unlink(entry.path)
                except OSError:
                    kept += 1
                    continue
            removed += 1
            freed += st.st_size
        if not dry_run:
            freed += store.clean_ingest()
    return GcReport(removed=removed, freed_bytes=freed, kept=kept)


# ---- putting a folder in place ------------------------------------------------------------

_RENAME_NOREPLACE = 1  # from <linux/fs.h>
_AT_FDCWD = -100


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist, atomically (Linux renameat2);
    FileExistsError if it does. Two processes racing for one output folder: exactly one wins.
    Where renameat2 is missing (old kernels, some filesystems) a check then rename stands in."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)
