"""The evaluation stage with real models: a tiny model trained here for a few seconds on the
committed text (peaked next-token distributions, like a real model's), built by `build recipe`
with the local engine at fp32, int8 and int4, and a copy whose weights were damaged after
conversion."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from builder.build import evaluate as ev
from builder.build import measure, source_figures
from builder.build import observed as observations
from builder.build.evaluate import gates as ev_gates
from builder.errors import EvaluationError
from conftest import need, no_partials, run_cli, tiny_recipe
from tinymodel import damage_weights, make_trained_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(importlib.util.find_spec("torch") is not None, "torch and transformers are not installed")
    return make_trained_tiny_model(tmp_path_factory.mktemp("models") / "tiny-trained")


@pytest.fixture(scope="session")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Output folder and `build recipe` stderr of each precision, built once per session."""
    return {}


def build(capsys: pytest.CaptureFixture[str], root: Path, model: Path, precision: str, extra: str = "",
          ) -> tuple[int, str, Path]:
    out = root / "out" / precision
    # tiny_recipe's body ends indented: the extra lines take that indentation
    recipe = tiny_recipe(root, model, precision, textwrap.indent(extra, " " * 8).lstrip())
    code, _, err = run_cli(capsys, "recipe", str(recipe), "--engine", "local", "-o", str(out), "--no-image")
    return code, err, out


def built(capsys: pytest.CaptureFixture[str], builds: dict[str, tuple[Path, str]], trained: Path,
          tmp_path_factory: pytest.TempPathFactory, precision: str) -> tuple[Path, str]:
    if precision not in builds:
        code, err, out = build(capsys, tmp_path_factory.mktemp(f"build-{precision}"), trained, precision)
        assert code == 0, err
        builds[precision] = (out, err)
    return builds[precision]


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_build_recipe_evaluates_and_annotates(capsys, builds, trained_model, tmp_path_factory, local_engine_ready,
                                              precision):  # type: ignore[no-untyped-def]
    out, err = built(capsys, builds, trained_model, tmp_path_factory, precision)
    assert "==> evaluate:" in err and "within the gates" in err
    record = json.loads((out / "olive-builder.json").read_text())
    data = record["evaluation"]
    acc = data["accuracy"]
    assert data["evaluated"] and data["passed"] and data["gates"] == ev_gates.gates_for(precision)
    assert data["text"]["digest"] == measure.load_text().digest and data["text"]["tokens"] >= 1000
    if precision == "fp32":
        assert abs(acc["perplexity_ratio"] - 1.0) <= 1e-3
        assert acc["top1_agreement"] >= 0.99 and acc["greedy_prefix_min"] == source_figures.GREEDY_TOKENS
    # trained, so peaked: far from the uniform distribution's perplexity (the vocabulary size)
    assert acc["source_perplexity"] < 150
    assert "speed" not in data  # what this machine observed is beside the folder, not in the artifact
    # The source's figures were computed while Olive converted (or, for a later precision, kept
    # by that): the stage read them from the cache.
    assert observations.full_record(out)["evaluation"]["source_cached"] is True
    speed = observations.full_record(out)["evaluation"]["speed"]
    assert speed["measured"] and speed["prompt_tokens"] == 512 and speed["decode_tokens"] == 128
    assert speed["decode_tokens_per_s"] > 0 and speed["peak_rss_mb"] > 0 and speed["cpu"]["usable_cores"] >= 1
    # the annotations of the packaged artifact, as `build inspect` shows them
    tag = record["tags"][0]
    code, _, err = run_cli(capsys, "package", str(out), "--no-image")  # into this test's own store
    assert code == 0, err
    code, shown, err = run_cli(capsys, "inspect", tag)
    assert code == 0, err
    assert re.search(rf"org\.olive-builder\.eval\.perplexity-ratio +{re.escape(format(acc['perplexity_ratio'], '.6g'))}\n",
                     shown), shown
    for key in ("eval.top1-agreement", "eval.mean-kl", "eval.text-digest", "eval.gates"):
        assert f"org.olive-builder.{key}" in shown
    assert "evaluation:" in shown
    # the speed, from the evaluation attestation (not an annotation: a rebuild would change the digests)
    observed = shown.split("\nevaluation:\n", 1)[1]
    for key in ("bench.decode-tokens-per-s", "bench.ttft-s", "bench.peak-rss-mb", "bench.cpu"):
        assert key in observed and f"org.olive-builder.{key}" not in shown


