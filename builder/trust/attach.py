"""Attaching a packaged build's documents and signatures to its content in the local store.

Each document (``sbom``, ``provenance``, ``evaluation_statement``) becomes an OCI 1.1 referrer
of the manifest it is about (``builder.oci.referrers``), annotated with its kind and predicate
type. With a signing key (``sign.SigningKey``) the model folder gets an OpenSSF model signature
(a referrer too), and each manifest and its attestations get cosign's signatures under cosign's
``sha256-<hex>.sig`` and ``.att`` tags, where cosign, Kyverno and policy-controller look. An
adapter artifact gets the same, from its manifest and the base's build record.

Attaching is idempotent: what is already attached (by this key) is kept, so packaging the same
build again adds nothing, and a stored build can be attested and signed again at any time.

The manifests of two builds of the same inputs are the same; what each build's run observed
(its speed and seconds, ``builder.build.observed``) is not, and travels in the evaluation
statement only. Packaging a rebuild therefore attaches one more evaluation statement to the same
manifests (and signs it beside the earlier ones); attesting stored content again, where no run
is at hand, keeps what an earlier packaging attached (``attached_observed``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from builder.contract import (
    ADAPTER_ANNOTATION,
    ADAPTER_SUFFIX,
    ADAPTERS_DIR,
    CHUNK,
    COSIGN_PREDICATE_TYPE_ANNOTATION,
    COSIGN_SIGNATURE_ANNOTATION,
    CYCLONEDX_PREDICATE,
    INFO_FILE,
    INTOTO_PREDICATE_TYPE_ANNOTATION,
    MODEL_ROOT,
    NS,
    REFERRER_KIND_ANNOTATION,
    SIGNATURE_KEY_ANNOTATION,
    SLSA_PROVENANCE_V1,
    TEST_RESULT_V01,
    RecipeInputs,
    atomic_write,
    model_files,
    parse_rfc3339,
    rfc3339,
)
from builder.errors import StoreError
from builder.oci import layout as oci
from builder.oci import referrers
from builder.oci.media import (
    COSIGN_ATT_ARTIFACT,
    COSIGN_SIG_ARTIFACT,
    DSSE_MEDIA,
    INTOTO_MEDIA,
    MANIFEST,
    SBOM_MEDIA,
    SIGSTORE_BUNDLE_MEDIA,
    SIMPLE_SIGNING_MEDIA,
)
from builder.trust import sign
from builder.trust.evaluation_statement import adapter_evaluation, evaluation, observed_in
from builder.trust.facts import AdapterFacts, BuildFacts, FileDigest, Subject, file_digests, statement
from builder.trust.provenance import adapter_provenance, provenance
from builder.trust.sbom import Package, adapter_sbom, layer_packages, sbom
from builder.trust.sign import SigningKey


class RuntimeLayers(Protocol):
    """A runtime image the runnable image is made on (``package.RuntimeImage``, or the runtime part
    of a stored runnable image): what its SBOM lists."""

    @property
    def ref(self) -> str: ...

    @property
    def manifest(self) -> oci.Descriptor: ...

    @property
    def layers(self) -> tuple[oci.Descriptor, ...]: ...


@dataclass(frozen=True)
class Attestations:
    """The documents of one packaged build (canonical JSON bytes), ready to attach."""

    artifact_sbom: bytes
    image_sbom: bytes | None
    provenance: bytes
    evaluation: bytes


def build_attestations(facts: BuildFacts, artifact: Subject, image: Subject | None, *,
                       image_packages: Iterable[Package] = (), base: Mapping[str, str] | None = None,
                       env: Mapping[str, str] | None = None) -> Attestations:
    subjects = [artifact] + ([image] if image else [])
    return Attestations(
        artifact_sbom=oci.canonical_json(sbom(facts, artifact)),
        image_sbom=oci.canonical_json(sbom(facts, image, packages=image_packages, base=base, image=True))
        if image else None,
        provenance=oci.canonical_json(provenance(facts, subjects, env)),
        evaluation=oci.canonical_json(evaluation(facts, subjects)),
    )


@dataclass(frozen=True)
class Attached:
    """What ``attach_build`` left in the store: (kind, subject digest, referrer descriptor)."""

    referrers: tuple[tuple[str, str, oci.Descriptor], ...]
    signed: bool


def _runtime_packages(store: oci.Store, runtime: RuntimeLayers) -> list[Package]:
    """The runtime image's packages, read once per runtime image and remembered beside the store."""
    cache = store.root / "sbom-cache" / (runtime.manifest.digest.split(":", 1)[1] + ".json")
    try:
        return [Package(**p) for p in json.loads(cache.read_text())]
    except (OSError, ValueError, TypeError):
        pass
    found = layer_packages(store, runtime.layers)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, json.dumps([p.__dict__ for p in found], sort_keys=True))
    return found


