"""Several replicas of the runtime image behind HAProxy on loopback, under load from the `openai`
client: requests spread over the replicas; a replica stopped with SIGTERM fails no request (it
drains); one killed with SIGKILL fails only what was in flight on it, and what comes after
succeeds on the others.

The parts (replica containers, the HAProxy configuration and its log, the load) are
benchmarks/replicas.py's: the test checks what the benchmark measures. The replicas are the
runtime image with a tiny model folder mounted (a runnable image is that image plus the folder as a
layer; building one here would only add time). Which replica served a request comes from each
replica's own /metrics, the `X-Replica` header HAProxy adds, and HAProxy's log.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need, write_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import replicas as harness  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.docker]

MODEL_ID = "tiny-replicas:0.1.0-cpu-fp32"
TOKENS = 48  # per request: long enough that a replica always has requests in flight under load


@pytest.fixture(scope="module")
def model(tiny_model: Path, local_engine_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model built by the pipeline: fp32 and not evaluated (the quickest build)."""
    from builder.cli import main

    root = tmp_path_factory.mktemp("replicas")
    recipe = write_recipe(root / "recipes" / "tiny-replicas", "cpu-fp32",
                          f"name: tiny-replicas\nversion: 0.1.0\nmodel:\n  path: {tiny_model}\n"
                          "target:\n  device: cpu\n  precision: fp32\ngeneration:\n  max_length: 512\n"
                          "evaluate: false\n")
    with pytest.raises(SystemExit) as info:
        main(["recipe", str(recipe), "--engine", "local", "-q", "--no-image", "-o", str(root / "out")])
    assert info.value.code == 0
    return root / "out"


@pytest.fixture
def balanced(model: Path, runtime_image: str, docker_client, tmp_path: Path  # type: ignore[no-untyped-def]
             ) -> Iterator[tuple[harness.Balancer, list[harness.Replica]]]:
    """Two replicas behind HAProxy; the containers and HAProxy are stopped whatever happens."""
    need(shutil.which("haproxy") is not None, "haproxy is not installed (apt-get install haproxy)")
    need(importlib.util.find_spec("openai") is not None, "the openai package is not installed")
    with harness.replicas(docker_client, runtime_image, model, 2, prefix="test-replica") as members, \
            harness.Balancer(tmp_path / "haproxy", members) as lb:
        yield lb, members


def test_the_balancer_spreads_requests_over_the_replicas(balanced) -> None:  # type: ignore[no-untyped-def]
    import openai

    lb, members = balanced
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{lb.port}/v1", api_key="unused", max_retries=0)
    results = [harness.stream_one(client, MODEL_ID, 8) for _ in range(12)]
    assert [r.error for r in results if not r.ok] == []
    by_header = Counter(r.replica for r in results)
    # Each replica's own count, from its /metrics: what it served, whatever the balancer says.
    served = {r.name: r.metric("olive_server_requests_total", endpoint="/v1/chat/completions", status="200")
              for r in members}
    assert by_header == served, (by_header, served)
    assert all(n >= 3 for n in served.values()), served
    records = lb.records()
    assert Counter(records[r.rid].server for r in results) == by_header


def test_a_replica_stopped_with_sigterm_fails_no_request(balanced) -> None:  # type: ignore[no-untyped-def]
    lb, members = balanced
    o = harness.outage(lb, members, MODEL_ID, kill=False, clients=6, tokens=TOKENS, before=2, after=2)
    assert o.exit_code == 0, members[0].logs()
    assert [r.error for r in o.failed] == []
    # The drain was real: requests were generating on the replica when it was told to stop, and
    # it finished them.
    assert o.on_victim() and all(o.records[r.rid].status == 200 for r in o.on_victim())
    after = o.after()
    assert after and {r.replica for r in after} == {members[1].name}


def test_a_replica_killed_fails_only_its_requests_in_flight(balanced) -> None:  # type: ignore[no-untyped-def]
    lb, members = balanced
    o = harness.outage(lb, members, MODEL_ID, kill=True, clients=6, tokens=TOKENS, before=2, after=2)
    assert o.exit_code == 137
    in_flight = o.on_victim()
    # Every failure was a request HAProxy had sent to the killed replica, still open when it died,
    # and cut off by it (not a refused connection: those go to the other replica); the kill did
    # hit some (nothing retried a generation that had started).
    assert o.failed, "the kill failed no request: it hit no request in flight"
    assert all(r in in_flight and o.cut_off(r) for r in o.failed), [(r.error, o.records.get(r.rid)) for r in o.failed]
    assert len(o.failed) <= len(in_flight)
    # What started once it was gone went to the other replica, and succeeded.
    after = o.after()
    assert after and all(r.ok for r in after) and {r.replica for r in after} == {members[1].name}