def test_evaluate_false_records_not_evaluated(capsys, tmp_path, trained_model, local_engine_ready):  # type: ignore[no-untyped-def]
    code, err, out = build(capsys, tmp_path, trained_model, "int4", "evaluate: false\n")
    assert code == 0, err
    assert "not evaluated" in err
    record = json.loads((out / "olive-builder.json").read_text())
    assert record["evaluation"] == {**record["evaluation"], "evaluated": False}
    code, shown, _ = run_cli(capsys, "inspect", record["tags"][0])
    assert re.search(r"org\.olive-builder\.eval +not evaluated\n", shown), shown


def test_evaluation_refuses_damaged_weights(capsys, builds, trained_model, tmp_path_factory, tmp_path,
                                            local_engine_ready):  # type: ignore[no-untyped-def]
    good, _ = built(capsys, builds, trained_model, tmp_path_factory, "fp32")
    damaged = tmp_path / "damaged"
    shutil.copytree(good, damaged)
    damage_weights(damaged, strength=0.2)
    result = ev.evaluate(damaged, trained_model, precision="fp32", settings=ev.Settings(speed=False))
    assert not result.passed and any("perplexity ratio" in f for f in result.failures)
    assert result.accuracy["top1_agreement"] < 0.95
    with pytest.raises(EvaluationError) as info:
        ev.raise_for_gates(result)
    assert info.value.exit_code == 4 and "An fp32 conversion should match its source" in str(info.value)

    # `build eval` on the folder: the table, and exit 4
    code, shown, err = run_cli(capsys, "eval", str(damaged), "--against", str(trained_model), "--no-speed")
    assert code == 4, err
    assert "perplexity_ratio" in shown and "FAILED" in shown
    assert "failed its evaluation gates" in err
    code, shown, err = run_cli(capsys, "eval", str(good), "--against", str(trained_model), "--no-speed")
    assert code == 0, err
    assert "verdict" in shown and "passed" in shown


def test_build_recipe_refuses_a_model_outside_its_gates_and_publishes_nothing(capsys, tmp_path, trained_model,
                                                                             local_engine_ready):  # type: ignore[no-untyped-def]
    # The escape hatch swaps the conversion for an int4 one while the recipe promises fp32: the
    # weights that come out are not the fp32 weights the gates are for.
    extra = "olive:\n  passes:\n    builder:\n      type: ModelBuilder\n      precision: int4\n"
    code, err, out = build(capsys, tmp_path, trained_model, "fp32", extra)
    assert code == 4, err
    assert "failed its evaluation gates (fp32)" in err
    assert "is below the limit 0.98 (min_top1_agreement)" in err  # the figure and the limit
    assert "perplexity_ratio" in err  # the table of figures
    assert "An fp32 conversion should match its source" in err  # what to try
    assert not out.exists() and not no_partials(out.parent)
    code, listing, listed = run_cli(capsys, "inspect")
    assert "tiny-qwen2" not in listing, "nothing may be packaged"


def test_eval_without_a_source_measures_the_model_alone(capsys, builds, trained_model, tmp_path_factory,
                                                        local_engine_ready):  # type: ignore[no-untyped-def]
    out, _ = built(capsys, builds, trained_model, tmp_path_factory, "int4")
    result = ev.evaluate(out, None, precision="int4", settings=ev.Settings(speed=False, max_tokens=512))
    assert result.passed and result.gates == {} and result.accuracy["perplexity"] > 1
    assert "perplexity_ratio" not in result.accuracy


