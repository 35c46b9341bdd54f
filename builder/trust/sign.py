"""Signing keys and the two signature formats olive-builder writes.

- Keys: EC P-256 (what cosign and OpenSSF model signing both accept), PKCS#8 PEM private key
  (encrypted when a passphrase is given) and SubjectPublicKeyInfo PEM public key. The key is
  named by ``--sign-key PATH`` or ``OLIVE_BUILDER_SIGN_KEY`` (a path, or the PEM text itself,
  as a CI secret would hold it); its passphrase comes only from ``OLIVE_BUILDER_SIGN_KEY_PASSWORD``.
  No key material or passphrase is ever printed, logged, or written to the store.
- The model itself: an OpenSSF model signing bundle (PyPI ``model-signing``), a sigstore bundle
  whose DSSE statement lists every file's SHA-256, verifiable by ``model_signing verify key``.
- Manifests and attestations in cosign's format (sigstore/cosign ``specs/SIGNATURE_SPEC.md`` and
  ``specs/ATTESTATION_SPEC.md``): a simple-signing payload whose ``critical.image.docker-manifest-digest``
  is the manifest's digest, signed with ECDSA-P256/SHA-256, the base64 DER signature in the layer
  annotation ``dev.cosignproject.cosign/signature``; attestations as DSSE envelopes
  (``application/vnd.dsse.envelope.v1+json``) signed over the DSSE pre-authentication encoding.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import SigningError, VerificationError

ENV_SIGN_KEY = "OLIVE_BUILDER_SIGN_KEY"
ENV_SIGN_PASSWORD = "OLIVE_BUILDER_SIGN_KEY_PASSWORD"

SIMPLE_SIGNING_MEDIA = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_SIGNATURE_TYPE = "cosign container image signature"
ANN_SIGNATURE = "dev.cosignproject.cosign/signature"
ANN_PREDICATE_TYPE = "predicateType"  # cosign's annotation on an attestation layer
DSSE_MEDIA = "application/vnd.dsse.envelope.v1+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
COSIGN_SIG_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
COSIGN_ATT_ARTIFACT = "application/vnd.dev.cosign.artifact.att.v1+json"
SIGSTORE_BUNDLE_MEDIA = "application/vnd.dev.sigstore.bundle.v0.3+json"


# ---- keys ------------------------------------------------------------------------------------

class SigningKey:
    """A private EC P-256 key. Its repr and str never show the key."""

    def __init__(self, key: Any, source: str, path: Path | None, password: bytes | None):
        self._key = key
        self.source = source  # where it came from, for messages
        self._path = path  # the PEM file, when it came from one (model_signing reads keys from files)
        self._password = password

    def __repr__(self) -> str:
        return f"SigningKey(source={self.source!r}, key_id={self.key_id[:16]}...)"

    __str__ = __repr__

    @property
    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return bytes(self._key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))

    @property
    def key_id(self) -> str:
        """SHA-256 of the public key PEM: the hint model_signing puts in its bundles."""
        return hashlib.sha256(self.public_pem).hexdigest()

    def sign(self, data: bytes) -> bytes:
        """An ECDSA P-256 / SHA-256 signature (DER) of ``data``."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return bytes(self._key.sign(data, ec.ECDSA(hashes.SHA256())))

    @contextlib.contextmanager
    def pem_file(self) -> Iterator[tuple[Path, str | None]]:
        """(path of the key as PEM, password) for libraries that read keys from files. A key that
        came from the environment is written, unencrypted, to a private temporary file that is
        removed afterwards (never into the store or the output)."""
        if self._path is not None:
            yield self._path, self._password.decode() if self._password else None
            return
        from cryptography.hazmat.primitives import serialization

        folder = tempfile.mkdtemp(prefix="olive-builder-key-")
        path = Path(folder) / "key.pem"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
            yield path, None
        finally:
            path.unlink(missing_ok=True)
            os.rmdir(folder)


class PublicKey:
    def __init__(self, key: Any, path: Path):
        self._key = key
        self.path = path

    @property
    def pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return bytes(self._key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.pem).hexdigest()

    def verify(self, signature: bytes, data: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            self._key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, ValueError):
            return False


