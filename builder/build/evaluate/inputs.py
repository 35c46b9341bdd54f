"""What the evaluation reads, found on the host: the source model to compare with
(``resolve_source``: a folder, a Hub repo id or the one the build record names) and a file of a
Hugging Face dataset as the evaluation text (``HubText``, fetched once per commit).

Host side only: the builder image gets both as read-only mounts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import DatasetError, EvaluationError, ModelNotFoundError, UsageError
from builder.source.hub import fetch_dataset, inside_repository

HUB_TEXT_LIMIT = 64 << 20  # an evaluation text uses its first tokens; a larger file is a mistake


@dataclass(frozen=True)
class HubText:
    """An evaluation text that is a file of a Hugging Face dataset repository at a pinned commit
    (the recipe's ``evaluate.text: {hub: OWNER/NAME, revision: <40-hex commit>, file: PATH}``)."""

    hub: str
    revision: str
    file: str

    @classmethod
    def from_json(cls, data: Any) -> HubText:
        """From the recipe's mapping; a clear error for anything else."""
        if not isinstance(data, dict) or set(data) != {"hub", "revision", "file"}:
            raise EvaluationError(f"evaluate.text {data!r}: a Hub text is {{hub: OWNER/NAME, revision: COMMIT, "
                                  "file: PATH}, nothing else.", hint="Or name a local UTF-8 file.")
        hub, revision, file = (str(data[k]) for k in ("hub", "revision", "file"))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", hub):
            raise EvaluationError(f"evaluate.text.hub {hub!r} is not a Hub dataset id (OWNER/NAME).")
        if not re.fullmatch(r"[0-9a-f]{40}", revision):
            raise EvaluationError(f"evaluate.text.revision {revision!r} is not a commit (40 hex digits).",
                                  hint="Pin the dataset: a branch or tag could name other text tomorrow, and the "
                                  "figures would not be comparable.")
        if not inside_repository(file):
            raise EvaluationError(f"evaluate.text.file {file!r} is not a path inside the dataset repository.")
        return cls(hub, revision, file)

    @property
    def label(self) -> str:
        return f"Hugging Face dataset {self.hub}@{self.revision[:12]}: {self.file}"

    def fetch(self) -> Path:
        """The local copy, downloaded once per commit (``hub.fetch_dataset``: HF_ENDPOINT, HF_TOKEN)."""
        try:
            return fetch_dataset(self.hub, self.revision, [self.file], max_bytes=HUB_TEXT_LIMIT)[0]
        except DatasetError as e:
            raise EvaluationError(f"The evaluation text cannot be fetched: {e.message}",
                                  hint="Check `evaluate.text` (hub, revision, file), the network (or HF_ENDPOINT) "
                                  "and, for a gated dataset, HF_TOKEN; or name a local copy of the file.") from None



def resolve_source(model_dir: Path, against: str | None) -> tuple[Path | None, str]:
    """The source model to compare with: ``against`` (a folder or a Hub repo id), else the one the
    build record names (a Hub model, from the local Hugging Face cache or the Hub). (None, why)
    when there is none."""
    hub, revision = None, None
    if against:
        folder = Path(against).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise UsageError(f"--against {against}: the folder has no config.json, so it is not a "
                                 "Hugging Face model folder.")
            return folder, str(folder)
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$", against):
            raise UsageError(f"--against {against}: neither a model folder nor a Hugging Face repo id "
                             "(OWNER/NAME[@REVISION]).")
        hub, _, rev = against.partition("@")
        revision = rev or None
    else:
        try:
            info = json.loads((model_dir / "olive-builder.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, "no build record (olive-builder.json) names the source; pass --against"
        source = info.get("source") or {}
        if not source.get("hub"):
            return None, "the build record names a local source folder; pass --against FOLDER"
        hub, revision = str(source["hub"]), source.get("resolved_revision") or source.get("revision")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(hub, revision=revision, ignore_patterns=["original/*", "*.gguf", "onnx/*",
                                                                          "*.msgpack", "*.h5", "*.ot", "*.pth"])
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all mean "no source here"
        raise ModelNotFoundError(f"The source model {hub}@{revision or 'main'} is not available: {e}",
                                 hint="Pass --against with a local copy of the source model.") from None
    return Path(path), f"{hub}@{revision or 'main'}"

