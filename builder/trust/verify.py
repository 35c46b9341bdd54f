"""What a pull and `build verify` require before they trust content: the verification policy.

- A manifest's cosign signature by the given public key (``verify_signature``), found under
  cosign's ``sha256-<hex>.sig`` tag; with ``verify_subject`` also its signed attestations
  (provenance whose subject is this manifest, SBOM, a passing evaluation) and the OpenSSF
  model signature attached to it.
- An adapter artifact: exactly the shape packaging writes (``adapter_of``), its file against
  the digests its signed manifest and SBOM name, and its base model verified the same way.
- ``PullGuard``: the checks `build pull --verify KEY --signature-out FILE` makes, in the order
  a pull meets them (the manifest before any blob, the unpacked files before they are put in place).

Content is read through ``builder.oci.referrers.Content``: the local store or a registry
repository alike.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.contract import (
    ADAPTER_ANNOTATION,
    ADAPTER_BASE_ANNOTATION,
    COSIGN_SIGNATURE_ANNOTATION,
    CYCLONEDX_PREDICATE,
    INTOTO_STATEMENT_V1,
    SLSA_PROVENANCE_V1,
    TEST_RESULT_V01,
    atomic_write,
    valid_adapter_name,
)
from builder.errors import ContentError, VerificationError
from builder.oci import layout as oci
from builder.oci import referrers
from builder.oci.content import open_content
from builder.oci.media import (
    ADAPTER_ARTIFACT_TYPE,
    ADAPTER_CONFIG,
    ADAPTER_MEDIA_TYPE,
    DSSE_MEDIA,
    INTOTO_MEDIA,
    MANIFEST,
    MODEL_ARTIFACT,
    SIGSTORE_BUNDLE_MEDIA,
    SIMPLE_SIGNING_MEDIA,
)
from builder.oci.referrers import Content
from builder.trust.sign import (
    PublicKey,
    bundle_key_hint,
    check_simple_signing,
    load_public_key,
    open_dsse,
    verify_model,
)

# ---- the adapter artifact's shape -----------------------------------------------------------------

@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter manifest says, checked: its name, its one layer, its base manifest."""

    name: str
    layer: oci.Descriptor
    base: oci.Descriptor


def adapter_of(manifest: dict[str, Any], shown: str) -> AdapterInfo:
    """The adapter a manifest (``parse_manifest``'s) describes; ContentError unless it is exactly
    what packaging writes: one layer of the adapter media type, a valid adapter name, a subject
    that is an image manifest whose digest the base annotation repeats."""
    def refuse(why: str) -> ContentError:
        return ContentError(f"{shown} is not a valid adapter artifact: {why}; refused.",
                            hint="This content was not made by olive-builder or was tampered with; do not use it.")

    if manifest.get("artifactType") != ADAPTER_ARTIFACT_TYPE:
        raise refuse(f"its artifactType is not {ADAPTER_ARTIFACT_TYPE}")
    if oci.Descriptor.from_json(manifest["config"]).media_type != ADAPTER_CONFIG:
        raise refuse(f"its config is not {ADAPTER_CONFIG}")
    layers = [oci.Descriptor.from_json(d) for d in manifest["layers"]]
    if len(layers) != 1 or layers[0].media_type != ADAPTER_MEDIA_TYPE:
        raise refuse(f"it must hold exactly one layer of {ADAPTER_MEDIA_TYPE}")
    ann = manifest.get("annotations") or {}
    name = ann.get(ADAPTER_ANNOTATION, "")
    if not valid_adapter_name(name):
        raise refuse(f"its adapter name {name[:80]!r} is not a valid adapter name")
    subject = manifest.get("subject")
    if not isinstance(subject, dict):
        raise refuse("it names no base manifest (subject)")
    try:
        base = oci.Descriptor.from_json(subject)
    except (KeyError, TypeError, ValueError):
        raise refuse("its subject is not a descriptor") from None
    if base.media_type != MANIFEST or not oci.valid_digest(base.digest) or not 0 < base.size <= (4 << 20):
        raise refuse("its subject is not an OCI image manifest with a sha256 digest and a size")
    if ann.get(ADAPTER_BASE_ANNOTATION) != base.digest:
        raise refuse(f"its {ADAPTER_BASE_ANNOTATION} annotation does not name its subject {base.digest}")
    return AdapterInfo(name, layers[0], base)


# ---- verifying a manifest's signature and attestations ------------------------------------------

