"""The check: is a folder a usable ONNX Runtime GenAI model?

Olive exits 0 when a pass fails, so its exit code proves nothing. A folder is accepted only
if it holds every file its genai_config.json names and a tokenizer, loads with
onnxruntime-genai, and generates tokens from a chat-templated prompt.

Stdlib only at import time: this module runs inside builder and runtime images, where
neither click nor pydantic need be installed. onnxruntime_genai is imported when needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckError

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

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "prompt_tokens": self.prompt_tokens,
            "generated_ids": self.generated_ids,
            "onnxruntime_genai": self.genai_version,
        }


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


def check_generates(folder: str | Path, *, new_tokens: int = 8) -> CheckReport:
    """Load the model with onnxruntime-genai and greedily generate a few tokens."""
    folder = Path(folder)
    files = check_files(folder)
    try:
        import onnxruntime_genai as og
    except ImportError as e:  # pragma: no cover - the builder images always have it
        raise CheckError(f"onnxruntime-genai is not installed, so the model cannot be checked: {e}") from None
    try:
        model = og.Model(str(folder))
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
    try:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        generated: list[int] = []
        while not generator.is_done() and len(generated) < new_tokens:
            generator.generate_next_token()
            generated.append(int(generator.get_next_tokens()[0]))
    except Exception as e:
        raise CheckError(f"The model loaded but failed to generate: {e}") from None
    if not generated:
        raise CheckError("The model loaded but generated no token.")
    return CheckReport(files=files, prompt_tokens=len(ids), generated_ids=generated, genai_version=og.__version__)
