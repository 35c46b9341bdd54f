"""LoRA adapters as OCI artifacts (issue 15): packaging, the local store, push to a real registry
(docker-registry), pull of an adapter with its base, third-party clients, hostile manifests and
the build cache.

The model folders are made here, as a finetuned build in adapter mode leaves them: the base
model's files, ``adapters/<name>.onnx_adapter`` written by onnxruntime's own adapter format
(``onnxruntime.AdapterFormat``) and a build record with a ``finetune`` section. Packaging and
distribution only read files, so no Olive run is needed; the model's weights are random bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from builder.contract import ADAPTER_ANNOTATION, ADAPTER_BASE_ANNOTATION, ADAPTERS_ANNOTATION, adapter_tag, sha256_file
from builder.oci import layout as oci
from builder.oci import referrers
from builder.oci.media import ADAPTER_ARTIFACT_TYPE, ADAPTER_CONFIG, ADAPTER_MEDIA_TYPE, IMAGE_CONFIG, MANIFEST
from builder.oci.registry import Registry
from builder.publish import cache, distribute, package
from conftest import need, no_partials, run_cli

pytestmark = pytest.mark.integration
cli = run_cli

TAG = "tiny:1.0-cpu-fp32"
WEIGHTS = 6_000_000  # the base model's weights: what a second adapter must not upload again
T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def write_adapter(path: Path, seed: int, rank: int = 8, hidden: int = 256) -> None:
    """An .onnx_adapter file in onnxruntime's format: LoRA A/B matrices of two projections."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    params = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            stem = f"model.layers.{layer}.attn.{proj}.lora"
            params[f"{stem}_A.MatMul.weight"] = ort.OrtValue.ortvalue_from_numpy(
                rng.standard_normal((hidden, rank)).astype(np.float32))
            params[f"{stem}_B.MatMul.weight"] = ort.OrtValue.ortvalue_from_numpy(
                rng.standard_normal((rank, hidden)).astype(np.float32))
    fmt.set_parameters(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(path))


def finetuned_folder(folder: Path, adapter: str, seed: int) -> Path:
    """An output folder of a finetuned build in adapter mode, adapter ``adapter`` trained with ``seed``:
    the base files are the same for every adapter (as the lead measured for real builds)."""
    folder.mkdir(parents=True)
    (folder / "genai_config.json").write_text(json.dumps(
        {"model": {"type": "qwen2", "decoder": {"filename": "model.onnx",
                                                "session_options": {"provider_options": []}}}}))
    (folder / "model.onnx").write_bytes(b"graph with optional LoRA inputs " * 100)
    (folder / "model.onnx.data").write_bytes(random.Random(0).randbytes(WEIGHTS))
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    file = folder / "adapters" / f"{adapter}.onnx_adapter"
    write_adapter(file, seed)
    settings = {"max_steps": 30, "learning_rate": 0.0002, "seed": seed, "lora": {"r": 8, "alpha": 16}}
    (folder / "olive-builder.json").write_text(json.dumps({
        "id": "tiny/cpu-fp32", "name": "tiny", "version": "1.0", "tags": [TAG],
        "license": "apache-2.0", "description": "a finetuned test model", "created": "2026-01-02T03:04:05Z",
        "target": {"device": "cpu", "execution_provider": "CPUExecutionProvider", "precision": "fp32"},
        "source": {"hub": "acme/tiny", "revision": "main", "resolved_revision": "0123abcd" * 5, "local": False},
        "recipe_digest": "sha256:" + "1" * 64,
        "cache_key": "sha256:" + hashlib.sha256(adapter.encode()).hexdigest(),
        "builder": {"version": "0.1.0", "engine": "docker", "image": "olive-builder-cpu:abc",
                    "image_id": "sha256:" + "3" * 64},
        "tools": {"olive-ai": "0.13.0", "onnxruntime-genai": "0.14.1", "onnxruntime": "1.32.0",
                  "transformers": "5.24.0", "torch": "2.13.0+cpu", "peft": "0.18.0"},
        "finetune": {"mode": "adapter", "adapters": [{
            "name": adapter, "file": f"adapters/{adapter}.onnx_adapter", "sha256": sha256_file(file),
            "size": file.stat().st_size,
            "dataset": {"source": "file", "hub": None, "revision": None, "names": [f"{adapter}.jsonl"], "rows": 24,
                        "columns": ["instruction", "response"], "sha256": "sha256:" + "4" * 64, "format": "json"},
            "settings": settings, "training": {"steps": 30, "seconds": 1.5, "final_loss": 0.5}}]},
    }))
    return folder


