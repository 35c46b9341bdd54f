"""Attestations of a packaged build: what is inside it, how it was made, how it was evaluated.

Three documents per build, in formats other tools read:

- a CycloneDX 1.6 SBOM (``cyclonedx-python-lib``) per manifest. The model artifact's lists
  the built model as a ``machine-learning-model`` component whose sub-components are its
  files with SHA-256 digests, the source model (Hub id, resolved commit, license) as its
  ancestor, and the tools that made it (versions and purls). The runnable image's adds the
  runtime's Python packages and the base image's Debian packages, read from the image's own
  layers (``*.dist-info/METADATA`` and ``var/lib/dpkg/status`` inside the layer tars).
- a SLSA v1 provenance statement (in-toto Statement v1) whose subjects are both manifests.
- the evaluation results as an in-toto statement with the test-result predicate.

Everything here is a pure function of the build's facts and its creation time (no wall
clock, no random serial numbers), so packaging the same build again gives the same bytes
and re-pushing uploads nothing new.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import re
import socket
import tarfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from builder import __version__
from builder.contract import atomic_write
from builder.errors import StoreError
from builder.oci import layout as oci

# media types and predicate types (the names other tools match on)
SBOM_MEDIA = "application/vnd.cyclonedx+json"
INTOTO_MEDIA = "application/vnd.in-toto+json"
STATEMENT_V1 = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
TEST_RESULT_V01 = "https://in-toto.io/attestation/test-result/v0.1"
CYCLONEDX_PREDICATE = "https://cyclonedx.org/bom"
BUILD_TYPE = "https://github.com/olive-builder/olive-builder/blob/main/README.md#supply-chain"
ANN_PREDICATE_TYPE = "in-toto.io/predicate-type"
# The namespace UUIDs of deterministic SBOM serial numbers (uuid5 of the subject digest).
_SERIAL_NS = uuid.UUID("9a3f4a51-5bd4-4a70-9f1e-7c3f1f0b6d21")


@dataclass(frozen=True)
class Subject:
    """A manifest an attestation is about."""

    name: str  # <name>:<tag> as stored (or pushed)
    digest: str  # sha256:<hex>
    media_type: str = oci.MANIFEST

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


def file_digests(model_dir: Path, files: Iterable[str]) -> tuple[FileDigest, ...]:
    out = []
    for name in sorted(files):
        path = model_dir / name
        h = hashlib.sha256()
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            while chunk := f.read(oci.CHUNK):
                h.update(chunk)
        out.append(FileDigest(name, h.hexdigest(), size))
    return tuple(out)


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def statement(subjects: Iterable[Subject], predicate_type: str, predicate: Mapping[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1."""
    return {"_type": STATEMENT_V1, "subject": [s.to_statement() for s in subjects],
            "predicateType": predicate_type, "predicate": dict(predicate)}


# ---- builder identity --------------------------------------------------------------------------

