"""Serving on this machine through Docker: what `build serve MODEL` starts by default.

What a user tries here is what they deploy: the same image, the same server, the same
onnxruntime-genai (with its Engine), the same telemetry setting.

    resolve(MODEL)  -> Served   a reference with a runnable image (``<tag>-serve``): that image,
                                fetched (verified) into the local store and loaded into Docker;
                                a model folder, or a reference without one: the runtime image of
                                its target with the folder mounted read-only at /model
    serve(Served)   -> int      ``docker run`` with the port published on --host/--port, the
                                server's options as the variables it reads, its log streamed;
                                Ctrl-C or SIGTERM stops it (the server drains), and the container
                                is removed whatever happens

The host route (`build serve --host-runtime`) stays in the CLI: it runs ``builder.serve`` in
this Python.
"""

from __future__ import annotations

import collections
import json
import shutil
import signal
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from builder import pipeline
from builder.build.engine import connect
from builder.contract import ADAPTER_TAG_SEPARATOR, SERVE_SUFFIX, BuildRecord, RecordError
from builder.errors import BuilderError, EngineError, UsageError
from builder.oci import layout as oci
from builder.oci.reference import Reference, parse_reference
from builder.oci.registry import Registry
from builder.publish import distribute
from builder.reporting import NullReporter, Reporter
from builder.targets import DEVICES

MODEL_MOUNT = "/model"  # where the runtime images' server reads the model (OLIVE_MODEL_DIR)
SERVER_PORT = 8000  # what the runtime images listen on inside the container (OLIVE_PORT)
API_KEY_ENV = "OLIVE_BUILDER_API_KEY"  # the server's variable for the key (builder.serve.app.API_KEY_ENV)
CONTAINER_PREFIX = "olive-builder-serve-"
LABEL = "org.olive-builder.serve"  # on every container `build serve` starts: `docker ps -f label=...` finds them
DEVICE_ANNOTATION = "org.olive-builder.device"  # the target's device, on the manifest and as an image label
LOG_TAIL = 30
CHUNK = 1 << 20
NO_DOCKER_HINT = ("Start Docker (or set DOCKER_HOST to a running engine), or serve in this Python with "
                  "`build serve --host-runtime` (pip install -e '.[serve]').")


