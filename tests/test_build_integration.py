"""`build recipe` end to end on a tiny model made here: real Olive, real onnxruntime-genai,
with the local engine and with a real Docker engine running the CPU builder image."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from builder.contract import INFO_FILE
from conftest import no_partials, run_cli, tiny_recipe

pytestmark = pytest.mark.integration


def build(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # packaging has its own tests (test_distribute_integration)
    return run_cli(capsys, "recipe", *argv, "--no-image")


def generate(folder: Path, new_tokens: int = 6) -> list[int]:
    """Greedy tokens from the built model, with this host's onnxruntime-genai."""
    from builder.build.check import check_generates

    return check_generates(folder, new_tokens=new_tokens).generated_ids


def assert_built(out: Path, precision: str, engine: str) -> dict:
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "chat_template.jinja",
            "config.json",
            "genai_config.json",
            "generation_config.json",
            "model.onnx",
            "tokenizer.json",
            "tokenizer_config.json",
            INFO_FILE,
        ]
        + (["model.onnx.data"] if (out / "model.onnx.data").exists() else [])
    ), "Olive's bookkeeping files must not be in the model folder"
    info = json.loads((out / INFO_FILE).read_text())
    assert info["target"] == {"device": "cpu", "execution_provider": "CPUExecutionProvider", "precision": precision}
    assert info["builder"]["engine"] == engine
    assert info["tools"]["olive-ai"] == "0.13.0" and info["tools"]["onnxruntime-genai"] == "0.14.1"
    assert len(info["check"]["generated_ids"]) == 8
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == 64  # the recipe's generation defaults
    assert len(generate(out)) == 6
    assert not no_partials(out.parent)
    return info


@pytest.mark.parametrize("precision", ["int4", "fp32"])
def test_local_engine_builds_a_checked_model(capsys, tmp_path, tiny_model, local_engine_ready, precision):  # type: ignore[no-untyped-def]
    recipe = tiny_recipe(tmp_path, tiny_model, precision)
    out = tmp_path / "out" / precision
    code, stdout, err = build(capsys, str(recipe), "--engine", "local", "-o", str(out))
    assert code == 0, err
    assert f"Built tiny-qwen2/cpu-{precision}" in stdout and "generated 8 tokens" in stdout
    assert "==> convert: olive run: builder (ModelBuilder)" in err  # progress
    assert "Running pass builder:modelbuilder" in err  # Olive's log, streamed
    assert_built(out, precision, "local")


def test_fp32_model_generates_what_transformers_generates(tmp_path, tiny_model, local_engine_ready, capsys):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "fp32"
    code, _, err = build(capsys, str(tiny_recipe(tmp_path, tiny_model, "fp32")), "--engine", "local", "-o", str(out))
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
    assert generate(out) == expected


def test_int8_is_weight_only_block_quantized_or_dynamically_with_the_builder_method(capsys, tmp_path, tiny_model,  # type: ignore[no-untyped-def]
                                                                                    local_engine_ready):
    import onnx

    out = tmp_path / "int8"
    code, _, err = build(capsys, str(tiny_recipe(tmp_path, tiny_model, "int8")), "--engine", "local", "-o", str(out))
    assert code == 0, err
    assert_built(out, "int8", "local")
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMulInteger" not in ops, ops
    record = json.loads((out / INFO_FILE).read_text())
    assert record["quantization"]["settings"]["bits"] == 8 and record["quantization"]["counts"]["linear"] > 0

    out = tmp_path / "int8-builder"
    recipe = tiny_recipe(tmp_path / "b", tiny_model, "int8", extra=textwrap.indent("quantize:\n  method: builder\n", " " * 8).lstrip())
    code, _, err = build(capsys, str(recipe), "--engine", "local", "-o", str(out))
    assert code == 0, err
    assert_built(out, "int8", "local")
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops, ops


def test_failed_build_leaves_nothing_and_shows_the_log_tail(capsys, tmp_path, tiny_model, local_engine_ready, clean_copy):  # type: ignore[no-untyped-def]
    broken = clean_copy(tiny_model, "broken")
    (broken / "model.safetensors").unlink()  # config and tokenizer, but no weights
    out = tmp_path / "out" / "broken"
    code, _, err = build(capsys, str(tiny_recipe(tmp_path, broken)), "--engine", "local", "-o", str(out))
    assert code == 4, err
    assert "--- last " in err and "lines of the log ---" in err
    assert "error: Olive failed:" in err and "The full log is in" in err
    # The cause, lifted out of Olive's traceback into the message itself:
    assert "Cause: OSError: Error no file named model.safetensors" in err.rsplit("error: ", 1)[1]
    assert not out.exists() and not no_partials(tmp_path / "out")