def builder_identity(env: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """(builder id, invocation id): the GitHub Actions workflow and its run when built there, else this host."""
    env = os.environ if env is None else env
    if env.get("GITHUB_ACTIONS") == "true" and env.get("GITHUB_REPOSITORY") and env.get("GITHUB_RUN_ID"):
        server = env.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/")
        repo = env["GITHUB_REPOSITORY"]
        workflow = env.get("GITHUB_WORKFLOW_REF")  # owner/repo/.github/workflows/x.yml@refs/heads/main
        builder = f"{server}/{workflow}" if workflow else f"{server}/{repo}/actions"
        run = f"{server}/{repo}/actions/runs/{env['GITHUB_RUN_ID']}/attempts/{env.get('GITHUB_RUN_ATTEMPT', '1')}"
        return builder, run
    return f"urn:olive-builder:host:{socket.gethostname() or 'localhost'}", None


# ---- SLSA provenance ---------------------------------------------------------------------------

def _digest_map(digest: str) -> dict[str, str]:
    algo, _, hexpart = digest.partition(":")
    return {algo: hexpart} if hexpart else {"sha256": digest}


def provenance(facts: BuildFacts, subjects: Iterable[Subject], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A SLSA v1 provenance statement: the recipe and target in, the model and builder image used, the builder."""
    info = facts.info
    source = info.get("source") or {}
    builder = info.get("builder") or {}
    tools = info.get("tools") or {}
    target = info.get("target") or {}
    recipe: dict[str, Any] = {"digest": info.get("recipe_digest")}
    if facts.recipe_path:
        recipe["path"] = facts.recipe_path
    if facts.recipe_text is not None:
        recipe["content"] = facts.recipe_text
    external = {"recipe": recipe, "target": {"id": info.get("id"), **target}}
    deps: list[dict[str, Any]] = []
    hub = source.get("hub")
    commit = source.get("resolved_revision")
    if hub:
        dep: dict[str, Any] = {"uri": f"https://huggingface.co/{hub}", "name": hub}
        if commit:
            dep["digest"] = {"gitCommit": commit}
            dep["uri"] += f"/tree/{commit}"
        deps.append(dep)
    elif source.get("local"):
        dep = {"name": "local model folder"}
        if commit and ":" in commit:
            dep["digest"] = _digest_map(commit)
        elif commit:
            dep["annotations"] = {"revision": commit}
        if "digest" in dep or "annotations" in dep:
            deps.append(dep)
    lock = facts.lock_entry or {}
    for name, digest in sorted((lock.get("files") or {}).items()):
        deps.append({"name": f"source:{name}", "uri": f"https://huggingface.co/{hub}/resolve/{commit}/{name}"
                     if hub and commit else None, "digest": _digest_map(str(digest))})
    if builder.get("image_id"):
        image_dep: dict[str, Any] = {"name": builder.get("image") or "builder image", "digest": _digest_map(builder["image_id"])}
        if builder.get("image"):
            image_dep["uri"] = f"pkg:docker/{builder['image'].split(':', 1)[0]}@{builder['image_id']}"
        deps.append(image_dep)
    internal: dict[str, Any] = {"engine": builder.get("engine"), "tools": dict(tools)}
    if info.get("cache_key"):
        internal["cacheKey"] = info["cache_key"]
    if facts.lock_entry is not None:
        internal["lockEntry"] = dict(facts.lock_entry)
    builder_id, invocation = builder_identity(env)
    metadata: dict[str, Any] = {"finishedOn": rfc3339(facts.created)}
    if invocation:
        metadata["invocationId"] = invocation
    predicate = {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": external,
            "internalParameters": internal,
            "resolvedDependencies": [{k: v for k, v in d.items() if v is not None} for d in deps],
        },
        "runDetails": {
            "builder": {"id": builder_id, "version": {"olive-builder": str(builder.get("version") or __version__)}},
            "metadata": metadata,
        },
    }
    return statement(subjects, SLSA_PROVENANCE_V1, predicate)


# ---- evaluation --------------------------------------------------------------------------------

def evaluation_results(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """The evaluation section of the build record, however the evaluation stage names it."""
    for key in ("evaluation", "eval"):
        value = info.get(key)
        if isinstance(value, dict):
            return value
    return None


def evaluation_passed(section: Mapping[str, Any] | None) -> bool | None:
    """True/False from the build record's ``evaluation`` (see ``builder.build.evaluate``); None when it was
    not evaluated."""
    if not section or section.get("evaluated") is False:
        return None
    if isinstance(section.get("passed"), bool):
        return bool(section["passed"])
    if isinstance(section.get("failures"), list):
        return not section["failures"]
    return None


def evaluation(facts: BuildFacts, subjects: Iterable[Subject]) -> dict[str, Any]:
    """The build's evaluation (and its check) as an in-toto test-result statement: PASSED when the
    gates held, FAILED with the failures when not, WARNED when it was not evaluated."""
    info = facts.info
    section = evaluation_results(info)
    passed = evaluation_passed(section)
    check = info.get("check") or {}
    passed_tests: list[str] = []
    failed_tests: list[str] = []
    warned: list[str] = []
    if check:
        (passed_tests if check.get("ok", True) else failed_tests).append("check: loads and generates")
    if passed is None:
        reason = (section or {}).get("reason")
        warned.append("evaluation: not evaluated" + (f" ({reason})" if reason else ""))
    else:
        gates = (section or {}).get("gates") or {}
        failed_tests.extend(f"evaluation: {f}" for f in (section or {}).get("failures") or [])
        if passed:
            passed_tests.extend(f"gate: {name} {limit}" for name, limit in sorted(gates.items()))
        elif not failed_tests:
            failed_tests.append("evaluation: failed")
    result = "FAILED" if failed_tests else ("WARNED" if warned else "PASSED")
    # test-result v0.1 has no field for figures: they travel as the configuration's annotations.
    notes: dict[str, Any] = {"target": info.get("id"), "evaluated": passed is not None}
    if section is not None:
        notes["results"] = section
    if check:
        notes["check"] = dict(check)
    predicate = {
        "result": result,
        "configuration": [{"name": "olive-builder evaluation", "annotations": notes}],
        "url": "https://github.com/olive-builder/olive-builder#evaluation",
        "passedTests": passed_tests,
        "warnedTests": warned,
        "failedTests": failed_tests,
    }
    return statement(subjects, TEST_RESULT_V01, predicate)


# ---- SBOM --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Package:
    """An installed package found in an image's layers."""

    ecosystem: str  # pypi | deb
    name: str
    version: str
    license: str | None = None
    arch: str | None = None


def _purl_oci(name: str, digest: str, repository_url: str | None = None) -> str:
    from packageurl import PackageURL

    qualifiers = {"repository_url": repository_url} if repository_url else None
    return str(PackageURL(type="oci", name=name.rsplit("/", 1)[-1].split(":", 1)[0], version=digest,
                          qualifiers=qualifiers))


def sbom(facts: BuildFacts, subject: Subject, *, packages: Iterable[Package] = (),
         base: Mapping[str, str] | None = None, image: bool = False) -> dict[str, Any]:
    """A CycloneDX 1.6 SBOM (JSON document) of ``subject``: the model, its source, its tools and
    (for the runnable image, ``image``) ``packages`` from the image's layers on ``base`` and the
    files only the image holds (``facts.image_files``: a finetuned build's adapters)."""
    try:  # the current locations; older cyclonedx-python-lib releases have only the old ones
        from cyclonedx.contrib.license.factories import LicenseFactory
        from cyclonedx.contrib.this.builders import this_component
    except ImportError:  # pragma: no cover
        from cyclonedx.builder.this import this_component
        from cyclonedx.factory.license import LicenseFactory
    from cyclonedx.model import ExternalReference, ExternalReferenceType, HashAlgorithm, HashType, Property, XsUri
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType, Pedigree
    from cyclonedx.model.tool import ToolRepository
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    info = facts.info
    source = info.get("source") or {}
    target = info.get("target") or {}
    licenses = LicenseFactory()
    extra = facts.image_files if image else ()

    def sha256(hexdigest: str) -> HashType:
        return HashType(alg=HashAlgorithm.SHA_256, content=hexdigest)

    files = [Component(type=ComponentType.FILE, name=f.path, bom_ref=f"file:{f.path}", hashes=[sha256(f.sha256)],
                       properties=[Property(name="olive-builder:size", value=str(f.size))]
                       + ([Property(name="olive-builder:image-path", value=f"/model/{f.path}")] if f in extra else []))
             for f in [*facts.files, *extra]]
    ancestors = []
    hub = source.get("hub")
    commit = source.get("resolved_revision")
    if hub:
        org, _, repo_name = str(hub).rpartition("/")
        src = Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=repo_name, group=org or None,
                        version=commit or source.get("revision"), bom_ref=f"source:{hub}",
                        purl=PackageURL(type="huggingface", namespace=org or None, name=repo_name, version=commit)
                        if commit else None,
                        licenses=[licenses.make_from_string(str(info["license"]))] if info.get("license") else [],
                        external_references=[ExternalReference(type=ExternalReferenceType.DISTRIBUTION,
                                                               url=XsUri(f"https://huggingface.co/{hub}"))])
        ancestors.append(src)
    elif source.get("local"):
        ancestors.append(Component(type=ComponentType.MACHINE_LEARNING_MODEL, name="local model folder",
                                   bom_ref="source:local", version=commit))
    model = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=str(info.get("name")), version=str(info.get("version")),
        bom_ref="model", description=info.get("description") or None,
        licenses=[licenses.make_from_string(str(info["license"]))] if info.get("license") else [],
        components=files, pedigree=Pedigree(ancestors=ancestors) if ancestors else None,
        properties=[Property(name=f"olive-builder:{k}", value=str(v)) for k, v in (
            ("target", info.get("id")), ("device", target.get("device")),
            ("execution-provider", target.get("execution_provider")), ("precision", target.get("precision")),
            ("recipe-digest", info.get("recipe_digest")), ("cache-key", info.get("cache_key"))) if v],
    )
    tools = _tool_components(info)
    tools.append(this_component())
    subject_component = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL if not image and not packages and base is None else ComponentType.CONTAINER,
        name=subject.name, version=subject.digest, bom_ref="subject",
        purl=PackageURL.from_string(_purl_oci(subject.name, subject.digest)),
    )
    components = [model]
    runtime_refs = []
    for p in sorted(set(packages), key=lambda p: (p.ecosystem, p.name.lower(), p.version)):
        if p.ecosystem == "pypi":
            purl = PackageURL(type="pypi", name=p.name.lower().replace("_", "-"), version=p.version)
        else:
            purl = PackageURL(type="deb", namespace="debian", name=p.name, version=p.version,
                              qualifiers={"arch": p.arch} if p.arch else None)
        ref = f"{p.ecosystem}:{p.name}@{p.version}"
        runtime_refs.append(ref)
        lic = []
        if p.license:
            try:
                lic = [licenses.make_from_string(p.license)]
            except Exception:  # noqa: BLE001 - free-text licenses the factory cannot read are left out
                lic = []
        components.append(Component(type=ComponentType.LIBRARY if p.ecosystem == "pypi" else ComponentType.APPLICATION,
                                    name=p.name, version=p.version, purl=purl, bom_ref=ref, licenses=lic))
    if base:
        components.append(Component(type=ComponentType.CONTAINER, name=base.get("name", "runtime image"),
                                    version=base.get("digest"), bom_ref="base-image"))
    bom = Bom(
        serial_number=uuid.uuid5(_SERIAL_NS, subject.digest),
        metadata=BomMetaData(timestamp=facts.created.astimezone(dt.UTC), component=subject_component,
                             tools=ToolRepository(components=tools)),
        components=components,
    )
    bom.register_dependency(subject_component, [model] + [c for c in components if c.bom_ref.value in runtime_refs]
                            + [c for c in components if c.bom_ref.value == "base-image"])
    doc: dict[str, Any] = json.loads(JsonV1Dot6(bom).output_as_string())
    _add_model_card(doc, info, facts)
    return doc