@pytest.mark.docker
def test_build_eval_runs_in_the_builder_image(capsys, builds, trained_model, tmp_path_factory, tmp_path,
                                              local_engine_ready, cpu_builder_image):  # type: ignore[no-untyped-def]
    """`build eval --engine docker`: for hosts without the build stack, the same figures from the image."""
    good, _ = built(capsys, builds, trained_model, tmp_path_factory, "int4")
    here = json.loads((good / "olive-builder.json").read_text())["evaluation"]["accuracy"]
    code, shown, err = run_cli(capsys, "eval", str(good), "--against", str(trained_model), "--engine", "docker",
                               "--no-speed", "--json")
    assert code == 0, err
    assert "in the CPU builder image" in err
    there = json.loads(shown)["accuracy"]
    assert abs(there["perplexity_ratio"] - here["perplexity_ratio"]) < 1e-3
    damaged = tmp_path / "damaged"
    shutil.copytree(good, damaged)
    damage_weights(damaged, strength=1.0)
    code, shown, err = run_cli(capsys, "eval", str(damaged), "--against", str(trained_model), "--engine", "docker",
                               "--no-speed")
    assert code == 4, err
    assert "FAILED" in shown and "failed its evaluation gates (int4)" in err


def test_build_eval_of_a_pulled_reference(capsys, builds, trained_model, tmp_path_factory, tmp_path, monkeypatch,
                                          local_engine_ready, registry):  # type: ignore[no-untyped-def]
    """`build eval REF`: the reference is pulled from a real registry into a machine with an empty
    store, verified, and evaluated like a folder."""
    out, _ = built(capsys, builds, trained_model, tmp_path_factory, "fp32")
    recorded = json.loads((out / "olive-builder.json").read_text())
    tag = recorded["tags"][0]
    code, _, err = run_cli(capsys, "package", str(out), "--no-image")
    assert code == 0, err
    code, _, err = run_cli(capsys, "push", tag, "--to", f"{registry.host}/models", "--no-image")
    assert code == 0, err
    # a second machine: nothing in its store or cache; only the registry holds the model
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "machine-2" / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "machine-2" / "cache"))
    ref = f"{registry.host}/models/{tag}"
    code, shown, err = run_cli(capsys, "eval", ref, "--against", str(trained_model), "--no-speed", "--json",
                               "--engine", "local")
    assert code == 0, err
    data = json.loads(shown)
    assert data["passed"] and data["precision"] == "fp32"  # the pulled build record's precision
    assert data["gates"] == ev_gates.gates_for("fp32")
    # the same model on the same tokens: the figures the build recorded
    for key in ("perplexity", "perplexity_ratio", "top1_agreement", "greedy_prefix_mean"):
        assert data["accuracy"][key] == pytest.approx(recorded["evaluation"]["accuracy"][key], abs=1e-4), key
    assert data["text"]["digest"] == recorded["evaluation"]["text"]["digest"]
    assert any((tmp_path / "machine-2" / "cache" / "olive-builder" / "models").iterdir()), "pulled where it belongs"
    # without --against: this build record names a local source folder, so the model is measured
    # alone (no ratios, no gates on them), and `build eval` says how to compare
    code, shown, err = run_cli(capsys, "eval", ref, "--no-speed", "--engine", "local", "--json")
    assert code == 0, err
    assert "pass --against" in err
    alone = json.loads(shown)
    assert "perplexity_ratio" not in alone["accuracy"]
    assert alone["accuracy"]["perplexity"] == pytest.approx(data["accuracy"]["perplexity"], rel=1e-4)


def test_a_cache_hit_does_not_evaluate_again(capsys, tmp_path, trained_model, local_engine_ready):  # type: ignore[no-untyped-def]
    code, first, out = build(capsys, tmp_path, trained_model, "int8")
    assert code == 0, first
    assert "==> evaluate:" in first and "within the gates" in first
    recorded = json.loads((out / "olive-builder.json").read_text())
    tag = recorded["tags"][0]
    code, shown_first, err = run_cli(capsys, "inspect", tag)
    assert code == 0, err

    code, second, out2 = build(capsys, tmp_path, trained_model, "int8")
    assert code == 0, second
    assert "was built before" in second
    assert "==> evaluate:" not in second and "==> check:" not in second, "a cache hit ran the build's stages"
    again = json.loads((out2 / "olive-builder.json").read_text())
    assert again["evaluation"] == recorded["evaluation"]  # the figures of the build that was reused
    code, shown, err = run_cli(capsys, "inspect", tag)
    assert code == 0, err
    evaluation_lines = [line for line in shown.splitlines() if "org.olive-builder.eval" in line or
                        "org.olive-builder.bench" in line]
    assert evaluation_lines and all(line in shown_first for line in evaluation_lines)
    assert re.search(r"org\.olive-builder\.eval +passed\n", shown), shown


