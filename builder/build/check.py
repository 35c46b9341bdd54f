"""The check: is a folder a usable ONNX Runtime GenAI model?

Olive exits 0 when a pass fails, so its exit code proves nothing. A folder is accepted only
if it holds every file its genai_config.json names and a tokenizer, loads with
onnxruntime-genai, and generates tokens from a chat-templated prompt.

The check is native where the target's hardware is (its execution provider is installed and
a device is visible). Elsewhere it is a CPU cross-check of the very same graph: a copy of the
folder (links to the same weight files) whose genai_config.json names no provider, which
onnxruntime-genai then runs on the CPU. The report says which (``mode``), never silently.

Stdlib only at import time: this module runs inside builder and runtime images, where
neither click nor pydantic need be installed. onnxruntime_genai is imported when needed.
"""

from __future__ import annotations

import ctypes
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.contract import CHECK_CPU_CROSS, CHECK_NATIVE, GENAI_CONFIG, og_config, write_json
from builder.errors import CheckError
from builder.targets import DEVICES

# Every model folder holds these, besides the files genai_config.json names...
REQUIRED_FILES = ("genai_config.json", "tokenizer_config.json")
# ...and at least one of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
CHECK_MESSAGES = [{"role": "user", "content": "Say hello."}]


@dataclass
class CheckReport:
    files: list[str]
    prompt_tokens: int = 0
    generated_ids: list[int] = field(default_factory=list)
    genai_version: str = ""
    mode: str = CHECK_NATIVE  # or CHECK_CPU_CROSS
    reason: str | None = None  # why the check was not native
    adapters: dict[str, list[int]] = field(default_factory=dict)  # adapter name -> its greedy tokens

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "files": self.files,
            "prompt_tokens": self.prompt_tokens,
            "generated_ids": self.generated_ids,
            "onnxruntime_genai": self.genai_version,
            "mode": self.mode,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.adapters:
            out["adapters"] = self.adapters
        return out


def named_files(genai_config: Any) -> list[str]:
    """Every file name genai_config.json refers to (keys ending in 'filename')."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and key.endswith("filename"):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(genai_config)
    return sorted(set(found))


def check_files(folder: str | Path) -> list[str]:
    """Cheap structural check; raises CheckError naming every missing file."""
    folder = Path(folder)
    config_path = folder / "genai_config.json"
    if not config_path.is_file():
        raise CheckError(
            f"{folder} holds no genai_config.json, so it is not an ONNX Runtime GenAI model.",
            hint="The conversion did not produce a model; the build log above says why.",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckError(f"{config_path} is not readable JSON: {e}") from None
    missing = [name for name in (*REQUIRED_FILES, *named_files(config)) if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise CheckError(
            f"{folder} is missing files the model needs: {', '.join(missing)}.",
            hint="The conversion stopped part way; the build log above says why.",
        )
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def check_generates(folder: str | Path, *, new_tokens: int = 8, adapters: dict[str, Path] | None = None) -> CheckReport:
    """Load the model with onnxruntime-genai and greedily generate a few tokens: with no adapter
    active, then with each of ``adapters`` (name -> .onnx_adapter file) active."""
    folder = Path(folder)
    files = check_files(folder)
    try:
        import onnxruntime_genai as og
    except ImportError as e:  # pragma: no cover - the builder images always have it
        raise CheckError(f"onnxruntime-genai is not installed, so the model cannot be checked: {e}") from None
    try:
        model = og.Model(og_config(og, folder))  # the server's loader: the same compute threads
        tokenizer = og.Tokenizer(model)
    except Exception as e:
        raise CheckError(f"onnxruntime-genai cannot load the model in {folder}: {e}") from None
    try:
        prompt = tokenizer.apply_chat_template(json.dumps(CHECK_MESSAGES), add_generation_prompt=True)
    except Exception as e:
        raise CheckError(
            f"The model's tokenizer has no usable chat template: {e}",
            hint="Instruct models ship one (chat_template.jinja or tokenizer_config.json); "
            "a base model cannot serve chat completions.",
        ) from None
    ids = list(tokenizer.encode(prompt))
    if not ids:
        raise CheckError("The tokenizer turned the chat-templated prompt into no tokens.")

    def generate(adapter: tuple[Any, str] | None) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        if adapter is not None:
            generator.set_active_adapter(*adapter)
        generator.append_tokens(ids)
        out: list[int] = []
        while not generator.is_done() and len(out) < new_tokens:
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        return out

    try:
        generated = generate(None)
    except Exception as e:
        raise CheckError(f"The model loaded but failed to generate: {e}") from None
    if not generated:
        raise CheckError("The model loaded but generated no token.")
    report = CheckReport(files=files, prompt_tokens=len(ids), generated_ids=generated, genai_version=og.__version__)
    if adapters:
        loaded = og.Adapters(model)
        for name, path in sorted(adapters.items()):
            try:
                loaded.load(str(path), name)
                report.adapters[name] = generate((loaded, name))
            except Exception as e:
                raise CheckError(f"The adapter {name!r} ({path.name}) does not work with its base model: {e}",
                                 hint="The adapter file is damaged, or was extracted from another base graph.")\
                    from None
    return report


# ---------------------------------------------------------------------------- per target



def _cuda_devices() -> int:
    """NVIDIA GPUs the driver shows this process (0 without a driver): libcuda, no toolkit."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def hardware_missing(device: str) -> str | None:
    """Why this machine cannot run ``device`` models on their own execution provider; None if it can.

    onnxruntime-genai's ``is_*_available`` only says what it was compiled with (the CPU
    package reports WebGPU), so the provider must also be in onnxruntime's list and, for
    CUDA, a GPU must be visible (onnxruntime-gpu lists CUDA without one)."""
    if device == "cpu":
        return None
    if device not in DEVICES:
        return f"olive-builder does not know device {device!r}"
    provider = DEVICES[device].provider
    if device == "dml" and sys.platform != "win32":
        return "DirectML runs on Windows only"
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed here"
    if provider not in onnxruntime.get_available_providers():
        return f"this onnxruntime {onnxruntime.__version__} ({_distribution()}) has no {provider}"
    if device == "cuda" and _cuda_devices() == 0:
        return "no NVIDIA GPU is visible (no driver, or the container was started without --gpus)"
    return None