def _tool_components(info: Mapping[str, Any]) -> list[Any]:
    """The tools that made a build (the record's ``tools`` with pypi purls, olive-builder, the
    builder image by digest) as CycloneDX components."""
    from cyclonedx.model import HashAlgorithm, HashType
    from cyclonedx.model.component import Component, ComponentType
    from packageurl import PackageURL

    builder = info.get("builder") or {}
    tools = [Component(type=ComponentType.APPLICATION, name=name, version=str(version),
                       purl=PackageURL(type="pypi", name=name, version=str(version)), bom_ref=f"tool:{name}")
             for name, version in sorted((info.get("tools") or {}).items())]
    tools.append(Component(type=ComponentType.APPLICATION, name="olive-builder",
                           version=str(builder.get("version") or __version__), bom_ref="tool:olive-builder"))
    if builder.get("image_id"):
        tools.append(Component(type=ComponentType.CONTAINER, name=str(builder.get("image") or "builder image"),
                               version=str(builder["image_id"]), bom_ref="tool:builder-image",
                               hashes=[HashType(alg=HashAlgorithm.SHA_256,
                                                content=str(builder["image_id"]).split(":", 1)[-1])]))
    return tools


def _add_model_card(doc: dict[str, Any], info: Mapping[str, Any], facts: BuildFacts) -> None:
    """cyclonedx-python-lib has no model card type yet; the 1.6 schema does: add it to the model."""
    card: dict[str, Any] = {"modelParameters": {"task": "text-generation"}}
    arch = info.get("architecture")
    for f in facts.files:
        if f.path == "genai_config.json":
            card["modelParameters"]["architectureFamily"] = "transformer"
    if arch:
        card["modelParameters"]["modelArchitecture"] = str(arch)
    section = evaluation_results(info)
    metrics = []
    for name, value in sorted(((section or {}).get("accuracy") or {}).items()):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            metrics.append({"type": str(name), "value": str(value)})
    if metrics:
        card["quantitativeAnalysis"] = {"performanceMetrics": metrics}
    for c in doc.get("components", []):
        if c.get("bom-ref") == "model":
            c["modelCard"] = card


# ---- what an image's layers hold ---------------------------------------------------------------

_DPKG_STATUS = "var/lib/dpkg/status"
_DIST_INFO = re.compile(r"^(?:.*/)?([^/]+)\.dist-info/METADATA$")  # site-packages, or a pip --target folder


def _open_layer(f: BinaryIO, media_type: str) -> BinaryIO:
    if media_type.endswith("gzip"):
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return f


