"""Engines run one command in a builder environment and stream its output line by line.

Two implementations behind one small interface:

- ``DockerEngine``: a container from a builder image, through docker-py. Podman works
  through its Docker-compatible socket (``DOCKER_HOST=unix://$XDG_RUNTIME_DIR/podman/podman.sock``).
- ``LocalEngine``: this Python on this host, for machines without an engine; needs
  ``pip install 'olive-builder[local]'``.

Paths differ between the two: a Mount names a host folder and where a container sees it,
and ``engine.path_for(mount)`` says which one the command must be given.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from builder.build.images import ImageSpec, build_image
from builder.contract import PACKAGE_DIR, TOOL_LABEL, TOOLS, tool_versions_here
from builder.errors import EngineError, ImageError

EngineName = Literal["docker", "local"]
LineSink = Callable[[str], None]

# Where the driver's own package is mounted inside builder containers. It is mounted, not
# installed, so that a change to olive-builder never needs a new builder image.
CONTAINER_PACKAGE_ROOT = "/opt/olive-builder"


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class Job:
    image: str
    module: str
    args: tuple[str, ...]
    env: dict[str, str]
    mounts: tuple[Mount, ...]
    gpus: bool = False


@dataclass(frozen=True)
class BuilderEnv:
    """The builder environment a build will run in: what decides its output besides the recipe."""

    image_id: str | None  # the builder image's id; None for the local engine
    tools: dict[str, str]  # versions of contract.TOOLS there

    @property
    def key_part(self) -> str:
        return self.image_id or "local"


class Engine(Protocol):
    name: str

    def path_for(self, mount: Mount) -> str: ...

    def preflight(self) -> None:
        """Raise EngineError unless this engine can run a build now."""

    def prepare(self, image: str, spec: ImageSpec | None, on_log: LineSink) -> BuilderEnv:
        """Make sure the builder environment exists (building ``spec`` if given and missing)."""

    def run(self, job: Job, on_line: LineSink) -> int: ...

    def docker(self) -> Any | None:
        """A docker-py client if this engine has one (for runtime images), else None."""


def split_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Bytes as they arrive -> text lines; a carriage return (progress bars) ends a line too."""
    buf = b""
    for chunk in chunks:
        buf += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield line.decode("utf-8", errors="replace")
    if buf.strip():
        yield buf.decode("utf-8", errors="replace")


