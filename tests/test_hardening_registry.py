"""Pulls from a hostile registry (tests/hostile_registry.py, a real server process on 127.0.0.1)
and what credentials it gets. Every case is a clean failure: the right exit code and message,
no traceback, within a bounded time and memory, and nothing left behind (no folder, no
partial folder, no tag, no ingest file).

The pulls run through `build pull` in one child process (``_PROBE``), so that its time and peak
memory per case are measured apart from pytest's."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.errors import ReferenceError_, RegistryError
from builder.oci import layout as oci
from builder.oci.credentials import redact, sanitize
from builder.oci.reference import parse_reference
from builder.oci.registry import Registry

SERVER = Path(__file__).parent / "hostile_registry.py"
HF_SECRET = "hf_SecretTokenThatMustNeverShow123"
USER, PASSWORD = "alice", "pa55-Never-Printed"


class Hostile:
    def __init__(self, root: Path):
        self.log = root / "requests.jsonl"
        self.log.touch()
        with (root / "server.err").open("w") as err:  # a client hanging up mid-answer is noisy there
            self.proc = subprocess.Popen([sys.executable, str(SERVER), str(self.log), HF_SECRET],
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.host = f"127.0.0.1:{self.port}"

    def requests(self) -> list[dict[str, str | None]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Hostile]:
    server = Hostile(tmp_path)
    yield server
    server.stop()


_PROBE = textwrap.dedent("""
    import json, resource, sys, time
    from builder.cli import main
    results = {}
    for name, argv in json.loads(sys.argv[1]).items():
        start = time.monotonic()
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        results[name] = {"code": code, "seconds": time.monotonic() - start,
                         "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        print("@@" + name, file=sys.stderr, flush=True)
    print(json.dumps(results))
""")


def probe(cases: dict[str, list[str]], env: dict[str, str], cwd: Path, timeout: float = 300) -> tuple[
        dict[str, dict[str, float]], dict[str, str]]:
    """Run `build ARGV` for each case in one child process: results and what each printed."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    sections = proc.stderr.split("@@")
    return results, {name: sections[i] for i, name in enumerate(results)}


def _left_behind(work: Path, store: Path) -> list[str]:
    out = [str(p.relative_to(work)) for p in work.iterdir()]
    out += [f"ingest/{p.name}" for p in (store / "ingest").iterdir()] if (store / "ingest").exists() else []
    if (store / "index.json").exists():
        out += [m["annotations"][oci.ANN_REF_NAME] for m in json.loads((store / "index.json").read_text())["manifests"]]
    return out


def _report(label: str, results: dict[str, dict[str, float]], base_kb: int) -> None:
    worst = max(results, key=lambda k: results[k]["seconds"])
    peak = max(r["peak_kb"] for r in results.values())
    print(f"{label}: {len(results)} cases; worst {worst} {results[worst]['seconds']:.2f} s; "
          f"peak {peak / 1024:.0f} MB ({(peak - base_kb) / 1024:.0f} MB above the CLI's own)")


def _base_kb() -> int:
    out = subprocess.run([sys.executable, "-c", "import resource; from builder.cli import main; "
                          "import builder.publish.distribute, builder.oci.registry; "
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                         capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout)


SHAPES = {
    "not-json": "is not JSON", "deep-json": "is not JSON", "not-object": "is not a JSON object",
    "layers-string": "has no list of layers", "size-string": "layer 0 has no valid size",
    "size-negative": "layer 0 has no valid size", "digest-bad": "layer 0 has no valid sha256 digest",
    "no-config": "config is not a descriptor", "layer-not-object": "layer 0 is not a descriptor",
    "annotations-int": "annotations that are not strings", "schema-1": "schemaVersion is not 2",
    "count": "lists 5000 layers, more than the 4096 allowed", "total": "add up to",
}
TARS = {
    "sparse": "as a sparse file", "oversize": "more than the layer's declared", "nul-name": "control characters",
    "long-name": "its name is too long", "file-and-folder": "is both a file and a folder",
    "folder-then-file": "appears twice (or as both a file and a folder)", "twice": "'x' appears twice",
    "dot-dot": "outside model/", "absolute": "outside model/", "symlink": "not a plain file or folder",
    "hardlink": "not a plain file or folder", "device": "not a plain file or folder",
    "fifo": "not a plain file or folder", "not-a-tar": "is not a valid tar", "truncated": "more than the layer's declared 1500 bytes",
}


def test_hostile_content_is_refused_cleanly(hostile: Hostile, tmp_path: Path) -> None:
    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir()
    cases: dict[str, list[str]] = {}
    expect: dict[str, tuple[int, str]] = {}
    for name, text in SHAPES.items():
        cases[f"shape:{name}"] = ["pull", f"{hostile.host}/shape/m:{name}", str(work / "out"), "--store", str(store)]
        expect[f"shape:{name}"] = (5, text)
    for name, text in TARS.items():
        cases[f"tar:{name}"] = ["pull", f"{hostile.host}/tar/m:{name}", str(work / "out"), "--store", str(store)]
        expect[f"tar:{name}"] = (5, text)
    cases["many-layers-10MB"] = ["pull", f"{hostile.host}/many/m:layers", str(work / "out"), "--store", str(store)]
    expect["many-layers-10MB"] = (5, "more than the 4194304")
    cases["endless-manifest"] = ["pull", f"{hostile.host}/huge/m:t", str(work / "out"), "--store", str(store)]
    expect["endless-manifest"] = (5, "more than the 4194304")
    cases["redirect-loop"] = ["pull", f"{hostile.host}/loop/m:t", str(work / "out"), "--store", str(store)]
    expect["redirect-loop"] = (5, "more than 5 redirects")
    cases["redirect-file"] = ["pull", f"{hostile.host}/file/m:t", str(work / "out"), "--store", str(store)]
    expect["redirect-file"] = (5, "only http(s) redirects are followed")
    for name, ref in {"ref-space": f"{hostile.host}/a b:t", "ref-long": f"{hostile.host}/" + "a" * 600,
                      "ref-userinfo": "user@evil.example.com/m:t", "ref-tag": f"{hostile.host}/m:-bad"}.items():
        cases[name] = ["pull", ref, str(work / "out"), "--store", str(store)]
        expect[name] = (2, "")

    base_kb = _base_kb()
    results, said = probe(cases, {}, tmp_path)
    _report("hostile content", results, base_kb)
    for name, (code, text) in expect.items():
        r, err = results[name], said[name]
        assert r["code"] == code, f"{name}: exit {r['code']}, wanted {code}\n{err}"
        assert "Traceback" not in err and text in err, f"{name}: {text!r} not in\n{err}"
        assert r["seconds"] < 10, f"{name} took {r['seconds']:.1f} s"
    assert max(r["peak_kb"] for r in results.values()) - base_kb < 200 * 1024
    assert _left_behind(work, store) == []


def test_silent_and_dripping_registries_fail_by_the_deadline(hostile: Hostile, tmp_path: Path) -> None:
    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir()
    cases = {name: ["pull", f"{hostile.host}/{name}/m:t", str(work / "out"), "--store", str(store)]
             for name in ("silent", "drip", "dripbody")}
    results, said = probe(cases, {"OLIVE_BUILDER_REGISTRY_TIMEOUT": "3"}, tmp_path)
    _report("slow registries (deadline 3 s)", results, _base_kb())
    for name in cases:
        r, err = results[name], said[name]
        assert r["code"] == 5, f"{name}: exit {r['code']}\n{err}"
        assert "no complete answer within 3 s" in err and "OLIVE_BUILDER_REGISTRY_TIMEOUT" in err, err
        assert "Traceback" not in err
        # one deadline for the whole operation, retries included: not 5 attempts of it
        assert 2.5 < r["seconds"] < 6, f"{name} took {r['seconds']:.1f} s"
    assert _left_behind(work, store) == []


def test_the_default_deadline_is_about_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Registry("127.0.0.1:1").timeout == 60
    monkeypatch.setenv("OLIVE_BUILDER_REGISTRY_TIMEOUT", "soon")
    from builder.errors import UsageError

    with pytest.raises(UsageError, match="OLIVE_BUILDER_REGISTRY_TIMEOUT='soon'"):
        Registry("127.0.0.1:1")


def test_credentials_go_only_where_they_belong(hostile: Hostile, tmp_path: Path) -> None:
    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir()
    creds = {"OLIVE_BUILDER_REGISTRY_USERNAME": USER, "OLIVE_BUILDER_REGISTRY_PASSWORD": PASSWORD,
             "HF_TOKEN": HF_SECRET}

    def pull(repo: str, env: dict[str, str]) -> tuple[dict[str, float], str]:
        results, said = probe({repo: ["pull", f"{hostile.host}/{repo}/m:t", str(work / "out"), "--store", str(store)]},
                              env, tmp_path)
        return results[repo], said[repo]

    # environment credentials named for another registry are never sent
    before = len(hostile.requests())
    r, err = pull("basic", {**creds, "OLIVE_BUILDER_REGISTRY_HOST": "registry.example.com"})
    assert r["code"] == 5 and "requires a login and no credentials" in err, err
    assert f"OLIVE_BUILDER_REGISTRY_HOST={hostile.host}" in err  # and the hint says how to name this one
    assert all(q["authorization"] is None for q in hostile.requests()[before:])
    # named for this one, they are
    r, err = pull("basic", {**creds, "OLIVE_BUILDER_REGISTRY_HOST": hostile.host})
    assert r["code"] == 5 and "does not exist" in err, err
    assert hostile.requests()[-1]["authorization"] == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    # a token service on another host over plain HTTP gets nothing
    r, err = pull("realm-plain", {**creds, "OLIVE_BUILDER_REGISTRY_HOST": hostile.host})
    assert r["code"] == 5 and "over plain HTTP; refused" in err, err
    # on loopback it may be plain
    r, err = pull("realm-loopback", {**creds, "OLIVE_BUILDER_REGISTRY_HOST": hostile.host})
    assert r["code"] == 5 and "does not exist" in err, err
    assert hostile.requests()[-1]["authorization"] == "Bearer token-for-loopback"

    # a redirect to another host does not carry the login along
    r, err = pull("away", {**creds, "OLIVE_BUILDER_REGISTRY_HOST": hostile.host})
    assert r["code"] == 5 and "does not exist" in err, err
    away = [q for q in hostile.requests() if q["path"].startswith("/v2/away/")]
    assert away[-1]["host"] == f"localhost:{hostile.port}" and away[-1]["authorization"] is None
    assert any(q["authorization"] for q in away if q["host"] == hostile.host)

    # what a server echoes back is printed without any secret and without escape sequences
    r, err = pull("echo", {**creds, "OLIVE_BUILDER_REGISTRY_HOST": hostile.host})
    assert r["code"] == 5 and "answered 400" in err and "***" in err, err
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, basic, HF_SECRET, "\x1b"):
        assert secret not in err
    assert _left_behind(work, store) == []


def test_references_and_redaction_units() -> None:
    with pytest.raises(ReferenceError_) as info:
        parse_reference("localhost:5000/a\x00b:t")
    assert info.value.exit_code == 2
    assert redact("tok=abc%2Fdef and abc/def", ["abc/def"]) == "tok=*** and ***"
    assert sanitize("a\x1b[31mb\nc") == "a?[31mb c"
    err = RegistryError("x", status=503)
    assert err.status == 503 and err.exit_code == 5


def test_the_deadline_moves_with_progress() -> None:
    """For blobs the deadline is on progress: a transfer moving 64 kB per period lives on, a stall does not."""
    client = Registry("127.0.0.1:1", timeout=3, credentials=None)
    start = time.monotonic()
    client._watch.arm(1.0, window=True)
    for _ in range(20):  # 2 s in all, well past the 1 s window, with progress all along
        time.sleep(0.1)
        client._watch.progress(70_000)
    assert not client._watch.expired
    time.sleep(1.5)  # then a stall: the watchdog fires
    assert client._watch.expired
    client.close()
    assert time.monotonic() - start < 5
