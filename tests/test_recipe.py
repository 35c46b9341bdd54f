"""Recipe validation: one bad-recipe file per failure mode, each error naming file:line and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.errors import RecipeError
from builder.recipe import format as recipe

BAD = Path(__file__).parent / "bad_recipes"
REPO = Path(__file__).resolve().parent.parent

# file -> fragments its error must contain (":N:" fragments pin the line).
CASES: dict[str, list[str]] = {
    "unknown-top-key.yaml": [":3: modle: unknown key. Perhaps you meant `model`?", ":1: model: required key is missing"],
    "unknown-nested-key.yaml": [":7: target.precison: unknown key. Perhaps you meant `precision`?"],
    "missing-key.yaml": [":5: target.precision: required key is missing"],
    "bad-enum.yaml": [":7: target.precision: 'int3' is not one of 'int4', 'int8', 'fp16', 'bf16' or 'fp32'"],
    "bad-yaml.yaml": [":5: not valid YAML"],
    "not-a-mapping.yaml": [":1: a recipe must be a YAML mapping, got a list"],
    "empty.yaml": [":1: a recipe must be a YAML mapping, got an empty file"],
    "duplicate-key.yaml": [":8: target.precision: key given twice"],
    "hub-and-path.yaml": [":3: model: give exactly one of `hub`"],
    "no-source.yaml": [":3: model: give exactly one of `hub`"],
    "cuda-provider-on-cpu.yaml": [":7: target.provider: CUDAExecutionProvider cannot run on device cpu"],
    "fp16-on-cpu.yaml": [":7: target.precision: fp16 needs device cuda"],
    "int8-on-cuda.yaml": [":7: target.precision: int8 is built by dynamic quantization"],
    "modelbuilder-int8.yaml": [":12: olive.passes.mb.precision: ModelBuilder has no int8"],
    "passes-and-extra-options.yaml": [":9: olive.extra_options: `extra_options` tunes the generated ModelBuilder"],
    "pass-without-type.yaml": [":10: olive.passes.mb: every pass needs a `type`"],
    "bad-name.yaml": [":1: name: 'My Model' is not allowed here (lower-case letters"],
    "wrong-type.yaml": [":9: generation.temperature:", "'hot'"],
    "revision-with-path.yaml": [":5: model.revision: `revision` applies to `hub` models only"],
    "remote-code-not-bool.yaml": [":5: model.trust_remote_code:", "'yes'"],
    "bad-hub-id.yaml": [":4: model.hub: 'just-a-name' is not allowed here (a Hugging Face repo id"],
    "version-is-a-number.yaml": [':2: version: YAML read this as the number 1.0; quote it so it stays as written, e.g. version: "1.0"'],
    "bad-registry.yaml": [":3: registry: 'https://ghcr.io/acme' is not allowed here (a registry host with an optional namespace"],
    "many-problems.yaml": [
        "has 3 problems",
        ":5: model.revison: unknown key. Perhaps you meant `revision`?",
        ":7: target.device: 'tpu' is not one of 'cpu', 'cuda', 'dml' or 'webgpu'",
        ":10: generation.top_p:",
    ],
}


def test_every_bad_recipe_has_a_case() -> None:
    assert sorted(CASES) == sorted(p.name for p in BAD.glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_recipe_is_refused_with_file_line_and_key(name: str) -> None:
    path = BAD / name
    with pytest.raises(RecipeError) as info:
        recipe.load(path)
    text = str(info.value)
    for fragment in CASES[name]:
        if fragment.startswith(":"):
            fragment = f"{path}{fragment}"
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    assert info.value.exit_code == 2


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        recipe.load(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a folder, not a recipe file"):
        recipe.load(tmp_path)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(RecipeError) as info:
        recipe.load(BAD / "many-problems.yaml")
    assert len(info.value.problems) == 3


SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


def test_the_required_recipes_are_shipped() -> None:
    ids = {recipe.recipe_id(p) for p in SHIPPED}
    assert {
        "smollm2-135m-instruct/cpu-int4",
        "smollm2-135m-instruct-gguf/cpu-int4",
        "smollm2-135m-instruct-gguf/cpu-int8",
        "smollm2-135m-instruct-gguf/cpu-fp32",
        "qwen2.5-0.5b-instruct/cpu-int4",
        "qwen2.5-0.5b-instruct/cuda-int4",
        "qwen2.5-0.5b-instruct/cuda-fp16",
        "llama-3.2-1b-instruct/cpu-int4",
        "phi-3.5-mini-instruct/cpu-int4",
    } <= ids


@pytest.mark.parametrize("path", SHIPPED, ids=[recipe.recipe_id(p) for p in SHIPPED])
def test_shipped_recipe_validates(path: Path) -> None:
    loaded = recipe.load(path)
    device, precision, *variant = path.stem.split("-", 2)
    # The file name is the target: keep them in step (a finetune recipe adds its adapter's name).
    assert (loaded.recipe.target.device, loaded.recipe.target.precision) == (device, precision)
    ft = loaded.recipe.finetune
    assert variant == ([ft.adapter] if ft is not None else [])
    m = loaded.recipe.model
    assert not m.trust_remote_code
    # a Hub model, or a GGUF pinned by package version and digest (the offline route)
    assert m.hub or (m.gguf is not None and m.gguf.package and m.gguf.file and len(m.gguf.sha256) == 64)


def test_committed_schema_is_current() -> None:
    committed = json.loads((REPO / "recipes" / "recipe.schema.json").read_text())
    assert committed == recipe.json_schema(), "recipes/recipe.schema.json is stale: run `build schema > recipes/recipe.schema.json`"


def test_schema_forbids_unknown_keys_everywhere() -> None:
    schema = recipe.json_schema()
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is False, name


def test_local_path_resolves_against_the_recipe_folder(tmp_path: Path) -> None:
    folder = tmp_path / "recipes" / "m"
    folder.mkdir(parents=True)
    path = folder / "cpu-int4.yaml"
    path.write_text("name: m\nversion: '1'\nmodel:\n  path: ../../models/m\ntarget:\n  device: cpu\n  precision: int4\n")
    loaded = recipe.load(path)
    assert loaded.model_dir == (tmp_path / "models" / "m").resolve()
    assert loaded.id == "m/cpu-int4"


def test_digest_ignores_formatting_and_comments(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "cpu-int4.yaml", tmp_path / "b" / "cpu-int4.yaml"
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_text("name: m\nversion: '1'\nmodel: {hub: org/m}\ntarget: {device: cpu, precision: int4}\n")
    b.write_text("# comment\ntarget:\n  precision: int4\n  device: cpu\nmodel:\n  hub: org/m\nversion: '1'\nname: m\n")
    assert recipe.load(a).digest == recipe.load(b).digest