@dataclass(frozen=True)
class Verified:
    """What ``verify_subject`` established about one manifest."""

    digest: str
    signature: bool  # a cosign signature by the key over this digest
    predicates: dict[str, dict[str, Any]]  # predicate type -> the verified statement
    evaluation_result: str | None  # PASSED | WARNED | FAILED (the test-result predicate's)
    model_bundle: bytes | None  # the OpenSSF model signing bundle by this key, if attached
    referrers: tuple[str, ...]  # artifact types of every referrer listed
    adapter: str | None = None  # a LoRA adapter's name, when the reference is an adapter artifact
    base: Verified | None = None  # then: its base model artifact (its subject), verified the same way


def verify_signature(content: Content, subject_digest: str, key: PublicKey, shown: str) -> None:
    """Refuse ``subject_digest`` unless cosign's ``sha256-<hex>.sig`` holds a signature of it by ``key``."""
    got = content.tagged(referrers.index_tag(subject_digest) + referrers.SIG_SUFFIX)
    if got is None:
        raise VerificationError(f"{shown} is not signed: there is no signature for {subject_digest}.",
                                hint="Pull only content its publisher signed, or sign it with `--sign-key` when "
                                     "packaging or pushing.")
    _desc, manifest = got
    reasons = []
    for layer in manifest.get("layers") or []:
        d = oci.Descriptor.from_json(layer)
        if d.media_type != SIMPLE_SIGNING_MEDIA or COSIGN_SIGNATURE_ANNOTATION not in d.annotations:
            continue
        why = check_simple_signing(key, content.blob(d), d.annotations[COSIGN_SIGNATURE_ANNOTATION], subject_digest)
        if why is None:
            return
        reasons.append(why)
    detail = "; ".join(sorted(set(reasons))) or "it holds no simple-signing layer"
    raise VerificationError(f"{shown} ({subject_digest}) is not signed by the key {key.path}: {detail}.",
                            hint="It was signed by someone else, or changed after signing: do not use it.")


def verify_subject(content: Content, subject_digest: str, key: PublicKey, shown: str, *,
                   require_attestations: bool = True) -> Verified:
    """Check a manifest's cosign signature by ``key`` and (with ``require_attestations``) that its signed
    attestations hold a provenance whose subject is this manifest, an SBOM and a passing evaluation."""
    verify_signature(content, subject_digest, key, shown)
    predicates: dict[str, dict[str, Any]] = {}
    got = content.tagged(referrers.index_tag(subject_digest) + referrers.ATT_SUFFIX)
    for layer in (got[1].get("layers") or []) if got else []:
        d = oci.Descriptor.from_json(layer)
        if d.media_type != DSSE_MEDIA:
            continue
        try:
            payload_type, payload = open_dsse(key, content.blob(d))
        except VerificationError:
            continue  # another signer's attestation: not evidence for this key
        if payload_type != INTOTO_MEDIA:
            continue
        try:
            st = json.loads(payload)
        except ValueError:
            continue
        subjects = {s.get("digest", {}).get("sha256") for s in st.get("subject") or [] if isinstance(s, dict)}
        if st.get("_type") == INTOTO_STATEMENT_V1 and subject_digest.split(":", 1)[1] in subjects:
            predicates.setdefault(str(st.get("predicateType")), st)
    listed = content.referrers(subject_digest)
    bundle = None
    for d in listed:
        if d.artifact_type == SIGSTORE_BUNDLE_MEDIA and bundle is None:
            m = content.manifest(d)
            for layer in m.get("layers") or []:
                data = content.blob(oci.Descriptor.from_json(layer))
                if bundle_key_hint(data) == key.key_id:
                    bundle = data
    evaluation = predicates.get(TEST_RESULT_V01)
    result = str(evaluation["predicate"].get("result")) if evaluation else None
    if require_attestations:
        missing = [label for label, ptype in (("SLSA provenance", SLSA_PROVENANCE_V1),
                                               ("SBOM", CYCLONEDX_PREDICATE),
                                               ("evaluation", TEST_RESULT_V01)) if ptype not in predicates]
        if missing:
            raise VerificationError(f"{shown} is signed, but has no {', '.join(missing)} attestation signed by "
                                    f"{key.path} whose subject is {subject_digest}.",
                                    hint="Package it again with --sign-key, then push.")
        if result == "FAILED":
            raise VerificationError(f"{shown}: its signed evaluation says FAILED.",
                                    hint="Do not publish or serve it; rebuild at a higher precision.")
    return Verified(subject_digest, True, predicates, result, bundle,
                    tuple(sorted(d.artifact_type or "" for d in listed)))