def layer_packages(store: oci.Store, layers: Iterable[oci.Descriptor]) -> list[Package]:
    """The Python distributions and Debian packages installed in an image, read from its layers
    in order (a later layer's file replaces an earlier one's; whiteouts delete)."""
    dist: dict[str, Package] = {}  # METADATA path -> package
    status: bytes | None = None
    for layer in layers:
        if layer.media_type not in (oci.IMAGE_LAYER, oci.IMAGE_LAYER_GZIP, oci.DOCKER_LAYER_GZIP):
            continue
        with store.open_blob(layer.digest) as raw, tarfile.open(fileobj=_open_layer(raw, layer.media_type),
                                                                 mode="r|") as tar:
            for member in tar:
                name = member.name.lstrip("./")
                base = PurePosixPath(name).name
                if base.startswith(".wh."):
                    gone = str(PurePosixPath(name).parent / base[4:])
                    if gone == _DPKG_STATUS:
                        status = None
                    for key in [k for k in dist if k == gone or k.startswith(gone + "/")]:
                        del dist[key]
                    continue
                if not member.isfile():
                    continue
                if name == _DPKG_STATUS:
                    f = tar.extractfile(member)
                    status = f.read() if f else None
                elif _DIST_INFO.match(name) and member.size < (4 << 20):
                    f = tar.extractfile(member)
                    if f is not None:
                        pkg = _python_package(f.read())
                        if pkg:
                            dist[name] = pkg
    out = list(dist.values())
    if status:
        out.extend(dpkg_packages(status.decode("utf-8", "replace")))
    return out


def _python_package(metadata: bytes) -> Package | None:
    headers = HeaderParser().parsestr(metadata.decode("utf-8", "replace"), headersonly=True)
    name, version = headers.get("Name"), headers.get("Version")
    if not name or not version:
        return None
    # Only an SPDX expression is trusted; free-text License fields and classifiers are not SPDX ids.
    lic = headers.get("License-Expression") or None
    return Package("pypi", str(name), str(version), lic)


def dpkg_packages(status: str) -> list[Package]:
    """Installed packages in a dpkg status file."""
    out = []
    for stanza in status.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if fields.get("Package") and fields.get("Version") and "installed" in fields.get("Status", "").split():
            out.append(Package("deb", fields["Package"], fields["Version"], None, fields.get("Architecture")))
    return out


# ---- all of a build's attestations -------------------------------------------------------------

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


__all__ = [
    "Attestations", "BuildFacts", "FileDigest", "Package", "Subject", "build_attestations", "builder_identity",
    "dpkg_packages", "evaluation", "file_digests", "layer_packages", "provenance", "sbom", "statement",
]


# ---- attaching a packaged build's attestations (and signatures) in the local store -----------

ANN_KEY_ID = "org.olive-builder.signature.key-id"  # sha256 of the signer's public key PEM
ANN_KIND = "org.olive-builder.referrer"  # sbom | provenance | evaluation | model-signature


@dataclass(frozen=True)
class Attached:
    """What ``attach_build`` left in the store: (kind, subject digest, referrer descriptor)."""

    referrers: tuple[tuple[str, str, oci.Descriptor], ...]
    signed: bool


def _runtime_packages(store: oci.Store, runtime: Any) -> list[Package]:
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


def attach_build(store: oci.Store, model_dir: Path, *, artifact_ref: str, artifact: oci.Descriptor,
                 image_ref: str | None = None, image: oci.Descriptor | None = None, runtime: Any = None,
                 created: dt.datetime, info: Mapping[str, Any], recipe_path: str | None = None,
                 recipe_text: str | None = None, lock_entry: Mapping[str, Any] | None = None,
                 key: Any = None, files: Iterable[str] | None = None,
                 precomputed: tuple[FileDigest, ...] | None = None,
                 env: Mapping[str, str] | None = None, image_files: tuple[FileDigest, ...] = ()) -> Attached:
    """Attach the SBOMs, provenance and evaluation of a packaged build as referrers of its manifests,
    and with ``key`` (a ``sign.SigningKey``) sign the model folder (OpenSSF model signing) and
    both manifests and the attestations (cosign's format). ``image_files``: files the runnable image
    holds beyond ``model_dir``'s (a finetuned build's adapters), listed in its SBOM. Idempotent: what
    is already attached (by this key) is kept, so packaging the same build again adds nothing."""
    from builder.oci import referrers
    from builder.publish import package as package_mod
    from builder.trust import sign

    name = artifact_ref.rpartition(":")[0]
    if precomputed is None:
        names = list(files) if files is not None else package_mod.model_files(model_dir)
        precomputed = file_digests(model_dir, names)
    facts = BuildFacts(info, precomputed, created, recipe_path, recipe_text, lock_entry, image_files)
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
        d = referrers.attach(store, name, subject, SBOM_MEDIA, [(sbom_doc, SBOM_MEDIA, {})],
                             annotations={**when, ANN_KIND: "sbom"})
        out.append(("sbom", subject.digest, d))
        for kind, (doc, ptype) in statements.items():
            d = referrers.attach(store, name, subject, INTOTO_MEDIA, [(doc, INTOTO_MEDIA, {ANN_PREDICATE_TYPE: ptype})],
                                 annotations={**when, ANN_KIND: kind, ANN_PREDICATE_TYPE: ptype})
            out.append((kind, subject.digest, d))
    if key is None:
        return Attached(tuple(out), False)
    # The model folder, in the OpenSSF model signing format (the same files in both manifests).
    bundle: bytes | None = None
    for subject, _ in subjects:
        existing = [d for d in referrers.list_local(store, name, subject.digest)
                    if d.artifact_type == sign.SIGSTORE_BUNDLE_MEDIA and d.annotations.get(ANN_KEY_ID) == key.key_id]
        if existing:
            out.append(("model-signature", subject.digest, existing[0]))
            continue
        bundle = bundle or _model_bundle(key, model_dir)
        d = referrers.attach(store, name, subject, sign.SIGSTORE_BUNDLE_MEDIA,
                             [(bundle, sign.SIGSTORE_BUNDLE_MEDIA, {ANN_KEY_ID: key.key_id})],
                             annotations={**when, ANN_KIND: "model-signature", ANN_KEY_ID: key.key_id})
        out.append(("model-signature", subject.digest, d))
    # Both manifests (cosign simple signing) and the attestations (cosign DSSE), under cosign's tags.
    for subject, sbom_doc in subjects:
        ref_name = artifact_ref if subject is artifact else str(image_ref)
        if not _signed_by(store, name, subject.digest, referrers.SIG_SUFFIX, key):
            payload, sig = sign.sign_manifest(key, ref_name.rpartition(":")[0], subject.digest)
            d = referrers.replace_local_tagged(store, name, subject, referrers.SIG_SUFFIX, sign.COSIGN_SIG_ARTIFACT,
                                               [(payload, sign.SIMPLE_SIGNING_MEDIA,
                                                 {sign.ANN_SIGNATURE: sig, ANN_KEY_ID: key.key_id})],
                                               annotations=when)
            out.append(("signature", subject.digest, d))
        if not _signed_by(store, name, subject.digest, referrers.ATT_SUFFIX, key):
            sbom_statement = oci.canonical_json(statement(
                [a_subject if subject is artifact else i_subject], CYCLONEDX_PREDICATE, json.loads(sbom_doc)))  # type: ignore[list-item]
            layers = []
            for doc, ptype in [(sbom_statement, CYCLONEDX_PREDICATE), *statements.values()]:
                layers.append((sign.dsse_envelope(key, doc), sign.DSSE_MEDIA,
                               {sign.ANN_SIGNATURE: "", sign.ANN_PREDICATE_TYPE: ptype, ANN_KEY_ID: key.key_id}))
            d = referrers.replace_local_tagged(store, name, subject, referrers.ATT_SUFFIX, sign.COSIGN_ATT_ARTIFACT,
                                               layers, annotations=when)
            out.append(("attestations", subject.digest, d))
    return Attached(tuple(out), True)


