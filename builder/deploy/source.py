"""What `build deploy` deploys: a pushed reference resolved at its registry and pinned by digest.

A runnable image (``<name>:<version>-<target>-serve``) runs as it is; a ModelPack model artifact
(``<name>:<version>-<target>``) runs in a runtime image (``--runtime-image``), which must be
at a registry too. Both are read the way `build inspect` reads them: the manifest (its
annotations say the target and device), an image's config (its real entrypoint, command,
environment and user) and the evaluation attestation among the referrers, where the build's
run recorded the model's measured peak memory and threads (``attached_observations``: a
rebuild gives the same manifest, so what one machine observed is never in it). Nothing here
writes anywhere: a reference that does not resolve, content that is not ours or a registry that
does not answer raises before any manifest is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.contract import NS
from builder.errors import ContentError, UsageError, VerificationError
from builder.oci import layout as oci
from builder.oci.content import remote_manifest
from builder.oci.media import IMAGE_CONFIG, MANIFEST, MODEL_ARTIFACT, MODEL_LAYER_TYPES
from builder.oci.reference import Reference, parse_reference
from builder.oci.referrers import SIG_SUFFIX, RemoteContent, index_tag
from builder.oci.registry import Registry
from builder.trust.evaluation_statement import attached_observations
from builder.trust.sign import load_public_key
from builder.trust.verify import verify_signature

SERVER_MODULE = "builder.serve"  # what a runtime image's entrypoint runs (images/runtime-*/Dockerfile)
DEFAULT_UID = 1000  # the runtime images' user (images/runtime-*/Dockerfile: runtime, uid 1000)


@dataclass(frozen=True)
class Pinned:
    """A registry manifest by digest: its reference, digest, parsed manifest and (for an image) config."""

    ref: Reference
    digest: str
    manifest: dict[str, Any]
    config: dict[str, Any] | None  # an image's config document; None for an artifact
    raw: bytes  # the manifest's bytes, as the registry holds them (their sha256 is ``digest``)

    @property
    def image(self) -> str:
        """``registry/repository@sha256:...``: what a pod spec names."""
        return f"{self.ref.name}@{self.digest}"

    @property
    def annotations(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in (self.manifest.get("annotations") or {}).items()}

    @property
    def is_artifact(self) -> bool:
        return self.manifest.get("artifactType") == MODEL_ARTIFACT

    def process(self) -> dict[str, Any]:
        """The image config's ``config`` (Entrypoint, Cmd, Env, User, ...)."""
        inner = (self.config or {}).get("config")
        return dict(inner) if isinstance(inner, dict) else {}

    def model_bytes(self) -> int:
        """The bytes of the model layers (ModelPack media types, or layers that say where their file goes)."""
        return sum(int(d.get("size") or 0) for d in self.manifest.get("layers") or []
                   if d.get("mediaType") in MODEL_LAYER_TYPES or oci.ANN_FILEPATH in (d.get("annotations") or {}))


@dataclass(frozen=True)
class Sizing:
    """Requests and limits, and what they came from (written on the Deployment as an annotation)."""

    memory_request_mi: int
    memory_limit_mi: int
    cpu_request: int  # cores
    gpus: int
    basis: str


@dataclass(frozen=True)
class Source:
    """Everything the manifests are made from."""

    model: Pinned  # the runnable image, or the model artifact
    runtime: Pinned  # the image the server container runs: the runnable image itself, or the runtime image
    sizing: Sizing
    signed: bool  # the model (or runnable image) has a cosign signature under its `.sig` tag
    uid: int
    uid_note: str | None  # why the uid is not the image's own number, when it is not

    @property
    def device(self) -> str:
        return self.model.annotations.get(NS + "device", "cpu")

    @property
    def target(self) -> str:
        return self.model.annotations.get(NS + "target", "")


# ---- sizing: from what the build measured, with headroom --------------------------------------

MEASURED_REQUEST = (1.5, 128)  # peak RSS x 1.5 + 128 MiB: the server's own imports, KV caches of a batch
MEASURED_LIMIT = (2.0, 256)
FALLBACK_REQUEST = (1.5, 256)  # model bytes x 1.5 + 256 MiB, when no speed was measured
FALLBACK_LIMIT = (2.0, 512)
FALLBACK_CPUS = 2
MAX_CPU_REQUEST = 16


def _mi(value_mb: float, factor: float, extra: int) -> int:
    """``value_mb * factor + extra`` MiB, rounded up to 16 MiB (stable under tiny measurement noise)."""
    return int(math.ceil((value_mb * factor + extra) / 16.0) * 16)


