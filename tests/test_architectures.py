"""Every shipped recipe, built at its model's real architecture.

No model can be downloaded here, so each recipe's model is made from the model's published
`config.json` (transcribed in tests/data/configs/, see the README there): the same
architecture, hidden size, heads, KV heads, head dimension, rope scaling (llama3, LongRoPE),
tied embeddings and dtype, cut to 2 layers and a ~1k-token vocabulary, with random weights.
The shipped recipe is then built as it is, with only `model.hub` swapped for that folder
(and `evaluate: false`: random weights give near-uniform next-token distributions, on which
the accuracy gates measure nothing; tests/test_evaluate* cover that stage). The build goes
through the local engine, so Olive, the model builder's conversion for the recipe's target,
and the check (native, or a CPU cross-check for GPU targets) all run.

Recipes whose models are large even at 2 layers (7-8B families: ~0.4B parameters left) are
marked `slow`; `-m "not slow"` leaves them out of a quick run. CI runs them all.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from builder.contract import CHECK_CPU_CROSS, CHECK_NATIVE, INFO_FILE
from builder.recipe import format as recipes

REPO = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "data" / "configs"
LAYERS = 2
VOCAB = 1024
# Families whose 2-layer model still holds ~0.4B parameters (minutes of CPU to build).
SLOW_MODELS = {"meta-llama/Llama-3.1-8B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3"}

pytestmark = pytest.mark.integration


def config_file(hub: str) -> Path:
    """tests/data/configs/<owner>--<name>.json for a Hub id."""
    return CONFIGS / (hub.replace("/", "--") + ".json")


def shipped() -> list[recipes.LoadedRecipe]:
    """The shipped recipes of Hub models. Those of GGUF files build their real weights in
    tests/test_real_model.py instead (a GGUF of random weights would test nothing more)."""
    found, problems = recipes.load_many([REPO / "recipes"])
    assert not problems, problems
    assert all(x.recipe.model.hub or x.recipe.model.gguf for x in found), "shipped recipes name Hub models or GGUFs"
    return [x for x in found if x.recipe.model.gguf is None]


def _params() -> list[object]:
    out = []
    for loaded in shipped():
        hub = loaded.recipe.model.hub or ""
        marks = [pytest.mark.slow] if hub in SLOW_MODELS else []
        out.append(pytest.param(loaded.id, id=loaded.id, marks=marks))
    return out


def test_every_shipped_recipe_has_its_models_config() -> None:
    missing = [(x.id, x.recipe.model.hub) for x in shipped()
               if not x.recipe.model.hub or not config_file(x.recipe.model.hub).is_file()]
    assert not missing, f"add the published config.json of these models to {CONFIGS}: {missing}"


def test_transcribed_configs_keep_what_the_conversion_depends_on() -> None:
    """Spot checks of the transcriptions against the published values they must keep."""
    def load(hub: str) -> dict:
        return json.loads(config_file(hub).read_text())

    llama = load("meta-llama/Llama-3.2-1B-Instruct")
    assert llama["rope_scaling"]["rope_type"] == "llama3" and llama["tie_word_embeddings"] is True
    assert (llama["hidden_size"], llama["num_attention_heads"], llama["num_key_value_heads"], llama["head_dim"]) == \
        (2048, 32, 8, 64)
    phi35 = load("microsoft/Phi-3.5-mini-instruct")
    assert phi35["rope_scaling"]["type"] == "longrope"
    # LongRoPE: one factor per rotary dimension pair (head_dim 96 -> 48).
    assert len(phi35["rope_scaling"]["long_factor"]) == len(phi35["rope_scaling"]["short_factor"]) == 48
    phi4 = load("microsoft/Phi-4-mini-instruct")
    assert phi4["partial_rotary_factor"] == 0.75 and len(phi4["rope_scaling"]["long_factor"]) == 128 * 3 // 4 // 2
    gemma = load("google/gemma-3-1b-it")
    assert (gemma["head_dim"], gemma["num_key_value_heads"], gemma["sliding_window"]) == (256, 1, 512)
    qwen3 = load("Qwen/Qwen3-0.6B")
    assert qwen3["head_dim"] * qwen3["num_attention_heads"] != qwen3["hidden_size"]  # q is wider than the residual


# ---------------------------------------------------------------------------- the models


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer with a ChatML template, trained here once (tinymodel's)."""
    need_stack()
    from tinymodel import make_tiny_model

    # make_tiny_model writes the tokenizer first; its tiny Qwen2 weights are not used here.
    folder = make_tiny_model(tmp_path_factory.mktemp("tokenizer"), vocab_size=VOCAB)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (folder / name).unlink(missing_ok=True)
    return folder


