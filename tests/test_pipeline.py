"""The pipeline as a library, one layer at a time: a fake engine (it writes what a worker would)
and a fake registry stand in for Docker, Olive and a registry. The integration tests run the
same pipeline with the real ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builder import contract, pipeline, reporting
from builder.build.engine import BuilderEnv, Job, LineSink, Mount
from builder.errors import BuildError, CheckError, OutputExistsError, RegistryError
from builder.oci import layout as oci
from builder.publish.cache import Hit

TOOLS = {"olive-ai": "0.13.0", "onnxruntime-genai": "0.14.1", "onnxruntime": "1.32.0", "transformers": "5.24.0",
         "torch": "2.13.0"}


class FakeEngine:
    """Does what a worker does, without Olive: writes a model folder and a result."""

    name = "fake"

    def __init__(self, *, fail: str | None = None, image_id: str = "sha256:" + "f" * 64):
        self.fail = fail
        self.image_id = image_id
        self.runs = 0
        self.prepared: list[str] = []

    def path_for(self, mount: Mount) -> str:
        return str(mount.source)

    def preflight(self) -> None:
        pass

    def prepare(self, image: str, spec: Any, on_log: LineSink) -> BuilderEnv:
        self.prepared.append(image)
        return BuilderEnv(self.image_id, dict(TOOLS))

    def docker(self) -> Any | None:
        return None

    def run(self, job: Job, on_line: LineSink) -> int:
        self.runs += 1
        spec = contract.WorkerSpec.read(Path(job.args[0]))
        work = Path(spec.work_dir)
        meta = work / "meta"
        meta.mkdir(parents=True, exist_ok=True)
        on_line("Running pass builder:modelbuilder")
        if self.fail == "olive":
            on_line("OSError: Error no file named model.safetensors")
            result = contract.WorkerResult(ok=False, kind="olive_failed", message="Olive failed: exit code 1.")
        else:
            model = work / "model"
            model.mkdir()
            (model / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
            (model / "model.onnx").write_bytes(b"graph" * 100)
            if self.fail != "missing-file":
                (model / "tokenizer.json").write_text("{}")
            (model / "tokenizer_config.json").write_text("{}")
            result = contract.WorkerResult(ok=True, resolved_revision=None, versions=dict(TOOLS),
                                           check={"generated_ids": [1, 2, 3], "onnxruntime_genai": "0.14.1"},
                                           extra={"evaluation": {"perplexity_ratio": 1.0}})
        contract.write_json(meta / contract.RESULT_FILE, result.to_json())
        return 0 if result.ok else 1


class Recorder:
    """A Reporter that keeps what it heard."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, str]] = []
        self.logs: list[str] = []
        self.events: list[str] = []
        self.warnings: list[str] = []

    def stage(self, stage: str, message: str) -> None:
        self.stages.append((stage, message))

    def log(self, line: str) -> None:
        self.logs.append(line)

    def event(self, message: str) -> None:
        self.events.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def progress(self, what: str, total: int) -> reporting.Progress:
        return pipeline.NullReporter().progress(what, total)


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    (model / "model.safetensors").write_bytes(b"weights")
    folder = tmp_path / "recipes" / "tiny"
    folder.mkdir(parents=True)
    path = folder / "cpu-int4.yaml"
    path.write_text(f"name: tiny\nversion: 1.0.0\nmodel:\n  path: {model}\ntarget:\n  device: cpu\n  precision: int4\n")
    return path


def options(tmp_path: Path, **kw: Any) -> pipeline.BuildOptions:
    pkg = pipeline.PackageOptions(store=tmp_path / "store", runnable_image=False,
                                  push_to=kw.pop("push_to", None))
    return pipeline.BuildOptions(builder_image="olive-builder-cpu:test", output=tmp_path / "out", package=pkg, **kw)


def test_a_build_runs_the_engine_records_and_packages(tmp_path: Path, recipe_file: Path) -> None:
    engine, heard = FakeEngine(), Recorder()
    outcome = pipeline.build(recipe_file, options(tmp_path, engine=engine), heard)
    assert engine.runs == 1 and engine.prepared == ["olive-builder-cpu:test"]
    assert outcome.built is not None and not outcome.cached and outcome.output == (tmp_path / "out").absolute()
    record = contract.BuildRecord.read(tmp_path / "out")
    assert record == outcome.built.record
    assert record.cache_key == outcome.cache_key and record.cache_key and record.cache_key.startswith("sha256:")
    assert record.builder.image_id == engine.image_id and record.tools == TOOLS
    assert record.extra["evaluation"] == {"perplexity_ratio": 1.0}  # later stages' results reach the record
    assert outcome.packaging is not None and outcome.packaging.artifact.ref == "tiny:1.0.0-cpu-int4"
    store = oci.Store(tmp_path / "store")
    desc = store.resolve("tiny:1.0.0-cpu-int4")
    assert desc is not None and desc.digest == outcome.packaging.artifact.digest
    assert store.read_json(desc.digest)["annotations"][contract.KEY_ANNOTATION] == outcome.cache_key
    assert ("convert", "olive run: builder (ModelBuilder)") not in heard.stages  # the fake ran no worker events
    assert "Running pass builder:modelbuilder" in heard.logs
    assert [s for s, _ in heard.stages][-1] == "package"