def _threads(speed: dict[str, Any]) -> int | None:
    intra = speed.get("intra_op_threads")
    if isinstance(intra, int) and intra > 0:
        return intra
    cpu = speed.get("cpu") if isinstance(speed.get("cpu"), dict) else {}
    usable = cpu.get("usable_cores") if cpu else None
    return int(usable) if isinstance(usable, int) and usable > 0 else None


def sizing(observations: list[tuple[str, dict[str, Any]]], model_bytes: int, gpus: int) -> Sizing:
    """Requests and limits from the largest measured peak RSS among the evaluation attestations
    (each build run that packaged this manifest attached one; the largest wins, so the result does
    not depend on their order), else from the model's size."""
    measured = []
    for referrer, seen in observations:
        speed = ((seen.get("evaluation") or {}).get("speed") or {}) if isinstance(seen, dict) else {}
        peak = speed.get("peak_rss_mb") if isinstance(speed, dict) else None
        if speed.get("measured") is not False and isinstance(peak, (int, float)) and peak > 0:
            measured.append((float(peak), _threads(speed), referrer))
    if measured:
        peak, threads, referrer = max(measured, key=lambda m: (m[0], m[1] or 0, m[2]))
        cpus = max(1, min(threads or FALLBACK_CPUS, MAX_CPU_REQUEST))
        return Sizing(_mi(peak, *MEASURED_REQUEST), _mi(peak, *MEASURED_LIMIT), cpus, gpus,
                      f"measured: peak RSS {peak:g} MB, {threads or 'unknown'} threads "
                      f"(evaluation attestation {referrer[:19]})")
    model_mb = model_bytes / (1 << 20)
    return Sizing(_mi(model_mb, *FALLBACK_REQUEST), _mi(model_mb, *FALLBACK_LIMIT), FALLBACK_CPUS, gpus,
                  f"estimated: no measured speed attached; model {model_mb:.1f} MiB x {FALLBACK_REQUEST[0]} + "
                  f"{FALLBACK_REQUEST[1]} MiB")


# ---- resolving -----------------------------------------------------------------------------------

def _registry_ref(text: str, what: str) -> Reference:
    ref = parse_reference(text)
    if ref.registry is None:
        raise UsageError(f"{text} names the local store; a cluster pulls {what} from a registry.",
                         hint=f"Push it first (`build push {text} --to REGISTRY/NAMESPACE`), then deploy "
                              "REGISTRY/NAMESPACE/NAME:TAG.")
    return ref


def _pin(registry: Registry, ref: Reference) -> Pinned:
    data, media, digest = remote_manifest(
        registry, ref, hint=f"Check the name and tag; `build inspect {ref.name}:TAG` shows one.")
    if media != MANIFEST:
        raise ContentError(f"{ref} is a {media or 'document without a media type'}, not an OCI image manifest: "
                           "it is not a model built by olive-builder.")
    manifest = oci.parse_manifest(data, str(ref))
    config = None
    config_desc = oci.Descriptor.from_json(manifest["config"])
    if config_desc.media_type == IMAGE_CONFIG:
        config = oci.json_object(RemoteContent(registry, ref.repository).blob(config_desc), f"{ref}'s config")
    return Pinned(ref, digest, manifest, config, data)


def _ours(pinned: Pinned) -> None:
    """Refuse what olive-builder did not make: a model artifact or a runnable image, both annotated
    with the build's target."""
    if NS + "target" not in pinned.annotations or not (pinned.is_artifact or pinned.config is not None):
        raise ContentError(f"{pinned.ref} is not a model artifact or runnable image made by olive-builder "
                           f"(no {NS}target annotation).",
                           hint="Deploy what `build recipe --push` or `build push` pushed: NAME:VERSION-TARGET "
                                "(the model) or NAME:VERSION-TARGET-serve (the runnable image).")


def _runtime(pinned: Pinned, shown: str) -> None:
    """Refuse an image whose entrypoint is not our server."""
    process = pinned.process()
    entry = [str(x) for x in (process.get("Entrypoint") or []) + (process.get("Cmd") or [])]
    if SERVER_MODULE not in entry:
        raise ContentError(f"{shown} does not run the olive-builder server (its entrypoint is "
                           f"{' '.join(entry) or 'empty'}).",
                           hint="Use a runtime image (`build images --target runtime-cpu`, pushed to a registry) "
                                "or the model's runnable image (NAME:VERSION-TARGET-serve).")


