"""Reproducible with the evaluation on: what was built stays in the artifact, what one run
observed (speed, seconds, the CPU, cache state) moves into the evaluation attestation, so two
builds of the same inputs give the same artifact and runnable image digests.

The unit tests use a fake engine whose every run observes other figures; the integration tests
build the tiny model twice for real (the local engine; the runnable image needs Docker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builder import contract, pipeline
from builder.build import execute
from builder.build import observed as observations
from builder.build.engine import BuilderEnv, Job, LineSink, Mount
from builder.build.evaluate import report
from builder.oci import layout as oci
from builder.oci.referrers import LocalContent
from builder.trust import evaluation_statement
from conftest import run_cli, tiny_recipe

TOOLS = {"olive-ai": "0.13.0", "onnxruntime-genai": "0.14.1", "onnxruntime": "1.32.0", "transformers": "5.24.0",
         "torch": "2.13.0"}
OBSERVED_EVALUATION = set(observations.EVALUATION_OBSERVED)  # speed, seconds, timings, source_cached


def evaluation(run: int, adapter: str | None = None) -> dict[str, Any]:
    """An evaluation as the worker reports it: the same figures every run, other times and speed."""
    return {
        "evaluated": True, "precision": "int4", "passed": True, "failures": [], "reason": None,
        "adapter": {"name": adapter, "mode": "adapter"} if adapter else None,
        "accuracy": {"perplexity": 11.0, "source_perplexity": 10.0, "perplexity_ratio": 1.1, "top1_agreement": 0.9},
        "gates": {"max_perplexity_ratio": 1.15, "min_top1_agreement": 0.75},
        "text": {"digest": "sha256:" + "0" * 64, "tokens": 2046, "windows": 2},
        "speed": {"measured": True, "load_s": 0.5 + run, "ttft_s": 0.2, "prompt_tokens": 512,
                  "prompt_tokens_per_s": 2560.0, "decode_tokens_per_s": 40.0 + run, "peak_rss_mb": 900.0 + run,
                  "cpu": {"model": f"CPU model {run}", "usable_cores": 2 + run}, "intra_op_threads": 2},
        "seconds": 10.5 + run,
        "timings": {"source_s": 1.0 + run, "built_s": 2.0, "cpu_s": 3.0 + run},
        "source_cached": run > 1,
    }


class ObservingEngine:
    """Does what a worker does, without Olive: the same model files every run, and a result whose
    observed figures (speed, seconds, the CPU, cache state) differ from run to run."""

    name = "fake"

    def __init__(self) -> None:
        self.runs = 0

    def path_for(self, mount: Mount) -> str:
        return str(mount.source)

    def preflight(self) -> None:
        pass

    def prepare(self, image: str, spec: Any, on_log: LineSink) -> BuilderEnv:
        return BuilderEnv("sha256:" + "f" * 64, dict(TOOLS))

    def docker(self) -> Any | None:
        return None

    def run(self, job: Job, on_line: LineSink) -> int:
        self.runs += 1
        work = Path(contract.WorkerSpec.read(Path(job.args[0])).work_dir)
        (work / "meta").mkdir(parents=True, exist_ok=True)
        model = work / "model"
        model.mkdir()
        (model / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
        (model / "model.onnx").write_bytes(b"graph" * 100)
        (model / "tokenizer.json").write_text("{}")
        (model / "tokenizer_config.json").write_text("{}")
        result = contract.WorkerResult(ok=True, versions=dict(TOOLS), olive_seconds=30.0 + self.runs,
                                       check={"generated_ids": [1, 2, 3], "onnxruntime_genai": "0.14.1", "mode": "native"},
                                       extra={"evaluation": evaluation(self.runs)})
        contract.write_json(work / "meta" / contract.RESULT_FILE, result.to_json())
        return 0


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    (model / "model.safetensors").write_bytes(b"weights")
    path = tmp_path / "recipes" / "tiny" / "cpu-int4.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(f"name: tiny\nversion: 1.0.0\nmodel:\n  path: {model}\ntarget:\n  device: cpu\n  precision: int4\n")
    return path


def options(tmp_path: Path, engine: Any, store: str = "store") -> pipeline.BuildOptions:
    return pipeline.BuildOptions(engine=engine, builder_image="olive-builder-cpu:test", output=tmp_path / "out",
                                 use_cache=False, force=True,
                                 package=pipeline.PackageOptions(store=tmp_path / store, runnable_image=False))


def keys(node: Any) -> set[str]:
    """Every key of a JSON document, at any depth."""
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in keys(v)}
    return set()


# ---- the record and the observed document ---------------------------------------------------------

def test_the_record_holds_what_was_built_and_the_observed_file_what_the_run_saw(tmp_path: Path) -> None:
    adapter_eval = {**evaluation(1, adapter="colors"),
                    "speed": {"measured": False, "reason": "speed is measured once per build"}}
    result = contract.WorkerResult(
        ok=True, versions=dict(TOOLS), olive_seconds=31.5, check={"generated_ids": [1, 2], "mode": "native"},
        extra={"evaluation": evaluation(1),
               "finetune": {"mode": "adapter", "method": "lora", "adapters": [
                   {"name": "colors", "file": "adapters/colors.onnx_adapter", "sha256": "sha256:" + "a" * 64,
                    "training": {"seconds": 12.5, "conversion_seconds": 4.0, "loss": 0.25},
                    "evaluation": adapter_eval}]}})
    step = contract.BuildStep(id="tiny/cpu-int4", recipe="r.yaml", recipe_digest="sha256:" + "2" * 64, name="tiny",
                              version="1", device="cpu", execution_provider="CPUExecutionProvider", precision="int4",
                              builder_image="img", gpus=False,
                              model=contract.ModelRef(hub=None, revision=None, path="/m", trust_remote_code=False),
                              olive_config={}, expected_outputs=(), tokenizer_files=(), tags=("tiny:1-cpu-int4",),
                              cache_key="sha256:" + "1" * 64)
    record = execute._record(step, result, "local", None).to_json()
    # Nothing one run observed is in the record that is packaged ...
    ev, entry = record["evaluation"], record["finetune"]["adapters"][0]
    assert not OBSERVED_EVALUATION & set(ev) and not OBSERVED_EVALUATION & set(entry["evaluation"])
    assert entry["training"] == {"loss": 0.25}
    assert "olive_seconds" not in keys(record) and "conversion_seconds" not in keys(record)
    assert not {"speed", "timings", "source_cached", "cpu"} & keys(record)
    # ... what was built is: the figures, the gates, the verdict, the text digest.
    assert ev["accuracy"]["perplexity_ratio"] == 1.1 and ev["gates"] and ev["passed"] is True
    assert ev["text"]["digest"] == "sha256:" + "0" * 64
    # The observed document has the rest, and puts the worker's result back together.
    seen = execute._observed(result)
    assert seen["olive_seconds"] == 31.5
    assert set(seen["evaluation"]) == OBSERVED_EVALUATION and seen["evaluation"]["speed"]["decode_tokens_per_s"] == 41.0
    assert seen["finetune"]["adapters"][0]["training"] == {"seconds": 12.5, "conversion_seconds": 4.0}
    whole = observations.merge(record, seen)
    assert whole["evaluation"] == evaluation(1)
    assert whole["finetune"]["adapters"][0]["training"] == {"seconds": 12.5, "conversion_seconds": 4.0, "loss": 0.25}
    assert whole["finetune"]["adapters"][0]["evaluation"] == adapter_eval


def test_the_observed_file_lies_beside_the_folder_and_names_its_record(tmp_path: Path) -> None:
    folder = tmp_path / "out" / "cpu-int4"
    folder.mkdir(parents=True)
    (folder / contract.INFO_FILE).write_text('{"name": "a"}\n')
    observations.write(folder, {"olive_seconds": 3.0})
    assert observations.path_for(folder) == tmp_path / "out" / "cpu-int4.observed.json"
    assert observations.path_for(tmp_path / "out" / "cpu-int4" / ".." / "cpu-int4") == observations.path_for(folder)
    assert observations.read(folder) == {"record": contract.sha256_file(folder / contract.INFO_FILE),
                                         "olive_seconds": 3.0}
    (folder / contract.INFO_FILE).write_text('{"name": "b"}\n')  # another build in the same folder
    assert observations.read(folder) is None, "observations of another record are never attached"
    observations.path_for(folder).write_text("not json")
    assert observations.read(folder) is None


# ---- two builds of one recipe, with the fake engine --------------------------------------------------

def attestations(store: oci.Store, ref: str) -> list[tuple[str, dict[str, Any]]]:
    desc = store.resolve(ref)
    assert desc is not None
    return evaluation_statement.attached_observations(LocalContent(store, ref.rpartition(":")[0]), desc.digest)


def test_two_builds_give_the_same_artifact_and_the_attestations_their_speed(
        tmp_path: Path, recipe_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    engine = ObservingEngine()
    first = pipeline.build(recipe_file, options(tmp_path, engine))
    first_seen = json.loads(observations.path_for(tmp_path / "out").read_text())
    first_record = (tmp_path / "out" / contract.INFO_FILE).read_bytes()
    second = pipeline.build(recipe_file, options(tmp_path, engine, store="store-2"))
    assert engine.runs == 2 and first.built is not None and second.built is not None
    assert first.packaging is not None and second.packaging is not None
    assert second.packaging.artifact == first.packaging.artifact, "the same inputs, the same artifact digest"
    assert (tmp_path / "out" / contract.INFO_FILE).read_bytes() == first_record
    assert not OBSERVED_EVALUATION & set(json.loads(first_record)["evaluation"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json", contract.INFO_FILE])
    # What each run observed lies beside the folder, and reached its own store's attestation.
    assert first_seen["evaluation"]["speed"]["decode_tokens_per_s"] == 41.0 and first_seen["olive_seconds"] == 31.0
    assert second.built.observed["evaluation"]["speed"]["decode_tokens_per_s"] == 42.0
    assert observations.read(tmp_path / "out") == second.built.observed
    ref = first.packaging.artifact.ref
    store, store_2 = oci.Store(tmp_path / "store"), oci.Store(tmp_path / "store-2")
    ((_, seen_1),) = attestations(store, ref)
    ((_, seen_2),) = attestations(store_2, ref)
    assert seen_1 == first_seen and seen_2 == second.built.observed
    manifest = store.read_json(first.packaging.artifact.digest)
    assert not [k for k in manifest["annotations"] if ".bench" in k]
    assert "decode_tokens_per_s" not in json.dumps(store.read_json(manifest["config"]["digest"]))

    # `build package DIR` attaches the folder's observations: one more evaluation statement of the
    # same manifest in the first store; the artifact itself does not change.
    code, out, err = run_cli(capsys, "package", str(tmp_path / "out"), "--no-image", "--store", str(tmp_path / "store"))
    assert code == 0, err
    assert first.packaging.artifact.digest in out
    speeds = sorted(seen["evaluation"]["speed"]["decode_tokens_per_s"] for _, seen in attestations(store, ref))
    assert speeds == [41.0, 42.0]
    # Packaging it again adds nothing.
    run_cli(capsys, "package", str(tmp_path / "out"), "--no-image", "--store", str(tmp_path / "store"))
    assert len(attestations(store, ref)) == 2

    # `build inspect` shows the speed, read from the evaluation attestations.
    code, shown, err = run_cli(capsys, "inspect", ref, "--store", str(tmp_path / "store-2"))
    assert code == 0, err
    evaluation_part = shown.split("\nevaluation:\n", 1)[1]
    assert "eval.perplexity-ratio" in evaluation_part and "observed by the build" in evaluation_part
    for row in ("bench.decode-tokens-per-s  42", "bench.cpu", "CPU model 2, 4 cores", "eval.seconds", "convert.seconds"):
        assert row in evaluation_part, evaluation_part
    code, shown, err = run_cli(capsys, "inspect", ref, "--json", "--store", str(tmp_path / "store-2"))
    assert code == 0, err
    (listed,) = json.loads(shown)["observed"]
    assert listed["evaluation"]["speed"]["decode_tokens_per_s"] == 42.0 and listed["referrer"].startswith("sha256:")


def test_attesting_stored_content_again_keeps_what_the_run_observed(tmp_path: Path, recipe_file: Path) -> None:
    from builder.publish import package
    from builder.trust import sign

    built = pipeline.build(recipe_file, options(tmp_path, ObservingEngine()))
    assert built.packaging is not None
    store, ref = oci.Store(tmp_path / "store"), built.packaging.artifact.ref
    key = sign.load_signing_key(str(_key(tmp_path)))
    assert key is not None and built.built is not None
    # `build push --sign-key` of what was packaged unsigned: the store has no run at hand.
    package.attach_stored(store, ref, key=key)
    (only,) = attestations(store, ref)
    assert only[1] == built.built.observed, "the statement attached and signed is the one with the run's figures"
    assert signed_evaluations(store, ref) == 1
    package.attach_stored(store, ref, key=key)  # again: nothing new
    assert signed_evaluations(store, ref) == 1


def _key(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = tmp_path / "key.pem"
    path.write_bytes(pem)
    return path


def signed_evaluations(store: oci.Store, ref: str) -> int:
    """How many evaluation statements are signed under the artifact's cosign ``.att`` tag."""
    from builder.oci import referrers

    desc = store.resolve(ref)
    assert desc is not None
    att = referrers.local_tagged(store, ref.rpartition(":")[0], desc.digest, referrers.ATT_SUFFIX)
    assert att is not None
    layers = store.read_json(att.digest)["layers"]
    return sum(1 for d in layers if d["annotations"].get(contract.COSIGN_PREDICATE_TYPE_ANNOTATION)
               == contract.TEST_RESULT_V01)


