"""Targets without their hardware: cuda, dml and webgpu recipes planned, built and checked here.

The model builder converts for every target on any machine; where the target's hardware is
missing (always here: no GPU, Linux) the check is a CPU cross-check of the very same graph,
and the build says so in olive-builder.json (`check.mode`) and the artifact's
`org.olive-builder.check` annotation. `--require-native-check` refuses to publish such a build.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from builder import pipeline
from builder.build import check
from builder.build import observed as observations
from builder.contract import CHECK_ANNOTATION, CHECK_CPU_CROSS, CHECK_NATIVE, INFO_FILE
from builder.errors import NativeCheckError, RecipeError
from builder.oci import layout as oci
from builder.recipe import format as recipe
from builder.recipe import plan
from builder.targets import DEVICES
from conftest import run_cli, write_recipe

PROVIDER_KEY = {"cuda": "cuda", "dml": "dml", "webgpu": "webgpu"}


def target_recipe(folder: Path, device: str, precision: str, model: str | Path = "/nonexistent",
                  extra: str = "evaluate: false\n") -> Path:
    return write_recipe(folder / "recipes" / "tiny-qwen2", f"{device}-{precision}", f"""
        name: tiny-qwen2
        version: 0.1.0
        model:
          path: {model}
        target:
          device: {device}
          precision: {precision}
        generation:
          max_length: 64
        """ + textwrap.dedent(extra))


# ---------------------------------------------------------------------------- recipes and plans


@pytest.mark.parametrize(("device", "precision"), [
    (device, precision) for device, d in DEVICES.items() for precision in d.precisions])
def test_every_device_takes_the_precisions_the_model_builder_offers(tmp_path: Path, device: str,
                                                                    precision: str) -> None:
    loaded = recipe.load(target_recipe(tmp_path, device, precision, tmp_path))
    assert loaded.recipe.target.execution_provider == DEVICES[device].provider


@pytest.mark.parametrize(("device", "precision", "says"), [
    ("dml", "bf16", "bf16 is built for CUDA only; device dml takes int4, fp16, fp32"),
    ("webgpu", "int8", "int8 is built by dynamic quantization, whose kernels are the CPU's; device webgpu takes"),
    ("cpu", "fp16", "fp16 needs device cuda, dml or webgpu"),
])
def test_precisions_a_device_does_not_take_are_refused_with_the_line(tmp_path: Path, device: str, precision: str,
                                                                     says: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe.load(target_recipe(tmp_path, device, precision, tmp_path))
    assert any(":7: target.precision: " + says in p for p in info.value.problems), info.value.problems


def test_a_provider_of_another_device_is_refused(tmp_path: Path) -> None:
    bad = write_recipe(tmp_path / "recipes" / "m", "cuda-int4", f"""
        name: m
        version: 1.0.0
        model:
          path: {tmp_path}
        target:
          device: cuda
          provider: DmlExecutionProvider
          precision: int4
        """)
    with pytest.raises(RecipeError) as info:
        recipe.load(bad)
    assert any(":7: target.provider: DmlExecutionProvider cannot run on device cuda; use CUDAExecutionProvider" in p
               for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(("device", "provider", "builder"), [
    ("cpu", "CPUExecutionProvider", "cpu"), ("cuda", "CUDAExecutionProvider", "cuda"),
    ("dml", "DmlExecutionProvider", "cpu"), ("webgpu", "WebGpuExecutionProvider", "cpu")])
def test_plan_names_olives_accelerator_and_the_builder_image_per_target(tmp_path: Path, device: str, provider: str,
                                                                       builder: str) -> None:
    loaded = recipe.load(target_recipe(tmp_path, device, "int4", tmp_path))
    step, spec = pipeline.plan_build(loaded, pipeline.BuildOptions())
    accelerator = step.olive_config["systems"]["target_system"]["accelerators"][0]
    # Olive's ModelBuilder takes `-e` from the provider and builds fp16 only for a gpu accelerator.
    assert accelerator == {"device": "cpu" if device == "cpu" else "gpu", "execution_providers": [provider]}
    assert step.execution_provider == provider and step.gpus == (device == "cuda")
    assert spec is not None and spec.flavour == builder
    assert step.builder_image.startswith(f"olive-builder-{builder}:")
    assert plan.plan(loaded, "img").olive_config == step.olive_config


def test_matrix_gives_dml_and_webgpu_targets_their_own_runners(capsys: pytest.CaptureFixture[str]) -> None:
    repo = Path(__file__).resolve().parent.parent
    code, out, err = run_cli(capsys, "matrix", "--device", "dml", "--runner-dml", "windows-latest, gpu",
                             str(repo / "recipes"))
    assert code == 0, err
    entries = json.loads(out)["include"]
    assert entries and all(e["device"] == "dml" and e["runner"] == ["windows-latest", "gpu"] for e in entries)
    code, out, _ = run_cli(capsys, "matrix", "--device", "webgpu", str(repo / "recipes"))
    assert {tuple(e["runner"]) for e in json.loads(out)["include"]} == {("ubuntu-latest",)}


# ---------------------------------------------------------------------------- the check


def _model_folder(folder: Path, provider_options: list[dict[str, object]]) -> Path:
    folder.mkdir()
    config = {"model": {"decoder": {"filename": "model.onnx",
                                    "session_options": {"log_id": "x", "provider_options": provider_options}}},
              "search": {"max_length": 64}}
    (folder / "genai_config.json").write_text(json.dumps(config))
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes(b"x" * 16)
    return folder


def test_cpu_copy_links_the_same_files_and_clears_only_the_providers(tmp_path: Path) -> None:
    model = _model_folder(tmp_path / "model", [{"cuda": {"enable_cuda_graph": "0"}}])
    copy = check.cpu_copy(model, tmp_path / "copy")
    config = json.loads((copy / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"] == {"log_id": "x", "provider_options": []}
    assert config["search"] == {"max_length": 64}
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        assert (copy / name).is_symlink() and (copy / name).resolve() == (model / name).resolve()
    # the model folder itself is untouched
    original = json.loads((model / "genai_config.json").read_text())
    assert original["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {"enable_cuda_graph": "0"}}]


@pytest.mark.parametrize(("options", "device"), [([], "cpu"), ([{"cuda": {}}], "cuda"), ([{"dml": {}}], "dml"),
                                                  ([{"webgpu": {"validationMode": "basic"}}], "webgpu")])
def test_a_folders_target_device_is_read_from_its_provider(tmp_path: Path, options: list[dict[str, object]],
                                                           device: str) -> None:
    assert check.target_device(_model_folder(tmp_path / "m", options)) == device


def test_hardware_is_missing_here_for_every_gpu_target() -> None:
    assert check.hardware_missing("cpu") is None
    assert check.hardware_missing("dml") == "DirectML runs on Windows only"
    # onnxruntime-genai's CPU package reports WebGPU as compiled in; onnxruntime has no such provider.
    assert "has no WebGpuExecutionProvider" in str(check.hardware_missing("webgpu"))
    if check._cuda_devices() == 0:
        assert check.hardware_missing("cuda") is not None


def test_require_native_refuses_a_cross_checked_build_and_passes_a_native_one(tmp_path: Path) -> None:
    pipeline.require_native("m/cpu-int4", {"mode": CHECK_NATIVE}, where=tmp_path)
    pipeline.require_native("m/cpu-int4", {}, where=tmp_path)  # records from before the field: native
    with pytest.raises(NativeCheckError) as info:
        pipeline.require_native("m/cuda-int4", {"mode": CHECK_CPU_CROSS, "reason": "no GPU"}, where=tmp_path)
    assert info.value.exit_code == 4
    assert "m/cuda-int4 was checked by a cpu-cross-check (no GPU)" in str(info.value)
    assert f"Nothing was pushed; the checked model is in {tmp_path}." in str(info.value)


def test_docker_no_gpu_answers_are_recognised() -> None:
    from builder.build.engine import _no_gpu

    assert _no_gpu(Exception('could not select device driver "" with capabilities: [[gpu]]'))
    assert _no_gpu(Exception("nvidia-container-cli: initialization error: nvml error: driver not loaded"))
    assert not _no_gpu(Exception("no space left on device"))


# ---------------------------------------------------------------------------- builds (local engine)


def _annotations(store: Path, ref: str) -> dict[str, str]:
    st = oci.open_store(store)
    desc = st.resolve(ref)
    assert desc is not None, f"{ref} is not in the store"
    return dict(st.read_json(desc.digest).get("annotations") or {})


@pytest.mark.integration
@pytest.mark.parametrize(("device", "precision"), [("cuda", "int4"), ("cuda", "fp16"), ("dml", "fp16"),
                                                   ("webgpu", "int4")])
def test_gpu_target_is_built_here_and_cross_checked_on_the_cpu(capsys, tmp_path, tiny_model, local_engine_ready,  # type: ignore[no-untyped-def]
                                                               device, precision):
    # the evaluation runs too, on the CPU copy, for one of them
    extra = "" if (device, precision) == ("cuda", "int4") else "evaluate: false\n"
    path = target_recipe(tmp_path, device, precision, tiny_model, extra)
    out, store = tmp_path / "out", tmp_path / "store"
    code, stdout, err = run_cli(capsys, "recipe", str(path), "--engine", "local", "-o", str(out),
                                "--store", str(store), "--no-image")
    assert code == 0, err
    assert "by a CPU cross-check" in err

    genai = json.loads((out / "genai_config.json").read_text())
    providers = genai["model"]["decoder"]["session_options"]["provider_options"]
    assert any(PROVIDER_KEY[device] in p for p in providers), "the shipped graph keeps its target's provider"
    info = json.loads((out / INFO_FILE).read_text())
    assert info["target"]["device"] == device and info["target"]["precision"] == precision
    assert info["check"]["mode"] == CHECK_CPU_CROSS and info["check"]["reason"]
    assert len(info["check"]["generated_ids"]) == 8
    assert sorted(p.name for p in out.iterdir() if p.is_symlink()) == [], "no links of the CPU copy in the output"
    if extra == "":
        evaluation = info["evaluation"]
        assert evaluation["evaluated"] and evaluation["passed"], evaluation
        assert evaluation["accuracy"]["perplexity_ratio"] > 0
        assert observations.full_record(out)["evaluation"]["speed"] == {
            "measured": False, "reason": f"speed not measured: cpu-cross-check ({info['check']['reason']})"}
    code, stdout, err = run_cli(capsys, "check", str(out))  # `build check` cross-checks too
    assert code == 0 and stdout.strip().endswith(f"by a CPU cross-check ({info['check']['reason']})"), err
    ann = _annotations(store, f"tiny-qwen2:0.1.0-{device}-{precision}")
    assert ann[CHECK_ANNOTATION] == CHECK_CPU_CROSS
    assert ann["org.olive-builder.device"] == device


@pytest.mark.integration
def test_require_native_check_refuses_to_publish_a_cross_checked_build(capsys, tmp_path, tiny_model,  # type: ignore[no-untyped-def]
                                                                      local_engine_ready):
    path = target_recipe(tmp_path, "cuda", "int4", tiny_model)
    out, store = tmp_path / "out", tmp_path / "store"
    code, _, err = run_cli(capsys, "recipe", str(path), "--engine", "local", "-o", str(out), "--store", str(store),
                           "--no-image", "--require-native-check")
    assert code == 4, err
    assert "tiny-qwen2/cuda-int4 was checked by a cpu-cross-check" in err
    assert "--require-native-check publishes only natively checked builds" in err
    assert (out / INFO_FILE).is_file(), "the checked model stays in the output folder"
    st = oci.open_store(store)
    assert st.resolve("tiny-qwen2:0.1.0-cuda-int4") is None, "nothing was published"
    # Without the option the cross-checked build is published; asked again with it, the cache
    # hit (its record says cpu-cross-check) is refused too, before anything is pushed.
    args = ("recipe", str(path), "--engine", "local", "-o", str(out), "--store", str(store), "--no-image")
    code, _, err = run_cli(capsys, *args, "--force")
    assert code == 0, err
    assert st.resolve("tiny-qwen2:0.1.0-cuda-int4") is not None
    code, stdout, err = run_cli(capsys, *args, "--require-native-check")
    assert code == 4 and "was built before" in stdout + err and "checked by a cpu-cross-check" in err, err


def test_cpu_target_is_checked_natively(tmp_path: Path) -> None:
    """The annotation of a build record without a mode, and of a native one, is `native`."""
    import datetime as dt

    from builder.publish.package import manifest_annotations

    created = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    base = {"name": "m", "version": "1", "tags": ["m:1-cpu-int4"], "target": {"device": "cpu"}}
    assert manifest_annotations(base, created)[CHECK_ANNOTATION] == CHECK_NATIVE
    crossed = {**base, "check": {"mode": CHECK_CPU_CROSS}}
    assert manifest_annotations(crossed, created)[CHECK_ANNOTATION] == CHECK_CPU_CROSS


# ---------------------------------------------------------------------------- builds (docker)


@pytest.mark.integration
@pytest.mark.docker
def test_dml_target_is_built_in_the_cpu_builder_container_and_packaged_without_an_image(  # type: ignore[no-untyped-def]
        capsys, tmp_path, tiny_model, cpu_builder_image):
    path = target_recipe(tmp_path, "dml", "int4", tiny_model)
    out, store = tmp_path / "out", tmp_path / "store"
    code, stdout, err = run_cli(capsys, "recipe", str(path), "-o", str(out), "--store", str(store))
    assert code == 0, err
    info = json.loads((out / INFO_FILE).read_text())
    assert info["builder"]["engine"] == "docker" and info["builder"]["image"] == cpu_builder_image
    assert info["check"] == {**info["check"], "mode": CHECK_CPU_CROSS, "reason": "DirectML runs on Windows only"}
    assert "no runnable image: there is no server image for dml targets" in err
    assert _annotations(store, "tiny-qwen2:0.1.0-dml-int4")[CHECK_ANNOTATION] == CHECK_CPU_CROSS
    assert oci.open_store(store).resolve("tiny-qwen2:0.1.0-dml-int4-serve") is None


@pytest.fixture(scope="module")
def cuda_build_in_docker(tmp_path_factory, tiny_model, docker_client):  # type: ignore[no-untyped-def]
    """A tiny cuda-int4 build made by the CUDA builder image (Dockerfile.cuda) on this GPU-less host."""
    import pytest as _pytest

    from conftest import ensure_image

    image = ensure_image(docker_client, "cuda")
    root = tmp_path_factory.mktemp("cuda-docker")
    path = target_recipe(root, "cuda", "int4", tiny_model)
    out = root / "out"
    with _pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", str(root / "state"))
        result = pipeline.build(path, pipeline.BuildOptions(
            output=out, use_cache=False, package=pipeline.PackageOptions(store=root / "store", runnable_image=False)))
    assert result.built is not None
    return image, out, result.built.log_path


@pytest.mark.integration
@pytest.mark.docker
def test_cuda_target_is_built_in_the_cuda_builder_container_without_a_gpu(cuda_build_in_docker):  # type: ignore[no-untyped-def]
    image, out, log_path = cuda_build_in_docker
    info = json.loads((out / INFO_FILE).read_text())
    assert info["builder"]["image"] == image and image.startswith("olive-builder-cuda:")
    assert info["tools"]["onnxruntime-genai-cuda"] == "0.14.1" and info["tools"]["onnxruntime-gpu"] == "1.26.0"
    if check._cuda_devices() == 0:  # no GPU on this host: Docker could not give the container one
        assert info["check"]["mode"] == CHECK_CPU_CROSS
        assert "no NVIDIA GPU is visible" in info["check"]["reason"]
        assert "this Docker host gives containers no GPU" in log_path.read_text()


@pytest.mark.integration
@pytest.mark.docker
def test_cuda_runtime_image_runs_the_cuda_graph_on_its_cpu_provider(cuda_build_in_docker, docker_client,  # type: ignore[no-untyped-def]
                                                                     tmp_path):
    """The CUDA runtime image (no nvidia base: NVIDIA's wheels) serves the cuda build through the
    OpenAI API; without a GPU, from a copy whose provider is cleared (the graph is the same)."""
    import shutil

    import openai

    from conftest import ensure_image, free_port, wait_healthy

    image = ensure_image(docker_client, "runtime-cuda")
    _, out, _ = cuda_build_in_docker
    model = tmp_path / "model"
    shutil.copytree(out, model)
    config = json.loads((model / "genai_config.json").read_text())
    check._clear_providers(config)
    (model / "genai_config.json").write_text(json.dumps(config))
    model.chmod(0o755)
    for p in model.iterdir():
        p.chmod(0o644)
    port = free_port()
    container = docker_client.containers.run(image, detach=True, ports={"8000/tcp": ("127.0.0.1", port)},
                                             volumes={str(model): {"bind": "/model", "mode": "ro"}})
    try:
        wait_healthy(port, lambda: container.reload() or container.status == "running",
                     lambda: container.logs().decode()[-2000:], timeout=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        model_id = client.models.list().data[0].id
        r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        assert r.usage is not None and r.usage.completion_tokens == 5
        labels = docker_client.images.get(image).labels
        assert labels["org.olive-builder.runtime.onnxruntime-genai"] == "0.18.0"
    finally:
        container.remove(force=True)
