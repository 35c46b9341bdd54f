"""Packaging and the local store, one layer at a time: deterministic tars, layer grouping,
ModelPack config, annotations, references, credentials, verified unpacking.

Model folders here are small synthetic ones (the files a build leaves, with made-up bytes);
the integration tests package real builds.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from builder.cli import main
from builder.errors import AuthError, ContentError, PackageError, ReferenceError_
from builder.oci import layout as oci
from builder.oci.credentials import credentials_for
from builder.oci.media import MANIFEST, MODEL_ARTIFACT, MODEL_CONFIG, MODEL_WEIGHT, MODEL_WEIGHT_CONFIG
from builder.oci.reference import parse_destination, parse_reference
from builder.publish import distribute, package
from builder.recipe import inputs

REPO = Path(__file__).resolve().parent.parent
# The ModelPack config schema: ../shared/specs has the current one; tests/data keeps a copy
# (github.com/modelpack/model-spec, schema/config-schema.json) for checkouts without it.
SHARED_SCHEMA = REPO.parent / "shared" / "specs" / "modelpack" / "config-schema.json"
SCHEMA = SHARED_SCHEMA if SHARED_SCHEMA.is_file() else Path(__file__).parent / "data" / "modelpack-config-schema.json"
T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def fake_model(folder: Path, target: str = "cpu-int4", weights: bytes = b"w" * 5000, device: str = "cpu",
               precision: str = "int4") -> Path:
    folder.mkdir(parents=True)
    (folder / "genai_config.json").write_text(json.dumps(
        {"model": {"type": "qwen2", "decoder": {"filename": "model.onnx",
                                                "session_options": {"provider_options": [{device: {}}]}}}}))
    (folder / "model.onnx").write_bytes(b"graph-" + target.encode())
    (folder / "model.onnx.data").write_bytes(weights)
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "olive-builder.json").write_text(json.dumps({
        "id": f"tiny/{target}", "name": "tiny", "version": "1.0", "tags": [f"tiny:1.0-{target}"],
        "license": "apache-2.0", "description": "a test model",
        "target": {"device": device, "execution_provider": "CPUExecutionProvider", "precision": precision},
        "source": {"hub": "acme/tiny", "revision": "main", "resolved_revision": "0123abcd" * 5, "local": False},
        "recipe_digest": "sha256:" + "1" * 64, "cache_key": "sha256:" + "2" * 64,
        "builder": {"version": "0.1.0", "engine": "docker", "image": "olive-builder-cpu:abc", "image_id": "sha256:" + "3" * 64},
        "tools": {"olive-ai": "0.13.0", "onnxruntime-genai": "0.14.1", "onnxruntime": "1.32.0",
                  "transformers": "5.24.0", "torch": "2.13.0+cpu"},
    }))
    return folder


def test_same_folder_gives_byte_identical_layers_and_manifests(tmp_path):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    a = package.package(model, oci.Store(tmp_path / "a"), created=T0)
    os.utime(model / "model.onnx.data", (1, 1))  # mtimes and store paths must not matter
    b = package.package(model, oci.Store(tmp_path / "b"), created=T0)
    assert a.artifact.digest == b.artifact.digest
    assert [d.digest for d in a.layers] == [d.digest for d in b.layers]
    for d in a.layers:
        assert (tmp_path / "a" / "blobs" / "sha256" / d.digest[7:]).read_bytes() == \
               (tmp_path / "b" / "blobs" / "sha256" / d.digest[7:]).read_bytes()
    c = package.package(model, oci.Store(tmp_path / "c"), created=T0 + dt.timedelta(seconds=1))
    assert c.artifact.digest != a.artifact.digest  # the creation time is recorded...
    assert [d.digest for d in c.layers] == [d.digest for d in a.layers]  # ...but not in the layers


def test_tar_entries_are_normalized_and_digests_are_of_the_written_bytes(tmp_path):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    os.chmod(model / "tokenizer.json", 0o600)
    store = oci.Store(tmp_path / "s")
    result = package.package(model, store, created=T0)
    names = []
    for layer in result.layers:
        blob = store.blob_path(layer.digest).read_bytes()
        assert layer.digest == "sha256:" + hashlib.sha256(blob).hexdigest() and layer.size == len(blob)
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
                assert m.mode == (0o755 if m.isdir() else 0o644)
                names.append(m.name)
    assert "model/tokenizer.json" in names and "model/model.onnx.data" in names
    assert all(n == "model" or n.startswith("model/") for n in names)


def test_weights_get_their_own_layers_and_two_targets_share_the_tokenizer_layer(tmp_path):  # type: ignore[no-untyped-def]
    store = oci.Store(tmp_path / "s")
    a = package.package(fake_model(tmp_path / "a", "cpu-int4"), store, created=T0)
    b = package.package(fake_model(tmp_path / "b", "cpu-fp32", weights=b"x" * 9000, precision="fp32"), store, created=T0)
    titles = [d.annotations[oci.ANN_TITLE] for d in a.layers]
    assert titles == ["model.onnx.tar", "model.onnx.data.tar", "shared-files.tar", "target-files.tar"]
    assert [d.media_type for d in a.layers] == [MODEL_WEIGHT, MODEL_WEIGHT, MODEL_WEIGHT_CONFIG,
                                                MODEL_WEIGHT_CONFIG]
    assert a.layers[1].annotations[oci.ANN_FILEPATH] == "model/model.onnx.data"
    meta = json.loads(a.layers[1].annotations[oci.ANN_FILE_METADATA])
    assert meta["size"] == 5000 and meta["name"] == "model/model.onnx.data"
    shared_a, shared_b = a.layers[2], b.layers[2]
    assert shared_a.digest == shared_b.digest  # tokenizer & co: one blob for both targets
    assert a.layers[3].digest != b.layers[3].digest and a.layers[1].digest != b.layers[1].digest
    assert store.resolve("tiny:1.0-cpu-int4") == oci.Descriptor(MANIFEST, a.artifact.digest, a.artifact.size,
                                                                {}, MODEL_ARTIFACT)


def test_manifest_is_a_modelpack_artifact_with_a_valid_config_and_annotations(tmp_path):  # type: ignore[no-untyped-def]
    import jsonschema
    store = oci.Store(tmp_path / "s")
    result = package.package(fake_model(tmp_path / "m"), store, created=T0)
    manifest = store.read_json(result.artifact.digest)
    assert manifest["artifactType"] == MODEL_ARTIFACT and manifest["mediaType"] == MANIFEST
    assert manifest["config"]["mediaType"] == MODEL_CONFIG
    config = store.read_json(manifest["config"]["digest"])
    jsonschema.validate(config, json.loads(SCHEMA.read_text()))
    assert config["modelfs"]["diffIds"] == [d["digest"] for d in manifest["layers"]]
    assert config["descriptor"]["revision"] == "0123abcd" * 5 and config["descriptor"]["licenses"] == ["apache-2.0"]
    assert config["config"]["format"] == "onnx" and config["config"]["architecture"] == "qwen2"
    assert config["config"]["precision"] == "int4"
    ann = manifest["annotations"]
    assert ann["org.opencontainers.image.created"] == "2026-01-02T03:04:05Z"
    assert ann["org.opencontainers.image.version"] == "1.0"
    assert ann["org.opencontainers.image.source"] == "https://huggingface.co/acme/tiny"
    assert ann["org.opencontainers.image.revision"] == "0123abcd" * 5
    assert ann["org.opencontainers.image.licenses"] == "apache-2.0"
    expected = {
        "target": "tiny/cpu-int4", "device": "cpu", "execution-provider": "CPUExecutionProvider", "precision": "int4",
        "source.model": "acme/tiny", "source.revision": "0123abcd" * 5, "recipe.digest": "sha256:" + "1" * 64,
        "builder.image-digest": "sha256:" + "3" * 64, "tools.olive-ai": "0.13.0", "tools.onnxruntime-genai": "0.14.1",
        "tools.onnxruntime": "1.32.0", "tools.transformers": "5.24.0", "tools.torch": "2.13.0+cpu",
        "runtime.min-onnxruntime-genai": "0.14.1",
    }
    assert {k: ann["org.olive-builder." + k] for k in expected} == expected


def test_creation_time_comes_from_source_date_epoch(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert inputs.created_time(None, model) == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC)
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    os.utime(model / "tokenizer.json", (1600000000, 1600000000))
    for p in model.iterdir():
        if p.name != "tokenizer.json":
            os.utime(p, (1500000000, 1500000000))
    # the newest file of the local source model, not the clock
    assert inputs.created_time(None, source_dir=model).timestamp() == 1600000000
    # the output folder (its files are as new as the build) is never a source of the time
    assert inputs.created_time(None, model).timestamp() == 0


def test_a_folder_without_build_info_or_with_links_is_refused(tmp_path, capsys):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    (model / "link.json").symlink_to(model / "tokenizer.json")
    with pytest.raises(PackageError, match="symbolic link"):
        package.package(model, oci.Store(tmp_path / "s"), created=T0)
    (model / "link.json").unlink()
    (model / "olive-builder.json").unlink()
    with pytest.raises(SystemExit) as exc:
        main(["package", str(model), "--no-image", "--store", str(tmp_path / "s")])
    assert exc.value.code == 5  # a packaging failure
    assert "has no olive-builder.json" in capsys.readouterr().err


def test_unpacking_from_the_store_round_trips_and_detects_a_damaged_blob(tmp_path):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    store = oci.Store(tmp_path / "s")
    result = package.package(model, store, created=T0)
    out = distribute.materialize(store, store.read_json(result.artifact.digest), tmp_path / "out", force=False, shown="x")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in model.iterdir())
    for p in model.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
    # flip one byte of the weights blob in the store: the unpack must refuse it and leave nothing
    blob = store.blob_path(result.layers[1].digest)
    os.chmod(blob, stat.S_IWUSR | stat.S_IRUSR)
    data = bytearray(blob.read_bytes())
    data[700] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ContentError, match="does not match its digest"):
        distribute.materialize(store, store.read_json(result.artifact.digest), tmp_path / "out2", force=False, shown="x")
    assert not (tmp_path / "out2").exists()
    assert not list(tmp_path.glob(".out2.partial-*"))


def test_a_layer_that_escapes_the_model_folder_is_refused(tmp_path):  # type: ignore[no-untyped-def]
    store = oci.Store(tmp_path / "s")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("model/../../etc/evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    layer = store.put_bytes(buf.getvalue(), MODEL_WEIGHT)
    manifest = {"layers": [layer.to_json()], "config": layer.to_json()}
    with pytest.raises(ContentError, match="outside model/"):
        distribute.materialize(store, manifest, tmp_path / "out", force=False, shown="evil")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "etc").exists()


def test_store_tags_replace_and_survive_reopen(tmp_path):  # type: ignore[no-untyped-def]
    store = oci.Store(tmp_path / "s")
    d1 = store.put_json({"a": 1}, MANIFEST)
    d2 = store.put_json({"a": 2}, MANIFEST)
    store.tag("x:1", d1)
    store.tag("x:1", d2)
    store.tag("y:1", d1)
    again = oci.Store(tmp_path / "s")
    assert again.resolve("x:1").digest == d2.digest and again.resolve("y:1").digest == d1.digest
    assert again.resolve("z:1") is None
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert len(index["manifests"]) == 2 and (tmp_path / "s" / "oci-layout").is_file()
    assert not list((tmp_path / "s" / "ingest").iterdir())  # nothing half-written


@pytest.mark.parametrize("text,expected", [
    ("localhost:5000/models/tiny:1.0-cpu-int4", ("localhost:5000", "models/tiny", "1.0-cpu-int4", None)),
    ("ghcr.io/acme/tiny", ("ghcr.io", "acme/tiny", "latest", None)),
    ("tiny:1.0", (None, "tiny", "1.0", None)),
    ("127.0.0.1:5000/t@sha256:" + "a" * 64, ("127.0.0.1:5000", "t", None, "sha256:" + "a" * 64)),
])
def test_references_parse(text, expected):  # type: ignore[no-untyped-def]
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize("text", ["Tiny:1", "localhost:5000/a b", "x@sha256:123", "tiny:bad tag"])
def test_bad_references_are_refused(text):  # type: ignore[no-untyped-def]
    with pytest.raises(ReferenceError_) as info:  # the user's mistake: a usage error, exit 2
        parse_reference(text)
    assert info.value.exit_code == 2


def test_destinations_parse():  # type: ignore[no-untyped-def]
    assert parse_destination("ghcr.io/acme/models") == ("ghcr.io", "acme/models")
    assert parse_destination("localhost:5000") == ("localhost:5000", "")
    with pytest.raises(ReferenceError_, match="does not start with a registry host"):
        parse_destination("acme/models")


def test_credentials_come_from_env_docker_config_and_helpers(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    config_dir = Path(os.environ["DOCKER_CONFIG"])
    config_dir.mkdir(parents=True, exist_ok=True)
    assert credentials_for("reg.example:5000") is None
    auth = base64.b64encode(b"alice:pw-from-config").decode()
    (config_dir / "config.json").write_text(json.dumps({
        "auths": {"reg.example:5000": {"auth": auth}, "https://other.example": {"auth": auth}},
        "credHelpers": {"helped.example": "fake"},
    }))
    c = credentials_for("reg.example:5000")
    assert (c.username, c.secret) == ("alice", "pw-from-config")
    assert credentials_for("other.example").username == "alice"
    assert "pw-from-config" not in repr(c)
    # a credential helper: a real program on PATH speaking Docker's helper protocol
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread host\necho "{\\"Username\\": \\"bob\\", \\"Secret\\": \\"pw-for-$host\\"}"\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    c = credentials_for("helped.example")
    assert (c.username, c.secret) == ("bob", "pw-for-helped.example")
    (config_dir / "config.json").write_text(json.dumps({"credHelpers": {"helped.example": "missing"}}))
    with pytest.raises(AuthError, match="docker-credential-missing"):
        credentials_for("helped.example")
    monkeypatch.setenv("OLIVE_BUILDER_REGISTRY_USERNAME", "carol")
    monkeypatch.setenv("OLIVE_BUILDER_REGISTRY_PASSWORD", "pw-from-env")
    monkeypatch.setenv("OLIVE_BUILDER_REGISTRY_HOST", "helped.example")  # the registry they are for
    c = credentials_for("helped.example")  # the environment comes first
    assert (c.username, c.secret) == ("carol", "pw-from-env")
