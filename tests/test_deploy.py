"""`build deploy REF`: Kubernetes manifests for a model pushed to a real registry (docker-registry),
checked offline by third-party validators: every core object strictly against Kubernetes 1.36's
schemas (kubernetes-validate), the custom resources against the openAPIV3Schema of their published
CRDs (tests/data/crds/, see its README), made strict the way `kubectl apply --validate=strict`
is (unknown fields are errors). The init container's puller (``builder.serve.model_fetch``) runs
for real against the registry and against blobs laid out as an image volume mounts them.
Last, a pod run the way a kubelet would run the Deployment's container, with Docker.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from builder.build import observed
from builder.oci import layout as oci
from builder.oci.media import IMAGE_CONFIG, MANIFEST
from builder.publish import package
from builder.serve import model_fetch
from builder.trust import sign
from conftest import RegistryProcess, free_port, need, run_cli

pytestmark = pytest.mark.integration

CRDS = Path(__file__).parent / "data" / "crds"
K8S = "1.36.0"
T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
CORE = {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "HorizontalPodAutoscaler"}
CRD_FILES = {"ScaledObject": "keda.sh_scaledobjects.v1alpha1.json",
             "InferencePool": "inference.networking.k8s.io_inferencepools.v1.json",
             "InferenceService": "serving.kserve.io_inferenceservices.v1beta1.json",
             "ClusterImagePolicy": "policy.sigstore.dev_clusterimagepolicies.v1beta1.json"}
PEAK_MB, THREADS = 300.0, 3


# ---- validators ------------------------------------------------------------------------------------

def strict_crd_schema(schema: Any) -> Any:
    """A CRD's structural schema as strict JSON schema: objects with ``properties`` admit no other
    keys (what the API server's strict field validation refuses), unless the schema says
    x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [strict_crd_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_crd_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    return out


def validate(obj: dict[str, Any]) -> None:
    kind = obj["kind"]
    if kind in CORE:
        kubernetes_validate.validate(obj, K8S, strict=True)
        return
    root = json.loads((CRDS / CRD_FILES[kind]).read_text())["openAPIV3Schema"]
    # The API server accepts these three on every object, whether the CRD's schema names them or not.
    root["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                          "metadata": {"type": "object"}, **root["properties"]}
    jsonschema.Draft7Validator(strict_crd_schema(root)).validate(obj)


def test_the_validators_refuse_what_a_cluster_would():  # type: ignore[no-untyped-def]
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                      "metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    validate(deployment)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    pool = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "p"},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": "e", "port": {"number": 9002}}}}
    validate(pool)
    for broken in ({"targetPort": [{"number": 8000}]}, {"targetPorts": [{"number": 0}]}):
        with pytest.raises(jsonschema.ValidationError):
            validate({**pool, "spec": {**pool["spec"], **broken}})


# ---- a model pushed to a registry (once for the module) ----------------------------------------------

def fake_runtime(store: oci.Store) -> package.RuntimeImage:
    """A runtime image as the runtime Dockerfiles make it (entrypoint, env, user), without layers:
    these tests read manifests and configs, they run nothing."""
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
              "config": {"User": "1000:1000", "Entrypoint": ["python3", "-m", "builder.serve"],
                         "Env": ["PATH=/usr/bin", "ORT_DISABLE_TELEMETRY=1", "OLIVE_MODEL_DIR=/model"],
                         "ExposedPorts": {"8000/tcp": {}},
                         "Labels": {"org.olive-builder.runtime.onnxruntime-genai": "0.18.0"}}}
    cdesc = store.put_json(config, IMAGE_CONFIG)
    mdesc = store.put_json({"schemaVersion": 2, "mediaType": MANIFEST, "config": cdesc.to_json(), "layers": []},
                           MANIFEST)
    return package.RuntimeImage("olive-builder-runtime-cpu:test", mdesc, config, ())


def fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "genai_config.json").write_text(json.dumps({"model": {"type": "qwen2", "decoder": {"filename": "model.onnx"}}}))
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "model.onnx.data").write_bytes(b"w" * 5000)
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "olive-builder.json").write_text(json.dumps({
        "id": "tiny/cpu-int4", "name": "tiny", "version": "1.0", "tags": ["tiny:1.0-cpu-int4"],
        "license": "apache-2.0", "description": "a test model",
        "target": {"device": "cpu", "execution_provider": "CPUExecutionProvider", "precision": "int4"},
        "source": {"hub": "acme/tiny", "revision": "main", "resolved_revision": "0123abcd" * 5, "local": False},
        "recipe_digest": "sha256:" + "1" * 64, "cache_key": "sha256:" + "2" * 64,
        "builder": {"version": "0.1.0", "engine": "docker", "image": "olive-builder-cpu:abc", "image_id": "sha256:" + "3" * 64},
        "tools": {"olive-ai": "0.13.0", "onnxruntime-genai": "0.14.1", "onnxruntime": "1.32.0",
                  "transformers": "5.24.0", "torch": "2.13.0+cpu"},
        "check": {"ok": True, "tokens": 8}, "evaluation": {"passed": True}}))
    # What the build's run measured: it reaches the evaluation attestation, never the artifact.
    observed.write(folder, {"evaluation": {"speed": {"measured": True, "peak_rss_mb": PEAK_MB, "intra_op_threads": THREADS,
                                                     "cpu": {"usable_cores": 2}}}})
    return folder


class Pushed:
    def __init__(self, root: Path, reg: RegistryProcess):
        self.root, self.reg = root, reg
        self.store = root / "store"
        self.pub = root / "k.pub"
        self.repo = f"{reg.host}/models/tiny"
        self.artifact = f"{self.repo}:1.0-cpu-int4"
        self.image = f"{self.repo}:1.0-cpu-int4-serve"


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    need(shutil.which("docker-registry") is not None, "docker-registry is not installed (apt-get install docker-registry)")
    from builder import pipeline

    root = tmp_path_factory.mktemp("deploy")
    reg = RegistryProcess(root / "registry").start()
    try:
        p = Pushed(root, reg)
        store = oci.Store(p.store)
        sign.keygen(root / "k.key", p.pub)
        key = sign.load_signing_key(str(root / "k.key"), env={})
        model = fake_model(root / "model")
        packaged = package.package(model, store, created=T0, runtime=fake_runtime(store), sign_key=key)
        pipeline.push_with_image(packaged.artifact_ref, f"{reg.host}/models", store=p.store)
        assert packaged.image is not None
        p.artifact_digest, p.image_digest = packaged.artifact.digest, packaged.image.digest
        p.model_bytes = sum(d.size for d in packaged.layers)
        yield p
    finally:
        reg.stop()


def deploy(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "deploy", *argv)


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


# ---- the manifests ---------------------------------------------------------------------------------