def test_a_second_build_of_the_same_inputs_is_a_cache_hit(tmp_path: Path, recipe_file: Path) -> None:
    engine = FakeEngine()
    first = pipeline.build(recipe_file, options(tmp_path, engine=engine))
    heard = Recorder()
    second = pipeline.build(recipe_file, options(tmp_path, engine=engine), heard)
    assert engine.runs == 1  # the engine did not run again
    assert second.cached and second.built is None and second.cache_key == first.cache_key
    assert second.hit is not None and second.hit.output_current and second.hit.where == "local store"
    assert any(s == "cache" and "is already this build" in m for s, m in heard.stages)
    assert second.packaging is not None and first.packaging is not None
    assert second.packaging.artifact == first.packaging.artifact
    # Without the cache, or with other tools, it builds again.
    pipeline.build(recipe_file, options(tmp_path, engine=engine, use_cache=False, force=True))
    assert engine.runs == 2
    other = FakeEngine(image_id="sha256:" + "e" * 64)  # another builder image: another key
    rebuilt = pipeline.build(recipe_file, options(tmp_path, engine=other, force=True))
    assert other.runs == 1 and rebuilt.cache_key != first.cache_key


def test_a_cache_hit_restores_a_deleted_output_folder(tmp_path: Path, recipe_file: Path) -> None:
    engine = FakeEngine()
    pipeline.build(recipe_file, options(tmp_path, engine=engine))
    import shutil

    shutil.rmtree(tmp_path / "out")
    outcome = pipeline.build(recipe_file, options(tmp_path, engine=engine))
    assert engine.runs == 1 and outcome.hit is not None and not outcome.hit.output_current
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"graph" * 100


@pytest.mark.parametrize("fail, error, text", [("olive", BuildError, "Olive failed"),
                                               ("missing-file", CheckError, "tokenizer")])
def test_a_failed_build_raises_by_cause_and_leaves_nothing(tmp_path: Path, recipe_file: Path, fail: str,
                                                          error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text) as info:
        pipeline.build(recipe_file, options(tmp_path, engine=FakeEngine(fail=fail)))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert oci.Store(tmp_path / "store").refs() == {}  # nothing packaged
    if fail == "olive":
        assert "Cause: OSError: Error no file named model.safetensors" in str(info.value)
        assert info.value.log_tail  # type: ignore[attr-defined]


def test_an_existing_output_is_a_usage_error_before_anything_runs(tmp_path: Path, recipe_file: Path) -> None:
    (tmp_path / "out").mkdir()
    engine = FakeEngine()
    with pytest.raises(OutputExistsError) as info:
        pipeline.build(recipe_file, options(tmp_path, engine=engine, use_cache=False))
    assert info.value.exit_code == 2 and engine.runs == 0


class FakeRegistry:
    """Stands in for builder.oci.registry.Registry at the pipeline's seams (push and cache lookups)."""

    manifests: dict[tuple[str, str], tuple[bytes, str, str]] = {}
    refuse: bool = False

    def __init__(self, host: str, **kw: Any):
        self.host = host

    def close(self) -> None:
        pass

    def check_push(self, repo: str) -> None:
        if self.refuse:
            raise RegistryError(f"{self.host} refused", status=403)

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str] | None:
        return self.manifests.get((repo, reference))

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        digest = oci.digest_bytes(data)
        self.manifests[(repo, reference)] = (data, media_type, digest)
        return digest


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> type[FakeRegistry]:
    from builder.oci import registry

    FakeRegistry.manifests, FakeRegistry.refuse = {}, False
    monkeypatch.setattr(registry, "Registry", FakeRegistry)
    return FakeRegistry


