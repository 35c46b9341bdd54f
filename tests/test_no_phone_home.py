"""Nothing phones home: while a model loads and serves, the server attempts no connection beyond
loopback, in the runtime image and on `build serve --host-runtime`.

onnxruntime-genai 0.18 (the runtime images' and the server environment's) carries a telemetry
client. With it on, ~9 s after the library loads it resolves mobile.events.data.microsoft.com
(glibc's resolver connect()s a UDP socket to the nameserver) and writes a device id under
~/.cache/Microsoft; `og.disable_telemetry_events()` alone does not stop that, ORT_DISABLE_TELEMETRY
does (measured here with the same probe). So each test serves for HOLD seconds past that point.

The attempts are observed, not merely blocked: every connect(), sendto() and sendmsg() of the
server and its threads is traced with strace. In the image (no shell, no strace, uid 1000,
`--network none`) the host's strace and the few libraries it needs are bind-mounted read-only
and started through the image's own dynamic loader, and it starts the image's entrypoint
(``python3 -m builder.serve``) as its child: tracing one's own child needs no capability under
Docker's default seccomp profile, and attaching to an already running container would miss the
load. A bind() to the server's port in the trace shows the probe really followed the server.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, need, wait_healthy
from test_serve_docker import MODEL_ID, build_tiny

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
STRACE = shutil.which("strace")
TRACE = ["-f", "-qq", "-e", "trace=connect,sendto,sendmsg,bind", "-e", "signal=none"]
HOLD = 15.0  # seconds served after the first answer: the telemetry's first lookup came ~9 s after load
SERVE_PYTHON = os.environ.get("OLIVE_BUILDER_SERVE_PYTHON") or str(REPO / ".ci-state" / "serve-venv" / "bin" / "python")
_CALL = re.compile(r"\b(connect|sendto|sendmsg)\(")
_ADDRESS = re.compile(r'sa_family=(AF_INET6?), sin6?_port=htons\((\d+)\).*?'
                      r'(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")')


def outbound(trace: str) -> list[str]:
    """Traced calls that address anything but loopback, or a DNS server even on loopback (a
    lookup is the first step of calling out, and resolvers such as systemd's listen on 127.0.0.53)."""
    found = []
    for line in trace.splitlines():
        if not _CALL.search(line):
            continue
        for m in _ADDRESS.finditer(line):
            address = ipaddress.ip_address(m.group(3) or m.group(4))
            mapped = getattr(address, "ipv4_mapped", None)
            if not (mapped or address).is_loopback or int(m.group(2)) == 53:
                found.append(line.strip())
    return found


def test_the_probe_flags_what_telemetry_does() -> None:
    """Lines strace printed here for onnxruntime-genai 0.18 with telemetry on (in the image with
    `--network none`, and on the host), and the server's own calls, which are fine."""
    telemetry = [
        '[pid    24] connect(12, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16)'
        ' = -1 ENETUNREACH (Network is unreachable)',
        '20191 connect(17, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16 '
        '<unfinished ...>',
        '7 connect(5, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "2603:1030::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH',
        '8 connect(3, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16) = 0',
    ]
    assert outbound("\n".join(telemetry)) == telemetry
    fine = [
        '[pid    23] connect(12, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT',
        '19706 sendto(7, "HTTP/1.1 503 Service Unavailable"..., 142, 0, NULL, 0) = 142',
        '9 connect(4, {sa_family=AF_INET, sin_port=htons(8000), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '9 bind(4, {sa_family=AF_INET, sin_port=htons(8000), sin_addr=inet_addr("0.0.0.0")}, 16) = 0',
    ]
    assert outbound("\n".join(fine)) == []


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, local_engine_ready: None) -> Path:
    return build_tiny(tmp_path_factory, tiny_model)


def serve_site_packages() -> str:
    """The server environment's site-packages (onnxruntime-genai 0.18 and its telemetry client)."""
    probe = ("import sysconfig, onnxruntime_genai as og; assert og.__version__.startswith('0.18'); "
             "print(sysconfig.get_paths()['purelib'])")
    found = subprocess.run([SERVE_PYTHON], input=probe, capture_output=True, text=True) \
        if Path(SERVE_PYTHON).is_file() else None
    need(found is not None and found.returncode == 0,
         f"no server environment with onnxruntime-genai 0.18 at {SERVE_PYTHON} (.ci/run makes it)")
    assert found is not None
    return found.stdout.strip()