@pytest.fixture
def two(tmp_path: Path) -> dict[str, Path]:
    return {name: finetuned_folder(tmp_path / f"out-{name}", name, seed)
            for seed, name in enumerate(("colors", "animals"), start=1)}


def store() -> oci.Store:
    return oci.open_store()


def package_cli(capsys: Any, folder: Path, *extra: str) -> str:
    code, out, err = cli(capsys, "package", str(folder), "--no-image", *extra)
    assert code == 0, err
    return out


def lines_with(out: str, label: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.strip().startswith(label)]


def upload_summary(out: str) -> tuple[int, int, int, int]:
    line = next(line for line in out.splitlines() if line.strip().startswith("uploaded "))
    words = line.replace(",", " ").replace(";", " ").split()
    return int(words[1]), int(words[3]), int(words[5]), int(words[8])


def registry_blobs(reg: Any) -> dict[str, int]:
    """Every blob the registry stores (digest -> size), read from its storage folder."""
    root = reg.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return {"sha256:" + p.parent.name: p.stat().st_size for p in root.glob("*/*/data")} if root.is_dir() else {}


# ------------------------------------------------------------------------------- packaging

def test_base_is_packaged_without_adapters_and_each_adapter_is_an_artifact_of_its_own(capsys, two):  # type: ignore[no-untyped-def]
    st = store()
    out = {name: package_cli(capsys, folder) for name, folder in two.items()}
    bases = {}
    for name in two:
        (artifact,) = lines_with(out[name], "model artifact")
        (adapter,) = lines_with(out[name], "LoRA adapter")
        assert artifact[2] == TAG and adapter[2] == f"tiny:{adapter_tag('1.0-cpu-fp32', name)}"
        bases[name] = artifact[3]
        manifest = st.read_json(adapter[3])
        # the adapter: one layer (the file itself), a config, the base as subject, annotations
        assert manifest["artifactType"] == ADAPTER_ARTIFACT_TYPE
        assert manifest["subject"]["digest"] == artifact[3] and manifest["subject"]["mediaType"] == MANIFEST
        assert manifest["subject"]["size"] == len(st.read_bytes(artifact[3]))
        (layer,) = manifest["layers"]
        assert layer["mediaType"] == ADAPTER_MEDIA_TYPE
        assert layer["annotations"][oci.ANN_TITLE] == f"{name}.onnx_adapter"
        assert st.read_bytes(layer["digest"]) == (two[name] / "adapters" / f"{name}.onnx_adapter").read_bytes()
        ann = manifest["annotations"]
        assert ann[ADAPTER_ANNOTATION] == name and ann[ADAPTER_BASE_ANNOTATION] == artifact[3]
        assert ann["org.opencontainers.image.version"] == "1.0" and ann["org.opencontainers.image.licenses"]
        config = st.read_json(manifest["config"]["digest"])
        assert manifest["config"]["mediaType"] == ADAPTER_CONFIG
        assert config["name"] == name and config["base"] == {"reference": TAG, "digest": artifact[3]}
        assert config["finetune"]["settings"]["seed"] == (1 if name == "colors" else 2)

    # the bases: no adapters/ inside; the heavy blobs identical; what differs is the build's record
    layers = {name: {layer["annotations"][oci.ANN_TITLE]: layer["digest"]
                     for layer in st.read_json(bases[name])["layers"]} for name in two}
    assert sorted(layers["colors"]) == ["model.onnx.data.tar", "model.onnx.tar", "shared-files.tar", "target-files.tar"]
    for title in ("model.onnx.data.tar", "model.onnx.tar", "shared-files.tar"):
        assert layers["colors"][title] == layers["animals"][title]
    assert layers["colors"]["target-files.tar"] != layers["animals"]["target-files.tar"]
    for name in two:
        manifest = st.read_json(bases[name])
        assert manifest["annotations"][ADAPTERS_ANNOTATION] == name
        for layer in manifest["layers"]:
            files = layer["annotations"].get("org.olive-builder.files", layer["annotations"][oci.ANN_FILEPATH])
            assert "adapters" not in files

    # the store lists adapters as such; inspect shows an adapter's base and a base's adapters
    code, out_list, _ = cli(capsys, "inspect", "--json")
    kinds = {r["reference"]: r["kind"] for r in json.loads(out_list)}
    assert kinds[f"tiny:{adapter_tag('1.0-cpu-fp32', 'colors')}"] == "LoRA adapter"
    assert kinds[TAG] == "model artifact"
    code, shown, err = cli(capsys, "inspect", f"tiny:{adapter_tag('1.0-cpu-fp32', 'animals')}")
    assert code == 0, err
    assert "(LoRA adapter)" in shown and f"adapter       animals of the base tiny@{bases['animals']}" in shown
    code, shown, err = cli(capsys, "inspect", TAG, "--json")
    assert code == 0, err
    assert [(a["name"], a["reference"]) for a in json.loads(shown)["adapters"]] == \
        [("animals", f"tiny:{adapter_tag('1.0-cpu-fp32', 'animals')}")]


