"""`build serve` serves what a deployment serves: the runtime image with the folder mounted, or a
reference's runnable image loaded from the store, through the real Docker engine, answered by
the real openai client; Ctrl-C leaves no container; a model that cannot load and a missing
engine are clear errors. `--host-runtime` says when its onnxruntime-genai has no Engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, need, run_cli, tiny_recipe, wait_healthy

pytestmark = pytest.mark.integration

MODEL_ID = "tiny-qwen2:0.1.0-cpu-int4"
REPO = Path(__file__).resolve().parent.parent
LABEL = "org.olive-builder.serve"


_BUILT: dict[Path, Path] = {}  # session temp folder -> the tiny model (test_no_phone_home.py shares it)


def build_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model, int4, built once per session by `build recipe --engine local` (no evaluation:
    these tests serve it, they do not judge it; no image, nothing pushed)."""
    base = tmp_path_factory.getbasetemp()
    if base not in _BUILT:
        root = tmp_path_factory.mktemp("serve-docker")
        recipe = tiny_recipe(root, tiny_model, extra="evaluate: false\n")
        from builder.cli import main

        with pytest.raises(SystemExit) as info:
            main(["recipe", str(recipe), "--engine", "local", "-q", "--no-image", "--no-push", "-o", str(root / "out")])
        assert info.value.code == 0
        _BUILT[base] = root / "out"
    return _BUILT[base]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, local_engine_ready: None) -> Path:
    return build_tiny(tmp_path_factory, tiny_model)


def containers_of(docker_client: Any, shown: str) -> list[Any]:
    """Containers `build serve` started for ``shown`` (running or not)."""
    return list(docker_client.containers.list(all=True, filters={"label": f"{LABEL}={shown}"}))


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