def test_runnable_image_gives_pinned_valid_manifests_sized_from_the_measured_run(capsys, pushed):  # type: ignore[no-untyped-def]
    argv = (pushed.image, "--inference-pool", "--policy-key", str(pushed.pub), "--namespace", "ml",
            "--api-key-secret", "tiny-key")
    code, out, err = deploy(capsys, *argv)
    assert code == 0, err
    objects = docs(out)
    assert [o["kind"] for o in objects] == ["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
                                            "HorizontalPodAutoscaler", "InferencePool", "ClusterImagePolicy"]
    for obj in objects:
        validate(obj)
    again = deploy(capsys, *argv)
    assert again[0] == 0 and again[1] == out  # byte-stable
    k = by_kind(objects)
    pinned = f"{pushed.repo}@{pushed.image_digest}"
    pod = k["Deployment"]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["image"] == pinned and server["command"] == ["python3", "-m", "builder.serve"]
    # 300 MB measured: x1.5 + 128 MiB and x2 + 256 MiB, rounded up to 16 MiB; the threads it ran with
    assert server["resources"] == {"requests": {"cpu": "3", "memory": "592Mi"}, "limits": {"memory": "864Mi"}}
    assert "measured: peak RSS 300 MB, 3 threads" in k["Deployment"]["metadata"]["annotations"]["org.olive-builder/sizing"]
    sc = server["securityContext"]
    assert (sc["runAsNonRoot"], sc["runAsUser"], sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"],
            sc["capabilities"], sc["seccompProfile"]) == (True, 1000, True, False, {"drop": ["ALL"]},
                                                          {"type": "RuntimeDefault"})
    assert pod["automountServiceAccountToken"] is False
    assert {p["httpGet"]["path"] for p in (server["startupProbe"], server["readinessProbe"], server["livenessProbe"])} \
        == {"/health"}
    env = {e["name"]: e for e in server["env"]}
    assert env["ORT_DISABLE_TELEMETRY"]["value"] == "1" and env["OLIVE_HOST"]["value"] == "0.0.0.0"
    drain = float(env["OLIVE_DRAIN_SECONDS"]["value"])
    assert pod["terminationGracePeriodSeconds"] > drain + server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert env["OLIVE_BUILDER_API_KEY"] == {"name": "OLIVE_BUILDER_API_KEY",
                                            "valueFrom": {"secretKeyRef": {"name": "tiny-key", "key": "api-key"}}}
    assert {m["mountPath"] for m in server["volumeMounts"]} == {"/tmp"}
    net = k["NetworkPolicy"]["spec"]
    assert net["policyTypes"] == ["Ingress", "Egress"] and net["egress"] == []
    metric = k["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "olive_server_requests_waiting"
    policy = k["ClusterImagePolicy"]["spec"]
    assert policy["authorities"][0]["key"]["data"] == pushed.pub.read_text()
    assert [g["glob"] for g in policy["images"]] == [f"{pushed.repo}:**", f"{pushed.repo}@**"]
    assert all(o["metadata"].get("namespace") == "ml" for o in objects if o["kind"] != "ClusterImagePolicy")
    assert "PRIVATE KEY" not in out
    assert f"{pinned}: Deployment, Service" in err


def test_artifact_as_image_volume_and_pulled_by_the_init_container_and_keda(capsys, pushed, tmp_path):  # type: ignore[no-untyped-def]
    code, out, err = deploy(capsys, pushed.artifact, "--runtime-image", pushed.image, "--autoscaler", "keda",
                            "-o", str(tmp_path / "k8s"))
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "k8s").iterdir())
    assert files == ["01-configmap-tiny-cpu-int4-manifest.yaml", "02-deployment-tiny-cpu-int4.yaml",
                     "03-service-tiny-cpu-int4.yaml", "04-poddisruptionbudget-tiny-cpu-int4.yaml",
                     "05-networkpolicy-tiny-cpu-int4.yaml", "06-scaledobject-tiny-cpu-int4.yaml"]
    objects = [d for f in files for d in docs((tmp_path / "k8s" / f).read_text())]
    for obj in objects:
        validate(obj)
    k = by_kind(objects)
    manifest = base64.b64decode(k["ConfigMap"]["binaryData"]["manifest.json"])
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == pushed.artifact_digest
    pod = k["Deployment"]["spec"]["template"]["spec"]
    artifact = next(v for v in pod["volumes"] if v["name"] == "artifact")
    assert artifact["image"]["reference"] == f"{pushed.repo}@{pushed.artifact_digest}"
    (init,) = pod["initContainers"]
    assert init["args"][:4] == ["--digest", pushed.artifact_digest, "--out", "/model"]
    assert {"name": "model", "mountPath": "/model", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert "olive_server_requests_waiting" in k["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"]
    assert "HorizontalPodAutoscaler" not in k  # KEDA makes its own HPA: two would fight

    # KServe in place of the Deployment, Service and autoscaler; the rest select its pods
    code, out, err = deploy(capsys, pushed.artifact, "--runtime-image", pushed.image, "--kserve", "--inference-pool")
    assert code == 0, err
    objects = docs(out)
    assert [o["kind"] for o in objects] == ["ConfigMap", "InferenceService", "PodDisruptionBudget", "NetworkPolicy",
                                            "InferencePool"]
    for obj in objects:
        validate(obj)
    k = by_kind(objects)
    predictor = k["InferenceService"]["spec"]["predictor"]
    assert predictor["containers"][0]["name"] == "kserve-container" and predictor["initContainers"][0]["name"] == "model-fetch"
    assert k["InferencePool"]["spec"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "tiny-cpu-int4"}

    code, out, err = deploy(capsys, pushed.artifact, "--runtime-image", pushed.image, "--model-from", "pull",
                            "--plain-http", "--pull-secret", "regcred")
    assert code == 0, err
    objects = docs(out)
    for obj in objects:
        validate(obj)
    k = by_kind(objects)
    init = k["Deployment"]["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][4:] == ["--registry", pushed.reg.host, "--repository", "models/tiny", "--plain-http",
                                "--auth-file", "/etc/olive-builder/registry-auth/.dockerconfigjson"]
    egress = k["NetworkPolicy"]["spec"]["egress"]
    assert {"protocol": "TCP", "port": pushed.reg.port} in egress[1]["ports"]
    # the same init container, run for real against the registry
    out_dir = tmp_path / "pulled"
    out_dir.mkdir()
    model_fetch.main(["--digest", pushed.artifact_digest, "--out", str(out_dir), "--registry", pushed.reg.host,
                      "--repository", "models/tiny", "--plain-http"])
    assert (out_dir / "model.onnx.data").read_bytes() == b"w" * 5000
    assert (out_dir / "genai_config.json").is_file() and not list(out_dir.glob(".partial-*"))


def test_the_image_volume_init_container_verifies_every_blob(pushed, tmp_path, capsys):  # type: ignore[no-untyped-def]
    """Blobs laid out as CRI-O mounts an artifact (one file per layer, named by its title)."""
    store = oci.Store(pushed.store)
    data = store.read_bytes(pushed.artifact_digest)
    manifest = json.loads(data)
    volume = tmp_path / "artifact"
    volume.mkdir()
    for layer in manifest["layers"]:
        shutil.copy(store.blob_path(layer["digest"]), volume / layer["annotations"]["org.opencontainers.image.title"])
    (tmp_path / "manifest.json").write_bytes(data)
    argv = ["--digest", pushed.artifact_digest, "--from-dir", str(volume), "--manifest", str(tmp_path / "manifest.json")]
    good = tmp_path / "good"
    good.mkdir()
    model_fetch.main([*argv, "--out", str(good)])
    assert sorted(p.name for p in good.iterdir()) == [".complete", "genai_config.json", "model.onnx", "model.onnx.data",
                                                       "olive-builder.json", "tokenizer.json", "tokenizer_config.json"]
    # one flipped byte in the weights' blob: refused, nothing left in the folder
    weights = next(volume / d["annotations"]["org.opencontainers.image.title"] for d in manifest["layers"]
                   if d["annotations"].get("org.cncf.model.filepath") == "model/model.onnx.data")
    blob = bytearray(weights.read_bytes())
    blob[-1025] ^= 1
    weights.write_bytes(bytes(blob))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(SystemExit) as info:
        model_fetch.main([*argv, "--out", str(bad)])
    assert info.value.code == 1 and "do not match the pinned manifest" in capsys.readouterr().err
    assert list(bad.iterdir()) == []
    # a manifest that is not the pinned one
    with pytest.raises(SystemExit):
        model_fetch.main(["--digest", "sha256:" + "0" * 64, "--from-dir", str(volume), "--manifest",
                          str(tmp_path / "manifest.json"), "--out", str(bad)])
    assert "not the pinned" in capsys.readouterr().err and list(bad.iterdir()) == []


def test_refusals_are_clear_exit_non_zero_and_write_nothing(capsys, pushed, tmp_path):  # type: ignore[no-untyped-def]
    out_dir = tmp_path / "k8s"
    cases = [
        (("not a reference",), 2, "is not a valid reference"),
        (("tiny:1.0-cpu-int4",), 2, "names the local store"),
        ((f"{pushed.repo}:nope",), 5, "does not exist"),
        # a cosign signature manifest: at the registry, but not a model or runnable image of ours
        ((f"{pushed.repo}:sha256-{pushed.image_digest.split(':')[1]}.sig",), 5, "not a model artifact or runnable image"),
        ((pushed.artifact,), 2, "--runtime-image"),
        ((pushed.image, "--model-from", "pull"), 2, "is a runnable image"),
        ((pushed.artifact, "--runtime-image", pushed.image, "--model-from", "pull"), 2, "no CA certificates"),
        ((pushed.image, "--name", "Not_A_Name"), 2, "DNS-1035"),
        ((f"127.0.0.1:{free_port()}/models/tiny:1.0-cpu-int4-serve",), 5, "up and reachable"),
    ]
    for argv, want_code, message in cases:
        code, out, err = deploy(capsys, *argv, "-o", str(out_dir))
        assert (code, message in err) == (want_code, True), (argv, code, err)
        assert "Traceback" not in err and not out_dir.exists()
    other = tmp_path / "other.pub"
    sign.keygen(tmp_path / "other.key", other)
    code, out, err = deploy(capsys, pushed.image, "--verify", str(other), "-o", str(out_dir))
    assert code == 5 and "is not signed by the key" in err and not out_dir.exists()
    assert deploy(capsys, pushed.image, "-o", str(out_dir))[0] == 0
    code, out, err = deploy(capsys, pushed.image, "-o", str(out_dir))
    assert code == 2 and "already exists" in err


def test_help_names_the_ways_to_bring_the_model(capsys):  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "deploy", "--help")
    assert code == 0
    for word in ("--model-from", "image-volume", "--runtime-image", "--autoscaler", "--policy-key", "pinned by digest"):
        assert word in out