def _uid(pinned: Pinned) -> tuple[int, str | None]:
    """The image's numeric uid. Kubernetes can check runAsNonRoot only against a number: an image
    that names its user (USER runtime) gets the runtime images' uid 1000, and the reason is kept."""
    user = str(pinned.process().get("User") or "")
    name = user.split(":", 1)[0]
    if name.isdigit():
        uid = int(name)
        if uid == 0:
            raise ContentError(f"{pinned.ref} runs as root (User {user!r}); the deployment runs as non-root.",
                               hint="Use a runtime image built by `build images` (uid 1000).")
        return uid, None
    return DEFAULT_UID, (f"the image names its user {name!r}" if name else "the image names no user") + \
        f"; runAsUser {DEFAULT_UID} (the runtime images' uid; their files are world-readable)"


def _signed(registry: Registry, pinned: Pinned) -> bool:
    return registry.get_manifest(pinned.ref.repository, index_tag(pinned.digest) + SIG_SUFFIX) is not None


def resolve(ref_text: str, *, runtime_image: str | None = None, insecure: bool | None = None,
            verify_key: Path | None = None) -> Source:
    """Resolve ``ref_text`` (and, for a model artifact, ``runtime_image``) at its registry, pinned by
    digest, with the sizing its evaluation attestation gives. With ``verify_key``, the model (or
    runnable image) must carry a cosign signature by that key."""
    ref = _registry_ref(ref_text, "the model")
    registry = Registry(str(ref.registry), insecure=insecure)
    try:
        model = _pin(registry, ref)
        _ours(model)
        content = RemoteContent(registry, ref.repository)
        if verify_key is not None:
            verify_signature(content, model.digest, load_public_key(verify_key), str(ref))
        signed = _signed(registry, model)
        observations = attached_observations(content, model.digest)
    finally:
        registry.close()
    if model.is_artifact:
        if runtime_image is None:
            raise UsageError(f"{ref_text} is a model artifact: it runs in a runtime image, and none was named.",
                             hint="Pass --runtime-image REGISTRY/REPO:TAG (a runtime image pushed to a registry, "
                                  "or the model's runnable image NAME:VERSION-TARGET-serve), or deploy the "
                                  "runnable image itself.")
        rref = _registry_ref(runtime_image, "the runtime image")
        rreg = Registry(str(rref.registry), insecure=insecure)
        try:
            runtime = _pin(rreg, rref)
        finally:
            rreg.close()
        if runtime.config is None:
            raise ContentError(f"{runtime_image} is not a container image (it has no image config).")
    else:
        if runtime_image is not None:
            raise UsageError(f"{ref_text} is a runnable image: it brings its own runtime, --runtime-image is for "
                             "model artifacts.", hint="Leave out --runtime-image, or deploy the model artifact.")
        runtime = model
    _runtime(runtime, runtime_image or ref_text)
    device = model.annotations.get(NS + "device", "cpu")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"{ref_text} is a {device} build: no Linux server runs it (only cpu and cuda builds have a "
                         "runtime image).")
    if device == "cuda" and model.is_artifact and "CUDA" not in str(runtime.process().get("Labels") or {}):
        raise UsageError(f"{ref_text} is a cuda build and {runtime_image} is not a CUDA runtime image.",
                         hint="Use the runtime-cuda image (`build images --target runtime-cuda`), pushed.")
    uid, note = _uid(runtime)
    return Source(model, runtime, sizing(observations, model.model_bytes(), 1 if device == "cuda" else 0),
                  signed, uid, note)


def check_policy_key(source: Source, key: Path, *, insecure: bool | None = None) -> list[str]:
    """The container images (``registry/repository``) whose cosign signature ``key`` verifies: what an
    admission policy with this key can require. VerificationError when none is."""
    public = load_public_key(key)
    out: list[str] = []
    for pinned in ([source.runtime] if source.runtime is source.model else [source.runtime, source.model]):
        if pinned.config is None:  # an artifact is no container image: admission controllers never see it
            continue
        registry = Registry(str(pinned.ref.registry), insecure=insecure)
        try:
            verify_signature(RemoteContent(registry, pinned.ref.repository), pinned.digest, public, str(pinned.ref))
        except VerificationError:
            continue
        finally:
            registry.close()
        out.append(pinned.ref.name)
    if not out:
        raise VerificationError(f"No container image of this deployment is signed by {key}: the admission policy "
                                "would refuse every pod.",
                                hint="Deploy the runnable image (NAME:VERSION-TARGET-serve) of a build packaged with "
                                     "--sign-key, or leave out --policy-key.")
    return out
