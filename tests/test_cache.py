"""The build cache key, revision resolution and lock files, as units (the integration tests
run the cache against a real store and a real registry)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder import contract
from builder.errors import PlanError
from builder.oci import layout as oci
from builder.oci.media import MANIFEST, MODEL_ARTIFACT, MODEL_CONFIG, MODEL_WEIGHT
from builder.publish import cache
from builder.recipe import format as recipe
from builder.recipe import lock
from builder.source import hub

BASE = {"recipe": None, "model_revision": "a" * 40, "builder_image": "sha256:" + "1" * 64,
        "tools": {"olive-ai": "0.13.0", "onnxruntime-genai": "0.14.1", "onnxruntime": "1.32.0",
                  "transformers": "5.24.0", "torch": "2.13.0"},
        "builder_version": "0.1.0"}
RECIPE = "name: m\nversion: 1.0.0\nmodel:\n  hub: org/m\ntarget:\n  device: cpu\n  precision: int4\n"


def load(folder: Path, text: str = RECIPE, target: str = "cpu-int4") -> recipe.LoadedRecipe:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{target}.yaml").write_text(text)
    return recipe.load(folder / f"{target}.yaml")


def key_of(tmp_path: Path, text: str = RECIPE, **changes) -> str:  # type: ignore[no-untyped-def]
    inputs = {**BASE, **changes}
    inputs["recipe"] = cache.recipe_inputs(load(tmp_path / str(abs(hash((text, str(changes))))) / "m", text))
    return cache.KeyInputs(**inputs).key()


@pytest.mark.parametrize("component,value", [
    ("model_revision", "b" * 40),
    ("builder_image", "sha256:" + "2" * 64),
    ("tools", {**BASE["tools"], "olive-ai": "0.14.0"}),
    ("tools", {**BASE["tools"], "onnxruntime-genai": "0.14.2"}),
    ("tools", {**BASE["tools"], "onnxruntime": "1.33.0"}),
    ("tools", {**BASE["tools"], "transformers": "5.25.0"}),
    ("tools", {**BASE["tools"], "torch": "2.14.0"}),
    ("builder_version", "0.2.0"),
])
def test_each_component_changes_the_key(tmp_path, component, value):  # type: ignore[no-untyped-def]
    assert key_of(tmp_path, **{component: value}) != key_of(tmp_path)


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("precision: int4", "precision: fp32"),
    lambda t: t + "generation:\n  top_k: 3\n",
    lambda t: t + "olive:\n  extra_options:\n    int4_block_size: 64\n",
    lambda t: t.replace("hub: org/m", "hub: org/other"),
    lambda t: t.replace("hub: org/m", "hub: org/m\n  revision: v2"),
    lambda t: t.replace("hub: org/m", "hub: org/m\n  trust_remote_code: true"),
])
def test_the_recipe_changes_the_key(tmp_path, edit):  # type: ignore[no-untyped-def]
    assert key_of(tmp_path, edit(RECIPE)) != key_of(tmp_path)


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("1.0.0", "2.0.0"),  # the version names the artifact; it does not change the model
    lambda t: t + "description: another text\n",
    lambda t: t + "registry: ghcr.io/acme\n",
    lambda t: "# a comment\n" + t.replace("  device: cpu\n  precision: int4", "  precision: int4\n  device: cpu"),
    lambda t: t.replace("target:", "target:\n  provider: CPUExecutionProvider"),  # the default, spelled out
])
def test_nothing_else_changes_the_key(tmp_path, edit):  # type: ignore[no-untyped-def]
    assert key_of(tmp_path, edit(RECIPE)) == key_of(tmp_path)


def test_where_a_local_model_lies_does_not_matter_but_its_content_does(tmp_path):  # type: ignore[no-untyped-def]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
    one = load(tmp_path / "r1" / "m", RECIPE.replace("hub: org/m", f"path: {tmp_path / 'a'}"))
    two = load(tmp_path / "r2" / "m", RECIPE.replace("hub: org/m", f"path: {tmp_path / 'b'}"))
    assert cache.recipe_inputs(one) == cache.recipe_inputs(two)
    assert cache.local_revision(tmp_path / "a") == cache.local_revision(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"weightz")
    assert cache.local_revision(tmp_path / "a") != cache.local_revision(tmp_path / "b")


def test_hub_revisions_resolve_from_a_commit_or_the_offline_cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve("org/m", "c" * 40) == "c" * 40
    assert hub.resolve("org/m", "main") is None  # not cached, offline: unknown
    refs = Path(os.environ["HF_HOME"]) / "hub" / "models--org--m" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("d" * 40)
    assert hub.resolve("org/m", "main") == "d" * 40


def test_lock_entries_pin_and_require_locked_refuses_moving_revisions(tmp_path):  # type: ignore[no-untyped-def]
    loaded = load(tmp_path / "recipes" / "m")
    assert lock.find(loaded.path.parent) is None
    with pytest.raises(PlanError, match="m/cpu-int4 is not pinned: revision 'main' of org/m can move"):
        lock.require(loaded, None, None)
    lock_path = tmp_path / contract.LOCK_FILE
    lock_path.write_text(json.dumps({"version": 1, "recipes": {
        "m/cpu-int4": {"hub": "org/m", "revision": "main", "commit": "e" * 40, "files": {}}}}))
    assert lock.find(loaded.path.parent) == lock_path
    entry = lock.entry(loaded, lock_path)
    assert entry is not None and entry.commit == "e" * 40
    lock.require(loaded, entry, lock_path)  # no error
    moved = load(tmp_path / "recipes2" / "m", RECIPE.replace("hub: org/m", "hub: org/m\n  revision: dev"))
    assert lock.entry(moved, lock_path) is None  # the lock recorded another revision: stale
    pinned = load(tmp_path / "recipes3" / "m", RECIPE.replace("hub: org/m", "hub: org/m\n  revision: " + "f" * 40))
    lock.require(pinned, None, None)  # a commit in the recipe is pinned by itself
    lock_path.write_text("not json")
    with pytest.raises(PlanError, match="is not a lock file"):
        lock.entry(loaded, lock_path)


def test_find_local_only_finds_complete_artifacts_with_the_key(tmp_path):  # type: ignore[no-untyped-def]
    store = oci.Store(tmp_path / "s")
    layer = store.put_bytes(b"layer", MODEL_WEIGHT)
    config = store.put_json({"c": 1}, MODEL_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": MODEL_ARTIFACT,
                "config": config.to_json(), "layers": [layer.to_json()],
                "annotations": {contract.KEY_ANNOTATION: "sha256:" + "9" * 64}}
    desc = store.put_json(manifest, MANIFEST, artifact_type=MODEL_ARTIFACT)
    store.tag("m:1.0-cpu-int4", desc)
    assert cache.find_local(store, "sha256:" + "8" * 64) is None
    assert cache.find_local(store, "sha256:" + "9" * 64) == ("m:1.0-cpu-int4", store.resolve("m:1.0-cpu-int4"))
    os.chmod(store.blob_path(layer.digest), 0o644)
    store.blob_path(layer.digest).unlink()
    assert cache.find_local(store, "sha256:" + "9" * 64) is None  # incomplete content is no hit


def test_tool_versions_here_names_every_tool():  # type: ignore[no-untyped-def]
    assert set(contract.tool_versions_here()) == set(contract.TOOLS)


def test_a_recipes_own_evaluation_text_counts_by_content(tmp_path):  # type: ignore[no-untyped-def]
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "text.txt").write_text("one text")
    loaded = load(folder, RECIPE + "evaluate:\n  text: text.txt\n")
    before = cache.recipe_inputs(loaded)
    (folder / "text.txt").write_text("another text")
    assert cache.recipe_inputs(loaded) != before  # same path, other content: another key
    (folder / "text.txt").write_text("one text")
    assert cache.recipe_inputs(loaded) == before