# ---- the pod runs as the manifest says ---------------------------------------------------------------

def _quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


def run_like_kubelet(docker_client, pod: dict[str, Any], container: dict[str, Any], volumes: dict[str, Path],  # type: ignore[no-untyped-def]
                     name: str, port: int | None = None):
    """Start ``container`` of ``pod`` as a kubelet would: its image (by digest), command and args,
    env (over the image's own), user and group, read-only root filesystem, every capability
    dropped, no new privileges, its memory limit; emptyDirs the spec names as tmpfs, or as the
    host folders ``volumes`` gives (an emptyDir shared with the init container, an image volume,
    a ConfigMap)."""
    sc = {**pod.get("securityContext", {}), **container["securityContext"]}
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    spec_volumes = {v["name"]: v for v in pod["volumes"]}
    tmpfs, binds = {}, {}
    for m in container.get("volumeMounts", []):
        v = spec_volumes[m["name"]]
        if m["name"] in volumes:
            binds[str(volumes[m["name"]])] = {"bind": m["mountPath"], "mode": "ro" if m.get("readOnly") else "rw"}
        else:
            assert "emptyDir" in v, v
            tmpfs[m["mountPath"]] = f"size={_quantity_bytes(v['emptyDir']['sizeLimit'])},mode=1777"
    image = container["image"]
    repo, digest = image.split("@")
    docker_client.images.pull(repo, tag=digest)
    return docker_client.containers.run(
        image, entrypoint=container["command"], command=container.get("args", []), name=name, detach=True,
        environment={e["name"]: e["value"] for e in container.get("env", []) if "value" in e},
        user=f"{sc['runAsUser']}:{sc['runAsGroup']}", read_only=True, cap_drop=["ALL"],
        security_opt=["no-new-privileges"], tmpfs=tmpfs, volumes=binds,
        mem_limit=_quantity_bytes(container["resources"]["limits"]["memory"]),
        ports={f"{container['ports'][0]['containerPort']}/tcp": ("127.0.0.1", port)} if port else {},
    )