def _signed_by(store: oci.Store, name: str, subject_digest: str, suffix: str, key: Any) -> bool:
    from builder.oci import referrers

    desc = referrers.local_tagged(store, name, subject_digest, suffix)
    if desc is None:
        return False
    layers = store.read_json(desc.digest).get("layers") or []
    return any((d.get("annotations") or {}).get(ANN_KEY_ID) == key.key_id for d in layers)


def _model_bundle(key: Any, model_dir: Path) -> bytes:
    import tempfile

    from builder.trust import sign

    with tempfile.TemporaryDirectory(prefix="olive-builder-sig-") as tmp:
        return sign.sign_model(key, model_dir, Path(tmp) / "model.sig")


class BackgroundDigests:
    """File digests computed on another thread while the layers are written: hashlib releases
    the GIL, so on two cores the SBOM's digests cost packaging almost no wall time."""

    def __init__(self, model_dir: Path, files: Iterable[str]):
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="file-digests")
        self._future = self._pool.submit(file_digests, Path(model_dir), list(files))

    def result(self) -> tuple[FileDigest, ...]:
        try:
            return self._future.result()
        finally:
            self._pool.shutdown(wait=False)


def recipe_inputs(recipe_path: Path | None) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """(recipe path, recipe text, lock entry) for the provenance; what cannot be read is left out."""
    if recipe_path is None:
        return None, None, None
    from builder.errors import BuilderError
    from builder.recipe import format as recipe
    from builder.recipe import lock

    shown = _recipe_shown(Path(recipe_path))
    try:
        text = Path(recipe_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return shown, None, None
    try:
        loaded = recipe.load(Path(recipe_path))
        found = lock.entry(loaded, lock.find(Path(recipe_path).parent))
    except BuilderError:
        found = None
    return shown, text, (found.to_json() if found is not None else None)


def _recipe_shown(path: Path) -> str:
    """The recipe's path within its git repository (as a workflow names it), else its file name:
    the provenance does not publish where a build machine keeps its files."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path.resolve().parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return path.resolve().relative_to(Path(out.stdout.strip()).resolve()).as_posix()
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return path.name


def attach_packaged(store: oci.Store, model_dir: Path, packaged: Any, *, info: Mapping[str, Any],
                    created: dt.datetime, runtime: Any = None, digests: BackgroundDigests | None = None,
                    sign_key: Any = None, recipe_path: Path | None = None,
                    adapters: Mapping[str, Path] | None = None) -> Attached:
    """``attach_build`` for what ``package.package`` just stored; ``adapters`` (name -> file) are in
    its runnable image."""
    path, text, entry = recipe_inputs(recipe_path)
    return attach_build(store, model_dir, artifact_ref=packaged.artifact_ref, artifact=packaged.artifact,
                        image_ref=packaged.image_ref, image=packaged.image, runtime=runtime, created=created,
                        info=info, recipe_path=path, recipe_text=text, lock_entry=entry, key=sign_key,
                        precomputed=digests.result() if digests is not None else None,
                        image_files=adapter_file_digests(adapters or {}) if packaged.image is not None else ())


def adapter_file_digests(adapters: Mapping[str, Path]) -> tuple[FileDigest, ...]:
    """``adapters/<name>.onnx_adapter`` of each adapter file, with its digest (for the image's SBOM)."""
    from builder.contract import ADAPTER_SUFFIX, ADAPTERS_DIR

    out = []
    for name, path in sorted(adapters.items()):
        (found,) = file_digests(Path(path).parent, [Path(path).name])
        out.append(FileDigest(f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}", found.sha256, found.size))
    return tuple(out)


def image_adapter_files(store: oci.Store, image: oci.Descriptor) -> tuple[FileDigest, ...]:
    """The adapter files a stored runnable image holds (its ``model/adapters/*`` layers), hashed
    from the layers themselves: what ``docker run`` will find under /model/adapters."""
    from builder.contract import ADAPTERS_DIR

    prefix = f"model/{ADAPTERS_DIR}/"
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
                    while f is not None and (chunk := f.read(oci.CHUNK)):
                        h.update(chunk)
                    out.append(FileDigest(path[len("model/"):], h.hexdigest(), member.size))
    return tuple(sorted(out, key=lambda f: f.path))


def attach_stored(store: oci.Store, artifact_ref: str, *, key: Any = None, image_ref: str | None = None) -> Attached:
    """``attach_build`` for a model artifact already in the store (a cache hit, or `build push
    --sign-key` of something packaged unsigned): its files are unpacked into a temporary folder
    (the build record travels inside the artifact), attested and, with ``key``, signed."""
    import tempfile

    from builder.oci import referrers
    from builder.publish import distribute

    desc, manifest = distribute.local_manifest(store, artifact_ref)
    if manifest.get("artifactType") != oci.MODEL_ARTIFACT:
        raise StoreError(f"{artifact_ref} is not a model artifact; sign the artifact, and its image comes along.")
    image = store.resolve(image_ref) if image_ref else None
    name = artifact_ref.rpartition(":")[0]
    # Nothing to do (and no unpacking) when every subject already has its attestations and signature.
    done = True
    for subject in [desc] + ([image] if image is not None else []):
        kinds = {d.annotations.get(ANN_KIND) for d in referrers.list_local(store, name, subject.digest)}
        done = done and {"sbom", "provenance", "evaluation"} <= kinds
        if key is not None:
            done = done and _signed_by(store, name, subject.digest, referrers.SIG_SUFFIX, key) \
                and _signed_by(store, name, subject.digest, referrers.ATT_SUFFIX, key)
    if done:
        return Attached((), key is not None)
    created_text = (manifest.get("annotations") or {}).get("org.opencontainers.image.created")
    created = (dt.datetime.strptime(created_text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
               if created_text else dt.datetime.fromtimestamp(0, dt.UTC))
    with tempfile.TemporaryDirectory(prefix="olive-builder-attest-") as tmp:
        folder = distribute.materialize(store, manifest, Path(tmp) / "model", force=False, shown=artifact_ref)
        info = json.loads((folder / "olive-builder.json").read_text(encoding="utf-8"))
        runtime = _stored_runtime(store, image) if image is not None else None
        return attach_build(store, folder, artifact_ref=artifact_ref, artifact=desc, image_ref=image_ref if image else None,
                            image=image, runtime=runtime, created=created, info=info, key=key,
                            image_files=image_adapter_files(store, image) if image is not None else ())


@dataclass(frozen=True)
class _StoredRuntime:
    ref: str
    manifest: oci.Descriptor
    layers: tuple[oci.Descriptor, ...]


def _stored_runtime(store: oci.Store, image: oci.Descriptor) -> _StoredRuntime | None:
    """The runtime part of a stored runnable image (its layers before the model's), for its SBOM."""
    m = store.read_json(image.digest)
    ann = m.get("annotations") or {}
    base = ann.get("org.opencontainers.image.base.digest")
    layers = tuple(oci.Descriptor.from_json(d) for d in m.get("layers") or []
                   if oci.ANN_FILEPATH not in (d.get("annotations") or {}))
    if not base:
        return None
    return _StoredRuntime(str(ann.get("org.opencontainers.image.base.name") or "runtime image"),
                          oci.Descriptor(oci.MANIFEST, base, 0), layers)


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

    @property
    def dataset(self) -> Mapping[str, Any]:
        found = self.entry.get("dataset")
        return found if isinstance(found, dict) else {}

    @property
    def section(self) -> Mapping[str, Any]:
        found = self.info.get("finetune")
        return found if isinstance(found, dict) else {}


def _dataset_label(dataset: Mapping[str, Any]) -> str:
    if dataset.get("hub"):
        return str(dataset["hub"])
    names = dataset.get("names") or dataset.get("files") or ([dataset["file"]] if dataset.get("file") else [])
    return ", ".join(str(n) for n in names) or "training dataset"


def _dataset_uri(dataset: Mapping[str, Any]) -> str | None:
    if dataset.get("hub"):
        uri = f"https://huggingface.co/datasets/{dataset['hub']}"
        return uri + (f"/tree/{dataset['revision']}" if dataset.get("revision") else "")
    return None


def _property_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


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


def adapter_sbom(facts: AdapterFacts, subject: Subject) -> dict[str, Any]:
    """A CycloneDX 1.6 SBOM of an adapter artifact: the adapter (a model whose one file is the
    .onnx_adapter, with its digest), the base model artifact it needs (by digest, with the source
    model it was converted from as its ancestor), the training dataset (digest, source, rows) and
    the tools (peft, olive-ai, torch, ... as the build record names them)."""
    try:
        from cyclonedx.contrib.license.factories import LicenseFactory
        from cyclonedx.contrib.this.builders import this_component
    except ImportError:  # pragma: no cover
        from cyclonedx.builder.this import this_component
        from cyclonedx.factory.license import LicenseFactory
    from cyclonedx.model import ExternalReference, ExternalReferenceType, HashAlgorithm, HashType, Property, XsUri
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType, Pedigree
    from cyclonedx.model.tool import ToolRepository
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    info = facts.info
    source = info.get("source") or {}
    target = info.get("target") or {}
    dataset = facts.dataset
    licenses = LicenseFactory()
    lic = [licenses.make_from_string(str(info["license"]))] if info.get("license") else []

    def sha256(hexdigest: str) -> HashType:
        return HashType(alg=HashAlgorithm.SHA_256, content=hexdigest)

    def props(pairs: Iterable[tuple[str, Any]]) -> list[Property]:
        return [Property(name=f"olive-builder:{k}", value=_property_value(v)) for k, v in pairs
                if v is not None and v != "" and v != [] and v != {}]

    file = Component(type=ComponentType.FILE, name=facts.file.path, bom_ref=f"file:{facts.file.path}",
                     hashes=[sha256(facts.file.sha256)], properties=props([("size", str(facts.file.size))]))
    ancestors = []
    hub = source.get("hub")
    commit = source.get("resolved_revision")
    if hub:
        org, _, repo_name = str(hub).rpartition("/")
        ancestors.append(Component(
            type=ComponentType.MACHINE_LEARNING_MODEL, name=repo_name, group=org or None,
            version=commit or source.get("revision"), bom_ref=f"source:{hub}",
            purl=PackageURL(type="huggingface", namespace=org or None, name=repo_name, version=commit) if commit else None,
            licenses=list(lic), external_references=[ExternalReference(
                type=ExternalReferenceType.DISTRIBUTION, url=XsUri(f"https://huggingface.co/{hub}"))]))
    elif source.get("local"):
        ancestors.append(Component(type=ComponentType.MACHINE_LEARNING_MODEL, name="local model folder",
                                   bom_ref="source:local", version=commit))
    base = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=facts.base.name, version=facts.base.digest, bom_ref="base",
        purl=PackageURL.from_string(_purl_oci(facts.base.name, facts.base.digest)),
        hashes=[sha256(facts.base.digest.split(":", 1)[1])],  # the manifest's own digest
        description="the base model artifact this adapter is loaded on (the adapter manifest's subject)",
        pedigree=Pedigree(ancestors=ancestors) if ancestors else None,
        properties=props([("target", info.get("id")), ("device", target.get("device")),
                          ("execution-provider", target.get("execution_provider")),
                          ("precision", target.get("precision"))]))
    dataset_digest = str(dataset.get("sha256") or "")
    data = Component(
        type=ComponentType.DATA, name=_dataset_label(dataset), bom_ref="dataset",
        version=str(dataset["revision"]) if dataset.get("hub") and dataset.get("revision") else None,
        hashes=[sha256(dataset_digest.split(":", 1)[1])] if dataset_digest.startswith("sha256:") else [],
        description="the training dataset (its sha256 is one digest over its files' content, in order)",
        external_references=[ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(uri))]
        if (uri := _dataset_uri(dataset)) else [],
        properties=props([("dataset.source", dataset.get("source") or ("hub" if dataset.get("hub") else "file")),
                          ("dataset.files", dataset.get("names")), ("dataset.rows", dataset.get("rows")),
                          ("dataset.columns", dataset.get("columns")), ("dataset.format", dataset.get("format"))]))
    settings = facts.entry.get("settings") if isinstance(facts.entry.get("settings"), dict) else {}
    training = facts.entry.get("training") if isinstance(facts.entry.get("training"), dict) else {}
    adapter = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=facts.name, group=str(info.get("name") or "") or None,
        version=str(info.get("version")), bom_ref="adapter", licenses=lic, components=[file],
        description=f"LoRA adapter {facts.name!r} of {facts.base.name} ({facts.base.digest})",
        properties=props([("adapter", facts.name), ("finetune.mode", facts.section.get("mode")),
                          ("finetune.method", facts.section.get("method")), ("target", info.get("id"))]
                         + [(f"finetune.{k}", v) for k, v in sorted((settings or {}).items())]
                         + [(f"training.{k}", v) for k, v in sorted((training or {}).items())]))
    tools = _tool_components(info)
    tools.append(this_component())
    subject_component = Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=subject.name,
                                  version=subject.digest, bom_ref="subject",
                                  purl=PackageURL.from_string(_purl_oci(subject.name, subject.digest)))
    bom = Bom(serial_number=uuid.uuid5(_SERIAL_NS, subject.digest),
              metadata=BomMetaData(timestamp=facts.created.astimezone(dt.UTC), component=subject_component,
                                   tools=ToolRepository(components=tools)),
              components=[adapter, base, data])
    bom.register_dependency(subject_component, [adapter])
    bom.register_dependency(adapter, [base, data])
    doc: dict[str, Any] = json.loads(JsonV1Dot6(bom).output_as_string())
    # the model card (the library has no type for it yet; the 1.6 schema does)
    card: dict[str, Any] = {"modelParameters": {"task": "text-generation", "approach": {"type": "supervised"},
                                                "datasets": [{"ref": "dataset"}]}}
    if info.get("architecture"):
        card["modelParameters"]["modelArchitecture"] = str(info["architecture"])
    metrics = [{"type": str(k), "value": str(v)} for k, v in sorted(
        ((adapter_evaluation_section(facts) or {}).get("accuracy") or {}).items())
        if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    if metrics:
        card["quantitativeAnalysis"] = {"performanceMetrics": metrics}
    for c in doc.get("components", []):
        if c.get("bom-ref") == "adapter":
            c["modelCard"] = card
    return doc


def adapter_provenance(facts: AdapterFacts, subject: Subject, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A SLSA v1 provenance of an adapter artifact: the finetune settings in; the base model
    artifact, the source model and the training dataset resolved (by digest); the builder."""
    info = facts.info
    source = info.get("source") or {}
    builder = info.get("builder") or {}
    dataset = facts.dataset
    external: dict[str, Any] = {
        "recipe": {"digest": info.get("recipe_digest")},
        "target": {"id": info.get("id"), **(info.get("target") or {})},
        "finetune": {k: v for k, v in (
            ("adapter", facts.name), ("mode", facts.section.get("mode")), ("method", facts.section.get("method")),
            ("settings", dict(facts.entry.get("settings") or {})),
            ("dataset", {k: dataset.get(k) for k in ("source", "hub", "revision", "names", "file")
                         if dataset.get(k) is not None})) if v is not None},
    }
    deps: list[dict[str, Any]] = [{
        "name": facts.base.name, "uri": _purl_oci(facts.base.name, facts.base.digest),
        "digest": _digest_map(facts.base.digest), "mediaType": facts.base.media_type,
        "annotations": {"role": "base model artifact (the adapter manifest's subject)"}}]
    hub, commit = source.get("hub"), source.get("resolved_revision")
    if hub:
        dep: dict[str, Any] = {"name": hub, "uri": f"https://huggingface.co/{hub}" + (f"/tree/{commit}" if commit else ""),
                               "annotations": {"role": "source model"}}
        if commit:
            dep["digest"] = {"gitCommit": commit}
        deps.append(dep)
    elif source.get("local") and commit:
        deps.append({"name": "local model folder", "annotations": {"role": "source model", "revision": commit},
                     **({"digest": _digest_map(commit)} if ":" in commit else {})})
    dataset_dep: dict[str, Any] = {"name": f"dataset:{_dataset_label(dataset)}",
                                   "annotations": {k: v for k, v in (("role", "training dataset"),
                                                                     ("source", dataset.get("source")),
                                                                     ("rows", dataset.get("rows")),
                                                                     ("files", dataset.get("names"))) if v is not None}}
    if dataset.get("sha256"):
        dataset_dep["digest"] = _digest_map(str(dataset["sha256"]))
    if dataset.get("hub") and dataset.get("revision"):
        dataset_dep["digest"] = {**dataset_dep.get("digest", {}), "gitCommit": str(dataset["revision"])}
    if _dataset_uri(dataset):
        dataset_dep["uri"] = _dataset_uri(dataset)
    deps.append(dataset_dep)
    if builder.get("image_id"):
        deps.append({"name": builder.get("image") or "builder image", "digest": _digest_map(builder["image_id"])})
    internal: dict[str, Any] = {"engine": builder.get("engine"), "tools": dict(info.get("tools") or {})}
    if info.get("cache_key"):
        internal["cacheKey"] = info["cache_key"]
    if facts.entry.get("training"):
        internal["training"] = dict(facts.entry["training"])
    builder_id, invocation = builder_identity(env)
    metadata: dict[str, Any] = {"finishedOn": rfc3339(facts.created)}
    if invocation:
        metadata["invocationId"] = invocation
    predicate = {
        "buildDefinition": {"buildType": BUILD_TYPE, "externalParameters": external,
                            "internalParameters": internal, "resolvedDependencies": deps},
        "runDetails": {"builder": {"id": builder_id,
                                   "version": {"olive-builder": str(builder.get("version") or __version__)}},
                       "metadata": metadata},
    }
    return statement([subject], SLSA_PROVENANCE_V1, predicate)


def adapter_evaluation(facts: AdapterFacts, subject: Subject) -> dict[str, Any]:
    """The test-result statement of an adapter artifact: the build's evaluation where it loaded this
    adapter (PASSED/FAILED), else WARNED ("not evaluated"): the base's evaluation is not the adapter's."""
    section = adapter_evaluation_section(facts)
    if section is None:
        section = {"evaluated": False, "reason": f"the build's evaluation did not load the adapter {facts.name!r}"}
    info = {k: v for k, v in facts.info.items() if k not in ("evaluation", "eval", "check")}
    st = evaluation(BuildFacts({**info, "evaluation": section}, (), facts.created), [subject])
    st["predicate"]["configuration"][0]["annotations"]["adapter"] = facts.name
    return st


def stored_record(store: oci.Store, base_digest: str) -> dict[str, Any]:
    """The build record (olive-builder.json) inside a stored model artifact, read from its layer."""
    from builder.contract import INFO_FILE

    wanted = f"model/{INFO_FILE}"
    for d in store.read_json(base_digest).get("layers") or []:
        ann = d.get("annotations") or {}
        listed = str(ann.get("org.olive-builder.files") or "").split(",")
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


def attach_adapter(store: oci.Store, ref: str, desc: oci.Descriptor, *, info: Mapping[str, Any] | None = None,
                   key: Any = None, env: Mapping[str, str] | None = None) -> Attached:
    """Attach an adapter artifact's SBOM, provenance and evaluation as referrers of its manifest
    and, with ``key``, sign the manifest and the attestations (cosign's formats, as for a model).
    ``info``: the build record (else read from the base artifact in the store). Idempotent."""
    from builder.contract import ADAPTER_ANNOTATION, ADAPTER_SUFFIX, ADAPTERS_DIR
    from builder.oci import referrers
    from builder.publish.package import parse_rfc3339, sign_adapter
    from builder.trust import sign

    name = ref.rpartition(":")[0]
    kinds = {d.annotations.get(ANN_KIND) for d in referrers.list_local(store, name, desc.digest)}
    if {"sbom", "provenance", "evaluation"} <= kinds and (key is None or (
            _signed_by(store, name, desc.digest, referrers.SIG_SUFFIX, key)
            and _signed_by(store, name, desc.digest, referrers.ATT_SUFFIX, key))):
        return Attached((), key is not None)
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
        dict(info) if info is not None else stored_record(store, base_digest), created)
    subject = Subject(ref, desc.digest)
    statements = {"provenance": (oci.canonical_json(adapter_provenance(facts, subject, env)), SLSA_PROVENANCE_V1),
                  "evaluation": (oci.canonical_json(adapter_evaluation(facts, subject)), TEST_RESULT_V01)}
    sbom_doc = oci.canonical_json(adapter_sbom(facts, subject))
    when = {"org.opencontainers.image.created": rfc3339(created)}
    out: list[tuple[str, str, oci.Descriptor]] = []
    d = referrers.attach(store, name, desc, SBOM_MEDIA, [(sbom_doc, SBOM_MEDIA, {})],
                         annotations={**when, ANN_KIND: "sbom"})
    out.append(("sbom", desc.digest, d))
    for kind, (doc, ptype) in statements.items():
        d = referrers.attach(store, name, desc, INTOTO_MEDIA, [(doc, INTOTO_MEDIA, {ANN_PREDICATE_TYPE: ptype})],
                             annotations={**when, ANN_KIND: kind, ANN_PREDICATE_TYPE: ptype})
        out.append((kind, desc.digest, d))
    if key is None:
        return Attached(tuple(out), False)
    sign_adapter(store, ref, desc, key, created)
    if not _signed_by(store, name, desc.digest, referrers.ATT_SUFFIX, key):
        sbom_statement = oci.canonical_json(statement([subject], CYCLONEDX_PREDICATE, json.loads(sbom_doc)))
        layers = [(sign.dsse_envelope(key, doc), sign.DSSE_MEDIA,
                   {sign.ANN_SIGNATURE: "", sign.ANN_PREDICATE_TYPE: ptype, ANN_KEY_ID: key.key_id})
                  for doc, ptype in [(sbom_statement, CYCLONEDX_PREDICATE), *statements.values()]]
        d = referrers.replace_local_tagged(store, name, desc, referrers.ATT_SUFFIX, sign.COSIGN_ATT_ARTIFACT,
                                           layers, annotations=when)
        out.append(("attestations", desc.digest, d))
    return Attached(tuple(out), True)
