"""Supply chain of LoRA adapter artifacts (issue 15): each adapter gets an SBOM, a SLSA provenance
and an evaluation as referrers of its own manifest, validated as the model's are (the CycloneDX
1.6 schema through cyclonedx-python-lib; in-toto's Statement v1, SLSA provenance v1 and
test-result v0.1 protobuf definitions, parsed strictly); `build verify` of an adapter's tag
checks its signature, its attestations, its file and its base, against a real registry
(Debian's docker-registry 2.8: the referrers tag schema) and the local store; the runnable
image's SBOM lists the adapter files.

The model folders are those of test_adapters_distribution: a real ``.onnx_adapter`` written by
``onnxruntime.AdapterFormat`` and a build record with a ``finetune`` section.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from builder.contract import CYCLONEDX_PREDICATE, SLSA_PROVENANCE_V1, TEST_RESULT_V01, adapter_tag, sha256_file
from builder.errors import VerificationError
from builder.oci import layout as oci
from builder.oci import referrers
from builder.oci.media import ADAPTER_ARTIFACT_TYPE, IMAGE_CONFIG, MANIFEST
from builder.publish import package
from builder.trust import attach, sign, verify
from builder.trust.facts import FileDigest
from conftest import run_cli
from test_adapters_distribution import T0, TAG, finetuned_folder
from test_supply_chain import assert_cyclonedx_16, assert_statement

ADAPTER_TAG = f"tiny:{adapter_tag('1.0-cpu-fp32', 'colors')}"


def with_record(folder: Path, **changes: Any) -> Path:
    """Change the build record of ``folder`` (top-level keys; ``dataset`` replaces the adapter's)."""
    path = folder / "olive-builder.json"
    record = json.loads(path.read_text())
    dataset = changes.pop("dataset", None)
    if dataset is not None:
        record["finetune"]["adapters"][0]["dataset"] = dataset
    record.update(changes)
    path.write_text(json.dumps(record))
    return folder


def adapter_evaluation(folder: Path, name: str = "colors", *, passed: bool = True) -> dict[str, Any]:
    """The build record's evaluation as the evaluation stage writes it when it loaded an adapter."""
    file = folder / "adapters" / f"{name}.onnx_adapter"
    return {"evaluated": True, "passed": passed, "failures": [] if passed else ["kl_divergence 0.9 > 0.05"],
            "gates": {"kl_divergence": 0.05}, "accuracy": {"kl_divergence": 0.001, "top1_agreement": 1.0},
            "adapter": {"name": name, "mode": "adapter", "file": file.name, "sha256": sha256_file(file)}}


HUB_DATASET = {"source": "hub", "hub": "acme/faq", "revision": "f" * 40, "names": ["train.jsonl"], "rows": 70,
               "columns": ["instruction", "response"], "sha256": "sha256:" + "5" * 64, "format": "json"}


def documents(st: oci.Store, digest: str, name: str = "tiny") -> dict[str, bytes]:
    content = referrers.LocalContent(st, name)
    out = {}
    for kind in ("sbom", "provenance", "evaluation"):
        doc = referrers.document(content, digest, kind)
        assert doc is not None, kind
        out[kind] = doc
    return out


# ------------------------------------------------------------------------------- the documents

def test_adapter_attestations_are_valid_and_say_what_the_adapter_is_made_of(tmp_path):  # type: ignore[no-untyped-def]
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.predicates.test_result.v0 import test_result_pb2

    folder = finetuned_folder(tmp_path / "out", "colors", 1)
    with_record(folder, evaluation=adapter_evaluation(folder), dataset=HUB_DATASET)
    st = oci.Store(tmp_path / "store")
    p = package.package(folder, st, created=T0)
    (a,) = p.adapters
    manifest = st.read_json(a.manifest.digest)
    file_hex = manifest["layers"][0]["digest"].split(":")[1]
    assert "sha256:" + file_hex == sha256_file(folder / "adapters" / "colors.onnx_adapter")
    docs = documents(st, a.manifest.digest)

    # SBOM: CycloneDX 1.6; the adapter file with its digest, the base by digest, the dataset, the tools
    assert_cyclonedx_16(docs["sbom"])
    bom = json.loads(docs["sbom"])
    assert bom["metadata"]["component"]["purl"] == f"pkg:oci/tiny@{a.manifest.digest}"
    by_ref = {c["bom-ref"]: c for c in bom["components"]}
    adapter = by_ref["adapter"]
    assert adapter["type"] == "machine-learning-model" and adapter["name"] == "colors"
    assert [(f["name"], f["hashes"][0]["content"]) for f in adapter["components"]] == \
        [("adapters/colors.onnx_adapter", file_hex)]
    assert adapter["modelCard"]["modelParameters"]["datasets"] == [{"ref": "dataset"}]
    assert {m["type"] for m in adapter["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]} == \
        {"kl_divergence", "top1_agreement"}
    props = {pr["name"]: pr["value"] for pr in adapter["properties"]}
    assert props["olive-builder:finetune.seed"] == "1" and props["olive-builder:finetune.mode"] == "adapter"
    base = by_ref["base"]
    assert base["purl"] == f"pkg:oci/tiny@{p.artifact.digest}" and base["version"] == p.artifact.digest
    assert base["pedigree"]["ancestors"][0]["purl"] == f"pkg:huggingface/acme/tiny@{'0123abcd' * 5}"
    data = by_ref["dataset"]
    assert data["type"] == "data" and data["name"] == "acme/faq" and data["version"] == "f" * 40
    assert data["hashes"] == [{"alg": "SHA-256", "content": "5" * 64}]
    assert data["externalReferences"][0]["url"] == f"https://huggingface.co/datasets/acme/faq/tree/{'f' * 40}"
    dprops = {pr["name"]: pr["value"] for pr in data["properties"]}
    assert dprops["olive-builder:dataset.rows"] == "70" and dprops["olive-builder:dataset.source"] == "hub"
    tools = {t["name"]: t for t in bom["metadata"]["tools"]["components"]}
    assert tools["peft"]["purl"] == "pkg:pypi/peft@0.18.0" and tools["torch"]["version"] == "2.13.0+cpu"
    assert "olive-ai" in tools and "olive-builder" in tools
    deps = {d["ref"]: d.get("dependsOn", []) for d in bom["dependencies"]}
    assert deps["subject"] == ["adapter"] and sorted(deps["adapter"]) == ["base", "dataset"]

    # provenance: subject the adapter manifest; the base, the source model, the dataset resolved
    st_prov = assert_statement(docs["provenance"], provenance_pb2.Provenance())
    assert st_prov["subject"] == [{"name": ADAPTER_TAG, "digest": {"sha256": a.manifest.digest.split(":")[1]}}]
    definition = st_prov["predicate"]["buildDefinition"]
    resolved = {d["name"]: d for d in definition["resolvedDependencies"]}
    assert resolved[TAG]["digest"] == {"sha256": p.artifact.digest.split(":")[1]}
    assert resolved["acme/tiny"]["digest"] == {"gitCommit": "0123abcd" * 5}
    assert resolved["dataset:acme/faq"]["digest"] == {"sha256": "5" * 64, "gitCommit": "f" * 40}
    assert resolved["dataset:acme/faq"]["annotations"]["rows"] == 70
    finetune = definition["externalParameters"]["finetune"]
    assert finetune["settings"] == {"max_steps": 30, "learning_rate": 0.0002, "seed": 1, "lora": {"r": 8, "alpha": 16}}
    assert finetune["dataset"] == {"source": "hub", "hub": "acme/faq", "revision": "f" * 40, "names": ["train.jsonl"]}

    # evaluation: the build evaluated this adapter, so its result is the adapter's
    st_eval = assert_statement(docs["evaluation"], test_result_pb2.TestResult())
    assert st_eval["predicate"]["result"] == "PASSED"
    assert st_eval["subject"][0]["digest"]["sha256"] == a.manifest.digest.split(":")[1]
    assert st_eval["predicate"]["configuration"][0]["annotations"]["adapter"] == "colors"

    # deterministic: packaging again attaches nothing new
    before = referrers.list_local(st, "tiny", a.manifest.digest)
    package.package(folder, st, created=T0)
    assert referrers.list_local(st, "tiny", a.manifest.digest) == before and len(before) == 3


@pytest.mark.parametrize("evaluation, result", [
    (None, "WARNED"),  # not evaluated at all
    ({"evaluated": True, "passed": True, "gates": {}}, "WARNED"),  # the base was evaluated, not the adapter
    ("other adapter", "WARNED"),
    ("this adapter, failed", "FAILED"),
])
def test_adapter_evaluation_is_the_adapters_own(tmp_path, evaluation, result):  # type: ignore[no-untyped-def]
    from in_toto_attestation.predicates.test_result.v0 import test_result_pb2

    folder = finetuned_folder(tmp_path / "out", "colors", 1)
    if evaluation == "other adapter":
        evaluation = {**adapter_evaluation(folder), "adapter": {"name": "animals", "mode": "adapter"}}
    elif evaluation == "this adapter, failed":
        evaluation = adapter_evaluation(folder, passed=False)
    if evaluation is not None:
        with_record(folder, evaluation=evaluation)
    st = oci.Store(tmp_path / "store")
    (a,) = package.package(folder, st, created=T0).adapters
    doc = documents(st, a.manifest.digest)["evaluation"]
    assert assert_statement(doc, test_result_pb2.TestResult())["predicate"]["result"] == result


def test_the_runnable_images_sbom_lists_the_adapter_files(tmp_path):  # type: ignore[no-untyped-def]
    folder = finetuned_folder(tmp_path / "out", "colors", 1)
    st = oci.Store(tmp_path / "store")
    config = {"architecture": "amd64", "os": "linux", "config": {"Labels": {}}, "rootfs": {"type": "layers", "diff_ids": []}}
    rt_config = st.put_json(config, IMAGE_CONFIG)
    rt = st.put_json({"schemaVersion": 2, "mediaType": MANIFEST, "config": rt_config.to_json(), "layers": []},
                     MANIFEST)
    p = package.package(folder, st, created=T0, runtime=package.RuntimeImage("runtime:test", rt, config, ()))
    assert p.image is not None
    want = sha256_file(folder / "adapters" / "colors.onnx_adapter").split(":")[1]

    def files(doc: bytes) -> dict[str, dict[str, Any]]:
        model = next(c for c in json.loads(doc)["components"] if c.get("bom-ref") == "model")
        return {f["name"]: f for f in model["components"]}

    image_doc = documents(st, p.image.digest)["sbom"]
    assert_cyclonedx_16(image_doc)
    listed = files(image_doc)
    assert listed["adapters/colors.onnx_adapter"]["hashes"] == [{"alg": "SHA-256", "content": want}]
    assert {"name": "olive-builder:image-path", "value": "/model/adapters/colors.onnx_adapter"} in \
        listed["adapters/colors.onnx_adapter"]["properties"]
    assert "model.onnx.data" in listed
    # the model artifact holds no adapters/, and its SBOM lists none
    assert "adapters/colors.onnx_adapter" not in files(documents(st, p.artifact.digest)["sbom"])
    # an image composed from the store (a cache hit) is read back the same way, from its layers
    assert attach.image_adapter_files(st, p.image) == (
        FileDigest("adapters/colors.onnx_adapter", want, (folder / "adapters" / "colors.onnx_adapter").stat().st_size),)


# ------------------------------------------------------------------------------- verify

def keypair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    sign.keygen(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
    return tmp_path / f"{name}.key", tmp_path / f"{name}.pub"


@pytest.mark.integration
def test_verify_of_an_adapter_on_a_registry_checks_it_and_its_base(capsys, tmp_path, registry):  # type: ignore[no-untyped-def]
    folder = finetuned_folder(tmp_path / "out", "colors", 1)
    with_record(folder, evaluation=adapter_evaluation(folder))
    key, pub = keypair(tmp_path, "ci")
    _other_key, other_pub = keypair(tmp_path, "other")
    code, out, err = run_cli(capsys, "package", str(folder), "--no-image", "--sign-key", str(key),
                             "--push", f"{registry.host}/models")
    assert code == 0, err
    ref = f"{registry.host}/models/{ADAPTER_TAG}"
    base_digest = json.loads(oci.open_store().read_bytes(oci.open_store().resolve(ADAPTER_TAG).digest))["subject"]["digest"]  # type: ignore[union-attr]

    # the registry has the adapter's own referrers, in the tag schema's index of its digest
    code, shown, err = run_cli(capsys, "inspect", ref, "--json", "--store", str(tmp_path / "s-inspect"))
    assert code == 0, err
    kinds = sorted(r["kind"] for r in json.loads(shown)["referrers"])
    assert kinds == ["attestations", "evaluation", "provenance", "sbom", "signature"]
    code, shown, err = run_cli(capsys, "inspect", ref, "--sbom", "--store", str(tmp_path / "s-inspect"))
    assert code == 0, err
    assert_cyclonedx_16(shown.encode())

    code, out, err = run_cli(capsys, "verify", ref, "--key", str(pub))
    assert code == 0, err
    assert out.startswith(f"verified {ref}@sha256:")
    assert "  adapter            colors: its file matches the signed manifest and SBOM" in out
    assert f"verified its base (the adapter's subject) @{base_digest}" in out
    for ptype in (SLSA_PROVENANCE_V1, CYCLONEDX_PREDICATE, TEST_RESULT_V01):
        assert out.count(ptype) == 2  # the adapter's and the base's
    code, out, err = run_cli(capsys, "verify", ref, "--key", str(pub), "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["adapter"] == "colors" and got["evaluation"] == "PASSED"
    assert got["base"]["digest"] == base_digest and got["base"]["modelSignature"] is True

    # another key: exit 5 with the reason
    code, out, err = run_cli(capsys, "verify", ref, "--key", str(other_pub))
    assert code == 5 and "not signed by the key" in err and "Traceback" not in err

    # the registry's copy of the adapter file changed: its manifest (and signature) still match, its bytes do not
    layer = json.loads(oci.open_store().read_bytes(oci.open_store().resolve(ADAPTER_TAG).digest))["layers"][0]  # type: ignore[union-attr]
    blob = registry.blob_data(layer["digest"])
    good = blob.read_bytes()
    blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    try:
        code, out, err = run_cli(capsys, "verify", ref, "--key", str(pub))
        assert code == 5 and "does not match its digest" in err and "Traceback" not in err, err
    finally:
        blob.write_bytes(good)
    code, out, err = run_cli(capsys, "verify", ref, "--key", str(pub))
    assert code == 0, err


@pytest.mark.integration
def test_push_sign_key_of_an_unsigned_adapter_attests_and_signs_it(capsys, tmp_path, registry):  # type: ignore[no-untyped-def]
    folder = finetuned_folder(tmp_path / "out", "colors", 1)
    key, pub = keypair(tmp_path, "ci")
    code, out, err = run_cli(capsys, "package", str(folder), "--no-image")
    assert code == 0, err
    dest = f"{registry.host}/late"
    # the base first (signed), then the adapter's tag alone (its base goes by digest)
    code, out, err = run_cli(capsys, "push", TAG, "--to", dest, "--sign-key", str(key))
    assert code == 0, err
    code, out, err = run_cli(capsys, "push", ADAPTER_TAG, "--to", dest, "--sign-key", str(key))
    assert code == 0, err
    code, out, err = run_cli(capsys, "verify", f"{dest}/{ADAPTER_TAG}", "--key", str(pub))
    assert code == 0, err
    assert "WARNED  (not evaluated)" in out  # the build's evaluation did not load this adapter


def test_verify_of_a_local_adapter_refuses_a_changed_file_and_an_unsigned_base(capsys, tmp_path):  # type: ignore[no-untyped-def]
    folder = finetuned_folder(tmp_path / "out", "colors", 1)
    key, pub = keypair(tmp_path, "ci")
    st = oci.open_store()
    # adapter signed, its base not: the adapter alone is not enough
    p = package.package(folder, st, created=T0)
    signer = sign.load_signing_key(str(key), env={})
    attach.attach_adapter(st, ADAPTER_TAG, p.adapters[0].manifest, key=signer)
    code, out, err = run_cli(capsys, "verify", ADAPTER_TAG, "--key", str(pub))
    assert code == 5 and f"(its base {p.artifact.digest}) is not signed" in err, err
    # both signed: verified
    code, out, err = run_cli(capsys, "package", str(folder), "--no-image", "--sign-key", str(key))
    assert code == 0, err
    code, out, err = run_cli(capsys, "verify", ADAPTER_TAG, "--key", str(pub))
    assert code == 0, err
    assert "verified its base" in out
    # the store's copy of the adapter file changed
    layer = st.read_json(p.adapters[0].manifest.digest)["layers"][0]["digest"]
    path = st.blob_path(layer)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes() + b"x")
    code, out, err = run_cli(capsys, "verify", ADAPTER_TAG, "--key", str(pub))
    assert code == 5 and "does not match its digest" in err and "Traceback" not in err


def test_signed_attestations_that_do_not_list_the_adapter_file_are_refused(tmp_path):  # type: ignore[no-untyped-def]
    """The SBOM check in verify: attestations copied from another adapter's (same key) do not pass."""
    folder = finetuned_folder(tmp_path / "out", "colors", 1)
    key, pub = keypair(tmp_path, "ci")
    st = oci.Store(tmp_path / "store")
    signer = sign.load_signing_key(str(key), env={})
    p = package.package(folder, st, created=T0, sign_key=signer)
    digest = p.adapters[0].manifest.digest
    content = referrers.LocalContent(st, "tiny")
    found = verify.verify_subject(content, digest, sign.load_public_key(pub), ADAPTER_TAG)
    manifest = st.read_json(digest)
    bom = found.predicates[CYCLONEDX_PREDICATE]
    other = json.loads(json.dumps(bom).replace(manifest["layers"][0]["digest"].split(":")[1],
                                               hashlib.sha256(b"another adapter").hexdigest()))
    forged = verify.Verified(found.digest, True, {**found.predicates, CYCLONEDX_PREDICATE: other},
                           found.evaluation_result, None, found.referrers)
    with pytest.raises(VerificationError, match="does not list the adapter file"):
        verify.verify_adapter(content, manifest, forged, sign.load_public_key(pub), ADAPTER_TAG)
    assert verify.verify_adapter(content, manifest, found, sign.load_public_key(pub), ADAPTER_TAG).adapter == "colors"
    assert verify.adapter_of(manifest, ADAPTER_TAG).base.digest == p.artifact.digest
    assert manifest["artifactType"] == ADAPTER_ARTIFACT_TYPE


# ------------------------------------------------------------------------------- a real build

@pytest.mark.integration
def test_a_real_finetune_build_signed_pushed_and_verified_and_a_cache_hit_signs_again(  # type: ignore[no-untyped-def]
        capsys, tmp_path, tiny_model, cpu_builder_image, registry):
    """Olive trains and converts a real adapter (the CPU builder image); its record (dataset, settings,
    the evaluation of the adapted model) becomes the adapter's attestations, which verify through
    the CLI from the registry; a local cache hit with another key attests and signs it again."""
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.predicates.test_result.v0 import test_result_pb2

    from test_finetune import finetune_recipe

    recipe = finetune_recipe(tmp_path, tiny_model)
    key, pub = keypair(tmp_path, "ci")
    key2, pub2 = keypair(tmp_path, "second")
    dest = f"{registry.host}/ft"
    code, out, err = run_cli(capsys, "recipe", str(recipe), "-q", "-o", str(tmp_path / "out"), "--no-image",
                             "--sign-key", str(key), "--push", dest)
    assert code == 0, err
    ref = f"{dest}/tiny-colors:{adapter_tag('0.1.0-cpu-fp32', 'colors')}"
    code, out, err = run_cli(capsys, "verify", ref, "--key", str(pub), "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["adapter"] == "colors" and got["evaluation"] == "PASSED"  # the build evaluated the adapter
    assert got["base"]["evaluation"] == "PASSED" and got["base"]["modelSignature"] is True

    docs = {}
    for kind in ("sbom", "provenance", "evaluation"):
        code, shown, err = run_cli(capsys, "inspect", ref, f"--{kind}", "--store", str(tmp_path / "s-inspect"))
        assert code == 0, err
        docs[kind] = shown.encode()
    assert_cyclonedx_16(docs["sbom"])
    record = json.loads((tmp_path / "out" / "olive-builder.json").read_text())
    dataset = record["finetune"]["adapters"][0]["dataset"]
    data = next(c for c in json.loads(docs["sbom"])["components"] if c["bom-ref"] == "dataset")
    assert data["hashes"][0]["content"] == dataset["sha256"].split(":")[1]
    assert {"name": "olive-builder:dataset.rows", "value": "48"} in data["properties"]
    prov = assert_statement(docs["provenance"], provenance_pb2.Provenance())
    assert prov["predicate"]["buildDefinition"]["externalParameters"]["finetune"]["settings"]["max_steps"] == 30
    assert {"sha256": got["base"]["digest"].split(":")[1]} in \
        [d.get("digest") for d in prov["predicate"]["buildDefinition"]["resolvedDependencies"]]
    assert assert_statement(docs["evaluation"], test_result_pb2.TestResult())["predicate"]["result"] == "PASSED"

    # a local cache hit, signed with another key: the adapter is signed (and attested) by it too
    code, out, err = run_cli(capsys, "recipe", str(recipe), "-q", "-o", str(tmp_path / "out"), "--no-image",
                             "--sign-key", str(key2))
    assert code == 0, err
    assert "Cached" in out, out
    local = f"tiny-colors:{adapter_tag('0.1.0-cpu-fp32', 'colors')}"
    for public in (pub, pub2):
        code, out, err = run_cli(capsys, "verify", local, "--key", str(public))
        assert code == 0, err
        assert "verified its base" in out
