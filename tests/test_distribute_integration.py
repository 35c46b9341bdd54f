"""Packaging and distribution with real parts: models built by real Olive, a real registry
process (docker-registry, with and without htpasswd auth), and third-party clients reading
what we push: `docker pull` + `docker run`, skopeo, and oras-py."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from builder.cli import main
from builder.oci import layout as oci
from builder.oci.media import MODEL_ARTIFACT
from builder.oci.registry import Registry
from conftest import (
    REGISTRY_PASSWORD,
    REGISTRY_USER,
    assert_private,
    free_port,
    need,
    no_partials,
    run_cli,
    tiny_recipe,
    wait_healthy,
)

pytestmark = pytest.mark.integration
MODEL_ID = "tiny-qwen2:0.1.0-cpu-int4"


cli = run_cli


def refs_in(out: str, label: str) -> list[str]:
    return [line.split()[-1] for line in out.splitlines() if line.strip().startswith(label)]


def upload_summary(out: str) -> tuple[int, int, int, int]:
    """(blobs uploaded, bytes uploaded, already there, mounted) from `build push` output."""
    line = next(line for line in out.splitlines() if line.strip().startswith("uploaded "))
    words = line.replace(",", " ").replace(";", " ").split()
    return int(words[1]), int(words[3]), int(words[5]), int(words[8])


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, local_engine_ready: None) -> dict[str, Path]:
    """Two targets of one tiny model (int4 and fp32), built by `build recipe --engine local`."""
    root = tmp_path_factory.mktemp("built")
    out = {}
    for precision in ("int4", "fp32"):
        recipe = tiny_recipe(root, tiny_model, precision)
        with pytest.raises(SystemExit) as info:
            main(["recipe", str(recipe), "--engine", "local", "-q", "--no-image", "--no-push",
                  "-o", str(root / "out" / precision)])
        assert info.value.code == 0
        out[precision] = root / "out" / precision
    assert_private(oci.default_store_path(), tmp_path_factory)  # session fixtures must not use the user's store
    return out


@pytest.fixture
def model_copy(tmp_path: Path, built: dict[str, Path]):  # type: ignore[no-untyped-def]
    def copy(precision: str = "int4") -> Path:
        dst = tmp_path / f"model-{precision}"
        shutil.copytree(built[precision], dst)
        return dst

    return copy


# ------------------------------------------------------------------------------- the whole path

@pytest.mark.docker
def test_build_recipe_packages_pushes_and_the_image_runs(capsys, tmp_path, tiny_model, local_engine_ready,  # type: ignore[no-untyped-def]
                                                         runtime_image, docker_client, registry):
    need(shutil.which("docker") is not None, "the docker CLI is not installed")
    import openai

    recipe = tiny_recipe(tmp_path, tiny_model)
    code, out, err = cli(capsys, "recipe", str(recipe), "--engine", "local", "-q", "-o", str(tmp_path / "out"),
                         "--push", f"{registry.host}/models")
    assert code == 0, err
    artifact = next(line.split() for line in out.splitlines() if line.strip().startswith("model artifact"))
    image = next(line.split() for line in out.splitlines() if line.strip().startswith("runnable image"))
    assert artifact[2] == MODEL_ID and image[2] == MODEL_ID + "-serve"
    pushed = refs_in(out, "pushed")
    assert pushed == [f"{registry.host}/models/{MODEL_ID}@{artifact[3]}",
                      f"{registry.host}/models/{MODEL_ID}-serve@{image[3]}"]

    # docker pull + docker run of the runnable image; the openai client talks to it
    remote_image = f"{registry.host}/models/{MODEL_ID}-serve"
    subprocess.run(["docker", "pull", "-q", remote_image], check=True, capture_output=True, timeout=300)
    port = free_port()
    container = docker_client.containers.run(remote_image, detach=True, ports={"8000/tcp": ("127.0.0.1", port)})
    try:
        wait_healthy(port, lambda: container.reload() or container.status == "running",
                     lambda: container.logs().decode()[-2000:])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL_ID]
        r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5
        labels = docker_client.images.get(remote_image).labels
        assert labels["org.olive-builder.target"] == "tiny-qwen2/cpu-int4"
        assert labels["org.olive-builder.tools.onnxruntime-genai"] == "0.14.1"
    finally:
        container.remove(force=True)
        docker_client.images.remove(remote_image, force=True)

    # build pull: a verified, ready-to-use folder with the very bytes that were built
    code, out, err = cli(capsys, "pull", f"{registry.host}/models/{MODEL_ID}", str(tmp_path / "pulled"))
    assert code == 0, err
    built_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == built_files
    for name in built_files:
        assert (tmp_path / "pulled" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    from builder.build.check import check_generates

    assert len(check_generates(tmp_path / "pulled", new_tokens=4).generated_ids) == 4


@pytest.mark.docker
def test_skopeo_and_oras_read_what_we_push(capsys, tmp_path, model_copy, runtime_image, registry):  # type: ignore[no-untyped-def]
    need(shutil.which("skopeo") is not None, "skopeo is not installed (apt-get install skopeo)")
    import oras.client

    model = model_copy()
    code, out, err = cli(capsys, "package", str(model), "--push", f"{registry.host}/ns")
    assert code == 0, err
    (artifact_ref, artifact_digest), (image_ref, image_digest) = [p.split("@") for p in refs_in(out, "pushed")]
    tls = ["--tls-verify=false"]

    raw = subprocess.run(["skopeo", "inspect", *tls, "--raw", f"docker://{artifact_ref}"],
                         check=True, capture_output=True, timeout=60).stdout
    assert oci.digest_bytes(raw) == artifact_digest
    assert json.loads(raw)["artifactType"] == MODEL_ARTIFACT
    seen = json.loads(subprocess.run(["skopeo", "inspect", *tls, f"docker://{image_ref}"], check=True,
                                     capture_output=True, timeout=60).stdout)
    assert seen["Digest"] == image_digest and seen["Labels"]["org.olive-builder.precision"] == "int4"
    for ref, digest in ((artifact_ref, artifact_digest), (image_ref, image_digest)):
        dest = tmp_path / "skopeo-copy"
        subprocess.run(["skopeo", "copy", "-q", "--preserve-digests", "--src-tls-verify=false", f"docker://{ref}",
                        f"oci:{dest}:{digest[7:19]}"], check=True, capture_output=True, timeout=300)
        index = json.loads((dest / "index.json").read_text())
        assert digest in [m["digest"] for m in index["manifests"]]

    # oras-py pulls the artifact: every layer arrives under its title and is the tar we wrote
    outdir = tmp_path / "oras"
    files = oras.client.OrasClient(hostname=registry.host, insecure=True).pull(target=artifact_ref, outdir=str(outdir))
    assert sorted(Path(f).name for f in files) == ["model.onnx.data.tar", "model.onnx.tar", "shared-files.tar",
                                                   "target-files.tar"]
    unpacked = tmp_path / "oras-unpacked"
    for f in files:
        with tarfile.open(f) as tar:
            tar.extractall(unpacked, filter="data")
    for p in model.iterdir():
        assert (unpacked / "model" / p.name).read_bytes() == p.read_bytes()


@pytest.mark.docker
def test_repush_uploads_nothing_second_target_shares_blobs_other_repo_mounts(capsys, model_copy, runtime_image,  # type: ignore[no-untyped-def]
                                                                             registry, docker_client):
    runtime_layers = len(docker_client.images.get(runtime_image).attrs["RootFS"]["Layers"])
    blobs = 4 + runtime_layers + 2  # 4 model layers, the runtime's layers, 2 configs
    int4, fp32 = model_copy("int4"), model_copy("fp32")
    code, out, err = cli(capsys, "package", str(int4), "--push", f"{registry.host}/m")
    assert code == 0, err
    uploaded, nbytes, existing, mounted = upload_summary(out)
    assert uploaded == blobs and existing == 0 and nbytes > 30_000_000

    code, out, err = cli(capsys, "push", MODEL_ID, "--to", f"{registry.host}/m")
    assert code == 0, err
    assert upload_summary(out) == (0, 0, blobs, 0)  # an unchanged build: not one byte again

    code, out, err = cli(capsys, "package", str(fp32), "--push", f"{registry.host}/m")
    assert code == 0, err
    shared = [line for line in err.splitlines() if "shared-files.tar" in line]
    assert shared and shared[0].split()[0] == "exists"  # the tokenizer/config layer of the int4 build
    runtime = [line.split()[0] for line in err.splitlines() if line.strip().endswith("runtime layer")]
    assert runtime == ["exists"] * runtime_layers
    uploaded, nbytes, existing, _ = upload_summary(out)
    # Uploaded: fp32 weights, its own config files and the manifests' configs; already there: the
    # shared tokenizer layer and the runtime's layers.
    assert nbytes < 2_000_000 and existing == 1 + runtime_layers

    code, out, err = cli(capsys, "push", MODEL_ID, "--to", f"{registry.host}/elsewhere")
    assert code == 0, err
    assert upload_summary(out) == (0, 0, 0, blobs)  # every blob mounted from the repository it was pushed to


# ------------------------------------------------------------------------------- auth

def test_auth_registry_needs_and_takes_credentials_without_showing_them(capsys, tmp_path, model_copy,  # type: ignore[no-untyped-def]
                                                                        auth_registry, monkeypatch):
    model = model_copy()
    dest = f"{auth_registry.host}/private"
    code, out, err = cli(capsys, "package", str(model), "--no-image", "--push", dest)
    assert code == 5 and f"{auth_registry.host} requires a login and no credentials" in err
    assert "Traceback" not in err

    monkeypatch.setenv("OLIVE_BUILDER_REGISTRY_USERNAME", REGISTRY_USER)
    monkeypatch.setenv("OLIVE_BUILDER_REGISTRY_PASSWORD", "wrong-password-123")
    monkeypatch.setenv("OLIVE_BUILDER_REGISTRY_HOST", auth_registry.host)  # the registry they are for
    code, out, err = cli(capsys, "push", MODEL_ID, "--to", dest)
    assert code == 5 and f"refused the credentials for user '{REGISTRY_USER}'" in err
    assert "wrong-password-123" not in out + err

    # what `docker login` leaves behind
    monkeypatch.delenv("OLIVE_BUILDER_REGISTRY_USERNAME")
    monkeypatch.delenv("OLIVE_BUILDER_REGISTRY_PASSWORD")
    config = Path(os.environ["DOCKER_CONFIG"])
    config.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{REGISTRY_USER}:{REGISTRY_PASSWORD}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": auth}}}))
    code, out, err = cli(capsys, "push", MODEL_ID, "--to", dest)
    assert code == 0, err
    assert REGISTRY_PASSWORD not in out + err
    code, out, err = cli(capsys, "pull", f"{dest}/tiny-qwen2:0.1.0-cpu-int4", str(tmp_path / "pulled"),
                         "--store", str(tmp_path / "other-store"))
    assert code == 0, err
    code, out, err = cli(capsys, "inspect", "--json", f"{dest}/tiny-qwen2:0.1.0-cpu-int4")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "model artifact" and info["annotations"]["org.olive-builder.precision"] == "int4"


# ------------------------------------------------------------------------------- damage and interruption

@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_or_truncated_blob_in_the_registry_is_refused_on_pull(capsys, tmp_path, model_copy, registry,  # type: ignore[no-untyped-def]
                                                                       damage):
    model = model_copy()
    code, out, err = cli(capsys, "package", str(model), "--no-image", "--push", f"{registry.host}/t")
    assert code == 0, err
    manifest = json.loads(oci.open_store().read_bytes(oci.open_store().resolve(MODEL_ID).digest))
    weights = next(layer for layer in manifest["layers"] if layer["annotations"][oci.ANN_TITLE] == "model.onnx.data.tar")
    data_file = registry.blob_data(weights["digest"])
    blob = bytearray(data_file.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01
    else:
        del blob[-2048:]
    data_file.write_bytes(bytes(blob))

    fresh = tmp_path / "fresh-store"  # a machine that never had the model
    code, out, err = cli(capsys, "pull", f"{registry.host}/t/{MODEL_ID}", str(tmp_path / "pulled"), "--store", str(fresh))
    assert code == 5, err
    assert ("does not match its digest" if damage == "flip" else "is truncated") in err
    assert "Nothing was kept" in err and "Traceback" not in err
    assert not (tmp_path / "pulled").exists() and not no_partials(tmp_path)
    assert not oci.Store(fresh).has(weights["digest"])  # no poisoned cache
    assert oci.Store(fresh).resolve(f"{registry.host}/t/{MODEL_ID}") is None


def upload_size(uploads: Path) -> int:
    """The largest upload in progress; the registry adds and removes upload folders while we look."""
    largest = 0
    try:
        sessions = list(os.scandir(uploads))
    except FileNotFoundError:
        return 0
    for session in sessions:
        try:
            largest = max(largest, os.stat(os.path.join(session.path, "data")).st_size)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return largest


def test_interrupted_push_leaves_no_tag_and_the_next_push_completes(capsys, tmp_path, model_copy, registry):  # type: ignore[no-untyped-def]
    model = model_copy()
    with (model / "extra.bin").open("wb") as f:  # a big weight file, so the kill lands mid-upload
        for _ in range(300):
            f.write(os.urandom(1 << 20))
    code, out, err = cli(capsys, "package", str(model), "--no-image")
    assert code == 0, err
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "builder", "push", MODEL_ID, "--to", f"{registry.host}/big"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    uploads = registry.storage / "docker" / "registry" / "v2" / "repositories" / "big" / "tiny-qwen2" / "_uploads"
    deadline = time.monotonic() + 60
    while upload_size(uploads) <= (8 << 20):
        assert proc.poll() is None, "the push ended before the registry could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    registry.kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    assert f"Is the registry at http://{registry.host} up and reachable?" in err and "Traceback" not in err

    registry.start()
    client = Registry(registry.host)
    assert client.get_manifest("big/tiny-qwen2", "0.1.0-cpu-int4") is None  # no tag points at incomplete content
    code, out, err = cli(capsys, "push", MODEL_ID, "--to", f"{registry.host}/big")
    assert code == 0, err
    assert "uploading: 100% of" in err  # long transfers show progress in logs too
    code, out, err = cli(capsys, "pull", f"{registry.host}/big/{MODEL_ID}", str(tmp_path / "pulled"),
                         "--store", str(tmp_path / "fresh"))
    assert code == 0, err
    assert "downloading:  50% of" in err and "downloading: 100% of" in err
    assert (tmp_path / "pulled" / "extra.bin").read_bytes() == (model / "extra.bin").read_bytes()


# ------------------------------------------------------------------------------- errors and inspect

def test_pull_and_push_mistakes_get_clear_errors(capsys, tmp_path, model_copy, registry):  # type: ignore[no-untyped-def]
    code, out, err = cli(capsys, "pull", f"{registry.host}/nothing/here:1.0", str(tmp_path / "x"))
    assert code == 5 and "does not exist" in err and not (tmp_path / "x").exists()
    code, out, err = cli(capsys, "pull", "Not A Ref", str(tmp_path / "x"))
    assert code == 2 and "is not a valid reference" in err  # the user's mistake: a usage error
    code, out, err = cli(capsys, "push", "tiny-qwen2:nope", "--to", f"{registry.host}/x")
    assert code == 5 and "is not in the local store" in err and "The local store is empty" in err
    code, out, err = cli(capsys, "push", "tiny-qwen2:nope", "--to", "no-registry-here")
    assert code == 2 and "does not start with a registry host" in err
    (tmp_path / "exists").mkdir()
    model = model_copy()
    assert cli(capsys, "package", str(model), "--no-image", "--push", f"{registry.host}/e")[0] == 0
    code, out, err = cli(capsys, "pull", f"{registry.host}/e/{MODEL_ID}", str(tmp_path / "exists"))
    assert code == 2 and "already exists" in err and "--force" in err
    code, out, err = cli(capsys, "pull", MODEL_ID, str(tmp_path / "exists"), "--force")  # from the local store
    assert code == 0, err
    assert (tmp_path / "exists" / "genai_config.json").is_file()
    # a registry that is not there: a clear message after a few retries, not a traceback
    code, out, err = cli(capsys, "pull", f"127.0.0.1:{free_port()}/x/y:1", str(tmp_path / "y"))
    assert code == 5 and "up and reachable" in err and "Traceback" not in err


def test_inspect_shows_annotations_as_a_table_and_json(capsys, model_copy, registry):  # type: ignore[no-untyped-def]
    model = model_copy()
    assert cli(capsys, "package", str(model), "--no-image", "--push", f"{registry.host}/i")[0] == 0
    code, out, err = cli(capsys, "inspect", MODEL_ID)
    assert code == 0, err
    assert "(model artifact)" in out and "org.olive-builder.tools.olive-ai" in out and "model/model.onnx.data" in out
    local = json.loads(cli(capsys, "inspect", MODEL_ID, "--json")[1])
    remote = json.loads(cli(capsys, "inspect", f"{registry.host}/i/{MODEL_ID}", "--json")[1])
    assert local["digest"] == remote["digest"] and local["annotations"] == remote["annotations"]
    assert remote["config"]["descriptor"]["name"] == "tiny-qwen2"
    listing = cli(capsys, "inspect")[1]  # no REF: what the local store holds
    assert MODEL_ID in listing and "model artifact" in listing and local["digest"] in listing
    assert remote["annotations"]["org.olive-builder.recipe.digest"].startswith("sha256:")


def test_serve_a_reference_pulls_verifies_and_serves(capsys, tmp_path, model_copy, registry):  # type: ignore[no-untyped-def]
    import signal

    model = model_copy()
    assert cli(capsys, "package", str(model), "--no-image", "--push", f"{registry.host}/s")[0] == 0
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "XDG_DATA_HOME": str(tmp_path / "empty-data"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "builder", "serve", f"{registry.host}/s/{MODEL_ID}",
                                 "--host-runtime", "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(port, lambda: proc.poll() is None, log.read_text)
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read())
        assert [m["id"] for m in models["data"]] == [MODEL_ID]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()
    served = list((tmp_path / "cache" / "olive-builder" / "models").iterdir())
    assert len(served) == 1 and (served[0] / "genai_config.json").is_file()


def test_missing_push_rights_fail_before_the_build(capsys, tmp_path, tiny_model, local_engine_ready,  # type: ignore[no-untyped-def]
                                                   auth_registry):

    recipe = tiny_recipe(tmp_path, tiny_model)
    code, out, err = cli(capsys, "recipe", str(recipe), "--engine", "local", "-q", "-o", str(tmp_path / "out"),
                         "--push", f"{auth_registry.host}/team")
    assert code == 5 and "requires a login" in err
    assert not (tmp_path / "out").exists()
    logs = Path(os.environ["XDG_STATE_HOME"]) / "olive-builder" / "logs"
    assert not logs.exists() or not list(logs.iterdir()), "a build ran although it could not have been pushed"
