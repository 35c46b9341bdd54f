"""What the attestations of a build are about: its subjects (manifests), its files and the facts
of its build record, and the in-toto Statement that wraps each document.

The documents themselves are built from these in ``sbom``, ``provenance`` and
``evaluation_statement``; ``attach`` stores them (and their signatures) beside the content.
Everything here is a pure function of the build's facts and its creation time (no wall clock,
no random serial numbers), so packaging the same build again gives the same bytes. The facts
include what the build's run observed (``observed``: its speed and seconds on one machine,
``builder.build.observed``), which only the evaluation statement carries: the SBOM and the
provenance of two builds of the same inputs are alike, their evaluation statements need not be.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.contract import CHUNK, INTOTO_STATEMENT_V1
from builder.oci.media import MANIFEST


@dataclass(frozen=True)
class Subject:
    """A manifest an attestation is about."""

    name: str  # <name>:<tag> as stored (or pushed)
    digest: str  # sha256:<hex>
    media_type: str = MANIFEST

    def to_statement(self) -> dict[str, Any]:
        return {"name": self.name, "digest": {"sha256": self.digest.split(":", 1)[1]}}


@dataclass(frozen=True)
class FileDigest:
    path: str  # relative to the model folder, POSIX
    sha256: str  # hex
    size: int


@dataclass(frozen=True)
class BuildFacts:
    """What the attestations say beyond the manifests themselves."""

    info: Mapping[str, Any]  # the build record, olive-builder.json
    files: tuple[FileDigest, ...]
    created: dt.datetime
    recipe_path: str | None = None  # as the user named it (relative paths stay relative)
    recipe_text: str | None = None
    lock_entry: Mapping[str, Any] | None = None  # this recipe's olive-builder.lock entry, if locked
    # Files only the runnable image holds: a finetuned build's adapters/<name>.onnx_adapter (the
    # model artifact leaves them out; each is an artifact of its own, see ``adapter_sbom``).
    image_files: tuple[FileDigest, ...] = ()
    # What the build's run observed (the observed document beside the output folder); None: unknown.
    observed: Mapping[str, Any] | None = None


def file_digests(model_dir: Path, files: Iterable[str]) -> tuple[FileDigest, ...]:
    out = []
    for name in sorted(files):
        path = model_dir / name
        h = hashlib.sha256()
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            while chunk := f.read(CHUNK):
                h.update(chunk)
        out.append(FileDigest(name, h.hexdigest(), size))
    return tuple(out)


class BackgroundDigests:
    """File digests computed on another thread while the layers are written: hashlib releases
    the GIL, so on two cores the SBOM's digests cost packaging almost no wall time."""

    def __init__(self, model_dir: Path, files: Iterable[str]):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="file-digests")
        self._future = self._pool.submit(file_digests, Path(model_dir), list(files))

    def result(self) -> tuple[FileDigest, ...]:
        try:
            return self._future.result()
        finally:
            self._pool.shutdown(wait=False)