def test_force_replaces_only_after_a_checked_build(capsys, tmp_path, tiny_model, local_engine_ready, clean_copy):  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    broken = clean_copy(tiny_model, "broken")
    (broken / "model.safetensors").unlink()
    code, _, _ = build(capsys, str(tiny_recipe(tmp_path / "b", broken)), "--engine", "local", "-o", str(out), "--force")
    assert code == 4 and (out / "old.txt").read_text() == "old"  # a failed build keeps what was there
    code, _, err = build(capsys, str(tiny_recipe(tmp_path / "g", tiny_model)), "--engine", "local", "-o", str(out), "--force")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "genai_config.json").is_file()
    assert not no_partials(tmp_path)


# ----------------------------------------------------------------------------- docker


def containers_left(docker_client) -> list:  # type: ignore[no-untyped-def]
    return docker_client.containers.list(all=True, filters={"label": "org.olive-builder.job"})


@pytest.mark.docker
@pytest.mark.parametrize("precision", ["int4", "fp32"])
def test_docker_engine_builds_a_checked_model(capsys, tmp_path, tiny_model, docker_client, cpu_builder_image, precision):  # type: ignore[no-untyped-def]
    out = tmp_path / "out" / precision
    code, stdout, err = build(capsys, str(tiny_recipe(tmp_path, tiny_model, precision)), "-o", str(out))
    assert code == 0, err
    assert f"docker engine, image {cpu_builder_image}" in err
    assert "Running pass builder:modelbuilder" in err
    info = assert_built(out, precision, "docker")
    assert info["builder"]["image"] == cpu_builder_image
    assert info["builder"]["image_id"] == docker_client.images.get(cpu_builder_image).id
    assert all(p.stat().st_uid == os.getuid() for p in out.iterdir())
    assert containers_left(docker_client) == []


@pytest.mark.docker
def test_docker_hf_token_reaches_the_build_but_no_file_or_log(capsys, tmp_path, tiny_model, docker_client,  # type: ignore[no-untyped-def]
                                                              cpu_builder_image, monkeypatch):
    secret = "hf_olivebuilderTESTsecret0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "out"
    code, stdout, err = build(capsys, str(tiny_recipe(tmp_path, tiny_model)), "-o", str(out))
    assert code == 0, err
    assert "==> auth: a Hugging Face token is available to this build" in err
    assert secret not in stdout + err
    state = Path(os.environ["XDG_STATE_HOME"])
    for folder in (out, state):
        for path in folder.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    assert containers_left(docker_client) == []


@pytest.mark.docker
def test_docker_failed_build_leaves_nothing(capsys, tmp_path, tiny_model, docker_client, cpu_builder_image, clean_copy):  # type: ignore[no-untyped-def]
    broken = clean_copy(tiny_model, "broken")
    (broken / "model.safetensors").unlink()
    out = tmp_path / "out" / "broken"
    code, _, err = build(capsys, str(tiny_recipe(tmp_path, broken)), "-o", str(out))
    assert code == 4 and "error: Olive failed:" in err and "--- last " in err
    assert not out.exists() and not no_partials(tmp_path / "out")
    assert containers_left(docker_client) == []