def need_stack() -> None:
    import importlib.util

    from conftest import need

    need(all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "olive", "onnxruntime_genai")),
         "torch, transformers, Olive and onnxruntime-genai are not installed here (pip install -e '.[local]')")


def cut_config(published: dict, token_ids: dict[str, int], vocab: int) -> dict:
    """The published config with 2 layers and the test tokenizer's vocabulary; nothing else changes
    but what must follow the layer count (per-layer lists) and the token ids."""
    c = dict(published)
    c["num_hidden_layers"] = LAYERS
    c["vocab_size"] = vocab
    for key in ("bos_token_id", "pad_token_id"):
        if c.get(key) is not None:
            c[key] = token_ids["eos"] if key == "bos_token_id" else token_ids["pad"]
    if c.get("eos_token_id") is not None:
        c["eos_token_id"] = [token_ids["eos"]] if isinstance(c["eos_token_id"], list) else token_ids["eos"]
    if "max_window_layers" in c:  # Qwen: layers from this index use sliding windows (when enabled)
        c["max_window_layers"] = min(c["max_window_layers"], LAYERS)
    if c.get("model_type") == "gemma3_text":
        # Both kinds of layer at 2 layers: a local (sliding-window, local rope base) and a global one.
        c["layer_types"] = ["sliding_attention", "full_attention"]
    return c