def test_push_goes_through_distribute_and_a_registry_hit_builds_nothing(tmp_path: Path, recipe_file: Path,
                                                                       fake_registry: type[FakeRegistry],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.publish import distribute

    pushed: list[tuple[list[str], str, str]] = []

    def fake_push(store: oci.Store, refs: list[str], host: str, namespace: str, **kw: Any) -> distribute.PushReport:
        pushed.append((refs, host, namespace))
        report = distribute.PushReport()
        for ref in refs:  # what a push leaves in a registry: the tag and the cache tag
            desc, manifest = distribute.local_manifest(store, ref)
            data = store.read_bytes(desc.digest)
            name, _, tag = ref.rpartition(":")
            fake_registry("").put_manifest(f"{namespace}/{name}", tag, data, desc.media_type)
            key = manifest["annotations"][contract.KEY_ANNOTATION]
            fake_registry("").put_manifest(f"{namespace}/{name}", contract.key_tag(key), data, desc.media_type)
            report.pushed.append((f"{host}/{namespace}/{ref}", desc.digest))
        return report

    monkeypatch.setattr(distribute, "push", fake_push)
    engine = FakeEngine()
    first = pipeline.build(recipe_file, options(tmp_path, engine=engine, push_to="reg.example/acme"))
    assert pushed == [(["tiny:1.0.0-cpu-int4"], "reg.example", "acme")]
    assert first.pushed is not None and first.pushed.refs[0].ref == "reg.example/acme/tiny:1.0.0-cpu-int4"
    # A fresh machine (empty store, no output) with the same inputs and a new version: the registry has it.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    bumped = recipe_file.read_text().replace("version: 1.0.0", "version: 1.0.1")
    recipe_file.write_text(bumped)
    heard = Recorder()
    opts = pipeline.BuildOptions(engine=engine, builder_image="olive-builder-cpu:test", output=fresh / "out",
                                 package=pipeline.PackageOptions(store=fresh / "store", runnable_image=False,
                                                                 push_to="reg.example/acme"))
    hit = pipeline.build(recipe_file, opts, heard)
    assert engine.runs == 1 and len(pushed) == 1  # built nothing, uploaded nothing
    assert isinstance(hit.hit, Hit) and hit.hit.where == "reg.example" and hit.output is None
    assert ("acme/tiny", "1.0.1-cpu-int4") in fake_registry.manifests  # tagged server-side
    assert any("found in reg.example" in m for _, m in heard.stages)


def test_push_rights_are_checked_before_the_build(tmp_path: Path, recipe_file: Path,
                                                  fake_registry: type[FakeRegistry]) -> None:
    fake_registry.refuse = True
    engine = FakeEngine()
    with pytest.raises(RegistryError) as info:
        pipeline.build(recipe_file, options(tmp_path, engine=engine, push_to="reg.example/acme"))
    assert info.value.status == 403 and engine.runs == 0 and not (tmp_path / "out").exists()


def test_the_build_record_round_trips_and_rejects_wrong_types(tmp_path: Path) -> None:
    record = contract.BuildRecord(id="m/cpu-int4", name="m", version="1", tags=("m:1-cpu-int4",),
                                  target=contract.Target("cpu", "CPUExecutionProvider", "int4"),
                                  source=contract.Source(None, None, None, True),
                                  builder=contract.BuilderInfo("0.1.0", "local", None, None),
                                  extra={"evaluation": {"x": 1}})
    record.write(tmp_path)
    assert contract.BuildRecord.read(tmp_path) == record
    data = json.loads((tmp_path / contract.INFO_FILE).read_text())
    data["tags"] = "m:1"
    with pytest.raises(contract.RecordError, match="tags"):
        contract.BuildRecord.from_json(data)
    with pytest.raises(contract.RecordError, match="name"):
        contract.BuildRecord.from_json({"version": "1", "tags": [], "target": {}})


def test_packaging_a_built_folder_again_gives_the_same_digests(tmp_path: Path, recipe_file: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    built = pipeline.build(recipe_file, options(tmp_path, engine=FakeEngine()))
    record = contract.BuildRecord.read(tmp_path / "out")
    assert record.created  # the creation time, from the inputs, travels in the record
    again = pipeline.package_folder(tmp_path / "out", pipeline.PackageOptions(store=tmp_path / "other",
                                                                              runnable_image=False))
    assert built.packaging is not None and again.artifact == built.packaging.artifact


def test_errors_printed_by_the_cli_never_show_a_secret(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from builder import console

    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    error = BuildError("the Hub said: bad token hf_secret_token_123", log_tail=["Authorization: hf_secret_token_123"])
    console.fail(error)
    err = capsys.readouterr().err
    assert "hf_secret_token_123" not in err and "the Hub said: bad token ***" in err