def test_observed_figures_read_like_the_old_bench_annotations() -> None:
    seen = {"evaluation": {k: v for k, v in evaluation(1).items() if k in OBSERVED_EVALUATION}, "olive_seconds": 31.0}
    rows = report.observed_figures(seen)
    assert rows["bench.decode-tokens-per-s"] == "41" and rows["bench.cpu"] == "CPU model 1, 3 cores"
    assert rows["eval.seconds"] == "11.5" and rows["eval.source-cached"] == "no" and rows["convert.seconds"] == "31"
    # a statement of a build made before the split holds the speed in its results: read alike
    old = {"predicate": {"configuration": [{"annotations": {"results": evaluation(1)}}]}}
    assert evaluation_statement.observed_in(old) == {"evaluation": seen["evaluation"]}


# ---- two real builds of the tiny model -------------------------------------------------------------

def build_twice(tmp_path: Path, tiny_model: Path, *, runnable_image: bool) -> list[pipeline.BuildOutcome]:
    """`build recipe --no-cache` of one recipe twice (the local engine, the evaluation on), each
    into its own output folder and store."""
    recipe = tiny_recipe(tmp_path, tiny_model, "int4")
    outcomes = []
    for i in (1, 2):
        opts = pipeline.BuildOptions(
            engine="local", output=tmp_path / f"out-{i}", use_cache=False,
            package=pipeline.PackageOptions(store=tmp_path / f"store-{i}", runnable_image=runnable_image))
        outcomes.append(pipeline.build(recipe, opts))
    return outcomes


