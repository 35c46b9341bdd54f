"""The local store and output folders under faults: a writer killed with -9, `build gc`, two
pulls or builds racing for one output folder, and creation times that come from the inputs."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from builder.build import execute  # noqa: E402
from builder.errors import OutputExistsError  # noqa: E402
from builder.oci import layout as oci
from builder.oci.media import MODEL_WEIGHT
from builder.publish import package
from builder.recipe import inputs
from conftest import run_cli  # noqa: E402
from test_package import fake_model  # noqa: E402

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)

_WRITER = textwrap.dedent("""
    import sys, time
    from builder.oci import layout as oci
    store = oci.Store(sys.argv[1])
    with store.writer() as w:
        chunk = b"x" * (1 << 20)
        for _ in range(int(sys.argv[2])):
            w.write(chunk)
        print("written", flush=True)
        time.sleep(600)  # until killed
""")


def _writer(store: Path, mb: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(store), str(mb)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    return proc


def test_ingest_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "store"
    oci.Store(root)
    live, dead = _writer(root, 8), _writer(root, 64)
    try:
        files = {p.name: p for p in (root / "ingest").iterdir()}
        assert len(files) == 2 and all(name.startswith("blob-") for name in files)
        dead_file = next(p for n, p in files.items() if n.startswith(f"blob-{dead.pid}-"))
        live_file = next(p for n, p in files.items() if n.startswith(f"blob-{live.pid}-"))
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        store = oci.Store(root)  # opening the store cleans only files older than a few seconds...
        assert dead_file.exists()
        start = time.monotonic()
        freed = store.clean_ingest(min_age=0)  # ...or any age: the lock, not the age, decides
        took = time.monotonic() - start
        assert freed == 64 << 20 and not dead_file.exists()
        assert live_file.exists() and live_file.stat().st_size == 8 << 20  # a live writer's file stays
        assert took < 1
        os.utime(live_file, (1, 1))  # however old it looks
        oci.Store(root)  # (opening cleans files older than a few seconds)
        assert oci.Store(root).clean_ingest(min_age=0) == 0 and live_file.exists()
    finally:
        for proc in (live, dead):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    oci.Store(root)  # once its writer is gone too, opening the store takes it (it looks old)
    assert list((root / "ingest").iterdir()) == []


def test_gc_removes_what_no_tag_reaches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = oci.Store(tmp_path / "store")
    model = fake_model(tmp_path / "m")
    kept = package.package(model, store, created=T0)
    orphan = store.put_bytes(b"o" * 100_000, MODEL_WEIGHT)
    old = package.package(fake_model(tmp_path / "m2", target="cpu-int8", weights=b"v" * 200_000), store, created=T0)
    store.tag(kept.artifact_ref.split(":")[0] + ":other", kept.artifact)
    # untag the second model: its layers and config become garbage, shared ones do not
    index = json.loads((store.root / "index.json").read_text())
    index["manifests"] = [m for m in index["manifests"] if m["digest"] != old.artifact.digest]
    (store.root / "index.json").write_text(json.dumps(index))
    before = {p.name for p in store.blobs.iterdir()}

    report = oci.gc(store)  # everything is younger than the grace period: nothing goes
    assert report.removed == 0 and {p.name for p in store.blobs.iterdir()} == before

    code, out, err = run_cli(capsys, "gc", "--grace", "0", "--dry-run", "--store", str(store.root))
    assert code == 0 and "would remove" in out and {p.name for p in store.blobs.iterdir()} == before
    code, out, err = run_cli(capsys, "gc", "--grace", "0", "--store", str(store.root))
    assert code == 0, err
    after = {p.name for p in store.blobs.iterdir()}
    gone = before - after
    assert orphan.digest[7:] in gone and old.artifact.digest[7:] in gone
    assert f"removed {len(gone)} blob(s)" in out and "bytes freed" in out
    freed = int(out.split("blob(s), ")[1].split(" bytes")[0])
    assert freed >= 300_000
    for d in oci.reachable(store):  # what is tagged is whole
        assert store.has(d)
    code, out, err = run_cli(capsys, "pull", kept.artifact_ref, str(tmp_path / "again"), "--store", str(store.root))
    assert code == 0, err


_RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from builder.publish import distribute
    from builder.oci import layout as oci

    real = distribute.check_files
    def slow(folder, *a, **k):  # both racers pass the "already exists?" check before either lands
        time.sleep(1.0)
        return real(folder, *a, **k)
    distribute.check_files = slow
    store = oci.Store(sys.argv[1])
    manifest = json.loads(store.read_bytes(sys.argv[2]))
    try:
        distribute.materialize(store, manifest, Path(sys.argv[3]), force=False, shown="race")
        print("ok")
    except Exception as e:
        print(type(e).__name__, getattr(e, "exit_code", None), e)
""")