def test_same_folder_packaged_twice_gives_the_same_digests(capsys, two):  # type: ignore[no-untyped-def]
    first = package_cli(capsys, two["colors"])
    again = package_cli(capsys, two["colors"])
    assert first == again
    assert not [p for p in two["colors"].parent.iterdir() if p.name.startswith(".")]  # the base view is gone


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "adapters" / "colors.onnx_adapter").write_bytes(b"changed"), "sha256 differs"),
    (lambda f: (f / "adapters" / "Bad_Name.onnx_adapter").write_bytes(b"x"), "is not an adapter"),
    (lambda f: (f / "adapters" / "notes.txt").write_text("x"), "is not an adapter"),
    (lambda f: (f / "adapters" / "colors.onnx_adapter").rename(f / "adapters" / "other.onnx_adapter"),
     "lacks the adapter(s) colors"),
    (lambda f: shutil.rmtree(f / "adapters"), "pull the adapter's tag"),  # e.g. a base pulled alone
])
def test_adapters_folder_that_does_not_match_the_record_is_refused(capsys, tmp_path, damage, message):  # type: ignore[no-untyped-def]
    folder = finetuned_folder(tmp_path / "out", "colors", 1)
    damage(folder)
    code, out, err = cli(capsys, "package", str(folder), "--no-image")
    assert code != 0 and message in err and "Traceback" not in err
    assert store().refs() == {}


def test_runnable_image_carries_the_base_and_its_adapters(tmp_path, two):  # type: ignore[no-untyped-def]
    st = store()
    config = {"architecture": "amd64", "os": "linux", "config": {"Labels": {}}, "rootfs": {"type": "layers", "diff_ids": []}}
    rt_config = st.put_json(config, IMAGE_CONFIG)
    rt_manifest = st.put_json({"schemaVersion": 2, "mediaType": MANIFEST, "config": rt_config.to_json(), "layers": []},
                              MANIFEST)
    runtime = package.RuntimeImage("runtime:test", rt_manifest, config, ())
    packaged = package.package(two["colors"], st, created=T0, runtime=runtime, attestations=False)
    assert packaged.image is not None
    image = st.read_json(packaged.image.digest)
    titles = [d["annotations"][oci.ANN_TITLE] for d in image["layers"]]
    assert "colors.onnx_adapter.tar" in titles
    assert "colors.onnx_adapter.tar" not in [d.annotations[oci.ANN_TITLE] for d in packaged.layers]
    folder = distribute.materialize(st, image, tmp_path / "from-image", force=False, shown="image")
    assert (folder / "adapters" / "colors.onnx_adapter").read_bytes() == \
        (two["colors"] / "adapters" / "colors.onnx_adapter").read_bytes()
    assert (folder / "model.onnx.data").read_bytes() == (two["colors"] / "model.onnx.data").read_bytes()


# ------------------------------------------------------------------------------- registry

