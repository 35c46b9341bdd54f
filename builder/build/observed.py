"""What one build run observed, kept apart from what it built.

The build record (``olive-builder.json``) is packaged into the model artifact's target layer,
so it holds only what the inputs and the tools determine: a rebuild of the same inputs gives
the same record, and so the same layers, config and manifests. What one run on one machine
observed goes elsewhere (``split``):

- the evaluation's ``speed`` (tokens/s, load time, peak RSS, the CPU, threads), its wall
  ``seconds``, its ``timings`` and ``source_cached`` (whether the source figures came from the
  cache of an earlier build);
- the conversion's seconds (``olive_seconds``);
- per finetuned adapter, its training's ``seconds`` and ``conversion_seconds``, and the same
  evaluation fields of its own evaluation.

``execute`` writes them to ``<folder>.observed.json`` beside the output folder; packaging
(``builder.publish.package``, `build package DIR` too) reads them back and attaches them in
the evaluation attestation (``builder.trust.evaluation_statement``), a referrer of the
manifests, not part of them. Beside the folder, not in it: the folder holds exactly the
artifact's files, so `build pull` gives back the very folder that was built, and the SBOM and
the model signature cover it as it is. The file names the record it belongs to by digest, so
one left over from another build is never attached to this one.

Stdlib only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from builder.contract import INFO_FILE, sha256_file, write_json

OBSERVED_SUFFIX = ".observed.json"
EVALUATION_OBSERVED = ("speed", "seconds", "timings", "source_cached")  # of an evaluation record
TRAINING_OBSERVED = ("seconds", "conversion_seconds")  # of a finetuned adapter's `training`
RUN_OBSERVED = ("olive_seconds",)  # of the run itself


def _split_keys(section: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({k: v for k, v in section.items() if k not in keys}, {k: v for k, v in section.items() if k in keys})


def split_evaluation(section: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An evaluation record (``EvaluationRecord.to_json()``) as (what was built, what was observed)."""
    return _split_keys(section, EVALUATION_OBSERVED)


def _split_adapter(entry: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    built, seen = dict(entry), {}
    if isinstance(entry.get("training"), dict):
        built["training"], training = _split_keys(entry["training"], TRAINING_OBSERVED)
        if training:
            seen["training"] = training
    if isinstance(entry.get("evaluation"), dict):
        built["evaluation"], evaluation = split_evaluation(entry["evaluation"])
        if evaluation:
            seen["evaluation"] = evaluation
    return built, ({"name": entry.get("name"), **seen} if seen else {})


def split(sections: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The worker's result sections (``evaluation``, ``finetune``, ``olive_seconds``, ...) as
    (what goes into the build record, what was observed). The second is what ``write`` keeps."""
    built: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    for key, value in sections.items():
        if key in RUN_OBSERVED:
            if value is not None:
                seen[key] = value
        elif key == "evaluation" and isinstance(value, dict):
            built[key], evaluation = split_evaluation(value)
            if evaluation:
                seen[key] = evaluation
        elif key == "finetune" and isinstance(value, dict) and isinstance(value.get("adapters"), list):
            pairs = [_split_adapter(e) if isinstance(e, dict) else (e, {}) for e in value["adapters"]]
            built[key] = {**value, "adapters": [b for b, _ in pairs]}
            adapters = [s for _, s in pairs if s]
            if adapters:
                seen[key] = {"adapters": adapters}
        else:
            built[key] = value
    return built, seen


def merge(record: Mapping[str, Any], observed: Mapping[str, Any] | None) -> dict[str, Any]:
    """The inverse of ``split``: the build record with what the run observed put back (what the
    worker reported, as one dict). For people and benchmarks; the artifact never holds it."""
    out = json.loads(json.dumps(record))
    if not observed:
        return dict(out)
    for key in RUN_OBSERVED:
        if key in observed:
            out[key] = observed[key]
    if isinstance(observed.get("evaluation"), dict) and isinstance(out.get("evaluation"), dict):
        out["evaluation"].update(observed["evaluation"])
    for seen in adapter_entries(observed):
        for entry in ((out.get("finetune") or {}).get("adapters") or []):
            if isinstance(entry, dict) and entry.get("name") == seen.get("name"):
                for part in ("training", "evaluation"):
                    if isinstance(seen.get(part), dict) and isinstance(entry.get(part), dict):
                        entry[part].update(seen[part])
    return dict(out)


def adapter_entries(observed: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-adapter observations (``finetune.adapters``) of an observed document."""
    found = (observed.get("finetune") or {}).get("adapters") if isinstance(observed.get("finetune"), dict) else None
    return [e for e in found if isinstance(e, dict)] if isinstance(found, list) else []


# ---- the file beside the output folder -----------------------------------------------------------

def path_for(model_dir: Path) -> Path:
    """``<folder>.observed.json`` beside ``model_dir`` (its name as given, `..` resolved, links not)."""
    folder = Path(os.path.abspath(model_dir))
    return folder.parent / (folder.name + OBSERVED_SUFFIX)


def record_digest(model_dir: Path) -> str:
    """The digest of the build record in ``model_dir``: what an observed document belongs to."""
    return sha256_file(Path(model_dir) / INFO_FILE)


def write(model_dir: Path, observed: Mapping[str, Any]) -> dict[str, Any]:
    """Keep ``observed`` beside ``model_dir``, naming the build record it belongs to; returns what
    was written."""
    doc = {"record": record_digest(model_dir), **observed}
    write_json(path_for(model_dir), doc)
    return doc


def read(model_dir: Path) -> dict[str, Any] | None:
    """What the run that made ``model_dir`` observed; None when there is no such file, or it is
    unreadable, or it belongs to another build record (left by an earlier build)."""
    try:
        data = json.loads(path_for(model_dir).read_text(encoding="utf-8"))
        digest = record_digest(model_dir)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("record") != digest:
        return None
    return data


def full_record(model_dir: Path) -> dict[str, Any]:
    """The build record of ``model_dir`` with what its run observed put back (``merge``)."""
    record = json.loads((Path(model_dir) / INFO_FILE).read_text(encoding="utf-8"))
    return merge(record, read(model_dir))