def test_two_pulls_to_one_folder_exactly_one_lands(tmp_path: Path) -> None:
    store = oci.Store(tmp_path / "store")
    packaged = package.package(fake_model(tmp_path / "m"), store, created=T0)
    dest = tmp_path / "out" / "model"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(store.root), packaged.artifact.digest, str(dest)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs[1] == "ok", outs
    assert outs[0].startswith("OutputExistsError 2 ") and "appeared meanwhile" in outs[0], outs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]  # no partial folder left
    assert (dest / "genai_config.json").is_file()


def test_a_build_whose_output_appeared_meanwhile_is_not_put_in_place(tmp_path: Path) -> None:
    work = tmp_path / ".out.partial-x"
    (work / "model").mkdir(parents=True)
    (work / "model" / "mine").write_text("new")
    output = tmp_path / "out"
    output.mkdir()
    (output / "theirs").write_text("first")
    with pytest.raises(OutputExistsError, match="appeared meanwhile") as info:
        execute._replace(work / "model", output, work, force=False)
    assert info.value.exit_code == 2
    assert [p.name for p in output.iterdir()] == ["theirs"]
    execute._replace(work / "model", output, work, force=True)  # --force replaces
    assert [p.name for p in output.iterdir()] == ["mine"]


def test_creation_time_comes_from_the_inputs_without_settings_or_git(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """No SOURCE_DATE_EPOCH, a recipe outside git: the same inputs give the same digests, however
    new the build's own files are."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above: really outside git
    source = tmp_path / "models" / "tiny"
    source.mkdir(parents=True)
    for i, name in enumerate(["config.json", "model.safetensors", "tokenizer.json"]):
        (source / name).write_text(name)
        os.utime(source / name, (1_600_000_000 + i, 1_600_000_000 + i))
    recipe_file = tmp_path / "recipes" / "tiny" / "cpu-int4.yaml"
    recipe_file.parent.mkdir(parents=True)
    recipe_file.write_text(f"name: tiny\nversion: 1.0.0\nmodel:\n  path: {source}\n"
                           "target:\n  device: cpu\n  precision: int4\n")
    digests = []
    for attempt in range(2):
        out = fake_model(tmp_path / f"out{attempt}")  # a fresh build: every file as new as now
        created = inputs.created_time(recipe_file, out)
        assert created.timestamp() == 1_600_000_002  # the newest file of the source model
        digests.append(package.package(out, oci.Store(tmp_path / f"store{attempt}"), created=created).artifact.digest)
        time.sleep(1.1)
    assert digests[0] == digests[1]
    # nothing known about the inputs' times: a fixed epoch, still never the clock
    assert inputs.created_time(None, tmp_path / "out0").timestamp() == 0
    hub_recipe = recipe_file.with_name("cpu-fp32.yaml")
    hub_recipe.write_text("name: tiny\nversion: 1.0.0\nmodel:\n  hub: a/b\ntarget:\n  device: cpu\n  precision: fp32\n")
    assert inputs.created_time(hub_recipe, tmp_path / "out0").timestamp() == 0
    commit_time = dt.datetime(2025, 5, 5, tzinfo=dt.UTC)
    assert inputs.created_time(hub_recipe, tmp_path / "out0", source_time=commit_time) == commit_time