def test_the_source_figures_are_cached_for_the_next_build_of_the_same_source(
        capsys, builds, trained_model, tmp_path_factory, local_engine_ready):  # type: ignore[no-untyped-def]
    """A matrix build evaluates every precision against the same source on the same tokens: the
    second one reads the source's figures instead of running the source model again."""
    int4, _ = built(capsys, builds, trained_model, tmp_path_factory, "int4")
    fp32, _ = built(capsys, builds, trained_model, tmp_path_factory, "fp32")
    settings = ev.Settings(speed=False, max_tokens=256)
    cache = source_figures.reference_cache_dir()  # this test's own (conftest isolates XDG_CACHE_HOME)
    assert cache is not None
    before = set(cache.glob("*.pt"))  # the builds above (when they ran in this test) kept theirs
    first = ev.evaluate(int4, trained_model, precision="int4", settings=settings)
    assert not first.source_cached and len(set(cache.glob("*.pt")) - before) == 1
    second = ev.evaluate(fp32, trained_model, precision="fp32", settings=settings)
    again = ev.evaluate(int4, trained_model, precision="int4", settings=settings)
    assert second.source_cached and again.source_cached
    assert again.accuracy == first.accuracy  # the same figures as from the source model itself
    assert second.accuracy["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert "from the cache" in ev.format_table(again.to_json())
    # other tokens (max_tokens, the text) are other figures
    other = ev.evaluate(int4, trained_model, precision="int4", settings=ev.Settings(speed=False, max_tokens=200))
    assert not other.source_cached and len(set(cache.glob("*.pt")) - before) == 2
    # a damaged entry is computed again, never trusted
    for entry in cache.glob("*.pt"):
        entry.write_bytes(b"not a tensor file")
    damaged = ev.evaluate(int4, trained_model, precision="int4", settings=settings)
    assert not damaged.source_cached and damaged.accuracy == first.accuracy


def test_the_source_figures_computed_ahead_are_the_ones_the_evaluation_computes(
        capsys, builds, trained_model, tmp_path_factory, local_engine_ready, monkeypatch):  # type: ignore[no-untyped-def]
    """What the worker starts while Olive converts: the source pass in a thread, into the cache."""
    int4, _ = built(capsys, builds, trained_model, tmp_path_factory, "int4")
    settings = ev.Settings(speed=False, max_tokens=192)
    cache = source_figures.reference_cache_dir()
    assert cache is not None
    before = set(cache.glob("*.pt"))
    thread = measure.prefetch_reference(trained_model, max_tokens=192)
    assert thread is not None
    thread.join()
    assert len(set(cache.glob("*.pt")) - before) == 1
    ahead = ev.evaluate(int4, trained_model, precision="int4", settings=settings)
    assert ahead.source_cached
    monkeypatch.setenv(source_figures.REFERENCE_CACHE_ENV, "off")
    assert measure.prefetch_reference(trained_model, max_tokens=192) is None  # nowhere to keep them
    computed = ev.evaluate(int4, trained_model, precision="int4", settings=settings)
    assert not computed.source_cached and computed.accuracy == ahead.accuracy


def test_the_fast_paths_compute_what_the_plain_ones_do(trained_model) -> None:  # type: ignore[no-untyped-def]
    """Decoding the chat prompts together (few-row linear as weight @ x.T) gives the tokens of
    decoding them one by one; the KL of a chunk equals the KL computed position by position."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained_model))
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                           tokenize=False))["input_ids"] for c in measure.CHAT_PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the padding is exercised
    model = AutoModelForCausalLM.from_pretrained(str(trained_model), dtype=torch.float32).eval()
    vocab = int(model.config.vocab_size)
    with torch.inference_mode():
        assert source_figures._greedy(model, prompts, vocab, batched=True) == source_figures._greedy(model, prompts, vocab, batched=False)
        x, w, b = torch.randn(3, 64), torch.randn(200, 64), torch.randn(200)
        with source_figures._few_rows_linear_mode():
            fast = torch.nn.functional.linear(x, w, b)
        assert torch.allclose(fast, torch.nn.functional.linear(x, w, b), atol=1e-5)

    g = torch.Generator().manual_seed(0)
    src = torch.log_softmax(torch.randn(5, 50, generator=g) * 3, -1)
    built_logp = torch.log_softmax(src + 0.3 * torch.randn(5, 50, generator=g), -1)
    top = torch.topk(src, 8, -1)
    rows = measure._kl(top.indices, top.values, built_logp)
    for i in range(5):  # the definition, one position at a time, in float64
        p, q = top.values[i].double().exp(), built_logp[i][top.indices[i]].double()
        head = float((p * (top.values[i].double() - q)).sum())
        rest_p, rest_q = 1 - float(p.sum()), 1 - float(q.exp().sum())
        assert float(rows[i]) == pytest.approx(head + rest_p * math.log(rest_p / rest_q), rel=1e-9, abs=1e-12)
    full = torch.topk(src, 50, -1)  # k covers the vocabulary: the exact KL divergence
    exact = (src.exp() * (src - built_logp)).sum(-1).double()
    assert torch.allclose(measure._kl(full.indices, full.values, built_logp), exact, atol=1e-6)


def _architectures() -> list:  # type: ignore[type-arg]
    from test_architectures import CONFIGS, SLOW_MODELS

    out = []
    for path in sorted(CONFIGS.glob("*.json")):
        hub = path.stem.replace("--", "/")
        out.append(pytest.param(path, id=hub, marks=[pytest.mark.slow] if hub in SLOW_MODELS else []))
    return out


@pytest.mark.parametrize("config_file", _architectures())
def test_the_prompts_decoded_together_give_each_prompts_own_tokens(config_file: Path, tmp_path: Path) -> None:
    """The source's greedy prompts are decoded as one left-padded batch: for every architecture a
    shipped recipe names (its published config at 2 layers, random weights), the tokens are those
    of decoding each prompt alone (positions, masks, rope scaling, sliding windows)."""
    need(importlib.util.find_spec("torch") is not None, "torch and transformers are not installed")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from test_architectures import cut_config
    from tinymodel import make_tiny_model

    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "tok"))
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                           tokenize=False))["input_ids"] for c in measure.CHAT_PROMPTS]
    published = json.loads(config_file.read_text())
    data = cut_config(published, {"eos": tok.convert_tokens_to_ids("<|im_end|>"),
                                  "pad": tok.convert_tokens_to_ids("<|endoftext|>")}, len(tok))
    model_type = data.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype"):
        data.pop(key, None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **data), dtype=torch.float32).eval()
    vocab = int(model.config.vocab_size)
    with torch.inference_mode():
        together = source_figures._greedy(model, prompts, vocab, batched=True)
        alone = source_figures._greedy(model, prompts, vocab, batched=False)
    assert together == alone


def test_the_source_figures_cache_keeps_the_newest_entries_within_its_size(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    need(importlib.util.find_spec("torch") is not None, "torch is not installed")
    import os

    import torch

    ref = source_figures.Reference(nll=[1.0] * 64, argmax=[3] * 64, topk_ids=torch.zeros(64, 8, dtype=torch.long),
                                   topk_logp=torch.full((64, 8), -2.0), greedy=[[1, 2, 3]], vocab=100)
    source_figures.save_reference(tmp_path, "a", ref)
    size = (tmp_path / "a.pt").stat().st_size
    os.utime(tmp_path / "a.pt", (1, 1))  # the oldest
    monkeypatch.setattr(source_figures, "REFERENCE_CACHE_BYTES", 2 * size + 10)
    source_figures.save_reference(tmp_path, "b", ref)
    source_figures.save_reference(tmp_path, "c", ref)
    assert sorted(p.stem for p in tmp_path.glob("*.pt")) == ["b", "c"]
    back = source_figures.load_reference(tmp_path, "c")
    assert back is not None and back.nll == ref.nll and back.greedy == ref.greedy and back.vocab == 100
    assert torch.equal(back.topk_ids, ref.topk_ids) and back.topk_ids.dtype == torch.long
    assert source_figures.load_reference(tmp_path, "a") is None
    monkeypatch.setenv(source_figures.REFERENCE_CACHE_ENV, "off")
    assert source_figures.reference_cache_dir() is None
    monkeypatch.setenv(source_figures.REFERENCE_CACHE_ENV, str(tmp_path / "elsewhere"))
    assert source_figures.reference_cache_dir() == tmp_path / "elsewhere"
