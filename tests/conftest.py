"""Shared fixtures.

Integration tests need real parts: Olive in this Python (local engine), a Docker engine
and the CPU builder image (docker engine). Where a part is missing they skip, unless
OLIVE_BUILDER_REQUIRE_INTEGRATION=1 (set by .ci/run), where a missing part fails the test:
CI must never pass by skipping. GPU tests (marker `gpu`) always skip without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tinymodel import make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REQUIRE = os.environ.get("OLIVE_BUILDER_REQUIRE_INTEGRATION") == "1"


def need(ok: bool, reason: str) -> None:
    """Skip (or, in CI, fail) when a real part the test needs is missing."""
    if ok:
        return
    if REQUIRE:
        pytest.fail(f"required for CI but missing: {reason}")
    pytest.skip(reason)


PRIVATE_UNSET = ("OLIVE_BUILDER_STORE", "OLIVE_BUILDER_REGISTRY", "OLIVE_BUILDER_REGISTRY_USERNAME",
                 "OLIVE_BUILDER_REGISTRY_HOST", "OLIVE_BUILDER_REGISTRY_TIMEOUT", "OLIVE_BUILDER_MAX_MODEL_BYTES",
                 "OLIVE_BUILDER_REGISTRY_PASSWORD", "OLIVE_BUILDER_INSECURE_REGISTRIES", "SOURCE_DATE_EPOCH",
                 "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _isolate(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Build logs, HF caches, the local OCI store, pulled models and registry credentials of
    tests go under ``root``, never the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(root / "state"))
    monkeypatch.setenv("XDG_DATA_HOME", str(root / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))
    monkeypatch.setenv("HF_HOME", str(root / "hf-home"))
    monkeypatch.setenv("DOCKER_CONFIG", str(root / "docker-config"))
    for name in PRIVATE_UNSET:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session", autouse=True)
def _private_session_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The same for session fixtures (they are set up before any test's own fixtures)."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("session-state"))
        yield


@pytest.fixture(autouse=True)
def _private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate(monkeypatch, tmp_path)


def assert_private(path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """``path`` lies in this test session's temporary folders."""
    assert path.resolve().is_relative_to(tmp_path_factory.getbasetemp().resolve()), f"{path} is outside the tests' folders"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(importlib.util.find_spec("torch") is not None, "torch and transformers are not installed")
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


