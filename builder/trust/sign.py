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

Verifying them against a policy (what a pull or `build verify` requires) is ``builder.trust.verify``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.errors import SigningError, VerificationError
from builder.oci.media import INTOTO_MEDIA

if TYPE_CHECKING:  # cryptography itself is imported where a key is used: the CLI starts without it
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey, EllipticCurvePublicKey

ENV_SIGN_KEY = "OLIVE_BUILDER_SIGN_KEY"
ENV_SIGN_PASSWORD = "OLIVE_BUILDER_SIGN_KEY_PASSWORD"

# The `critical.type` of a simple-signing payload. The media types of these documents are in
# builder.oci.media, the annotation keys on them in builder.contract.
COSIGN_SIGNATURE_TYPE = "cosign container image signature"


# ---- keys ------------------------------------------------------------------------------------

class SigningKey:
    """A private EC P-256 key. Its repr and str never show the key."""

    def __init__(self, key: EllipticCurvePrivateKey, source: str, path: Path | None, password: bytes | None):
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
    def __init__(self, key: EllipticCurvePublicKey, path: Path):
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


def _not_p256(what: str) -> SigningError:
    return SigningError(f"{what} is not an EC P-256 key.",
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
    from cryptography.hazmat.primitives.asymmetric import ec

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
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise _not_p256(f"The signing key {shown}")
    return SigningKey(key, shown, path, password)


def load_public_key(path: Path) -> PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

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
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise _not_p256(f"The public key {path}")
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


def dsse_envelope(key: SigningKey, payload: bytes, payload_type: str = INTOTO_MEDIA) -> bytes:
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