def _attach_documents(store: oci.Store, name: str, subject: oci.Descriptor, sbom_doc: bytes,
                      statements: Mapping[str, tuple[bytes, str]], when: Mapping[str, str],
                      out: list[tuple[str, str, oci.Descriptor]]) -> None:
    """The SBOM and the statements (kind -> (document, predicate type)) as referrers of ``subject``."""
    d = referrers.attach(store, name, subject, SBOM_MEDIA, [(sbom_doc, SBOM_MEDIA, {})],
                         annotations={**when, REFERRER_KIND_ANNOTATION: "sbom"})
    out.append(("sbom", subject.digest, d))
    for kind, (doc, ptype) in statements.items():
        d = referrers.attach(store, name, subject, INTOTO_MEDIA,
                             [(doc, INTOTO_MEDIA, {INTOTO_PREDICATE_TYPE_ANNOTATION: ptype})],
                             annotations={**when, REFERRER_KIND_ANNOTATION: kind,
                                          INTOTO_PREDICATE_TYPE_ANNOTATION: ptype})
        out.append((kind, subject.digest, d))


def signed_by(store: oci.Store, name: str, subject_digest: str, suffix: str, key: SigningKey) -> bool:
    """Whether cosign's ``suffix`` tag (``.sig`` or ``.att``) of a subject holds a layer signed by ``key``."""
    desc = referrers.local_tagged(store, name, subject_digest, suffix)
    if desc is None:
        return False
    layers = store.read_json(desc.digest).get("layers") or []
    return any((d.get("annotations") or {}).get(SIGNATURE_KEY_ANNOTATION) == key.key_id for d in layers)


def _sign_manifest(store: oci.Store, name: str, docker_name: str, subject: oci.Descriptor, key: SigningKey,
                   when: Mapping[str, str]) -> oci.Descriptor | None:
    """Cosign's simple signing of ``subject`` under its ``.sig`` tag, unless ``key``'s is there already."""
    if signed_by(store, name, subject.digest, referrers.SIG_SUFFIX, key):
        return None
    payload, sig = sign.sign_manifest(key, docker_name, subject.digest)
    return referrers.replace_local_tagged(
        store, name, subject, referrers.SIG_SUFFIX, COSIGN_SIG_ARTIFACT,
        [(payload, SIMPLE_SIGNING_MEDIA, {COSIGN_SIGNATURE_ANNOTATION: sig, SIGNATURE_KEY_ANNOTATION: key.key_id})],
        annotations=dict(when))


def _signed_payloads(store: oci.Store, name: str, subject_digest: str, key: SigningKey) -> set[str]:
    """The digests of the statements ``key`` signed under the ``.att`` tag of a subject."""
    desc = referrers.local_tagged(store, name, subject_digest, referrers.ATT_SUFFIX)
    found: set[str] = set()
    for d in (store.read_json(desc.digest).get("layers") or []) if desc is not None else []:
        if (d.get("annotations") or {}).get(SIGNATURE_KEY_ANNOTATION) != key.key_id:
            continue
        try:
            found.add(oci.digest_bytes(base64.b64decode(json.loads(store.read_bytes(d["digest"]))["payload"])))
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return found


def _sign_attestations(store: oci.Store, name: str, subject: oci.Descriptor, key: SigningKey,
                       documents: Iterable[tuple[bytes, str]], when: Mapping[str, str]) -> oci.Descriptor | None:
    """Cosign's DSSE attestations of ``documents`` (statement, predicate type) under the ``.att`` tag
    of ``subject``, but those ``key`` signed there already (a DSSE signature differs each time, so
    the statement inside is compared): packaging the same build again signs nothing, a rebuild's
    new evaluation statement is signed beside the earlier ones."""
    done = _signed_payloads(store, name, subject.digest, key)
    layers = [(sign.dsse_envelope(key, doc), DSSE_MEDIA,
               {COSIGN_SIGNATURE_ANNOTATION: "", COSIGN_PREDICATE_TYPE_ANNOTATION: ptype,
                SIGNATURE_KEY_ANNOTATION: key.key_id})
              for doc, ptype in documents if oci.digest_bytes(doc) not in done]
    if not layers:
        return None
    return referrers.replace_local_tagged(store, name, subject, referrers.ATT_SUFFIX, COSIGN_ATT_ARTIFACT,
                                          layers, annotations=dict(when))