@dataclass(frozen=True)
class ServerOptions:
    """`build serve`'s options, as the runtime image's server (``python -m builder.serve``) reads them."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str | None = None
    max_concurrency: int | None = None
    queue_size: int = 16
    batch_size: int | None = None
    api_key: str | None = None
    metrics_need_key: bool = False
    drain_seconds: float = 30.0

    def environment(self) -> dict[str, str]:
        """The server's variables. The key travels only here: a container's command line is
        visible to every user of the host (`ps`, `docker inspect`'s Args)."""
        env = {"OLIVE_QUEUE_SIZE": str(self.queue_size), "OLIVE_DRAIN_SECONDS": str(self.drain_seconds)}
        optional = {"OLIVE_MODEL_ID": self.model_id, "OLIVE_MAX_CONCURRENCY": self.max_concurrency,
                    "OLIVE_BATCH_SIZE": self.batch_size, API_KEY_ENV: self.api_key}
        env.update({name: str(value) for name, value in optional.items() if value})
        return env

    def arguments(self) -> list[str]:
        """Options the server has no variable for (none of them a secret)."""
        return ["--metrics-need-key"] if self.metrics_need_key else []


@dataclass(frozen=True)
class Served:
    """What runs: an image (Docker's id or tag), and the model folder mounted into it, if any."""

    image: str
    shown: str  # what the user is told runs
    folder: Path | None = None
    gpu: bool = False


# ---- what to run -------------------------------------------------------------------------------

def resolve(model: str, reporter: Reporter | None = None, *, store: Path | None = None, insecure: bool = False,
            verify_key: Path | None = None, docker: Any | None = None) -> Served:
    """The image that serves ``model`` (a folder or a reference; see the module's docstring).
    Content is found and verified before Docker is asked for anything."""
    reporter = reporter or NullReporter()
    folder = Path(model)
    if folder.exists() or not (":" in model or "@" in model):
        return _for_folder(folder, reporter, docker)
    ref = parse_reference(model)
    image_ref = _runnable_image(ref, store, insecure)
    if image_ref is None:
        folder = pipeline.pull_for_serve(model, reporter, store=store, insecure=insecure, verify_key=verify_key)
        return _for_folder(folder, reporter, docker)
    st = oci.open_store(store)
    got = distribute.fetch_model(image_ref, st, insecure=insecure or None, reporter=reporter, verify_key=verify_key)
    annotations = got.model.get("annotations") or {}
    device = str(annotations.get(DEVICE_ANNOTATION) or _device_of_config(st, got.model))
    docker = docker or docker_client()
    if _needs_gpu(device):
        require_gpu(docker, got.name)
    image_id = load_image(docker, st, got.model, got.name, reporter)
    reporter.stage("serve", f"{got.name}@{got.desc.digest} (the runnable image)")
    return Served(image_id, got.name, None, gpu=_needs_gpu(device))


def _runnable_image(ref: Reference, store: Path | None, insecure: bool) -> Reference | None:
    """``ref``'s runnable image (``<tag>-serve``) where it exists, else None. An adapter's tag and a
    bare digest name no image of their own: they are served from the folder."""
    if ref.tag is None or ADAPTER_TAG_SEPARATOR in ref.tag:
        return None
    image = ref if ref.tag.endswith(SERVE_SUFFIX) else ref.with_tag(ref.tag + SERVE_SUFFIX)
    if ref.registry is None:
        return image if oci.open_store(store).resolve(f"{image.repository}:{image.tag}") is not None else None
    registry = Registry(ref.registry, insecure=insecure or None)
    try:
        return image if registry.get_manifest(image.repository, image.reference) is not None else None
    finally:
        registry.close()


def _device_of_config(store: oci.Store, manifest: dict[str, Any]) -> str:
    """The target device a runnable image's labels name (``org.olive-builder.device``), else cpu."""
    try:
        config = store.read_json(manifest["config"]["digest"])
        return str(((config.get("config") or {}).get("Labels") or {}).get(DEVICE_ANNOTATION) or "cpu")
    except (OSError, KeyError, ValueError, AttributeError):
        return "cpu"


def _needs_gpu(device: str) -> bool:
    return device in DEVICES and DEVICES[device].runtime_flavour == "runtime-cuda"


def _for_folder(folder: Path, reporter: Reporter, docker: Any | None) -> Served:
    """The runtime image of the folder's target (built once if Docker lacks it), the folder mounted."""
    try:
        device = BuildRecord.read(folder).target.device
    except (OSError, RecordError):
        device = "cpu"  # a model folder not made by `build recipe`: served as a CPU model
    flavour = DEVICES[device].runtime_flavour if device in DEVICES else None
    if flavour is None:
        raise UsageError(f"{folder} is built for {device}, and no runtime image serves {device} on Linux.",
                         hint="Serve it where its provider runs, or build a cpu or cuda target.")
    docker = docker or docker_client()
    if _needs_gpu(device):
        require_gpu(docker, str(folder))
    tag = pipeline.runtime_image(docker, device, pipeline.ImageSettings(), reporter)
    reporter.stage("serve", f"{folder} in {tag}")
    return Served(tag, str(folder), folder.absolute(), gpu=_needs_gpu(device))


def docker_client() -> Any:
    try:
        return connect()
    except EngineError as e:
        raise EngineError(e.message, hint=NO_DOCKER_HINT) from None


def require_gpu(docker: Any, shown: str) -> None:
    """Refuse a cuda model before any image is built when Docker cannot hand out a GPU: `--gpus`
    needs NVIDIA's runtime (registered with the engine) or its hook (found by a local engine)."""
    try:
        runtimes = (docker.info() or {}).get("Runtimes") or {}
    except Exception:  # noqa: BLE001 - the start below still says it clearly
        return
    if "nvidia" in runtimes or shutil.which("nvidia-container-runtime-hook"):
        return
    raise EngineError(f"{shown} is a cuda model, and this Docker engine has no NVIDIA runtime to give it a GPU.",
                      hint="Install the NVIDIA Container Toolkit and restart Docker, or serve a cpu build.")


# ---- a runnable image from the store into Docker --------------------------------------------------

def load_image(docker: Any, store: oci.Store, manifest: dict[str, Any], name: str,
               reporter: Reporter | None = None) -> str:
    """Docker's id of the image ``manifest`` describes, loaded from ``store`` (``docker load`` in the
    format every engine reads: its manifest.json, the config and the layers as they are stored,
    streamed). Docker's image id is the config's digest, so what runs is what was verified."""
    import docker.errors as docker_errors

    reporter = reporter or NullReporter()
    image_id = str(manifest["config"]["digest"])
    repo, _, tag = name.rpartition(":")
    try:
        image = docker.images.get(image_id)
    except docker_errors.ImageNotFound:
        image = None
    except docker_errors.APIError as e:
        raise EngineError(f"Docker could not look up {name}: {e.explanation or e}") from None
    if image is None:
        layers = [str(d["digest"]) for d in manifest["layers"]]
        size = sum(int(d["size"]) for d in manifest["layers"])
        reporter.stage("serve", f"loading {name} into Docker ({size / 1e6:.1f} MB)")
        try:
            docker.images.load(_docker_archive(store, image_id, layers, name))
            image = docker.images.get(image_id)
        except docker_errors.DockerException as e:
            raise EngineError(f"Docker could not load {name}: {getattr(e, 'explanation', None) or e}",
                              hint="`docker info` shows whether the engine is healthy and has space.") from None
    elif repo and f"{repo}:{tag}" not in (image.tags or []):
        image.tag(repo, tag)
    return image_id


def _docker_archive(store: oci.Store, config: str, layers: list[str], name: str) -> Iterator[bytes]:
    """The `docker save` archive of one image, made as it is sent. Layers go as stored (gzip or
    plain tar): `docker load` unpacks either and checks them against the config's diff ids."""
    def member(arcname: str, size: int) -> bytes:
        info = tarfile.TarInfo(arcname)
        info.size, info.mode = size, 0o644
        return info.tobuf(format=tarfile.PAX_FORMAT)

    def blob(digest: str, arcname: str) -> Iterator[bytes]:
        path = store.blob_path(digest)
        size = path.stat().st_size
        yield member(arcname, size)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        yield b"\0" * (-size % tarfile.BLOCKSIZE)

    def hexname(digest: str) -> str:
        return digest.split(":", 1)[1]

    entry = [{"Config": hexname(config) + ".json", "RepoTags": [name] if ":" in name else None,
              "Layers": [f"{hexname(d)}/layer.tar" for d in layers]}]
    index = json.dumps(entry).encode()
    yield member("manifest.json", len(index)) + index + b"\0" * (-len(index) % tarfile.BLOCKSIZE)
    yield from blob(config, hexname(config) + ".json")
    for d in dict.fromkeys(layers):  # a layer listed twice is one file in the archive
        yield from blob(d, f"{hexname(d)}/layer.tar")
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


# ---- running it --------------------------------------------------------------------------------

class _Stop(Exception):
    """Ctrl-C or SIGTERM arrived: stop the container, letting the server drain."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve(served: Served, options: ServerOptions, reporter: Reporter | None = None, *,
          on_line: Callable[[str], None] = lambda line: None, docker: Any | None = None) -> int:
    """Run ``served`` in a new container until it stops or we are told to stop (SIGINT, SIGTERM:
    ``docker stop``, so the server finishes in-flight requests). Returns 0; a server that stops
    on its own with another code (a model that cannot load: 1) raises, with its log's end. The
    container is removed in every case."""
    import docker.errors as docker_errors
    from docker.types import DeviceRequest

    reporter = reporter or NullReporter()
    docker = docker or docker_client()
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    for s in previous:
        signal.signal(s, _raise_stop)
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
    container: Any = None
    try:
        try:
            container = docker.containers.create(
                served.image, command=options.arguments(), name=CONTAINER_PREFIX + uuid.uuid4().hex[:12],
                environment=options.environment(), labels={LABEL: served.shown[:200]},
                ports={f"{SERVER_PORT}/tcp": (options.host, options.port)},
                volumes={str(served.folder): {"bind": MODEL_MOUNT, "mode": "ro"}} if served.folder else None,
                device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])] if served.gpu else None)
            container.start()
            reporter.stage("serve", f"{served.shown} in container {container.name}, on "
                                    f"http://{_published(container, options)}/v1 (Ctrl-C stops it)")
            for line in _lines(container.logs(stream=True, follow=True)):
                tail.append(line)
                on_line(line)
            code = int(container.wait().get("StatusCode", 1))
        except _Stop as stop:
            reporter.stage("serve", f"{stop}: stopping the server (in-flight requests finish, at most "
                                    f"{options.drain_seconds:.0f} s)")
            if container is not None:
                try:
                    container.stop(timeout=int(options.drain_seconds) + 5)
                except _Stop:
                    reporter.warn("stopping at once")  # a second Ctrl-C: the removal below kills it
                except docker_errors.APIError:
                    pass
            return 0
        except docker_errors.APIError as e:
            raise _start_error(e, served, options) from None
    finally:
        for s in previous:  # a signal now must not cut the removal short
            signal.signal(s, signal.SIG_IGN)
        if container is not None:
            try:
                container.remove(force=True)
            except docker_errors.APIError:
                pass
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code:
        why = f"the model in {served.shown} could not be loaded" if code == 1 else "see its log above"
        raise BuilderError(f"The server stopped with exit code {code}: {why}.", log_tail=list(tail)[-20:],
                           hint="The end of the server's log is above.")
    return 0


def _published(container: Any, options: ServerOptions) -> str:
    """HOST:PORT the server answers on (Docker's own choice where --port is 0)."""
    port = options.port
    try:
        container.reload()
        bound = container.attrs["NetworkSettings"]["Ports"][f"{SERVER_PORT}/tcp"]
        port = int(bound[0]["HostPort"])
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    host = options.host if ":" not in options.host else f"[{options.host}]"
    return f"{host}:{port}"


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Whole lines of a container's log stream (Docker's frames split it anywhere)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *done, pending = pending.split(b"\n")
        for line in done:
            yield line.decode("utf-8", "replace").rstrip("\r")
    if pending:
        yield pending.decode("utf-8", "replace")


def _start_error(e: Any, served: Served, options: ServerOptions) -> BuilderError:
    text = str(getattr(e, "explanation", None) or e)
    if "port is already allocated" in text or "address already in use" in text:
        return UsageError(f"Port {options.port} on {options.host} is taken: {text}",
                          hint="Choose another --port, or stop what listens there.")
    if "could not select device driver" in text or "nvidia" in text.lower():
        return EngineError(f"Docker could not give {served.shown} a GPU: {text}",
                           hint="Install the NVIDIA Container Toolkit and restart Docker, or serve a cpu build.")
    return EngineError(f"Docker could not start {served.image}: {text}")