class LocalEngine:
    """Runs the job with this interpreter on this host; the image and mounts are not used."""

    name = "local"

    def path_for(self, mount: Mount) -> str:
        return str(mount.source)

    def preflight(self) -> None:
        missing = [m for m in ("olive", "onnxruntime_genai") if importlib.util.find_spec(m) is None]
        if missing:
            raise EngineError(
                f"--engine local runs Olive in this Python ({sys.executable}), but {', '.join(missing)} "
                "is not installed here.",
                hint="Install the build stack: pip install torch==2.13.0 && pip install -e '.[local]'\n"
                "or use the default --engine docker.",
            )

    def prepare(self, image: str, spec: ImageSpec | None, on_log: LineSink) -> BuilderEnv:
        return BuilderEnv(None, tool_versions_here())

    def docker(self) -> Any | None:
        return None

    def run(self, job: Job, on_line: LineSink) -> int:
        # The signing key and its passphrase stay with the driver: the worker and Olive never need them.
        env = {k: v for k, v in os.environ.items()
               if k not in ("OLIVE_BUILDER_SIGN_KEY", "OLIVE_BUILDER_SIGN_KEY_PASSWORD")}
        env.update(job.env)
        package_root = str(PACKAGE_DIR.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", job.module, *job.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us; we stop the child ourselves
        )
        stdout = proc.stdout
        if stdout is None:  # pragma: no cover - stdout=PIPE always gives one
            raise EngineError("Could not read the worker's output.")
        try:
            for line in split_lines(iter(lambda: stdout.read1(65536), b"")):  # type: ignore[attr-defined]
                on_line(line)
            return proc.wait()
        finally:
            # The worker leads its own process group (olive runs as its child): stop them all.
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class DockerEngine:
    """Runs the job in a fresh, uniquely named container that is removed whatever happens."""

    name = "docker"

    def __init__(self, client: object | None = None):
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect()
        return self._client

    def path_for(self, mount: Mount) -> str:
        return mount.target

    def preflight(self) -> None:
        _ = self.client

    def has_image(self, image: str) -> bool:
        import docker.errors

        try:
            self.client.images.get(image)
            return True
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError as e:
            raise EngineError(f"Docker could not look up image {image}: {e.explanation or e}") from None

    def image_id(self, image: str) -> str:
        return str(self.client.images.get(image).id)

    def docker(self) -> Any | None:
        return self.client

    def prepare(self, image: str, spec: ImageSpec | None, on_log: LineSink) -> BuilderEnv:
        self.preflight()
        if not self.has_image(image):
            if spec is None:
                raise ImageError(f"The builder image {image} is not in this Docker engine.",
                                 hint="Build it with `build images`, or name another one with --image.")
            on_log(f"builder image {image} is not built yet; building it (once)")
            build_image(self.client, spec, on_log)
        return BuilderEnv(*self.tools_of_image(image))

    def tools_of_image(self, image: str) -> tuple[str, dict[str, str]]:
        """(image id, tool versions) of a builder image: from its labels, else by asking Python inside it."""
        import docker.errors

        img = self.client.images.get(image)
        labels = img.labels or {}
        tools = {t: labels[TOOL_LABEL + t] for t in TOOLS if TOOL_LABEL + t in labels}
        if len(tools) < len(TOOLS):  # an image not built from our Dockerfiles: ask its Python
            probe = "import json; from builder.contract import tool_versions_here as v; print(json.dumps(v()))"
            try:
                out = self.client.containers.run(image, ["python", "-c", probe], remove=True, stdout=True, stderr=False,
                                                 environment={"PYTHONPATH": CONTAINER_PACKAGE_ROOT},
                                                 volumes={str(PACKAGE_DIR): {"bind": CONTAINER_PACKAGE_ROOT + "/builder",
                                                                                "mode": "ro"}})
                found = json.loads(out.decode().strip().splitlines()[-1])
            except (docker.errors.DockerException, ValueError, IndexError) as e:
                raise ImageError(f"Could not read the tool versions in {image}: {_short(e)}",
                                 hint="A builder image needs python with olive-ai and onnxruntime-genai.") from None
            tools = {str(k): str(v) for k, v in found.items()}
        return str(img.id), tools

    def run(self, job: Job, on_line: LineSink) -> int:
        import docker.errors
        from docker.types import DeviceRequest

        if not self.has_image(job.image):
            raise ImageError(
                f"The builder image {job.image} is not in this Docker engine.",
                hint="Build it with `build images`, or name another one with --image.",
            )
        # The driver's own package, read-only, where PYTHONPATH points: every job runs our code as it
        # is here (mounted, never installed in the image), so a job names only its own folders.
        volumes = {str(PACKAGE_DIR): {"bind": CONTAINER_PACKAGE_ROOT + "/builder", "mode": "ro"}}
        volumes.update({
            str(m.source): {"bind": m.target, "mode": "ro" if m.read_only else "rw"} for m in job.mounts
        })
        device_requests = [DeviceRequest(count=-1, capabilities=[["gpu"]])] if job.gpus else None
        name = f"olive-builder-{uuid.uuid4().hex[:12]}"
        env = dict(job.env)
        env["PYTHONPATH"] = CONTAINER_PACKAGE_ROOT
        container = None

        def create(requests: list[Any] | None) -> Any:
            return self.client.containers.create(
                job.image,
                command=["python", "-m", job.module, *job.args],
                name=name,
                environment=env,
                volumes=volumes,
                # Files written to mounted folders belong to the user who runs the build.
                user=f"{os.getuid()}:{os.getgid()}",
                device_requests=requests,
                labels={"org.olive-builder.job": job.module},
                detach=True,
            )

        try:
            try:
                container = create(device_requests)
                container.start()
            except docker.errors.APIError as e:
                if not (job.gpus and _no_gpu(e)):
                    raise
                # No GPU on this Docker host: build anyway; the worker finds no GPU and checks
                # the graph by a CPU cross-check, which the build record and annotations say.
                if container is not None:
                    container.remove(force=True)
                on_line(f"[olive-builder] this Docker host gives containers no GPU ({_short(e)}); "
                        "building without one: the check will be a CPU cross-check")
                container = create(None)
                container.start()
            for line in split_lines(container.logs(stream=True, follow=True)):
                on_line(line)
            status = container.wait()
            return int(status.get("StatusCode", 1))
        except docker.errors.APIError as e:
            text = str(e.explanation or e)
            if job.gpus and ("gpu" in text.lower() or "nvidia" in text.lower()):
                raise EngineError(
                    f"Docker could not give the container a GPU: {text}",
                    hint="cuda targets need an NVIDIA GPU and nvidia-container-toolkit on the Docker host.",
                ) from None
            raise EngineError(f"Docker failed to run the builder container: {text}") from None
        finally:
            if container is not None:
                try:
                    container.remove(force=True)
                except docker.errors.APIError:
                    pass


def _no_gpu(e: Exception) -> bool:
    """Docker's answer when a GPU was requested and the host has no GPU runtime to give one."""
    text = str(getattr(e, "explanation", None) or e).lower()
    # No NVIDIA runtime registered ("could not select device driver ... [[gpu]]"), or one that
    # finds no driver (nvidia-container-cli: initialization error).
    return "could not select device driver" in text or "nvidia-container-cli" in text


def connect() -> Any:
    """A docker-py client for DOCKER_HOST (or the default socket), checked to answer."""
    try:
        import docker
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise EngineError(f"docker-py is not installed: {e}") from None
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as e:
        where = os.environ.get("DOCKER_HOST", "the default Docker socket (/var/run/docker.sock)")
        raise EngineError(
            f"No Docker engine answers at {where}: {_short(e)}",
            hint="Start Docker (or Podman's socket and set DOCKER_HOST), or build on this host "
            "with --engine local.",
        ) from None
    return client


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 300 else text[:300] + "..."


def make_engine(name: str) -> LocalEngine | DockerEngine:
    if name == "local":
        return LocalEngine()
    if name == "docker":
        return DockerEngine()
    raise EngineError(f"Unknown engine {name!r}.", hint="Use --engine docker or --engine local.")