def attach_build(store: oci.Store, model_dir: Path, *, artifact_ref: str, artifact: oci.Descriptor,
                 image_ref: str | None = None, image: oci.Descriptor | None = None,
                 runtime: RuntimeLayers | None = None, created: dt.datetime, info: Mapping[str, Any],
                 recipe: RecipeInputs | None = None, key: SigningKey | None = None,
                 files: Iterable[str] | None = None, precomputed: tuple[FileDigest, ...] | None = None,
                 env: Mapping[str, str] | None = None, image_files: tuple[FileDigest, ...] = (),
                 observed: Mapping[str, Any] | None = None) -> Attached:
    """Attach the SBOMs, provenance and evaluation of a packaged build as referrers of its manifests,
    and with ``key`` sign the model folder (OpenSSF model signing) and both manifests and the
    attestations (cosign's format). ``image_files``: files the runnable image holds beyond
    ``model_dir``'s (a finetuned build's adapters), listed in its SBOM. ``observed``: what the
    build's run observed (``builder.build.observed``), for the evaluation statement; None keeps
    what an earlier packaging of this artifact attached. Idempotent: what is already attached (by
    this key) is kept, so packaging the same build again adds nothing."""
    name = artifact_ref.rpartition(":")[0]
    if precomputed is None:
        names = list(files) if files is not None else model_files(model_dir)
        precomputed = file_digests(model_dir, names)
    if observed is None:
        observed = attached_observed(store, name, artifact.digest)
    facts = BuildFacts(info, precomputed, created, recipe.path if recipe else None, recipe.text if recipe else None,
                       recipe.lock_entry if recipe else None, image_files, observed)
    a_subject = Subject(artifact_ref, artifact.digest)
    i_subject = Subject(image_ref, image.digest) if image is not None and image_ref else None
    packages = _runtime_packages(store, runtime) if runtime is not None and i_subject else []
    base = {"name": runtime.ref, "digest": runtime.manifest.digest} if runtime is not None and i_subject else None
    docs = build_attestations(facts, a_subject, i_subject, image_packages=packages, base=base, env=env)
    when = {"org.opencontainers.image.created": rfc3339(created)}
    out: list[tuple[str, str, oci.Descriptor]] = []
    subjects = [(artifact, docs.artifact_sbom)] + ([(image, docs.image_sbom)] if image is not None and docs.image_sbom else [])
    statements = {"provenance": (docs.provenance, SLSA_PROVENANCE_V1), "evaluation": (docs.evaluation, TEST_RESULT_V01)}
    for subject, sbom_doc in subjects:
        _attach_documents(store, name, subject, sbom_doc, statements, when, out)
    if key is None:
        return Attached(tuple(out), False)
    # The model folder, in the OpenSSF model signing format (the same files in both manifests).
    bundle: bytes | None = None
    for subject, _ in subjects:
        existing = [d for d in referrers.list_local(store, name, subject.digest)
                    if d.artifact_type == SIGSTORE_BUNDLE_MEDIA
                    and d.annotations.get(SIGNATURE_KEY_ANNOTATION) == key.key_id]
        if existing:
            out.append(("model-signature", subject.digest, existing[0]))
            continue
        bundle = bundle or _model_bundle(key, model_dir)
        d = referrers.attach(store, name, subject, SIGSTORE_BUNDLE_MEDIA,
                             [(bundle, SIGSTORE_BUNDLE_MEDIA, {SIGNATURE_KEY_ANNOTATION: key.key_id})],
                             annotations={**when, REFERRER_KIND_ANNOTATION: "model-signature",
                                          SIGNATURE_KEY_ANNOTATION: key.key_id})
        out.append(("model-signature", subject.digest, d))
    # Both manifests (cosign simple signing) and the attestations (cosign DSSE), under cosign's tags.
    for subject, sbom_doc in subjects:
        ref_name = artifact_ref if subject is artifact else str(image_ref)
        signature = _sign_manifest(store, name, ref_name.rpartition(":")[0], subject, key, when)
        if signature is not None:
            out.append(("signature", subject.digest, signature))
        sbom_statement = oci.canonical_json(statement(
            [a_subject if subject is artifact else i_subject], CYCLONEDX_PREDICATE, json.loads(sbom_doc)))  # type: ignore[list-item]
        signed = _sign_attestations(store, name, subject, key,
                                    [(sbom_statement, CYCLONEDX_PREDICATE), *statements.values()], when)
        if signed is not None:
            out.append(("attestations", subject.digest, signed))
    return Attached(tuple(out), True)