def _distribution() -> str:
    from importlib import metadata

    for name in ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-webgpu", "onnxruntime"):
        try:
            metadata.version(name)
            return name
        except metadata.PackageNotFoundError:
            continue
    return "onnxruntime"


def _clear_providers(node: Any) -> None:
    """Empty every ``session_options.provider_options`` (decoder, and any other component)."""
    if isinstance(node, dict):
        options = node.get("session_options")
        if isinstance(options, dict) and "provider_options" in options:
            options["provider_options"] = []
        for value in node.values():
            _clear_providers(value)
    elif isinstance(node, list):
        for item in node:
            _clear_providers(item)


def target_device(folder: str | Path) -> str:
    """The device a model folder was built for, from the provider its genai_config.json names."""
    try:
        config = json.loads((Path(folder) / GENAI_CONFIG).read_text(encoding="utf-8"))
        entries = config["model"]["decoder"]["session_options"].get("provider_options") or []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "cpu"
    named = {key for entry in entries if isinstance(entry, dict) for key in entry}
    return next((d.name for d in DEVICES.values() if d.genai_key in named), "cpu")


def cpu_copy(folder: str | Path, dest: str | Path) -> Path:
    """A copy of the model in ``folder`` that onnxruntime-genai runs on the CPU: links to the very
    same files, and a genai_config.json whose provider options are emptied. ``dest`` must not exist."""
    folder, dest = Path(folder).resolve(), Path(dest)
    dest.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != GENAI_CONFIG:
            (dest / path.name).symlink_to(path)
    try:
        config = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckError(f"{folder / GENAI_CONFIG} is not readable JSON: {e}") from None
    _clear_providers(config)
    write_json(dest / GENAI_CONFIG, config)
    return dest


def check_target(folder: str | Path, device: str, *, scratch: str | Path, new_tokens: int = 8,
                 adapters: dict[str, Path] | None = None) -> tuple[CheckReport, Path]:
    """Check ``folder`` for its target ``device``: natively where the hardware is, else by a CPU
    cross-check of the same graph (a ``cpu_copy`` made at ``scratch``, which must not exist).

    Returns the report and the folder that was run: ``folder`` itself, or the CPU copy, which
    later stages (the evaluation) run on too."""
    folder = Path(folder)
    reason = hardware_missing(device)
    if reason is None:
        return check_generates(folder, new_tokens=new_tokens, adapters=adapters), folder
    files = check_files(folder)
    copy = cpu_copy(folder, scratch)
    report = check_generates(copy, new_tokens=new_tokens, adapters=adapters)
    report.files, report.mode, report.reason = files, CHECK_CPU_CROSS, reason
    return report, copy