def _check_curve(key: Any, what: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or key.curve.name != "secp256r1":
        raise SigningError(f"{what} is not an EC P-256 key.",
                           hint="Make one with `build keygen` (or `openssl ecparam -name prime256v1 -genkey`).")


def keygen(private_path: Path, public_path: Path, *, password: str | None = None) -> str:
    """Write a new EC P-256 key pair; returns the key id. Existing files are never overwritten."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} already exists; keygen does not overwrite keys.",
                               hint="Choose other file names, or remove the old pair first.")
    key = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        public_path.parent.mkdir(parents=True, exist_ok=True)
        public_path.write_bytes(public)
    except OSError as e:
        raise SigningError(f"Cannot write the key pair: {e.strerror or e} ({e.filename}).") from None
    return hashlib.sha256(public).hexdigest()


def load_signing_key(spec: str | None = None, *, env: dict[str, str] | None = None) -> SigningKey | None:
    """The key named by ``spec`` (a path) or ``OLIVE_BUILDER_SIGN_KEY`` (a path or PEM text); None if neither."""
    from cryptography.hazmat.primitives import serialization

    environ = os.environ if env is None else env
    source = spec or environ.get(ENV_SIGN_KEY) or None
    if not source:
        return None
    password_text = environ.get(ENV_SIGN_PASSWORD) or None
    password = password_text.encode() if password_text else None
    path: Path | None
    # Key material given as text (a CI secret) is never echoed: anything that does not look like
    # a plain path is treated as the key itself.
    if source.lstrip().startswith("-----BEGIN") or "\n" in source or len(source) > 1024:
        data, path, shown = source.encode(), None, "given as text" if spec else f"in ${ENV_SIGN_KEY}"
    else:
        path = Path(source).expanduser()
        shown = str(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SigningError(f"Cannot read the signing key {shown}: {e.strerror or e}.",
                               hint="Name a PEM private key made by `build keygen`.") from None
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError:
        # Encrypted without a password, or a password for an unencrypted key: say which, never what.
        if password is None:
            raise SigningError(f"The signing key {shown} is encrypted and no passphrase was given.",
                               hint=f"Set {ENV_SIGN_PASSWORD}.") from None
        raise SigningError(f"The signing key {shown} is not encrypted, but {ENV_SIGN_PASSWORD} is set.",
                           hint=f"Unset {ENV_SIGN_PASSWORD}.") from None
    except ValueError:
        raise SigningError(f"The signing key {shown} cannot be read: not a PEM private key, or the passphrase "
                           f"in {ENV_SIGN_PASSWORD} is wrong.",
                           hint="Use a key made by `build keygen`, with its passphrase.") from None
    _check_curve(key, f"The signing key {shown}")
    return SigningKey(key, shown, path, password)


def load_public_key(path: Path) -> PublicKey:
    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise VerificationError(f"Cannot read the public key {path}: {e.strerror or e}.",
                                hint="Name the .pub file `build keygen` wrote.") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise VerificationError(f"{path} is not a PEM public key.",
                                hint="Name the .pub file `build keygen` wrote (not the private key).") from None
    _check_curve(key, f"The public key {path}")
    return PublicKey(key, Path(path))


# ---- cosign: simple signing ----------------------------------------------------------------------

def simple_signing_payload(docker_reference: str, manifest_digest: str) -> bytes:
    """The payload cosign signs for an image (its digest in ``critical.image``)."""
    payload = {"critical": {"identity": {"docker-reference": docker_reference},
                            "image": {"docker-manifest-digest": manifest_digest},
                            "type": COSIGN_SIGNATURE_TYPE},
               "optional": None}
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def sign_manifest(key: SigningKey, docker_reference: str, manifest_digest: str) -> tuple[bytes, str]:
    """(payload, base64 signature) of a cosign signature of ``manifest_digest``."""
    payload = simple_signing_payload(docker_reference, manifest_digest)
    return payload, base64.b64encode(key.sign(payload)).decode()


def check_simple_signing(key: PublicKey, payload: bytes, signature_b64: str, manifest_digest: str) -> str | None:
    """None if ``payload`` is a cosign signature of ``manifest_digest`` by ``key``, else why not."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        return "the signature annotation is not base64"
    if not key.verify(signature, payload):
        return "the signature was not made by this key over this payload"
    try:
        critical = json.loads(payload)["critical"]
        digest = critical["image"]["docker-manifest-digest"]
        kind = critical["type"]
    except (ValueError, KeyError, TypeError):
        return "the signed payload is not a simple-signing document"
    if kind != COSIGN_SIGNATURE_TYPE:
        return f"the signed payload's type is {kind!r}"
    if digest != manifest_digest:
        return f"the signature is for {digest}, not {manifest_digest}"
    return None


# ---- DSSE ------------------------------------------------------------------------------------

def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def dsse_envelope(key: SigningKey, payload: bytes, payload_type: str = INTOTO_PAYLOAD_TYPE) -> bytes:
    envelope = {"payloadType": payload_type, "payload": base64.b64encode(payload).decode(),
                "signatures": [{"keyid": "", "sig": base64.b64encode(key.sign(pae(payload_type, payload))).decode()}]}
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()


def open_dsse(key: PublicKey, envelope: bytes) -> tuple[str, bytes]:
    """(payload type, payload) of an envelope that ``key`` signed; VerificationError otherwise."""
    try:
        env = json.loads(envelope)
        payload_type = str(env["payloadType"])
        payload = base64.b64decode(env["payload"], validate=True)
        signatures = [base64.b64decode(s["sig"], validate=True) for s in env["signatures"]]
    except (ValueError, KeyError, TypeError):
        raise VerificationError("An attestation is not a DSSE envelope.") from None
    message = pae(payload_type, payload)
    if not any(key.verify(sig, message) for sig in signatures):
        raise VerificationError(f"An attestation envelope is not signed by the key {key.path}.")
    return payload_type, payload


# ---- OpenSSF model signing -----------------------------------------------------------------------

def sign_model(key: SigningKey, model_dir: Path, out: Path) -> bytes:
    """Sign a model folder in the OpenSSF model signing format; returns the bundle's bytes."""
    from model_signing import signing

    with key.pem_file() as (path, password):
        try:
            signing.Config().use_elliptic_key_signer(  # type: ignore[no-untyped-call]
                private_key=path, password=password).sign(model_dir, out)
        except (ValueError, OSError) as e:
            raise SigningError(f"Signing the model folder {model_dir} failed: {type(e).__name__}: {e}") from None
    return out.read_bytes()


def verify_model(public_key: Path, model_dir: Path, signature: Path) -> None:
    """Verify a model folder against an OpenSSF model signing bundle (as `model_signing verify key` does)."""
    from model_signing import verifying

    try:
        verifying.Config().use_elliptic_key_verifier(  # type: ignore[no-untyped-call]
            public_key=public_key).verify(model_dir, signature)
    except Exception as e:  # noqa: BLE001 - model_signing raises ValueError, protobuf and crypto errors alike
        raise VerificationError(f"The model files do not match their signature: {e}",
                                hint="Do not use this content: it was changed after it was signed, "
                                     "or signed by another key.") from None


def bundle_key_hint(bundle: bytes) -> str | None:
    """The public-key hint (sha256 of the signer's public key PEM) in a model signing bundle."""
    try:
        data: dict[str, Any] = json.loads(bundle)
        hint = data["verificationMaterial"]["publicKey"]["hint"]
        return str(hint)
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class SignedLayer:
    """One signature (or signed attestation) layer of a cosign-format manifest."""

    data: bytes
    media_type: str
    annotations: dict[str, str]


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


def verify_signature(content: Any, subject_digest: str, key: PublicKey, shown: str) -> None:
    """Refuse ``subject_digest`` unless cosign's ``sha256-<hex>.sig`` holds a signature of it by ``key``."""
    from builder.oci import layout as oci
    from builder.oci import referrers

    got = content.tagged(referrers.index_tag(subject_digest) + referrers.SIG_SUFFIX)
    if got is None:
        raise VerificationError(f"{shown} is not signed: there is no signature for {subject_digest}.",
                                hint="Pull only content its publisher signed, or sign it with `--sign-key` when "
                                     "packaging or pushing.")
    _desc, manifest = got
    reasons = []
    for layer in manifest.get("layers") or []:
        d = oci.Descriptor.from_json(layer)
        if d.media_type != SIMPLE_SIGNING_MEDIA or ANN_SIGNATURE not in d.annotations:
            continue
        why = check_simple_signing(key, content.blob(d), d.annotations[ANN_SIGNATURE], subject_digest)
        if why is None:
            return
        reasons.append(why)
    detail = "; ".join(sorted(set(reasons))) or "it holds no simple-signing layer"
    raise VerificationError(f"{shown} ({subject_digest}) is not signed by the key {key.path}: {detail}.",
                            hint="It was signed by someone else, or changed after signing: do not use it.")


def verify_subject(content: Any, subject_digest: str, key: PublicKey, shown: str, *,
                   require_attestations: bool = True) -> Verified:
    """Check a manifest's cosign signature by ``key`` and (with ``require_attestations``) that its signed
    attestations hold a provenance whose subject is this manifest, an SBOM and a passing evaluation."""
    from builder.oci import layout as oci
    from builder.oci import referrers
    from builder.trust import attest

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
        if payload_type != INTOTO_PAYLOAD_TYPE:
            continue
        try:
            st = json.loads(payload)
        except ValueError:
            continue
        subjects = {s.get("digest", {}).get("sha256") for s in st.get("subject") or [] if isinstance(s, dict)}
        if st.get("_type") == attest.STATEMENT_V1 and subject_digest.split(":", 1)[1] in subjects:
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
    evaluation = predicates.get(attest.TEST_RESULT_V01)
    result = str(evaluation["predicate"].get("result")) if evaluation else None
    if require_attestations:
        missing = [label for label, ptype in (("SLSA provenance", attest.SLSA_PROVENANCE_V1),
                                               ("SBOM", attest.CYCLONEDX_PREDICATE),
                                               ("evaluation", attest.TEST_RESULT_V01)) if ptype not in predicates]
        if missing:
            raise VerificationError(f"{shown} is signed, but has no {', '.join(missing)} attestation signed by "
                                    f"{key.path} whose subject is {subject_digest}.",
                                    hint="Package it again with --sign-key, then push.")
        if result == "FAILED":
            raise VerificationError(f"{shown}: its signed evaluation says FAILED.",
                                    hint="Do not publish or serve it; rebuild at a higher precision.")
    return Verified(subject_digest, True, predicates, result, bundle,
                    tuple(sorted(d.artifact_type or "" for d in listed)))


def find_model_bundle(content: Any, subject_digest: str, key_id: str | None = None) -> bytes | None:
    """The OpenSSF model signing bundle attached to a manifest (by ``key_id``'s key if given)."""
    from builder.oci import layout as oci

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

    def verify(self, content: Any, digest: str) -> None:
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
        from builder.contract import atomic_write

        self.signature_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.signature_out, self.bundle)