def _model_bundle(key: SigningKey, model_dir: Path) -> bytes:
    with tempfile.TemporaryDirectory(prefix="olive-builder-sig-") as tmp:
        return sign.sign_model(key, model_dir, Path(tmp) / "model.sig")


def adapter_file_digests(adapters: Mapping[str, Path]) -> tuple[FileDigest, ...]:
    """``adapters/<name>.onnx_adapter`` of each adapter file, with its digest (for the image's SBOM)."""
    out = []
    for name, path in sorted(adapters.items()):
        (found,) = file_digests(Path(path).parent, [Path(path).name])
        out.append(FileDigest(f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}", found.sha256, found.size))
    return tuple(out)


# ---- what a stored runnable image or model artifact holds (to attest it again) -------------------

def image_adapter_files(store: oci.Store, image: oci.Descriptor) -> tuple[FileDigest, ...]:
    """The adapter files a stored runnable image holds (its ``model/adapters/*`` layers), hashed
    from the layers themselves: what ``docker run`` will find under /model/adapters."""
    prefix = f"{MODEL_ROOT}/{ADAPTERS_DIR}/"
    out = []
    for d in store.read_json(image.digest).get("layers") or []:
        path = str((d.get("annotations") or {}).get(oci.ANN_FILEPATH) or "")
        if not path.startswith(prefix):
            continue
        with store.open_blob(d["digest"]) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name == path:
                    f = tar.extractfile(member)
                    h = hashlib.sha256()
                    while f is not None and (chunk := f.read(CHUNK)):
                        h.update(chunk)
                    out.append(FileDigest(path[len(f"{MODEL_ROOT}/"):], h.hexdigest(), member.size))
    return tuple(sorted(out, key=lambda f: f.path))


@dataclass(frozen=True)
class StoredRuntime:
    """The runtime part of a stored runnable image (``RuntimeLayers``)."""

    ref: str
    manifest: oci.Descriptor
    layers: tuple[oci.Descriptor, ...]


def stored_runtime(store: oci.Store, image: oci.Descriptor) -> StoredRuntime | None:
    """The runtime part of a stored runnable image (its layers before the model's), for its SBOM."""
    m = store.read_json(image.digest)
    ann = m.get("annotations") or {}
    base = ann.get("org.opencontainers.image.base.digest")
    layers = tuple(oci.Descriptor.from_json(d) for d in m.get("layers") or []
                   if oci.ANN_FILEPATH not in (d.get("annotations") or {}))
    if not base:
        return None
    return StoredRuntime(str(ann.get("org.opencontainers.image.base.name") or "runtime image"),
                         oci.Descriptor(MANIFEST, base, 0), layers)


def attached_observed(store: oci.Store, name: str, subject_digest: str) -> dict[str, Any] | None:
    """What an evaluation statement already attached to a subject says its run observed (the first,
    by digest, of those that say); None when none does. Attesting stored content again (a cache hit,
    `build push --sign-key` of what was packaged unsigned) has no run at hand: it keeps this."""
    for d in referrers.list_local(store, name, subject_digest):
        if d.annotations.get(REFERRER_KIND_ANNOTATION) != "evaluation" or not store.has(d.digest):
            continue
        for layer in store.read_json(d.digest).get("layers") or []:
            try:
                seen = observed_in(store.read_bytes(str(layer["digest"])))
            except (OSError, KeyError, TypeError):
                continue
            if seen is not None:
                return seen
    return None


def attached_and_signed(store: oci.Store, name: str, subject_digest: str, key: SigningKey | None) -> bool:
    """Whether a subject has its SBOM, provenance and evaluation and, with ``key``, that key's
    signatures of itself and of its attestations: then attaching again would add nothing."""
    kinds = {d.annotations.get(REFERRER_KIND_ANNOTATION) for d in referrers.list_local(store, name, subject_digest)}
    return {"sbom", "provenance", "evaluation"} <= kinds and (key is None or (
        signed_by(store, name, subject_digest, referrers.SIG_SUFFIX, key)
        and signed_by(store, name, subject_digest, referrers.ATT_SUFFIX, key)))


def stored_record(store: oci.Store, base_digest: str) -> dict[str, Any]:
    """The build record (olive-builder.json) inside a stored model artifact, read from its layer."""
    wanted = f"{MODEL_ROOT}/{INFO_FILE}"
    for d in store.read_json(base_digest).get("layers") or []:
        ann = d.get("annotations") or {}
        listed = str(ann.get(NS + "files") or "").split(",")
        if ann.get(oci.ANN_FILEPATH) != wanted and INFO_FILE not in listed:
            continue
        with store.open_blob(d["digest"]) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name == wanted and member.size < (16 << 20):
                    f = tar.extractfile(member)
                    if f is not None:
                        found: dict[str, Any] = json.loads(f.read())
                        return found
    raise StoreError(f"The model artifact {base_digest} in the local store has no {INFO_FILE}.",
                     hint="Package the build again.")


# ---- LoRA adapters -----------------------------------------------------------------------------

def attach_adapter(store: oci.Store, ref: str, desc: oci.Descriptor, *, info: Mapping[str, Any] | None = None,
                   key: SigningKey | None = None, env: Mapping[str, str] | None = None,
                   observed: Mapping[str, Any] | None = None) -> Attached:
    """Attach an adapter artifact's SBOM, provenance and evaluation as referrers of its manifest
    and, with ``key``, sign the manifest and the attestations (cosign's formats, as for a model).
    ``info``: the build record (else read from the base artifact in the store). ``observed``: what
    the build's run observed (else what an earlier packaging attached). Idempotent."""
    name = ref.rpartition(":")[0]
    if observed is None and attached_and_signed(store, name, desc.digest, key):
        return Attached((), key is not None)  # nothing new to say: no run's observations at hand
    manifest = store.read_json(desc.digest)
    layer = oci.Descriptor.from_json(manifest["layers"][0])
    config = store.read_json(manifest["config"]["digest"])
    ann = manifest.get("annotations") or {}
    adapter = str(ann[ADAPTER_ANNOTATION])
    base_digest = str(manifest["subject"]["digest"])
    base_ref = str((config.get("base") or {}).get("reference") or f"{name}@{base_digest}")
    created_text = ann.get("org.opencontainers.image.created")
    created = parse_rfc3339(created_text) if created_text else dt.datetime.fromtimestamp(0, dt.UTC)
    facts = AdapterFacts(
        adapter, FileDigest(f"{ADAPTERS_DIR}/{adapter}{ADAPTER_SUFFIX}", layer.digest.split(":", 1)[1], layer.size),
        dict(config.get("finetune") or {}), Subject(base_ref, base_digest),
        dict(info) if info is not None else stored_record(store, base_digest), created,
        observed if observed is not None else attached_observed(store, name, desc.digest))
    subject = Subject(ref, desc.digest)
    statements = {"provenance": (oci.canonical_json(adapter_provenance(facts, subject, env)), SLSA_PROVENANCE_V1),
                  "evaluation": (oci.canonical_json(adapter_evaluation(facts, subject)), TEST_RESULT_V01)}
    sbom_doc = oci.canonical_json(adapter_sbom(facts, subject))
    when = {"org.opencontainers.image.created": rfc3339(created)}
    out: list[tuple[str, str, oci.Descriptor]] = []
    _attach_documents(store, name, desc, sbom_doc, statements, when, out)
    if key is None:
        return Attached(tuple(out), False)
    sign_adapter(store, ref, desc, key, created)
    sbom_statement = oci.canonical_json(statement([subject], CYCLONEDX_PREDICATE, json.loads(sbom_doc)))
    signed = _sign_attestations(store, name, desc, key, [(sbom_statement, CYCLONEDX_PREDICATE), *statements.values()],
                                when)
    if signed is not None:
        out.append(("attestations", desc.digest, signed))
    return Attached(tuple(out), True)


def sign_adapter(store: oci.Store, ref: str, desc: oci.Descriptor, key: SigningKey, created: dt.datetime) -> None:
    """Sign an adapter manifest as the base's are signed (cosign simple signing under its
    ``sha256-<hex>.sig`` tag): it names its layer and its base by digest, so `build pull --verify`
    of an adapter checks the adapter file and, through the base's own signature, the base."""
    name = ref.rpartition(":")[0]
    _sign_manifest(store, name, name, desc, key, {"org.opencontainers.image.created": rfc3339(created)})