def test_second_adapter_of_a_base_uploads_only_the_adapter(capsys, two, registry):  # type: ignore[no-untyped-def]
    dest = f"{registry.host}/models"
    out1 = package_cli(capsys, two["colors"], "--push", dest)
    first = upload_summary(out1)
    blobs1 = registry_blobs(registry)
    out2 = package_cli(capsys, two["animals"], "--push", dest)
    second = upload_summary(out2)
    blobs2 = registry_blobs(registry)
    new = {d: n for d, n in blobs2.items() if d not in blobs1}
    adapter_file = (two["animals"] / "adapters" / "animals.onnx_adapter").stat().st_size
    with capsys.disabled():  # the figures for the closing note (pytest -s shows them)
        print(f"\nfirst push (base + colors): {first[0]} blobs, {first[1]} bytes uploaded; "
              f"registry holds {len(blobs1)} blobs, {sum(blobs1.values())} bytes")
        print(f"second push (base + animals): {second[0]} blobs, {second[1]} bytes uploaded, {second[2]} already there; "
              f"{len(new)} new blobs in the registry, {sum(new.values())} bytes (adapter file {adapter_file} bytes)")
    assert first[1] > WEIGHTS
    # of the model's blobs, only the adapter file and small documents (the target layer with the
    # build record, the ModelPack config, the adapter's config) are new; the weights are not sent
    assert second[2] == 3  # model.onnx, model.onnx.data, shared files: already there
    assert second[1] < adapter_file + 20_000
    assert sum(new.values()) < adapter_file + 60_000  # with the referrers (SBOM, provenance, ...)
    pushed = [line[1] for line in lines_with(out2, "pushed")]
    assert pushed[0].startswith(f"{dest}/tiny:1.0-cpu-fp32@")
    assert pushed[1].startswith(f"{dest}/tiny:{adapter_tag('1.0-cpu-fp32', 'animals')}@")

    # the registry (distribution 2.8: no referrers API) lists each adapter in its base's tag index
    reg = Registry(registry.host)
    try:
        for name in two:
            got = reg.get_manifest("models/tiny", adapter_tag("1.0-cpu-fp32", name))
            assert got is not None
            base = json.loads(got[0])["subject"]["digest"]
            listed = referrers.list_remote(reg, "models/tiny", base)
            assert [d.annotations.get(ADAPTER_ANNOTATION) for d in listed if d.artifact_type == ADAPTER_ARTIFACT_TYPE] \
                == [name]
    finally:
        reg.close()
    code, shown, err = cli(capsys, "inspect", f"{dest}/{TAG}", "--json")
    assert code == 0, err
    assert [(a["name"], a["reference"]) for a in json.loads(shown)["adapters"]] == \
        [("animals", f"{dest}/tiny:{adapter_tag('1.0-cpu-fp32', 'animals')}")]
    code, shown, err = cli(capsys, "inspect", f"{dest}/tiny:{adapter_tag('1.0-cpu-fp32', 'colors')}")
    assert code == 0, err
    assert "(LoRA adapter)" in shown and "adapter       colors of the base" in shown
    # `build push` of an adapter alone (its base by digest, no tag moved) uploads nothing new
    code, out3, err = cli(capsys, "push", f"tiny:{adapter_tag('1.0-cpu-fp32', 'colors')}", "--to", f"{registry.host}/copy")
    assert code == 0, err
    uploaded, _nbytes, _existing, mounted = upload_summary(out3)
    assert uploaded == 0 and mounted >= 5
    assert [line[1].split("@")[0] for line in lines_with(out3, "pushed")] == \
        [f"{registry.host}/copy/tiny:{adapter_tag('1.0-cpu-fp32', 'colors')}"]