def _interrupt_mid_build(recipe: Path, out: Path, engine: str) -> tuple[int, str]:
    """Start `build recipe` as a user would, press Ctrl-C once Olive is running."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "builder", "recipe", str(recipe), "--engine", engine, "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # As a terminal would have it: a test run started in the background (`cmd &` without job
        # control) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        seen.append(line)
        if "==> convert:" in line or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + rest


def test_local_ctrl_c_leaves_nothing(tmp_path, tiny_model, local_engine_ready):  # type: ignore[no-untyped-def]
    out = tmp_path / "out" / "m"
    code, text = _interrupt_mid_build(tiny_recipe(tmp_path, tiny_model), out, "local")
    assert code == 130, text
    assert "Interrupted; nothing was left behind." in text and "Traceback" not in text
    assert not out.exists() and not no_partials(tmp_path / "out")


@pytest.mark.docker
def test_docker_ctrl_c_removes_the_container(tmp_path, tiny_model, docker_client, cpu_builder_image):  # type: ignore[no-untyped-def]
    out = tmp_path / "out" / "m"
    code, text = _interrupt_mid_build(tiny_recipe(tmp_path, tiny_model), out, "docker")
    assert code == 130, text
    assert "Interrupted; nothing was left behind." in text and "Traceback" not in text
    assert not out.exists() and not no_partials(tmp_path / "out")
    assert containers_left(docker_client) == []


# ----------------------------------------------------------------------------- Hub models


def _hub_recipe(tmp_path: Path, repo: str) -> Path:
    from conftest import write_recipe

    return write_recipe(
        tmp_path / "recipes" / "hub-model",
        "cpu-int4",
        f"name: hub-model\nversion: 0.1.0\nmodel:\n  hub: {repo}\n  revision: main\n"
        "target:\n  device: cpu\n  precision: int4\n",
    )


def _seed_hf_cache(model: Path, repo: str, commit: str) -> None:
    """Put ``model`` into $HF_HOME as the Hub cache would hold ``repo`` at ``commit`` (branch main)."""
    import shutil

    entry = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("engine", ["local", pytest.param("docker", marks=pytest.mark.docker)])
def test_hub_model_from_the_user_cache_records_its_commit(engine, request, capsys, tmp_path, tiny_model, monkeypatch):  # type: ignore[no-untyped-def]
    request.getfixturevalue("cpu_builder_image" if engine == "docker" else "local_engine_ready")
    repo, commit = "olive-builder-tests/tiny-qwen2", "0123456789abcdef0123456789abcdef01234567"
    _seed_hf_cache(tiny_model, repo, commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub is never asked: the cache must serve it
    out = tmp_path / "out"
    code, _, err = build(capsys, str(_hub_recipe(tmp_path, repo)), "--engine", engine, "-o", str(out))
    assert code == 0, err
    # The driver resolved main to its commit before the build (the cache key names it)
    assert f"==> fetch: fetching {repo}@{commit} from the Hugging Face Hub" in err
    source = json.loads((out / INFO_FILE).read_text())["source"]
    assert source == {"hub": repo, "revision": "main", "resolved_revision": commit, "local": False,
                      "trust_remote_code": False}
    assert len(generate(out)) == 6


@pytest.mark.parametrize("engine", ["local", pytest.param("docker", marks=pytest.mark.docker)])
def test_unknown_hub_model_fails_clearly(engine, request, capsys, tmp_path):  # type: ignore[no-untyped-def]
    request.getfixturevalue("cpu_builder_image" if engine == "docker" else "local_engine_ready")
    repo = "olive-builder-tests/no-such-model"
    out = tmp_path / "out"
    code, _, err = build(capsys, str(_hub_recipe(tmp_path, repo)), "--engine", engine, "-o", str(out))
    assert code == 4, err
    message = err.rsplit("error: ", 1)[1]
    # Unreachable Hub (here) or a Hub that says "not found" (elsewhere): either way, named and explained.
    assert repo in message and "Traceback" not in message
    assert not out.exists() and not no_partials(tmp_path)


def test_build_lock_pins_hub_recipes_and_the_build_checks_the_locked_files(capsys, tmp_path, tiny_model,  # type: ignore[no-untyped-def]
                                                                           local_engine_ready, monkeypatch):
    repo, commit = "olive-builder-tests/tiny-qwen2", "89abcdef0123456789abcdef0123456789abcdef"
    _seed_hf_cache(tiny_model, repo, commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe_file = _hub_recipe(tmp_path, repo)
    monkeypatch.chdir(tmp_path)
    # CI refuses a recipe that names a branch and has no lock entry...
    code, _, err = build(capsys, str(recipe_file), "--engine", "local", "--require-locked", "--dry-run")
    assert code == 2 and "is not pinned: revision 'main'" in err and "build lock" in err
    # ...`build lock` records the commit and the file hashes...
    code, _, err = run_cli(capsys, "lock", str(recipe_file.parent.parent))
    assert code == 0, err
    lock = json.loads((tmp_path / "olive-builder.lock").read_text())
    entry = lock["recipes"][f"{recipe_file.parent.name}/{recipe_file.stem}"]
    assert entry["commit"] == commit and entry["revision"] == "main"
    assert entry["files"]["config.json"].startswith("sha256:") and len(entry["files"]) >= 4
    code, _, err = build(capsys, str(recipe_file), "--engine", "local", "--require-locked", "--dry-run")
    assert code == 0, err
    # ...and a build whose download does not match the recorded hashes fails before Olive runs.
    entry["files"]["config.json"] = "sha256:" + "0" * 64
    (tmp_path / "olive-builder.lock").write_text(json.dumps(lock))
    code, _, err = build(capsys, str(recipe_file), "--engine", "local", "--require-locked", "-o", str(tmp_path / "out"))
    assert code == 4 and "config.json does not match the lock file" in err
    assert not (tmp_path / "out").exists() and not no_partials(tmp_path)