def find_model_bundle(content: Content, subject_digest: str, key_id: str | None = None) -> bytes | None:
    """The OpenSSF model signing bundle attached to a manifest (by ``key_id``'s key if given)."""
    for d in content.referrers(subject_digest):
        if d.artifact_type != SIGSTORE_BUNDLE_MEDIA:
            continue
        for layer in content.manifest(d).get("layers") or []:
            data = content.blob(oci.Descriptor.from_json(layer))
            if key_id is None or bundle_key_hint(data) == key_id:
                return bytes(data)
    return None


class PullGuard:
    """What `build pull --verify KEY --signature-out FILE` checks, in the order a pull meets it."""

    def __init__(self, shown: str, key_path: Path | None, signature_out: Path | None):
        self.shown = shown
        self.key = load_public_key(key_path) if key_path is not None else None  # a bad key fails before downloading
        self.signature_out = signature_out
        self.bundle: bytes | None = None

    @property
    def active(self) -> bool:
        return self.key is not None or self.signature_out is not None

    def verify(self, content: Content, digest: str) -> None:
        """Before any blob is downloaded: the manifest's signature, and the model signature to check later."""
        if self.key is not None:
            found = verify_subject(content, digest, self.key, self.shown, require_attestations=False)
            self.bundle = found.model_bundle
        if self.bundle is None and self.signature_out is not None:
            self.bundle = find_model_bundle(content, digest)
            if self.bundle is None:
                raise VerificationError(f"{self.shown} has no model signature attached, so there is nothing to "
                                        "write to --signature-out.",
                                        hint="Package it with --sign-key (or OLIVE_BUILDER_SIGN_KEY) and push it again.")

    def check_folder(self, folder: Path) -> None:
        """After unpacking, before the folder is put in place: every file matches the model signature."""
        if self.key is None or self.bundle is None:
            return
        with tempfile.TemporaryDirectory(prefix="olive-builder-verify-") as tmp:
            path = Path(tmp) / "model.sig"
            path.write_bytes(self.bundle)
            verify_model(self.key.path, folder, path)

    def write_signature(self) -> None:
        if self.signature_out is None or self.bundle is None:
            return
        self.signature_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.signature_out, self.bundle)


def verify_reference(ref_text: str, key_path: Path, store: oci.Store, *, insecure: bool | None = None) -> Verified:
    """`build verify REF --key PUB`: the signature, the provenance's subject, the SBOM and the
    evaluation; for a LoRA adapter also its file and its base (``verify_adapter``)."""
    key = load_public_key(key_path)
    with open_content(ref_text, store, insecure=insecure) as (content, digest):
        found = verify_subject(content, digest, key, ref_text, require_attestations=True)
        manifest = content.manifest(oci.Descriptor(MANIFEST, digest, 0))
        if manifest.get("artifactType") != ADAPTER_ARTIFACT_TYPE:
            return found
        return verify_adapter(content, manifest, found, key, ref_text)


def verify_adapter(content: Content, manifest: dict[str, Any], found: Verified, key: PublicKey, shown: str) -> Verified:
    """An adapter artifact whose own signature and attestations ``found`` holds: its one layer (the
    .onnx_adapter file) is downloaded and must match the digest the signed manifest names and its
    signed SBOM lists; its signed provenance must name the base it is the subject of; and that base
    must itself be a model artifact signed by ``key`` with its own attestations."""
    info = adapter_of(manifest, shown)
    content.check_blob(info.layer)
    want = info.layer.digest.split(":", 1)[1]
    bom = found.predicates[CYCLONEDX_PREDICATE].get("predicate") or {}
    listed = {h.get("content") for c in bom.get("components") or [] for f in c.get("components") or []
              if f.get("type") == "file" for h in f.get("hashes") or []}
    if want not in listed:
        raise VerificationError(f"{shown}: its signed SBOM does not list the adapter file {info.layer.digest}.",
                                hint="The attestations belong to other content: do not use it.")
    provenance = found.predicates[SLSA_PROVENANCE_V1].get("predicate") or {}
    deps = (provenance.get("buildDefinition") or {}).get("resolvedDependencies") or []
    if not any((d.get("digest") or {}).get("sha256") == info.base.digest.split(":", 1)[1] for d in deps):
        raise VerificationError(f"{shown}: its signed provenance does not name its base {info.base.digest}.",
                                hint="The attestations belong to other content: do not use it.")
    base_shown = f"{shown} (its base {info.base.digest})"
    if content.manifest(info.base).get("artifactType") != MODEL_ARTIFACT:
        raise VerificationError(f"{base_shown} is not a model artifact.",
                                hint="An adapter's subject is the model it was trained for; do not use this one.")
    base = verify_subject(content, info.base.digest, key, base_shown, require_attestations=True)
    return dataclasses.replace(found, adapter=info.name, base=base)