@pytest.mark.docker
def test_the_pod_runs_as_the_manifest_says(capsys, tmp_path, tiny_model, local_engine_ready, runtime_image,  # type: ignore[no-untyped-def]
                                           docker_client, registry):
    """A real build pushed to a real registry; its Deployment's container started as a kubelet
    would, for the runnable image, and for the artifact in the runtime image with the init
    container first (the artifact's blobs laid out as CRI-O's image volume mounts them); then the
    probe paths and one chat completion through the openai client."""
    import openai

    from conftest import tiny_recipe, wait_healthy

    recipe = tiny_recipe(tmp_path, tiny_model, extra="evaluate: false\n")
    code, out, err = run_cli(capsys, "recipe", str(recipe), "--engine", "local", "-q", "-o", str(tmp_path / "out"),
                             "--push", f"{registry.host}/models")
    assert code == 0, err
    model_id = "tiny-qwen2:0.1.0-cpu-int4"
    artifact, image = f"{registry.host}/models/{model_id}", f"{registry.host}/models/{model_id}-serve"
    code, out, err = deploy(capsys, image)
    assert code == 0, err
    runnable = by_kind(docs(out))["Deployment"]
    code, out, err = deploy(capsys, artifact, "--runtime-image", image)
    assert code == 0, err
    objects = by_kind(docs(out))
    assert "estimated: no measured speed" in objects["Deployment"]["metadata"]["annotations"]["org.olive-builder/sizing"]

    # the image volume, as CRI-O mounts it; the ConfigMap; the shared emptyDir (0777, as the kubelet makes it)
    manifest = base64.b64decode(objects["ConfigMap"]["binaryData"]["manifest.json"])
    volume, config_map, shared = tmp_path / "artifact", tmp_path / "configmap", tmp_path / "emptydir-model"
    for folder in (volume, config_map, shared):
        folder.mkdir()
    store = oci.open_store(None)
    for layer in json.loads(manifest)["layers"]:
        shutil.copy(store.blob_path(layer["digest"]), volume / layer["annotations"]["org.opencontainers.image.title"])
    (config_map / "manifest.json").write_bytes(manifest)
    shared.chmod(0o777)
    started = []
    try:
        pod = objects["Deployment"]["spec"]["template"]["spec"]
        init = run_like_kubelet(docker_client, pod, pod["initContainers"][0],
                                {"artifact": volume, "manifest": config_map, "model": shared}, f"deploy-init-{tmp_path.name}")
        started.append(init)
        assert init.wait(timeout=120)["StatusCode"] == 0, init.logs().decode()
        assert (shared / "genai_config.json").is_file()
        for spec, volumes in ((runnable["spec"]["template"]["spec"], {}), (pod, {"model": shared})):
            port = free_port()
            c = run_like_kubelet(docker_client, spec, spec["containers"][0], volumes,
                                 f"deploy-server-{len(started)}-{tmp_path.name}", port)
            started.append(c)
            wait_healthy(port, lambda c=c: c.reload() or c.status == "running", lambda c=c: c.logs().decode()[-2000:])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                path = spec["containers"][0][probe]["httpGet"]["path"]
                assert urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status == 200
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
            assert r.usage is not None and r.usage.completion_tokens == 4
            c.stop(timeout=60)  # SIGTERM: it drains and exits 0, well within the grace period
            assert c.wait(timeout=60)["StatusCode"] == 0, c.logs().decode()[-2000:]
    finally:
        pulled = {c.image.id for c in started}  # pulled by digest from this test's registry: nothing else uses them
        for c in started:
            c.remove(force=True)
        for image_id in pulled:
            docker_client.images.remove(image_id, force=True)