def statement(subjects: Iterable[Subject], predicate_type: str, predicate: Mapping[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1."""
    return {"_type": INTOTO_STATEMENT_V1, "subject": [s.to_statement() for s in subjects],
            "predicateType": predicate_type, "predicate": dict(predicate)}


def purl_oci(name: str, digest: str, repository_url: str | None = None) -> str:
    """The package URL of a manifest (``pkg:oci/<last path part>@<digest>``)."""
    from packageurl import PackageURL

    qualifiers = {"repository_url": repository_url} if repository_url else None
    return str(PackageURL(type="oci", name=name.rsplit("/", 1)[-1].split(":", 1)[0], version=digest,
                          qualifiers=qualifiers))


# ---- the build record's evaluation -----------------------------------------------------------

def evaluation_results(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """The evaluation section of the build record, however the evaluation stage names it."""
    for key in ("evaluation", "eval"):
        value = info.get(key)
        if isinstance(value, dict):
            return value
    return None


# ---- LoRA adapters -------------------------------------------------------------------------------
#
# An adapter artifact (``package.package_adapter``: one layer, the .onnx_adapter file; ``subject``:
# the base model artifact) gets the proofs a model artifact gets, as referrers of its own manifest:
# an SBOM (the adapter file, the base by digest, the training dataset, the tools), a SLSA provenance
# (the base manifest, the source model and the dataset as resolved dependencies; the finetune
# settings as external parameters) and the evaluation, PASSED/FAILED where the build evaluated
# this adapter, else WARNED. Everything is read from the adapter's manifest and config and the
# base's build record, so a stored adapter can be attested (and signed) again at any time.

@dataclass(frozen=True)
class AdapterFacts:
    """What an adapter artifact's attestations say beyond its manifest."""

    name: str
    file: FileDigest  # adapters/<name>.onnx_adapter; its sha256 is the adapter layer's digest
    entry: Mapping[str, Any]  # the build record's finetune.adapters entry of this adapter
    base: Subject  # the base model artifact (the adapter manifest's subject)
    info: Mapping[str, Any]  # the build record
    created: dt.datetime
    observed: Mapping[str, Any] | None = None  # what the build's run observed (``BuildFacts.observed``)

    @property
    def dataset(self) -> Mapping[str, Any]:
        found = self.entry.get("dataset")
        return found if isinstance(found, dict) else {}

    @property
    def section(self) -> Mapping[str, Any]:
        found = self.info.get("finetune")
        return found if isinstance(found, dict) else {}


def dataset_label(dataset: Mapping[str, Any]) -> str:
    if dataset.get("hub"):
        return str(dataset["hub"])
    names = dataset.get("names") or dataset.get("files") or ([dataset["file"]] if dataset.get("file") else [])
    return ", ".join(str(n) for n in names) or "training dataset"


def dataset_uri(dataset: Mapping[str, Any]) -> str | None:
    if dataset.get("hub"):
        uri = f"https://huggingface.co/datasets/{dataset['hub']}"
        return uri + (f"/tree/{dataset['revision']}" if dataset.get("revision") else "")
    return None


def adapter_evaluation_section(facts: AdapterFacts) -> dict[str, Any] | None:
    """The evaluation of this adapter: its own record entry's, or the build's evaluation when that
    loaded this adapter (its ``adapter`` entry names it, and the same file where it says which)."""
    own = facts.entry.get("evaluation")
    if isinstance(own, dict):
        return own
    section = evaluation_results(facts.info)
    tested = (section or {}).get("adapter")
    if not isinstance(tested, dict) or tested.get("name") != facts.name:
        return None
    if tested.get("sha256") and str(tested["sha256"]).split(":", 1)[-1] != facts.file.sha256:
        return None
    return section


def adapter_observed(facts: AdapterFacts) -> dict[str, Any] | None:
    """What the build's run observed of this adapter, in the observed document's own shape: the
    record it belongs to, this adapter's ``finetune.adapters`` entry (training seconds, its own
    evaluation's seconds) and, where the adapter's evaluation is the build's, the build's
    ``evaluation``. Taking it of its own result gives the same document."""
    seen = facts.observed
    if not seen:
        return None
    out: dict[str, Any] = {k: seen[k] for k in ("record",) if k in seen}
    finetune = seen.get("finetune")
    entries = finetune.get("adapters") if isinstance(finetune, dict) else None
    mine = [e for e in entries if isinstance(e, dict) and e.get("name") == facts.name] if isinstance(entries, list) else []
    if mine:
        out["finetune"] = {"adapters": mine[:1]}
    if not isinstance(facts.entry.get("evaluation"), dict) and isinstance(seen.get("evaluation"), dict) \
            and adapter_evaluation_section(facts) is not None:
        out["evaluation"] = seen["evaluation"]
    return out if set(out) - {"record"} else None
