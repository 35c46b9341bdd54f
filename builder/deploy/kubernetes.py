"""Kubernetes manifests for a pushed model (``build deploy REF``), pinned by digest.

From a resolved ``source.Source`` (the runnable image, or a model artifact and the runtime image
it runs in), ``manifests`` makes, in this order: the ConfigMap holding the artifact's manifest
(image-volume mode only), the Deployment, Service, PodDisruptionBudget, NetworkPolicy, the
autoscaler (an ``autoscaling/v2`` HPA on the per-pod custom metric ``olive_server_requests_waiting``,
or a KEDA ScaledObject with a Prometheus trigger), and on request a Gateway API Inference
Extension InferencePool and a sigstore policy-controller ClusterImagePolicy. With ``kserve`` a
KServe InferenceService takes the place of the Deployment, Service and autoscaler (KServe makes
those itself; the PodDisruptionBudget, NetworkPolicy and InferencePool then select its pods).
``render`` writes them as one multi-document YAML: the same inputs give the same bytes (objects
in a fixed order, keys in the order written here, nothing taken from the clock).

The pod is what the runtime image's server needs, no more: its entrypoint and command as the
image config states them, the ``OLIVE_*`` settings of ``python -m builder.serve`` (host, port,
model folder, drain seconds) and ``ORT_DISABLE_TELEMETRY=1``; a restricted securityContext
(non-root with the image's numeric uid, read-only root filesystem, every capability dropped, no
privilege escalation, RuntimeDefault seccomp, no service account token); an emptyDir at /tmp (the
only path the server may write; HOME and XDG_CACHE_HOME point there); probes on /health, which
answers 200 only once the model is loaded and has generated; a preStop sleep so endpoints drop
the pod before the server stops accepting, and a grace period longer than that plus the drain.

Three ways to bring the model (``ModelFrom``): ``image``, the runnable image alone; ``image-volume``,
the model artifact as a Kubernetes image volume (``volumes[].image``, GA in 1.36; CRI-O mounts
artifacts, and mounts each layer blob as a file named by its title, so an init container,
``python -m builder.serve.model_fetch`` in the runtime image, checks every blob against the pinned
manifest and unpacks it into an emptyDir); ``pull``, for runtimes that cannot mount artifacts
(containerd), the same init container pulls the artifact by digest from the registry.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from builder.deploy.source import Source
from builder.errors import OutputExistsError, UsageError

ModelFrom = Literal["image", "image-volume", "pull"]
Autoscaler = Literal["hpa", "keda", "none"]
MODEL_FROM: tuple[ModelFrom, ...] = ("image", "image-volume", "pull")
AUTOSCALERS: tuple[Autoscaler, ...] = ("hpa", "keda", "none")

PORT = 8000  # OLIVE_PORT of the runtime images
MODEL_DIR = "/model"  # OLIVE_MODEL_DIR of the runtime images
ARTIFACT_DIR = "/artifact"  # where the image volume is mounted in the init container
MANIFEST_DIR = "/etc/olive-builder/manifest"
AUTH_DIR = "/etc/olive-builder/registry-auth"
DRAIN_SECONDS = 30  # OLIVE_DRAIN_SECONDS: what the server waits for in-flight requests on SIGTERM
PRE_STOP_SECONDS = 5  # endpoints controllers and kube-proxy take a few seconds to drop a terminating pod
GRACE_MARGIN = 10
QUEUE_METRIC = "olive_server_requests_waiting"  # builder/serve/metrics.py: requests waiting for a slot
API_KEY_ENV = "OLIVE_BUILDER_API_KEY"  # builder/serve/app.py
API_KEY_KEY = "api-key"
KSERVE_POD_LABEL = "serving.kserve.io/inferenceservice"  # what KServe labels an InferenceService's pods with
POD_ANNOTATIONS = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}  # the key in the Secret --api-key-secret names
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class DeployOptions:
    """What `build deploy` writes; every field has a documented default."""

    name: str | None = None  # [default: from the model's name and target]
    namespace: str | None = None  # [default: none written: kubectl's namespace]
    model_from: ModelFrom | None = None  # [default: image for a runnable image, image-volume for an artifact]
    replicas: int = 2
    max_replicas: int = 8
    autoscaler: Autoscaler = "hpa"
    waiting_target: int = 2  # queued requests per pod the autoscaler aims at
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    kserve: bool = False
    inference_pool: bool = False
    epp_name: str | None = None  # the endpoint picker's Service [default: <name>-epp]
    epp_port: int = 9002
    policy_key_pem: str | None = None  # a PEM public key: emit a ClusterImagePolicy
    policy_images: tuple[str, ...] = field(default_factory=tuple)  # registry/repository the key verified
    api_key_secret: str | None = None
    pull_secret: str | None = None
    ca_configmap: str | None = None  # CA bundle (key ca.crt) for the pull init container over HTTPS
    plain_http: bool = False  # the pull init container talks HTTP (a loopback or in-cluster registry)


def default_name(source: Source) -> str:
    """``<model name>-<target>`` as a DNS-1035 label (what a Service name must be)."""
    title = source.model.annotations.get("org.opencontainers.image.title", "model")
    target = source.target.rsplit("/", 1)[-1]
    text = re.sub(r"[^a-z0-9-]+", "-", f"{title}-{target}".lower()).strip("-")
    text = re.sub(r"^[^a-z]+", "", text)[:52].rstrip("-")
    return text or "model"


def _check(options: DeployOptions, name: str) -> None:
    if not NAME_RE.match(name):
        raise UsageError(f"--name {name!r} is not a DNS-1035 label of at most 52 characters.",
                         hint="Lower-case letters, digits and '-', starting with a letter (e.g. qwen-cpu-int4).")
    for what, value in (("--api-key-secret", options.api_key_secret), ("--pull-secret", options.pull_secret),
                        ("--ca-configmap", options.ca_configmap), ("--namespace", options.namespace),
                        ("--epp-name", options.epp_name)):
        if value is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", value):
            raise UsageError(f"{what} {value!r} is not a Kubernetes object name.")
    if options.replicas < 1 or options.max_replicas < options.replicas:
        raise UsageError(f"--replicas {options.replicas} and --max-replicas {options.max_replicas}: need "
                         "1 <= replicas <= max-replicas.")


def _labels(name: str, source: Source) -> dict[str, str]:
    version = source.model.annotations.get("org.opencontainers.image.version", "")
    out = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "model-server",
           "app.kubernetes.io/managed-by": "olive-builder"}
    if version and len(version) <= 63 and LABEL_VALUE_RE.match(version):
        out["app.kubernetes.io/version"] = version
    return out


def _meta(name: str, options: DeployOptions, labels: dict[str, str], *,
          annotations: dict[str, str] | None = None, cluster: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if options.namespace and not cluster:
        meta["namespace"] = options.namespace
    meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _probe(period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def _restricted(uid: int) -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False, "privileged": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _env(options: DeployOptions) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "OLIVE_HOST", "value": "0.0.0.0"},
        {"name": "OLIVE_PORT", "value": str(PORT)},
        {"name": "OLIVE_MODEL_DIR", "value": MODEL_DIR},
        {"name": "OLIVE_DRAIN_SECONDS", "value": str(DRAIN_SECONDS)},
        {"name": "ORT_DISABLE_TELEMETRY", "value": "1"},
        # The root filesystem is read-only: anything that wants a home or a cache gets the emptyDir.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
    ]
    if options.api_key_secret:
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": options.api_key_secret,
                                                                        "key": API_KEY_KEY}}})
    return env


def _resources(source: Source) -> dict[str, Any]:
    s = source.sizing
    # No CPU limit: onnxruntime sizes its thread pool by the node's cores, and a CFS quota below
    # that throttles every decoding step; the request reserves what the evaluation ran with.
    requests: dict[str, str] = {"cpu": str(s.cpu_request), "memory": f"{s.memory_request_mi}Mi"}
    limits: dict[str, str] = {"memory": f"{s.memory_limit_mi}Mi"}
    if s.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(s.gpus)
    return {"requests": requests, "limits": limits}


def _model_volume_size(source: Source) -> str:
    return f"{source.model.model_bytes() // (1 << 20) + 64}Mi"


def _init_container(source: Source, options: DeployOptions, mode: ModelFrom) -> dict[str, Any]:
    process = source.runtime.process()
    python = str((process.get("Entrypoint") or ["python3"])[0])
    args = ["--digest", source.model.digest, "--out", MODEL_DIR]
    mounts: list[dict[str, Any]] = [{"name": "model", "mountPath": MODEL_DIR}]
    env: list[dict[str, Any]] = []
    if mode == "image-volume":
        args += ["--from-dir", ARTIFACT_DIR, "--manifest", f"{MANIFEST_DIR}/manifest.json"]
        mounts += [{"name": "artifact", "mountPath": ARTIFACT_DIR, "readOnly": True},
                   {"name": "manifest", "mountPath": MANIFEST_DIR, "readOnly": True}]
    else:
        ref = source.model.ref
        args += ["--registry", str(ref.registry), "--repository", ref.repository]
        if options.plain_http:
            args.append("--plain-http")
        if options.pull_secret:
            args += ["--auth-file", f"{AUTH_DIR}/.dockerconfigjson"]
            mounts.append({"name": "registry-auth", "mountPath": AUTH_DIR, "readOnly": True})
        if options.ca_configmap:
            mounts.append({"name": "ca-bundle", "mountPath": "/etc/olive-builder/ca", "readOnly": True})
            env.append({"name": "SSL_CERT_FILE", "value": "/etc/olive-builder/ca/ca.crt"})
    container: dict[str, Any] = {
        "name": "model-fetch", "image": source.runtime.image,
        "command": [python, "-m", "builder.serve.model_fetch"], "args": args,
    }
    if env:
        container["env"] = env
    container.update({
        "resources": {"requests": {"cpu": "500m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": _restricted(source.uid), "volumeMounts": mounts,
    })
    return container


def _pod_spec(source: Source, options: DeployOptions, mode: ModelFrom, name: str) -> dict[str, Any]:
    process = source.runtime.process()
    container: dict[str, Any] = {
        "name": "server",
        "image": source.runtime.image,
        "imagePullPolicy": "IfNotPresent",
    }
    # The image config's own entrypoint and command, stated: what runs is what the manifest says.
    if process.get("Entrypoint"):
        container["command"] = [str(x) for x in process["Entrypoint"]]
    if process.get("Cmd"):
        container["args"] = [str(x) for x in process["Cmd"]]
    container.update({
        "env": _env(options),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": _resources(source),
        # Loading can take minutes for a large model: the startup probe holds the others off until then.
        "startupProbe": _probe(2, 300, 2),
        "readinessProbe": _probe(5, 2, 2),
        "livenessProbe": _probe(10, 3, 3),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
        "securityContext": _restricted(source.uid),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    })
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]
    spec: dict[str, Any] = {}
    if mode != "image":
        container["volumeMounts"].append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
        volumes.append({"name": "model", "emptyDir": {"sizeLimit": _model_volume_size(source)}})
        spec["initContainers"] = [_init_container(source, options, mode)]
        if mode == "image-volume":
            volumes.append({"name": "artifact", "image": {"reference": source.model.image,
                                                          "pullPolicy": "IfNotPresent"}})
            volumes.append({"name": "manifest", "configMap": {"name": f"{name}-manifest"}})
        else:
            if options.pull_secret:
                volumes.append({"name": "registry-auth", "secret": {"secretName": options.pull_secret, "items": [
                    {"key": ".dockerconfigjson", "path": ".dockerconfigjson"}]}})
            if options.ca_configmap:
                volumes.append({"name": "ca-bundle", "configMap": {"name": options.ca_configmap}})
    spec["containers"] = [container]
    spec.update({
        "securityContext": {"runAsNonRoot": True, "runAsUser": source.uid, "runAsGroup": source.uid,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": PRE_STOP_SECONDS + DRAIN_SECONDS + GRACE_MARGIN,
        "volumes": volumes,
    })
    if options.pull_secret:
        spec["imagePullSecrets"] = [{"name": options.pull_secret}]
    return spec


def _source_annotations(source: Source, mode: ModelFrom) -> dict[str, str]:
    out = {"org.olive-builder/model": source.model.image, "org.olive-builder/model-from": mode,
           "org.olive-builder/sizing": source.sizing.basis}
    if source.uid_note:
        out["org.olive-builder/run-as"] = source.uid_note
    return out


def manifests(source: Source, options: DeployOptions) -> list[dict[str, Any]]:
    """Every object, in the order they are written (and applied)."""
    name = options.name or default_name(source)
    _check(options, name)
    mode: ModelFrom = options.model_from or ("image-volume" if source.model.is_artifact else "image")
    if mode != "image" and not source.model.is_artifact:
        raise UsageError(f"--model-from {mode} brings a model artifact; {source.model.ref} is a runnable image.",
                         hint="Deploy the model artifact (NAME:VERSION-TARGET) with --runtime-image, or use "
                              "--model-from image.")
    if mode == "image" and source.model.is_artifact:
        raise UsageError(f"--model-from image runs a runnable image; {source.model.ref} is a model artifact.",
                         hint="Deploy NAME:VERSION-TARGET-serve, or use --model-from image-volume or pull.")
    if mode == "pull" and not options.plain_http and not options.ca_configmap:
        raise UsageError("--model-from pull fetches over HTTPS from the runtime image, which carries no CA "
                         "certificates.",
                         hint="Pass --ca-configmap NAME (a ConfigMap with the registry's CA bundle as ca.crt), or "
                              "--plain-http for an in-cluster registry without TLS.")
    labels = _labels(name, source)
    # KServe makes the Deployment, Service and autoscaler of an InferenceService itself, and labels
    # its pods with the service's name: with --kserve it replaces ours, and the rest select its pods.
    selector = {KSERVE_POD_LABEL: name} if options.kserve else {"app.kubernetes.io/name": name}
    out: list[dict[str, Any]] = []
    if mode == "image-volume":
        # The manifest's exact bytes: their digest is what the init container checks.
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{name}-manifest", options, labels),
                    "immutable": True, "binaryData": {"manifest.json": base64.b64encode(source.model.raw).decode()}})
    if options.kserve:
        out.append(_inference_service(name, options, labels, source, mode))
    else:
        out.append(_deployment(name, options, labels, selector, source, mode))
        out.append({"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, options, labels),
                    "spec": {"type": "ClusterIP", "selector": selector,
                             "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP",
                                        "appProtocol": "http"}]}})
    out.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(name, options, labels),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}})
    out.append(_network_policy(name, options, labels, selector, mode, source))
    if options.autoscaler == "hpa" and not options.kserve:
        out.append(_hpa(name, options, labels))
    elif options.autoscaler == "keda" and not options.kserve:
        out.append(_scaled_object(name, options, labels))
    if options.inference_pool:
        out.append(_inference_pool(name, options, labels, selector))
    if options.policy_key_pem:
        out.append(_image_policy(name, options, labels))
    return out


def _deployment(name: str, options: DeployOptions, labels: dict[str, str], selector: dict[str, str],
                source: Source, mode: ModelFrom) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(name, options, labels, annotations=_source_annotations(source, mode)),
        "spec": {
            "replicas": options.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels, "annotations": POD_ANNOTATIONS},
                         "spec": _pod_spec(source, options, mode, name)},
        },
    }


def _network_policy(name: str, options: DeployOptions, labels: dict[str, str], selector: dict[str, str],
                    mode: ModelFrom, source: Source) -> dict[str, Any]:
    # Ingress to the server's port only (clients, Prometheus, the gateway); no egress at all: the
    # model is in the pod, and a model server has no one to call. The pull init container is
    # the one exception: DNS and the registry's port.
    spec: dict[str, Any] = {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress", "Egress"],
                            "ingress": [{"ports": [{"protocol": "TCP", "port": PORT}]}]}
    if mode == "pull":
        host = str(source.model.ref.registry)
        port = int(host.rsplit(":", 1)[1]) if re.search(r":\d+$", host) else (80 if options.plain_http else 443)
        spec["egress"] = [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                          {"ports": [{"protocol": "TCP", "port": port}]}]
    else:
        spec["egress"] = []
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(name, options, labels),
            "spec": spec}


def _hpa(name: str, options: DeployOptions, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(name, options, labels),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": options.replicas, "maxReplicas": options.max_replicas,
                # A per-pod custom metric (custom.metrics.k8s.io, e.g. from prometheus-adapter): the
                # requests waiting for a generation slot, which grow only once every slot is busy.
                "metrics": [{"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                                      "target": {"type": "AverageValue",
                                                                 "averageValue": str(options.waiting_target)}}}],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
            }}


def keda_query(name: str, namespace: str | None) -> str:
    where = f'namespace="{namespace}",' if namespace else ""
    return f'sum({QUEUE_METRIC}{{{where}pod=~"{name}-[a-z0-9]+-[a-z0-9]+"}})'


def _scaled_object(name: str, options: DeployOptions, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": _meta(name, options, labels),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicaCount": options.replicas, "maxReplicaCount": options.max_replicas,
                "cooldownPeriod": 300,
                "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
                    "serverAddress": options.prometheus_url,
                    "query": keda_query(name, options.namespace),
                    "threshold": str(options.waiting_target)}}],
            }}


def _inference_service(name: str, options: DeployOptions, labels: dict[str, str], source: Source,
                       mode: ModelFrom) -> dict[str, Any]:
    pod = _pod_spec(source, options, mode, name)
    container = dict(pod["containers"][0], name="kserve-container")
    predictor: dict[str, Any] = {"minReplicas": options.replicas, "maxReplicas": options.max_replicas}
    predictor.update({k: v for k, v in pod.items() if k != "containers"})
    predictor["containers"] = [container]
    annotations = {"serving.kserve.io/deploymentMode": "Standard", **_source_annotations(source, mode)}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": _meta(name, options, labels, annotations=annotations),
            "spec": {"predictor": predictor}}


def _inference_pool(name: str, options: DeployOptions, labels: dict[str, str],
                    selector: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": _meta(name, options, labels),
            "spec": {"selector": {"matchLabels": selector}, "targetPorts": [{"number": PORT}],
                     "endpointPickerRef": {"name": options.epp_name or f"{name}-epp",
                                           "port": {"number": options.epp_port}}}}


def _glob_host(image: str) -> str:
    # policy-controller matches globs against normalized names: Docker Hub is index.docker.io.
    host, _, rest = image.partition("/")
    return f"index.docker.io/{rest}" if host in ("docker.io", "registry-1.docker.io") else image


def _image_policy(name: str, options: DeployOptions, labels: dict[str, str]) -> dict[str, Any]:
    images = sorted(set(options.policy_images))
    return {"apiVersion": "policy.sigstore.dev/v1beta1", "kind": "ClusterImagePolicy",
            "metadata": _meta(f"{name}-signed", options, labels, cluster=True),
            "spec": {
                "images": [{"glob": f"{_glob_host(i)}{suffix}"} for i in images for suffix in (":**", "@**")],
                # A key authority without ctlog: policy-controller skips the transparency log (our
                # signatures are cosign simple signing under sha256-<hex>.sig, with no Rekor entry).
                "authorities": [{"name": "olive-builder-key",
                                 "key": {"data": options.policy_key_pem, "hashAlgorithm": "sha256"}}],
            }}


def render(objects: Iterable[dict[str, Any]]) -> str:
    """One multi-document YAML, byte-stable: key order as built, no aliases, wide lines."""
    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def literal(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
        style = "|" if "\n" in text else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)

    _Dumper.add_representer(str, literal)
    return "".join("---\n" + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1 << 16,
                                       allow_unicode=False) for obj in objects)


def file_names(objects: list[dict[str, Any]]) -> list[str]:
    """``NN-kind-name.yaml``: one file per object, in apply order."""
    return [f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml" for i, obj in enumerate(objects, 1)]


def write(objects: list[dict[str, Any]], dest: Path, *, force: bool = False) -> list[Path]:
    """Write one file per object into the folder ``dest``, all or nothing: into a hidden folder beside
    it, renamed into place once complete. An existing ``dest`` is replaced only with ``force``."""
    dest = dest.absolute()
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} already exists.", hint="Pass --force to replace it, or choose another folder.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        for name, obj in zip(file_names(objects), objects, strict=True):
            (work / name).write_text(render([obj]), encoding="utf-8")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            work.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [dest / name for name in file_names(objects)]