def write_recipe(folder: Path, target: str, body: str) -> Path:
    """Write ``folder/<target>.yaml`` (folder name = model part of the recipe id)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{target}.yaml"
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def tiny_recipe(tmp_path: Path, model: Path, precision: str = "int4", extra: str = "") -> Path:
    return write_recipe(
        tmp_path / "recipes" / "tiny-qwen2",
        f"cpu-{precision}",
        f"""
        name: tiny-qwen2
        version: 0.1.0
        model:
          path: {model}
        target:
          device: cpu
          precision: {precision}
        generation:
          max_length: 64
        """
        + textwrap.dedent(extra),
    )


@pytest.fixture(scope="session")
def local_engine_ready() -> None:
    need(
        importlib.util.find_spec("olive") is not None and importlib.util.find_spec("onnxruntime_genai") is not None,
        "Olive and onnxruntime-genai are not installed here (pip install -e '.[local]')",
    )


@pytest.fixture(scope="session")
def docker_client():  # type: ignore[no-untyped-def]
    import docker

    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as e:  # noqa: BLE001
        need(False, f"no Docker engine answers ({e})")
    return client


def ensure_image(docker_client, flavour: str) -> str:  # type: ignore[no-untyped-def]
    """The image of ``flavour`` (cpu, runtime-cpu, ...), built by the same code as `build images` if missing."""
    from builder.build import images

    spec = images.image_spec(flavour)
    try:
        docker_client.images.get(spec.tag)
    except Exception:  # noqa: BLE001
        need(
            bool(os.environ.get("OLIVE_BUILDER_BASE_IMAGE")),
            f"no {flavour} image, and OLIVE_BUILDER_BASE_IMAGE names no local base image to build one on",
        )
        images.build_image(docker_client, spec, lambda line: None)
    return spec.tag


@pytest.fixture(scope="session")
def cpu_builder_image(docker_client) -> str:  # type: ignore[no-untyped-def]
    """The CPU builder image from Dockerfile.cpu."""
    return ensure_image(docker_client, "cpu")


@pytest.fixture(scope="session")
def runtime_image(docker_client) -> str:  # type: ignore[no-untyped-def]
    """The CPU runtime image from images/runtime-cpu/Dockerfile."""
    return ensure_image(docker_client, "runtime-cpu")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `build ARGV...` in this process: (exit code, stdout, stderr)."""
    from builder.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(port: int, alive: Callable[[], bool], log: Callable[[], str], timeout: float = 60) -> None:
    """Wait until GET /health on loopback ``port`` answers 200, failing with ``log()`` if the
    server stops (``alive()`` is false) or the time runs out."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        assert alive(), f"the server stopped before it was healthy:\n{log()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet, or 503 while loading
            pass
        assert time.monotonic() < deadline, f"the server never became healthy:\n{log()}"
        time.sleep(0.1)


def no_partials(folder: Path) -> list[Path]:
    """Leftover work folders of a build (there must be none)."""
    return [p for p in folder.rglob(".*.partial-*")] if folder.exists() else []


@pytest.fixture
def clean_copy(tmp_path: Path):  # type: ignore[no-untyped-def]
    def copy(src: Path, name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy


class RegistryProcess:
    """A real OCI registry (the Debian docker-registry package, distribution 2.8) on loopback."""

    def __init__(self, root: Path, htpasswd: Path | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.storage = root / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n" if htpasswd else ""
        self.config = root / "config.yml"
        self.config.write_text(
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n" + auth
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RegistryProcess:
        import urllib.error
        import urllib.request

        log = (self.root / "registry.log").open("ab")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # 401 from an auth registry: it is up
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"docker-registry did not start; see {self.root / 'registry.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def blob_data(self, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexpart[:2] / hexpart / "data"


def _need_registry() -> None:
    need(shutil.which("docker-registry") is not None, "docker-registry is not installed (apt-get install docker-registry)")


@pytest.fixture
def registry(tmp_path: Path):  # type: ignore[no-untyped-def]
    _need_registry()
    folder = tmp_path / "registry"
    folder.mkdir()
    reg = RegistryProcess(folder).start()
    yield reg
    reg.stop()


REGISTRY_USER, REGISTRY_PASSWORD = "ci-user", "s3cret-Pa55word"


@pytest.fixture
def auth_registry(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A registry that wants HTTP Basic auth (htpasswd, bcrypt) as REGISTRY_USER / REGISTRY_PASSWORD."""
    _need_registry()
    import bcrypt

    folder = tmp_path / "auth-registry"
    folder.mkdir()
    htpasswd = folder / "htpasswd"
    hashed = bcrypt.hashpw(REGISTRY_PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
    htpasswd.write_text(f"{REGISTRY_USER}:{hashed}\n")
    reg = RegistryProcess(folder, htpasswd).start()
    yield reg
    reg.stop()


@contextlib.contextmanager
def fake_hub_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      datasets: dict[str, tuple[Path, str]]) -> Iterator[Path]:
    """tests/fake_hub.py serving dataset repositories (id -> (folder, commit)) on loopback, with
    HF_ENDPOINT pointing at it; yields its request log."""
    config = tmp_path / "hub.json"
    config.write_text(json.dumps({"repos": {}, "datasets": {
        name: {"dir": str(folder), "commit": commit} for name, (folder, commit) in datasets.items()}}))
    log = tmp_path / "hub.log"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_hub.py"), str(config), str(log)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{int(proc.stdout.readline())}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield log
    finally:
        proc.terminate()
        proc.wait(timeout=10)