def make_model(hub: str, out: Path, tokenizer: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    published = json.loads(config_file(hub).read_text())
    shutil.copytree(tokenizer, out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = {"eos": tok.convert_tokens_to_ids("<|im_end|>"), "pad": tok.convert_tokens_to_ids("<|endoftext|>")}
    data = cut_config(published, ids, len(tok))
    model_type = data.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype"):
        data.pop(key, None)
    config = AutoConfig.for_model(model_type, **data)
    config.architectures = published["architectures"]
    torch.manual_seed(0)
    dtype = getattr(torch, published.get("torch_dtype", "float32"))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


def swapped_recipe(loaded: recipes.LoadedRecipe, model: Path, folder: Path) -> Path:
    """The shipped recipe file as it is, with `hub`/`revision` replaced by `path` and the evaluation off
    (a finetune recipe's dataset path made absolute)."""
    text = loaded.path.read_text()
    text = re.sub(r"(?m)^(\s+)hub: .*$", rf"\1path: {model}", text)
    text = re.sub(r"(?m)^\s+revision: .*\n", "", text)
    # A finetune recipe trains for 8 steps here: what is tested is the architecture's LoRA
    # modules, conversion with the adapter and extraction, not how well it learns.
    text = re.sub(r"(?m)^(\s+)max_steps: .*$", r"\1max_steps: 8", text)
    # A finetune recipe's dataset lies beside the shipped recipe, not beside the copy.
    text = re.sub(r"(?m)^(\s+)path: (data/.*)$", lambda m: f"{m.group(1)}path: {loaded.path.parent / m.group(2)}", text)
    text = re.sub(r"(?m)^evaluate:.*\n(?:[ \t]+.*\n)*", "", text) + "evaluate: false\n"
    dest = folder / loaded.path.parent.name / loaded.path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return dest


# ---------------------------------------------------------------------------- the builds


@pytest.mark.parametrize("recipe_id", _params())
def test_shipped_recipe_builds_at_its_real_architecture(recipe_id: str, tmp_path: Path, tokenizer_dir: Path,
                                                        record_property) -> None:  # type: ignore[no-untyped-def]
    from builder import pipeline

    loaded = next(x for x in shipped() if x.id == recipe_id)
    hub = loaded.recipe.model.hub
    assert hub, "shipped recipes name Hub models"
    started = time.monotonic()
    model = make_model(hub, tmp_path / "model", tokenizer_dir)
    made = time.monotonic() - started
    recipe_file = swapped_recipe(loaded, model, tmp_path / "recipes")
    swapped = recipes.load(recipe_file)
    assert swapped.id == loaded.id and swapped.recipe.target == loaded.recipe.target

    out = tmp_path / "out"
    options = pipeline.BuildOptions(engine="local", output=out, use_cache=False,
                                    package=pipeline.PackageOptions(store=tmp_path / "store", runnable_image=False))
    outcome = pipeline.build(swapped, options)
    seconds = time.monotonic() - started
    record_property("model_seconds", round(made, 1))
    record_property("build_seconds", round(seconds, 1))
    print(f"{recipe_id}: model made in {made:.1f} s, built and checked in {seconds - made:.1f} s")

    assert outcome.built is not None
    info = json.loads((out / INFO_FILE).read_text())
    target = loaded.recipe.target
    assert info["target"]["device"] == target.device and info["target"]["precision"] == target.precision
    assert len(info["check"]["generated_ids"]) == 8
    assert info["check"]["mode"] == (CHECK_NATIVE if target.device == "cpu" else CHECK_CPU_CROSS)

    # The graph is the published architecture's: what onnxruntime-genai reads of it.
    genai = json.loads((out / "genai_config.json").read_text())
    published = json.loads(config_file(hub).read_text())
    decoder = genai["model"]["decoder"]
    heads = published["num_attention_heads"]
    assert decoder["hidden_size"] == published["hidden_size"]
    assert decoder["num_attention_heads"] == heads
    assert decoder["num_key_value_heads"] == published.get("num_key_value_heads", heads)
    assert decoder["head_size"] == (published.get("head_dim") or published["hidden_size"] // heads)
    assert decoder["num_hidden_layers"] == LAYERS
    assert genai["model"]["context_length"] == published["max_position_embeddings"]
    providers = decoder["session_options"].get("provider_options") or []
    if target.device == "cpu":
        assert providers == []
    else:
        assert any({"cuda": "cuda", "dml": "dml", "webgpu": "webgpu"}[target.device] in p for p in providers), providers
    if loaded.recipe.generation and loaded.recipe.generation.max_length:
        assert genai["search"]["max_length"] == loaded.recipe.generation.max_length


def test_gemma3_is_not_convertible_by_the_pinned_builder(tmp_path: Path, tokenizer_dir: Path) -> None:
    """recipes/README.md says why no Gemma 3 recipe ships; this keeps that true. When it fails,
    the pinned builder converts Gemma 3: add recipes/gemma-3-1b-it/cpu-int4.yaml."""
    from builder import pipeline
    from builder.errors import BuildError
    from conftest import write_recipe

    model = make_model("google/gemma-3-1b-it", tmp_path / "model", tokenizer_dir)
    recipe_file = write_recipe(tmp_path / "recipes" / "gemma-3-1b-it", "cpu-int4", f"""
        name: gemma-3-1b-it
        version: 1.0.0
        model:
          path: {model}
        target:
          device: cpu
          precision: int4
        evaluate: false
        """)
    options = pipeline.BuildOptions(engine="local", output=tmp_path / "out", use_cache=False,
                                    package=pipeline.PackageOptions(store=tmp_path / "store", runnable_image=False))
    with pytest.raises(BuildError) as info:
        pipeline.build(recipe_file, options)
    assert "rope_local_base_freq" in info.value.message
    assert not (tmp_path / "out").exists()