@pytest.fixture
def serving() -> Iterator[list[subprocess.Popen[bytes]]]:
    """`build serve` processes a test starts; any still running at the end is stopped by its PID."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        stop(proc, signal.SIGKILL)


@pytest.mark.docker
def test_serve_runs_the_runtime_image_with_the_folder_and_ctrl_c_leaves_no_container(
        tiny_folder: Path, tmp_path: Path, runtime_image: str, docker_client: Any,
        serving: list[subprocess.Popen[bytes]]) -> None:
    import openai

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "builder", "serve", str(tiny_folder), "--port", str(port),
                                 "--max-concurrency", "2", "--queue-size", "3"],
                                stdout=sink, stderr=subprocess.STDOUT, env=cli_env(OLIVE_BUILDER_API_KEY="s3cret-key"))
    serving.append(proc)
    wait_healthy(port, lambda: proc.poll() is None, log.read_text, timeout=120)

    [container] = containers_of(docker_client, str(tiny_folder))
    assert container.image.tags == [runtime_image]  # the image a deployment runs, from this tree
    config = container.attrs["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["OLIVE_BUILDER_API_KEY"] == "s3cret-key" and env["ORT_DISABLE_TELEMETRY"] == "1"
    assert env["OLIVE_MAX_CONCURRENCY"] == "2" and env["OLIVE_QUEUE_SIZE"] == "3"
    assert "s3cret-key" not in json.dumps(container.attrs["Args"]) + json.dumps(config["Cmd"])  # never in argv
    assert [(m["Destination"], m["RW"]) for m in container.attrs["Mounts"]] == [("/model", False)]
    assert container.attrs["HostConfig"]["PortBindings"]["8000/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret-key", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()

    started = time.monotonic()
    assert stop(proc, signal.SIGINT) == 0, log.read_text()  # Ctrl-C: the server drains, then exits 0
    assert time.monotonic() - started < 30
    assert containers_of(docker_client, str(tiny_folder)) == []
    text = log.read_text()
    assert "Application startup complete" in text and "stopping the server" in text  # its log, streamed
    assert "s3cret-key" not in text


@pytest.mark.docker
def test_serve_a_reference_runs_its_runnable_image(capsys: pytest.CaptureFixture[str], tiny_folder: Path,
                                                   tmp_path: Path, runtime_image: str, docker_client: Any,
                                                   serving: list[subprocess.Popen[bytes]]) -> None:
    store = tmp_path / "store"
    code, out, err = run_cli(capsys, "package", str(tiny_folder), "--store", str(store), "--no-push")
    assert code == 0, err
    image_ref = next(line.split()[2] for line in out.splitlines() if line.strip().startswith("runnable image"))
    assert image_ref == MODEL_ID + "-serve"
    from builder.oci import layout as oci

    st = oci.Store(store)
    config_digest = st.read_json(st.resolve(image_ref).digest)["config"]["digest"]  # type: ignore[union-attr]
    import docker.errors

    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(config_digest)  # not in Docker before: `build serve` loads it
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "builder", "serve", MODEL_ID, "--store", str(store),
                                 "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT, env=cli_env())
    serving.append(proc)
    try:
        wait_healthy(port, lambda: proc.poll() is None, log.read_text, timeout=120)
        [container] = containers_of(docker_client, image_ref)
        assert container.image.id == config_digest  # exactly the stored image, loaded into Docker
        assert container.attrs["Mounts"] == []  # the model is in the image
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == [MODEL_ID]
        assert stop(proc, signal.SIGTERM) == 0, log.read_text()  # SIGTERM drains the same way
        assert containers_of(docker_client, image_ref) == []
        assert "loading " + image_ref + " into Docker" in log.read_text()
    finally:
        docker_client.images.remove(config_digest, force=True)


@pytest.mark.docker
def test_a_model_that_cannot_load_exits_non_zero_with_the_log_tail(capsys: pytest.CaptureFixture[str],
                                                                  tiny_folder: Path, tmp_path: Path,
                                                                  runtime_image: str, docker_client: Any) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "model.onnx").write_bytes(b"this is not an onnx graph")
    code, _, err = run_cli(capsys, "serve", str(broken), "--port", str(free_port()))
    assert code == 1 and "exit code 1: the model in" in err and "could not be loaded" in err, err
    tail = err.split("--- last", 1)[1]
    assert "model.onnx" in tail or "onnx" in tail.lower()  # the server's own reason, from the container's log
    assert "Traceback (most recent call last)" not in err.split("--- last", 1)[0]
    assert containers_of(docker_client, str(broken)) == []


def test_no_docker_engine_is_a_clear_error(capsys: pytest.CaptureFixture[str], tiny_folder: Path,
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    code, _, err = run_cli(capsys, "serve", str(tiny_folder))
    assert code == 3 and "No Docker engine answers" in err and "--host-runtime" in err, err
    assert "Traceback" not in err


@pytest.mark.docker
def test_a_cuda_model_without_a_gpu_runtime_is_refused_before_any_image_builds(
        capsys: pytest.CaptureFixture[str], tiny_folder: Path, tmp_path: Path, docker_client: Any) -> None:
    need(shutil.which("nvidia-container-runtime-hook") is None and "nvidia" not in docker_client.info()["Runtimes"],
         "this Docker engine has an NVIDIA runtime: the refusal cannot be shown here")
    cuda = tmp_path / "cuda"
    shutil.copytree(tiny_folder, cuda)
    record = json.loads((cuda / "olive-builder.json").read_text())
    record["target"]["device"] = "cuda"
    (cuda / "olive-builder.json").write_text(json.dumps(record))
    code, _, err = run_cli(capsys, "serve", str(cuda))
    assert code == 3 and "is a cuda model" in err and "NVIDIA Container Toolkit" in err, err
    assert "building it" not in err


def test_the_host_route_says_when_it_has_no_engine(tiny_folder: Path, tmp_path: Path,
                                                   serving: list[subprocess.Popen[bytes]]) -> None:
    """The build side's onnxruntime-genai 0.14.1 (the `local` extra) has no og.Engine."""
    import onnxruntime_genai as og

    from builder.serve.generator import engine_available

    need(not engine_available(og), "this Python's onnxruntime-genai has an Engine: nothing to warn about")
    port = free_port()
    log = tmp_path / "host.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "builder", "serve", str(tiny_folder), "--host-runtime",
                                 "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT, env=cli_env())
    serving.append(proc)
    wait_healthy(port, lambda: proc.poll() is None, log.read_text)
    assert stop(proc, signal.SIGTERM) == 0, log.read_text()
    text = log.read_text()
    assert "has no Engine" in text and "without continuous batching" in text and "onnxruntime-genai==0.18.0" in text