def test_pull_of_an_adapter_brings_its_base_pull_of_the_base_does_not(capsys, tmp_path, two, registry):  # type: ignore[no-untyped-def]
    dest = f"{registry.host}/models"
    package_cli(capsys, two["colors"], "--push", dest)
    package_cli(capsys, two["animals"], "--push", dest)  # the base tag now names the animals build
    for name, folder in two.items():
        code, out, err = cli(capsys, "pull", f"{dest}/tiny:{adapter_tag('1.0-cpu-fp32', name)}",
                             str(tmp_path / f"pulled-{name}"))
        assert code == 0, err
        pulled = tmp_path / f"pulled-{name}"
        want = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert sorted(p.relative_to(pulled).as_posix() for p in pulled.rglob("*") if p.is_file()) == want
        for rel in want:
            assert (pulled / rel).read_bytes() == (folder / rel).read_bytes(), rel
    code, out, err = cli(capsys, "pull", f"{dest}/{TAG}", str(tmp_path / "base"))
    assert code == 0, err
    assert not (tmp_path / "base" / "adapters").exists()
    assert (tmp_path / "base" / "model.onnx.data").read_bytes() == (two["animals"] / "model.onnx.data").read_bytes()
    # from the local store too: the colors adapter's base is no longer tagged there (the tag names
    # the animals build), and gc keeps it all the same, since the adapter's tag reaches it
    local = f"tiny:{adapter_tag('1.0-cpu-fp32', 'colors')}"
    oci.gc(store(), grace_seconds=0)
    code, out, err = cli(capsys, "pull", local, str(tmp_path / "again"))
    assert code == 0, err
    for rel in ("adapters/colors.onnx_adapter", "olive-builder.json", "model.onnx.data"):
        assert (tmp_path / "again" / rel).read_bytes() == (two["colors"] / rel).read_bytes()
    assert not no_partials(tmp_path)


def test_skopeo_and_oras_read_an_adapter_artifact(capsys, tmp_path, two, registry):  # type: ignore[no-untyped-def]
    need(shutil.which("skopeo") is not None, "skopeo is not installed (apt-get install skopeo)")
    import oras.client

    out = package_cli(capsys, two["colors"], "--push", f"{registry.host}/ns")
    ref, digest = lines_with(out, "pushed")[1][1].split("@")
    raw = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
                         check=True, capture_output=True, timeout=60).stdout
    assert oci.digest_bytes(raw) == digest
    manifest = json.loads(raw)
    assert manifest["artifactType"] == ADAPTER_ARTIFACT_TYPE and manifest["subject"]["mediaType"] == MANIFEST
    copied = tmp_path / "skopeo-copy"
    subprocess.run(["skopeo", "copy", "-q", "--preserve-digests", "--src-tls-verify=false", f"docker://{ref}",
                    f"oci:{copied}:adapter"], check=True, capture_output=True, timeout=120)
    assert digest in [m["digest"] for m in json.loads((copied / "index.json").read_text())["manifests"]]
    files = oras.client.OrasClient(hostname=registry.host, insecure=True).pull(target=ref, outdir=str(tmp_path / "oras"))
    assert [Path(f).name for f in files] == ["colors.onnx_adapter"]
    assert Path(files[0]).read_bytes() == (two["colors"] / "adapters" / "colors.onnx_adapter").read_bytes()


def _put_adapter(reg: Registry, tmp: Path, repo: str, tag: str, *, subject: dict[str, Any], name: str = "colors",
                 layer_media: str = ADAPTER_MEDIA_TYPE, base_annotation: str | None = None) -> None:
    """Push a hand-made adapter manifest (its blobs real, its claims chosen by the test)."""
    layer_data, config_data = b"not really an adapter", b'{"name": "x"}'
    for data, media in ((layer_data, layer_media), (config_data, ADAPTER_CONFIG)):
        desc = oci.Descriptor(media, oci.digest_bytes(data), len(data))
        path = tmp / desc.digest.split(":")[1]
        path.write_bytes(data)
        reg.push_blob(repo, desc, path)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": ADAPTER_ARTIFACT_TYPE,
                "config": {"mediaType": ADAPTER_CONFIG, "digest": oci.digest_bytes(config_data),
                           "size": len(config_data)},
                "layers": [{"mediaType": layer_media, "digest": oci.digest_bytes(layer_data), "size": len(layer_data)}],
                "subject": subject,
                "annotations": {ADAPTER_ANNOTATION: name,
                                ADAPTER_BASE_ANNOTATION: base_annotation or str(subject.get("digest"))}}
    reg.put_manifest(repo, tag, oci.canonical_json(manifest), MANIFEST)