@pytest.mark.integration
def test_two_real_builds_with_the_evaluation_give_the_same_artifact(tmp_path: Path, tiny_model: Path,
                                                                     local_engine_ready: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first, second = build_twice(tmp_path, tiny_model, runnable_image=False)
    assert first.built is not None and second.built is not None
    assert first.packaging is not None and second.packaging is not None
    one, two = tmp_path / "out-1", tmp_path / "out-2"
    record = json.loads((one / contract.INFO_FILE).read_text())
    assert record["evaluation"]["evaluated"] and record["evaluation"]["passed"], "the evaluation ran"
    assert (one / contract.INFO_FILE).read_bytes() == (two / contract.INFO_FILE).read_bytes()
    assert second.packaging.artifact == first.packaging.artifact
    # ... while the runs observed what runs observe: the speed, and the source figures from the cache.
    seen = [observations.read(one), observations.read(two)]
    assert all(s is not None and s["evaluation"]["speed"]["measured"] for s in seen)
    assert seen[1] is not None and seen[1]["evaluation"]["source_cached"] is True
    ref = first.packaging.artifact.ref
    (from_first,) = attestations(oci.Store(tmp_path / "store-1"), ref)
    assert from_first[1] == seen[0]


@pytest.mark.integration
@pytest.mark.docker
def test_two_real_builds_with_the_evaluation_give_the_same_runnable_image(
        tmp_path: Path, tiny_model: Path, local_engine_ready: None, docker_client: Any, runtime_image: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first, second = build_twice(tmp_path, tiny_model, runnable_image=True)
    assert first.packaging is not None and second.packaging is not None
    assert first.packaging.image is not None and second.packaging.image is not None
    assert second.packaging.artifact == first.packaging.artifact
    assert second.packaging.image == first.packaging.image
