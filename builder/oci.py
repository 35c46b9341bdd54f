"""OCI content: media types, descriptors, deterministic tar layers and the local store.

The local store is an OCI image layout (https://github.com/opencontainers/image-spec/blob/main/image-layout.md):
``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``. Every blob is written to a
temporary file in ``ingest/`` while its digest is computed, and renamed into ``blobs/``
only when complete, so a crash or Ctrl-C never leaves a blob whose name lies about its
content. ``index.json`` names manifests with ``org.opencontainers.image.ref.name`` set to
``<name>:<tag>`` and is replaced atomically under a lock.

The default store is ``$OLIVE_BUILDER_STORE``, else ``$XDG_DATA_HOME/olive-builder/store``
(``~/.local/share/olive-builder/store``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import StoreError

# OCI image spec
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
IMAGE_LAYER = "application/vnd.oci.image.layer.v1.tar"
IMAGE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# CNCF ModelPack (https://github.com/modelpack/model-spec)
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODEL_WEIGHT = "application/vnd.cncf.model.weight.v1.tar"
MODEL_WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.tar"
MODEL_LAYER_TYPES = (MODEL_WEIGHT, MODEL_WEIGHT_CONFIG)
ANN_FILEPATH = "org.cncf.model.filepath"
ANN_FILE_METADATA = "org.cncf.model.file.metadata+json"
ANN_UNTESTED = "org.cncf.model.file.mediatype.untested"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_TITLE = "org.opencontainers.image.title"

CHUNK = 4 << 20
ENV_STORE = "OLIVE_BUILDER_STORE"


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
        fd, name = tempfile.mkstemp(prefix="blob-", dir=store.ingest)
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
        if not self.has(digest):
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
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_index(self) -> dict[str, Any]:
        return json.loads((self.root / "index.json").read_text())

    def _write_index(self, index: dict[str, Any]) -> None:
        tmp = self.root / f".index.json.{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.root / "index.json")

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
    dirs: set[str] = {prefix}
    for name in files:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add(f"{prefix}/{'/'.join(parts[:i])}")
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    entries = sorted([(d + "/", None) for d in dirs] + [(f"{prefix}/{f}", f) for f in files])
    for arcname, rel in entries:
        if rel is None:
            out.write(_tarinfo(arcname, is_dir=True).tobuf(tarfile.PAX_FORMAT, "utf-8", "strict"))
            continue
        path = root / rel
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