def test_hostile_or_malformed_adapter_manifests_fail_cleanly(capsys, tmp_path, two, registry):  # type: ignore[no-untyped-def]
    out = package_cli(capsys, two["colors"], "--push", f"{registry.host}/h")
    base_digest = lines_with(out, "pushed")[0][1].split("@")[1]
    reg = Registry(registry.host)
    base_size = len(reg.get_manifest("h/tiny", base_digest)[0])  # type: ignore[index]
    good_subject = {"mediaType": MANIFEST, "digest": base_digest, "size": base_size}
    missing = {"mediaType": MANIFEST, "digest": "sha256:" + "9" * 64, "size": 500}
    try:
        _put_adapter(reg, tmp_path, "h/tiny", "missing-base", subject=missing)
        _put_adapter(reg, tmp_path, "h/tiny", "wrong-media", subject=good_subject, layer_media="application/octet-stream")
        _put_adapter(reg, tmp_path, "h/tiny", "escape", subject=good_subject, name="../../evil")
        _put_adapter(reg, tmp_path, "h/tiny", "lying-annotation", subject=good_subject, base_annotation="sha256:" + "8" * 64)
        # an adapter whose base is another adapter: followed one hop only, never in a loop
        got = reg.get_manifest("h/tiny", adapter_tag("1.0-cpu-fp32", "colors"))
        assert got is not None
        _put_adapter(reg, tmp_path, "h/tiny", "adapter-of-adapter",
                     subject={"mediaType": MANIFEST, "digest": got[2], "size": len(got[0])})
    finally:
        reg.close()
    cases = {"missing-base": "does not exist", "wrong-media": "exactly one layer",
             "escape": "not a valid adapter name", "lying-annotation": "does not name its subject",
             "adapter-of-adapter": "is not a model artifact"}
    for tag, message in cases.items():
        dest = tmp_path / f"pulled-{tag}"
        code, _out, err = cli(capsys, "pull", f"{registry.host}/h/tiny:{tag}", str(dest))
        assert code != 0 and message in err, (tag, err)
        assert "Traceback" not in err
        assert not dest.exists() and not no_partials(tmp_path)
        assert not (tmp_path / "evil").exists()
    assert not os.path.exists(tmp_path.parent / "evil")


# ------------------------------------------------------------------------------- the build cache

def test_local_cache_hit_restores_the_adapters(capsys, tmp_path, two):  # type: ignore[no-untyped-def]
    st = store()
    package_cli(capsys, two["colors"])
    key = json.loads((two["colors"] / "olive-builder.json").read_text())["cache_key"]
    out_dir = tmp_path / "restored"
    hit = cache.reuse_local(st, key, "tiny:1.1-cpu-fp32", out_dir, force=False, runtime=lambda: None)
    assert hit is not None
    assert (out_dir / "adapters" / "colors.onnx_adapter").read_bytes() == \
        (two["colors"] / "adapters" / "colors.onnx_adapter").read_bytes()
    restored = st.resolve(f"tiny:{adapter_tag('1.1-cpu-fp32', 'colors')}")
    assert restored is not None and restored.artifact_type == ADAPTER_ARTIFACT_TYPE

    # an adapter blob gone from the store: not a hit (the build runs again) rather than a model without it
    layer = st.read_json(restored.digest)["layers"][0]["digest"]
    st.blob_path(layer).unlink()
    assert cache.reuse_local(st, key, "tiny:1.2-cpu-fp32", tmp_path / "other", force=False, runtime=lambda: None) is None
    assert not (tmp_path / "other").exists()


def test_registry_cache_hit_tags_the_adapters_too(capsys, two, registry):  # type: ignore[no-untyped-def]
    package_cli(capsys, two["colors"], "--push", f"{registry.host}/models")
    key = json.loads((two["colors"] / "olive-builder.json").read_text())["cache_key"]
    hit = cache.reuse_remote(registry.host, "models", key, "tiny:1.1-cpu-fp32", with_image=True)
    assert hit is not None and hit.image_digest is None
    refs = [r for r, _ in hit.remote]
    assert refs == [f"{registry.host}/models/tiny:1.1-cpu-fp32",
                    f"{registry.host}/models/tiny:{adapter_tag('1.1-cpu-fp32', 'colors')}"]
    reg = Registry(registry.host)
    try:
        got = reg.get_manifest("models/tiny", adapter_tag("1.1-cpu-fp32", "colors"))
        assert got is not None and json.loads(got[0])["subject"]["digest"] == hit.artifact_digest
    finally:
        reg.close()