def verify_reference(ref_text: str, key_path: Path, store: Any, *, insecure: bool | None = None) -> Verified:
    """`build verify REF --key PUB`: the signature, the provenance's subject, the SBOM and the
    evaluation; for a LoRA adapter also its file and its base (``verify_adapter``)."""
    from builder.contract import ADAPTER_ARTIFACT_TYPE
    from builder.oci import layout as oci
    from builder.oci import referrers

    key = load_public_key(key_path)
    with referrers.open_content(ref_text, store, insecure=insecure) as (content, digest):
        found = verify_subject(content, digest, key, ref_text, require_attestations=True)
        manifest = content.manifest(oci.Descriptor(oci.MANIFEST, digest, 0))
        if manifest.get("artifactType") != ADAPTER_ARTIFACT_TYPE:
            return found
        return verify_adapter(content, manifest, found, key, ref_text)


def verify_adapter(content: Any, manifest: dict[str, Any], found: Verified, key: PublicKey, shown: str) -> Verified:
    """An adapter artifact whose own signature and attestations ``found`` holds: its one layer (the
    .onnx_adapter file) is downloaded and must match the digest the signed manifest names and its
    signed SBOM lists; its signed provenance must name the base it is the subject of; and that base
    must itself be a model artifact signed by ``key`` with its own attestations."""
    import dataclasses

    from builder.oci import layout as oci
    from builder.publish.distribute import adapter_of
    from builder.trust import attest

    info = adapter_of(manifest, shown)
    content.check_blob(info.layer)
    want = info.layer.digest.split(":", 1)[1]
    bom = found.predicates[attest.CYCLONEDX_PREDICATE].get("predicate") or {}
    listed = {h.get("content") for c in bom.get("components") or [] for f in c.get("components") or []
              if f.get("type") == "file" for h in f.get("hashes") or []}
    if want not in listed:
        raise VerificationError(f"{shown}: its signed SBOM does not list the adapter file {info.layer.digest}.",
                                hint="The attestations belong to other content: do not use it.")
    provenance = found.predicates[attest.SLSA_PROVENANCE_V1].get("predicate") or {}
    deps = (provenance.get("buildDefinition") or {}).get("resolvedDependencies") or []
    if not any((d.get("digest") or {}).get("sha256") == info.base.digest.split(":", 1)[1] for d in deps):
        raise VerificationError(f"{shown}: its signed provenance does not name its base {info.base.digest}.",
                                hint="The attestations belong to other content: do not use it.")
    base_shown = f"{shown} (its base {info.base.digest})"
    if content.manifest(info.base).get("artifactType") != oci.MODEL_ARTIFACT:
        raise VerificationError(f"{base_shown} is not a model artifact.",
                                hint="An adapter's subject is the model it was trained for; do not use this one.")
    base = verify_subject(content, info.base.digest, key, base_shown, require_attestations=True)
    return dataclasses.replace(found, adapter=info.name, base=base)