def complete(port: int) -> None:
    body = json.dumps({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] >= 1


def test_build_serve_on_the_host_calls_nowhere(tiny_folder: Path, tmp_path: Path) -> None:
    """`build serve --host-runtime` with onnxruntime-genai 0.18 in front on the path (this Python has
    the build side's 0.14.1, which has no telemetry client: tracing it would prove nothing)."""
    need(STRACE is not None, "strace is not installed (apt-get install strace)")
    assert STRACE is not None
    site = serve_site_packages()
    port = free_port()
    home = tmp_path / "home"  # where the telemetry would keep its device id
    trace, log = tmp_path / "strace.txt", tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "HOME": str(home)}
    env.pop("ORT_DISABLE_TELEMETRY", None)  # `build serve` must turn it off by itself
    with log.open("wb") as sink:
        proc = subprocess.Popen([STRACE, *TRACE, "-o", str(trace), sys.executable, "-m", "builder", "serve",
                                 str(tiny_folder), "--host-runtime", "--port", str(port)],
                                stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(port, lambda: proc.poll() is None, log.read_text, timeout=120)
        complete(port)
        time.sleep(HOLD)
        complete(port)
    finally:
        # SIGTERM to `build serve` itself (strace's child): it drains and exits, and strace with it
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            os.kill(int(child), signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "onnxruntime-genai 0.18" in text, text  # the version with the telemetry client served
    traced = trace.read_text()
    assert re.search(rf"bind\(\d+, {{sa_family=AF_INET, sin_port=htons\({port}\)", traced), "strace missed the server"
    assert outbound(traced) == []
    assert not (home / ".cache" / "Microsoft").exists()


def strace_mounts() -> tuple[dict[str, dict[str, str]], list[str]]:
    """The host's strace and the libraries it loads beyond glibc, for a bind mount, and the
    command that starts it through the image's own loader with only those libraries added."""
    assert STRACE is not None
    libs = []
    for line in subprocess.run(["ldd", STRACE], capture_output=True, text=True, check=True).stdout.splitlines():
        m = re.search(r"=> (/\S+)", line)
        if m and not re.search(r"/lib(c|m|pthread|dl)\.so", m.group(1)):
            libs.append(m.group(1))
    mounts = {STRACE: {"bind": "/opt/probe/strace", "mode": "ro"}}
    mounts.update({lib: {"bind": f"/opt/probe/lib/{Path(lib).name}", "mode": "ro"} for lib in libs})
    loader = ["/lib64/ld-linux-x86-64.so.2", "--library-path", "/opt/probe/lib", "/opt/probe/strace"]
    return mounts, loader


@pytest.mark.docker
def test_the_runtime_image_calls_nowhere(tiny_folder: Path, runtime_image: str, docker_client: Any) -> None:
    need(STRACE is not None, "strace is not installed (apt-get install strace)")
    need(os.uname().machine == "x86_64", "the probe starts strace through the x86-64 loader")
    mounts, loader = strace_mounts()
    mounts[str(tiny_folder)] = {"bind": "/model", "mode": "ro"}
    container = docker_client.containers.run(
        runtime_image, entrypoint=[*loader, *TRACE, "python3", "-m", "builder.serve"], detach=True,
        network_mode="none", volumes=mounts)  # the image's own user, environment and seccomp profile

    def inside(code: str) -> int:  # a client in the container's network namespace (it has no other)
        return int(container.exec_run(["python3", "-c", code]).exit_code)

    health = "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=2)"
    completion = ("import json, urllib.request as u; r = u.Request('http://127.0.0.1:8000/v1/completions', "
                  f"json.dumps({{'model': '{MODEL_ID}', 'prompt': 'Hello', 'max_tokens': 4}}).encode(), "
                  "{'Content-Type': 'application/json'}); "
                  "assert json.loads(u.urlopen(r, timeout=30).read())['usage']['completion_tokens'] >= 1")
    try:
        deadline = time.monotonic() + 60
        while inside(health) != 0:
            container.reload()
            assert container.status == "running", container.logs().decode()[-3000:]
            assert time.monotonic() < deadline, container.logs().decode()[-3000:]
            time.sleep(0.3)
        assert inside(completion) == 0
        time.sleep(HOLD)
        assert inside(completion) == 0
        container.stop(timeout=5)  # PID 1 is strace, which does not pass SIGTERM on: the window above is what counts
        logs = container.logs().decode("utf-8", "replace")
    finally:
        container.remove(force=True)
    assert "ORT_DISABLE_TELEMETRY=1" in docker_client.images.get(runtime_image).attrs["Config"]["Env"]
    assert re.search(r"bind\(\d+, {sa_family=AF_INET, sin_port=htons\(8000\)", logs), logs[-3000:]
    assert "onnxruntime-genai 0.18" in logs
    assert outbound(logs) == []