def test_signed_adapter_pulls_with_verify_and_an_other_key_is_refused(capsys, tmp_path, two, registry):  # type: ignore[no-untyped-def]
    from builder.trust import sign

    sign.keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    sign.keygen(tmp_path / "other.pem", tmp_path / "other.pub")
    package_cli(capsys, two["colors"], "--sign-key", str(tmp_path / "k.pem"), "--push", f"{registry.host}/s")
    ref = f"{registry.host}/s/tiny:{adapter_tag('1.0-cpu-fp32', 'colors')}"
    code, out, err = cli(capsys, "pull", ref, str(tmp_path / "pulled"), "--verify", str(tmp_path / "k.pub"),
                         "--signature-out", str(tmp_path / "model.sig"))
    assert code == 0, err
    assert (tmp_path / "pulled" / "adapters" / "colors.onnx_adapter").is_file()
    assert (tmp_path / "model.sig").is_file()  # the base's model signature
    code, out, err = cli(capsys, "pull", ref, str(tmp_path / "refused"), "--verify", str(tmp_path / "other.pub"))
    assert code != 0 and "is not signed by the key" in err and not (tmp_path / "refused").exists()

    # an adapter packaged unsigned is refused by --verify even though its base is signed
    package_cli(capsys, two["animals"], "--push", f"{registry.host}/s")
    code, out, err = cli(capsys, "pull", f"{registry.host}/s/tiny:{adapter_tag('1.0-cpu-fp32', 'animals')}",
                         str(tmp_path / "unsigned"), "--verify", str(tmp_path / "k.pub"))
    assert code != 0 and "is not signed" in err and not (tmp_path / "unsigned").exists()


def test_pull_for_serve_of_an_adapter_gives_a_folder_with_base_and_adapter(capsys, two, registry):  # type: ignore[no-untyped-def]
    from builder import pipeline

    package_cli(capsys, two["colors"], "--push", f"{registry.host}/m")
    ref = f"{registry.host}/m/tiny:{adapter_tag('1.0-cpu-fp32', 'colors')}"
    folder = pipeline.pull_for_serve(ref)
    assert (folder / "adapters" / "colors.onnx_adapter").read_bytes() == \
        (two["colors"] / "adapters" / "colors.onnx_adapter").read_bytes()
    assert (folder / "model.onnx.data").is_file()
    assert pipeline.pull_for_serve(ref) == folder  # unpacked once per manifest digest
    base = pipeline.pull_for_serve(f"{registry.host}/m/{TAG}")
    assert base != folder and not (base / "adapters").exists()


@pytest.mark.docker
def test_runnable_image_pulled_by_docker_has_the_adapters_in_its_model_folder(capsys, two, runtime_image,  # type: ignore[no-untyped-def]
                                                                             docker_client, registry):
    need(shutil.which("docker") is not None, "the docker CLI is not installed")
    code, out, err = cli(capsys, "package", str(two["colors"]), "--push", f"{registry.host}/img")
    assert code == 0, err
    (image,) = lines_with(out, "runnable image")
    assert image[2] == TAG + "-serve"
    remote = f"{registry.host}/img/{TAG}-serve"
    subprocess.run(["docker", "pull", "-q", remote], check=True, capture_output=True, timeout=300)
    try:
        script = ("import hashlib, pathlib; m = pathlib.Path('/model')\n"
                  "for p in sorted(m.rglob('*')):\n"
                  "    p.is_file() and print(hashlib.sha256(p.read_bytes()).hexdigest(), p.relative_to(m))")
        listing = docker_client.containers.run(remote, entrypoint=["python3", "-c", script], remove=True).decode()
    finally:
        docker_client.images.remove(remote, force=True)
    sums = dict(reversed(line.split()) for line in listing.splitlines())
    for rel in ("adapters/colors.onnx_adapter", "model.onnx.data"):
        assert "sha256:" + sums[rel] == sha256_file(two["colors"] / rel)
