"""Supply chain without a registry: SBOMs validated against the CycloneDX 1.6 schema, provenance
and evaluation against the in-toto Statement v1 and SLSA/test-result schemas (the in-toto
attestation protobuf definitions, parsed strictly), cosign-format signatures checked by our
verifier following sigstore/cosign's specs, the OpenSSF model signing bundle checked by the
real `model_signing` CLI, and referrers in the local store."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.contract import (
    CYCLONEDX_PREDICATE,
    REFERRER_KIND_ANNOTATION,
    SLSA_PROVENANCE_V1,
    TEST_RESULT_V01,
    model_files,
)
from builder.errors import SigningError, VerificationError
from builder.oci import layout as oci
from builder.oci import referrers
from builder.oci.media import IMAGE_LAYER, INDEX, MANIFEST
from builder.publish import package
from builder.trust import attach, evaluation_statement, provenance, sbom, sign, verify
from builder.trust.facts import BuildFacts, Subject, file_digests

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def fake_model(folder: Path, *, evaluation: dict | None = None) -> Path:  # type: ignore[type-arg]
    folder.mkdir(parents=True)
    (folder / "genai_config.json").write_text(json.dumps({"model": {"type": "qwen2", "decoder": {"filename": "model.onnx"}}}))
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "model.onnx.data").write_bytes(b"w" * 5000)
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    info = {
        "id": "tiny/cpu-int4", "name": "tiny", "version": "1.0", "tags": ["tiny:1.0-cpu-int4"],
        "license": "apache-2.0", "description": "a test model",
        "target": {"device": "cpu", "execution_provider": "CPUExecutionProvider", "precision": "int4"},
        "source": {"hub": "acme/tiny", "revision": "main", "resolved_revision": "0123abcd" * 5, "local": False},
        "recipe_digest": "sha256:" + "1" * 64, "cache_key": "sha256:" + "2" * 64,
        "builder": {"version": "0.1.0", "engine": "docker", "image": "olive-builder-cpu:abc", "image_id": "sha256:" + "3" * 64},
        "tools": {"olive-ai": "0.13.0", "onnxruntime-genai": "0.14.1", "onnxruntime": "1.32.0",
                  "transformers": "5.24.0", "torch": "2.13.0+cpu"},
        "check": {"ok": True, "tokens": 8},
    }
    if evaluation is not None:
        info["evaluation"] = evaluation
    (folder / "olive-builder.json").write_text(json.dumps(info))
    return folder


def facts_of(model: Path, **kw) -> BuildFacts:  # type: ignore[no-untyped-def]
    info = json.loads((model / "olive-builder.json").read_text())
    return BuildFacts(info, file_digests(model, model_files(model)), T0, **kw)


ARTIFACT = Subject("tiny:1.0-cpu-int4", "sha256:" + "a" * 64)
IMAGE = Subject("tiny:1.0-cpu-int4-serve", "sha256:" + "b" * 64)


def assert_cyclonedx_16(doc: bytes) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(doc.decode())
    assert errors is None, errors


def assert_statement(doc: bytes | dict, predicate_message) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """Parse strictly (unknown fields fail) into in-toto's Statement v1 and the predicate's message."""
    from google.protobuf import json_format
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement

    st = json.loads(doc) if isinstance(doc, bytes) else doc
    Statement.copy_from_pb(json_format.ParseDict(st, statement_pb2.Statement())).validate()
    json_format.ParseDict(st["predicate"], predicate_message)
    return st


# ------------------------------------------------------------------------------- documents

def test_model_sbom_is_valid_cyclonedx_16_and_lists_files_source_and_tools(tmp_path):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    facts = facts_of(model)
    doc = oci.canonical_json(sbom.sbom(facts, ARTIFACT))
    assert_cyclonedx_16(doc)
    bom = json.loads(doc)
    assert bom["specVersion"] == "1.6"
    assert bom["metadata"]["component"]["purl"] == f"pkg:oci/tiny@sha256:{'a' * 64}"
    assert bom["metadata"]["timestamp"].startswith("2026-01-02T03:04:05")
    model_c = next(c for c in bom["components"] if c["type"] == "machine-learning-model")
    files = {c["name"]: c["hashes"][0] for c in model_c["components"]}
    assert set(files) == set(model_files(model))
    assert files["model.onnx.data"] == {"alg": "SHA-256", "content": __import__("hashlib").sha256(b"w" * 5000).hexdigest()}
    source = model_c["pedigree"]["ancestors"][0]
    assert source["purl"] == f"pkg:huggingface/acme/tiny@{'0123abcd' * 5}"
    assert source["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    tools = {t["name"]: t for t in bom["metadata"]["tools"]["components"]}
    assert tools["olive-ai"]["purl"] == "pkg:pypi/olive-ai@0.13.0"
    assert tools["onnxruntime-genai"]["version"] == "0.14.1"
    assert tools["olive-builder-cpu:abc"]["hashes"][0]["content"] == "3" * 64
    # deterministic: the same build gives the same bytes (re-push uploads nothing new)
    assert oci.canonical_json(sbom.sbom(facts_of(model), ARTIFACT)) == doc


def test_image_sbom_adds_runtime_python_and_debian_packages(tmp_path):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    pkgs = [sbom.Package("pypi", "onnxruntime_genai", "0.18.0", "MIT"),
            sbom.Package("deb", "libc6", "2.36-9+deb12u9", None, "amd64")]
    doc = oci.canonical_json(sbom.sbom(facts_of(model), IMAGE, packages=pkgs, base={"name": "rt:1", "digest": "sha256:" + "c" * 64}))
    assert_cyclonedx_16(doc)
    purls = {c.get("purl") for c in json.loads(doc)["components"]}
    assert "pkg:pypi/onnxruntime-genai@0.18.0" in purls
    assert "pkg:deb/debian/libc6@2.36-9%2Bdeb12u9?arch=amd64" in purls


def test_layer_packages_read_dist_info_and_dpkg_status_with_whiteouts(tmp_path):  # type: ignore[no-untyped-def]
    import io
    import tarfile

    store = oci.Store(tmp_path / "store")

    def layer(files: dict[str, bytes]) -> oci.Descriptor:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return store.put_bytes(buf.getvalue(), IMAGE_LAYER)

    status = (b"Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9\n\n"
              b"Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n")
    site = "usr/local/lib/python3.11/site-packages"
    layers = [
        layer({"var/lib/dpkg/status": status,
               f"{site}/numpy-2.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: numpy\nVersion: 2.1.0\n",
               f"{site}/pip-24.0.dist-info/METADATA": b"Name: pip\nVersion: 24.0\n"}),
        layer({f"{site}/.wh.pip-24.0.dist-info": b""}),  # pip removed in a later layer
    ]
    found = {(p.ecosystem, p.name, p.version) for p in sbom.layer_packages(store, layers)}
    assert found == {("deb", "libc6", "2.36-9"), ("pypi", "numpy", "2.1.0")}


def test_provenance_is_an_in_toto_v1_statement_with_a_slsa_v1_predicate(tmp_path):  # type: ignore[no-untyped-def]
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2

    model = fake_model(tmp_path / "m")
    lock = {"revision": "0123abcd" * 5, "files": {"model.safetensors": "sha256:" + "4" * 64}}
    facts = facts_of(model, recipe_path="recipes/tiny/cpu-int4.yaml", recipe_text="name: tiny\n", lock_entry=lock)
    st = assert_statement(provenance.provenance(facts, [ARTIFACT, IMAGE], env={}), provenance_pb2.Provenance())
    assert st["_type"] == "https://in-toto.io/Statement/v1" and st["predicateType"] == "https://slsa.dev/provenance/v1"
    assert [s["digest"]["sha256"] for s in st["subject"]] == ["a" * 64, "b" * 64]
    bd = st["predicate"]["buildDefinition"]
    assert bd["externalParameters"]["recipe"] == {"digest": "sha256:" + "1" * 64, "path": "recipes/tiny/cpu-int4.yaml",
                                                  "content": "name: tiny\n"}
    assert bd["externalParameters"]["target"]["precision"] == "int4"
    deps = {d["name"]: d["digest"] for d in bd["resolvedDependencies"]}
    assert deps["acme/tiny"] == {"gitCommit": "0123abcd" * 5}
    assert deps["source:model.safetensors"] == {"sha256": "4" * 64}
    assert deps["olive-builder-cpu:abc"] == {"sha256": "3" * 64}
    assert bd["internalParameters"]["lockEntry"] == lock
    assert st["predicate"]["runDetails"]["builder"]["id"].startswith("urn:olive-builder:host:")


def test_provenance_names_the_github_actions_run_when_built_there(tmp_path):  # type: ignore[no-untyped-def]
    env = {"GITHUB_ACTIONS": "true", "GITHUB_REPOSITORY": "acme/models", "GITHUB_RUN_ID": "42", "GITHUB_RUN_ATTEMPT": "2",
           "GITHUB_WORKFLOW_REF": "acme/models/.github/workflows/models.yml@refs/heads/main"}
    st = provenance.provenance(facts_of(fake_model(tmp_path / "m")), [ARTIFACT], env=env)
    run = st["predicate"]["runDetails"]
    assert run["builder"]["id"] == "https://github.com/acme/models/.github/workflows/models.yml@refs/heads/main"
    assert run["metadata"]["invocationId"] == "https://github.com/acme/models/actions/runs/42/attempts/2"


@pytest.mark.parametrize("evaluation, result", [  # the shapes builder.build.evaluate writes
    (None, "WARNED"),
    ({"evaluated": False, "reason": "evaluate: false in the recipe", "passed": True, "failures": []}, "WARNED"),
    ({"evaluated": True, "passed": True, "failures": [], "accuracy": {"perplexity_ratio": 1.01, "top1_agreement": 0.97},
      "gates": {"max_perplexity_ratio": 1.15, "min_top1_agreement": 0.9}}, "PASSED"),
    ({"evaluated": True, "passed": False, "failures": ["perplexity ratio 1.52 > 1.15"],
      "accuracy": {"perplexity_ratio": 1.52}, "gates": {"max_perplexity_ratio": 1.15}}, "FAILED"),
])
def test_evaluation_is_a_test_result_statement(tmp_path, evaluation, result):  # type: ignore[no-untyped-def]
    from in_toto_attestation.predicates.test_result.v0 import test_result_pb2

    facts = facts_of(fake_model(tmp_path / "m", evaluation=evaluation))
    st = assert_statement(evaluation_statement.evaluation(facts, [ARTIFACT, IMAGE]), test_result_pb2.TestResult())
    assert st["predicateType"] == "https://in-toto.io/attestation/test-result/v0.1"
    assert st["predicate"]["result"] == result
    if evaluation:
        assert st["predicate"]["configuration"][0]["annotations"]["results"] == evaluation
    if result == "FAILED":
        assert st["predicate"]["failedTests"] == ["evaluation: perplexity ratio 1.52 > 1.15"]
    if result == "PASSED":
        assert "gate: max_perplexity_ratio 1.15" in st["predicate"]["passedTests"]
        bom = sbom.sbom(facts, ARTIFACT)  # the figures also reach the SBOM's model card
        card = next(c for c in bom["components"] if c["bom-ref"] == "model")["modelCard"]
        assert {"type": "perplexity_ratio", "value": "1.01"} in card["quantitativeAnalysis"]["performanceMetrics"]
        assert_cyclonedx_16(oci.canonical_json(bom))


# ------------------------------------------------------------------------------- keys and signatures

def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    key_id = sign.keygen(tmp_path / "k.pem", tmp_path / "k.pub", password="pass phrase")
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "k.pem").read_bytes()
    with pytest.raises(SigningError, match="already exists"):
        sign.keygen(tmp_path / "k.pem", tmp_path / "k2.pub")
    with pytest.raises(SigningError, match="encrypted and no passphrase"):
        sign.load_signing_key(str(tmp_path / "k.pem"), env={})
    with pytest.raises(SigningError, match="passphrase") as info:
        sign.load_signing_key(str(tmp_path / "k.pem"), env={sign.ENV_SIGN_PASSWORD: "Zq-not-it-9"})
    assert "Zq-not-it-9" not in str(info.value)
    key = sign.load_signing_key(str(tmp_path / "k.pem"), env={sign.ENV_SIGN_PASSWORD: "pass phrase"})
    assert key is not None and key.key_id == key_id
    assert "PRIVATE" not in repr(key) and "pass phrase" not in repr(key)
    # the key may come from the environment as PEM text (a CI secret)
    sign.keygen(tmp_path / "e.pem", tmp_path / "e.pub")
    env_key = sign.load_signing_key(None, env={sign.ENV_SIGN_KEY: (tmp_path / "e.pem").read_text()})
    assert env_key is not None and env_key.source == "in $OLIVE_BUILDER_SIGN_KEY"
    secretish = "c2VjcmV0LWtleS1tYXRlcmlhbA==\nnot-a-pem-Zq7"
    with pytest.raises(SigningError) as info:
        sign.load_signing_key(None, env={sign.ENV_SIGN_KEY: secretish})
    assert "Zq7" not in str(info.value) and "c2Vj" not in str(info.value)
    assert sign.load_signing_key(None, env={}) is None
    with pytest.raises(SigningError, match="Cannot read the signing key"):
        sign.load_signing_key(str(tmp_path / "missing.pem"), env={})
    with pytest.raises(VerificationError, match="not a PEM public key"):
        sign.load_public_key(tmp_path / "k.pem")


def test_rsa_keys_are_refused(tmp_path):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pem").write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    with pytest.raises(SigningError, match="not an EC P-256 key"):
        sign.load_signing_key(str(tmp_path / "rsa.pem"), env={})


@pytest.fixture
def keys(tmp_path):  # type: ignore[no-untyped-def]
    sign.keygen(tmp_path / "keys" / "a.pem", tmp_path / "keys" / "a.pub")
    sign.keygen(tmp_path / "keys" / "b.pem", tmp_path / "keys" / "b.pub")
    return {n: (sign.load_signing_key(str(tmp_path / "keys" / f"{n}.pem"), env={}), tmp_path / "keys" / f"{n}.pub")
            for n in ("a", "b")}


def test_cosign_simple_signing_payload_and_signature_follow_the_spec(keys):  # type: ignore[no-untyped-def]
    """sigstore/cosign specs/SIGNATURE_SPEC.md: the payload's critical.image.docker-manifest-digest is the
    manifest digest, critical.type 'cosign container image signature'; the signature is base64 of an
    ECDSA-P256 signature over SHA-256 of the payload bytes. Checked with `cryptography` directly."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key, pub_path = keys["a"]
    payload, sig = sign.sign_manifest(key, "registry.example/acme/tiny", ARTIFACT.digest)
    doc = json.loads(payload)
    assert doc["critical"] == {"identity": {"docker-reference": "registry.example/acme/tiny"},
                               "image": {"docker-manifest-digest": ARTIFACT.digest},
                               "type": "cosign container image signature"}
    public = serialization.load_pem_public_key(pub_path.read_bytes())
    public.verify(base64.b64decode(sig), payload, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, union-attr]
    pub = sign.load_public_key(pub_path)
    assert sign.check_simple_signing(pub, payload, sig, ARTIFACT.digest) is None
    assert "not" in (sign.check_simple_signing(pub, payload, sig, IMAGE.digest) or "")
    tampered = payload.replace(ARTIFACT.digest.encode(), IMAGE.digest.encode())
    assert "not made by this key" in (sign.check_simple_signing(pub, tampered, sig, IMAGE.digest) or "")
    other = sign.load_public_key(keys["b"][1])
    assert sign.check_simple_signing(other, payload, sig, ARTIFACT.digest) is not None


def test_dsse_envelope_signs_the_pre_authentication_encoding(keys):  # type: ignore[no-untyped-def]
    """secure-systems-lab/dsse envelope.md: sig = Sign(PAE(type, body)), PAE = 'DSSEv1 len type len body'."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key, pub_path = keys["a"]
    body = b'{"_type":"https://in-toto.io/Statement/v1"}'
    # the spec's own example (protocol.md): type http://example.com/HelloWorld, body "hello world"
    assert sign.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    env = json.loads(sign.dsse_envelope(key, body))
    assert env["payloadType"] == "application/vnd.in-toto+json" and base64.b64decode(env["payload"]) == body
    public = serialization.load_pem_public_key(pub_path.read_bytes())
    public.verify(base64.b64decode(env["signatures"][0]["sig"]), sign.pae(env["payloadType"], body),  # type: ignore[call-arg, union-attr]
                  ec.ECDSA(hashes.SHA256()))
    assert sign.open_dsse(sign.load_public_key(pub_path), json.dumps(env).encode()) == ("application/vnd.in-toto+json", body)
    env["payload"] = base64.b64encode(body.replace(b"v1", b"v2")).decode()
    with pytest.raises(VerificationError, match="not signed by the key"):
        sign.open_dsse(sign.load_public_key(pub_path), json.dumps(env).encode())


def model_signing_cli() -> str:
    return str(Path(sys.executable).with_name("model_signing"))


def run_model_signing(pub: Path, signature: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([model_signing_cli(), "verify", "key", "--public_key", str(pub), "--signature", str(signature),
                           str(folder)], capture_output=True, text=True, timeout=120)


def test_model_signature_verifies_with_the_model_signing_cli_and_refuses_changes(tmp_path, keys):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    key, pub = keys["a"]
    bundle = sign.sign_model(key, model, tmp_path / "model.sig")
    assert json.loads(bundle)["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert sign.bundle_key_hint(bundle) == key.key_id
    ok = run_model_signing(pub, tmp_path / "model.sig", model)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    other = run_model_signing(keys["b"][1], tmp_path / "model.sig", model)
    assert other.returncode != 0
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    (copy / "model.onnx.data").write_bytes(b"x" + b"w" * 4999)
    changed = run_model_signing(pub, tmp_path / "model.sig", copy)
    assert changed.returncode != 0
    with pytest.raises(VerificationError, match="do not match their signature"):
        sign.verify_model(pub, copy, tmp_path / "model.sig")
    sign.verify_model(pub, model, tmp_path / "model.sig")


# ------------------------------------------------------------------------------- referrers in the store

def test_packaging_attaches_referrers_and_signatures_idempotently(tmp_path, keys):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m", evaluation={"passed": True})
    store = oci.Store(tmp_path / "store")
    p = package.package(model, store, created=T0)
    info = json.loads((model / "olive-builder.json").read_text())
    key, pub_path = keys["a"]
    attach.attach_build(store, model, artifact_ref=p.artifact_ref, artifact=p.artifact, created=T0, info=info)
    listed = referrers.list_local(store, "tiny", p.artifact.digest)
    assert sorted(d.annotations[REFERRER_KIND_ANNOTATION] for d in listed) == ["evaluation", "provenance", "sbom"]
    for d in listed:
        m = store.read_json(d.digest)
        assert m["subject"]["digest"] == p.artifact.digest and m["artifactType"] == d.artifact_type
        assert m["config"] == {"mediaType": "application/vnd.oci.empty.v1+json",
                               "digest": oci.digest_bytes(b"{}"), "size": 2}
    index = store.resolve(f"tiny:{referrers.index_tag(p.artifact.digest)}")
    assert index is not None and index.media_type == INDEX

    attach.attach_build(store, model, artifact_ref=p.artifact_ref, artifact=p.artifact, created=T0, info=info, key=key)
    signed = referrers.list_local(store, "tiny", p.artifact.digest)
    assert len(signed) == 6
    again = attach.attach_build(store, model, artifact_ref=p.artifact_ref, artifact=p.artifact, created=T0, info=info, key=key)
    assert referrers.list_local(store, "tiny", p.artifact.digest) == signed and again.signed
    content = referrers.LocalContent(store, "tiny")
    v = verify.verify_subject(content, p.artifact.digest, sign.load_public_key(pub_path), p.artifact_ref)
    assert v.evaluation_result == "PASSED" and v.model_bundle is not None
    assert set(v.predicates) == {SLSA_PROVENANCE_V1, CYCLONEDX_PREDICATE, TEST_RESULT_V01}
    with pytest.raises(VerificationError, match="not signed by the key"):
        verify.verify_subject(content, p.artifact.digest, sign.load_public_key(keys["b"][1]), p.artifact_ref)
    # a second signer adds its layers beside the first one's in cosign's one-manifest-per-tag storage
    attach.attach_build(store, model, artifact_ref=p.artifact_ref, artifact=p.artifact, created=T0, info=info,
                        key=keys["b"][0])
    sig = referrers.local_tagged(store, "tiny", p.artifact.digest, referrers.SIG_SUFFIX)
    assert sig is not None and len(store.read_json(sig.digest)["layers"]) == 2
    for name in ("a", "b"):
        verify.verify_subject(content, p.artifact.digest, sign.load_public_key(keys[name][1]), p.artifact_ref)
    # no key material reached the store
    for path in store.root.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes()


def test_unsigned_content_is_refused(tmp_path, keys):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    store = oci.Store(tmp_path / "store")
    p = package.package(model, store, created=T0)
    with pytest.raises(VerificationError, match="is not signed"):
        verify.verify_subject(referrers.LocalContent(store, "tiny"), p.artifact.digest,
                            sign.load_public_key(keys["a"][1]), p.artifact_ref)


def test_failed_evaluation_is_refused_by_verify(tmp_path, keys):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m", evaluation={"passed": False})
    store = oci.Store(tmp_path / "store")
    p = package.package(model, store, created=T0)
    info = json.loads((model / "olive-builder.json").read_text())
    attach.attach_build(store, model, artifact_ref=p.artifact_ref, artifact=p.artifact, created=T0, info=info,
                        key=keys["a"][0])
    with pytest.raises(VerificationError, match="evaluation says FAILED"):
        verify.verify_subject(referrers.LocalContent(store, "tiny"), p.artifact.digest,
                            sign.load_public_key(keys["a"][1]), p.artifact_ref)


def test_key_from_the_environment_signs_without_leaving_a_file(tmp_path, keys, monkeypatch):  # type: ignore[no-untyped-def]
    sign.keygen(tmp_path / "e.pem", tmp_path / "e.pub")
    key = sign.load_signing_key(None, env={sign.ENV_SIGN_KEY: (tmp_path / "e.pem").read_text()})
    assert key is not None
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    model = fake_model(tmp_path / "m")
    sign.sign_model(key, model, tmp_path / "sig")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert run_model_signing(tmp_path / "e.pub", tmp_path / "sig", model).returncode == 0
    assert os.environ.get(sign.ENV_SIGN_KEY) is None


def test_the_workflow_signs_when_a_key_secret_is_configured():  # type: ignore[no-untyped-def]
    import yaml

    workflow = yaml.safe_load((Path(__file__).resolve().parent.parent / ".github" / "workflows" / "models.yml").read_text())
    step = next(s for s in workflow["jobs"]["build"]["steps"] if s.get("name") == "Build ${{ matrix.id }}")
    assert "secrets.MODEL_SIGNING_KEY" in step["env"]["OLIVE_BUILDER_SIGN_KEY"]
    assert "pull_request" in step["env"]["OLIVE_BUILDER_SIGN_KEY"]  # never on pull requests
    assert step["env"]["OLIVE_BUILDER_SIGN_KEY_PASSWORD"] == "${{ secrets.MODEL_SIGNING_KEY_PASSWORD }}"


class FakeReferrersRegistry:
    """An in-memory registry with the OCI 1.1 referrers API (answers manifest PUTs with OCI-Subject)."""

    host = "fake.example"
    base = "https://fake.example/v2/"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}  # digest -> bytes
        self.tags: dict[str, str] = {}  # tag -> digest

    class _Response:
        def __init__(self, status: int, headers: dict[str, str], body: bytes = b""):
            self.status_code, self.headers, self.content = status, headers, body

        def json(self):  # type: ignore[no-untyped-def]
            return json.loads(self.content)

    def push_blob(self, repo, desc, path, **kw):  # type: ignore[no-untyped-def]
        if desc.digest in self.blobs:
            return "exists"
        self.blobs[desc.digest] = Path(path).read_bytes()
        return "uploaded"

    def put_manifest(self, repo, reference, data, media_type):  # type: ignore[no-untyped-def]
        digest = oci.digest_bytes(data)
        self.manifests[digest] = data
        if not reference.startswith("sha256:"):
            self.tags[reference] = digest
        return digest

    def get_manifest(self, repo, reference):  # type: ignore[no-untyped-def]
        digest = reference if reference.startswith("sha256:") else self.tags.get(reference)
        if digest is None or digest not in self.manifests:
            return None
        data = self.manifests[digest]
        return data, json.loads(data).get("mediaType", MANIFEST), digest

    def request(self, method, path, **kw):  # type: ignore[no-untyped-def]
        if method == "PUT" and "/manifests/" in path:
            data = kw["body"]()
            reference = path.rsplit("/", 1)[1]
            self.put_manifest("", reference, data, MANIFEST)
            subject = (json.loads(data).get("subject") or {}).get("digest")
            return self._Response(201, {"OCI-Subject": subject} if subject else {})
        if method == "GET" and "/referrers/" in path:
            subject = path.rsplit("/", 1)[1]
            found = []
            for digest, data in self.manifests.items():
                m = json.loads(data)
                if (m.get("subject") or {}).get("digest") == subject:
                    found.append({"mediaType": MANIFEST, "digest": digest, "size": len(data),
                                  "artifactType": m.get("artifactType"), "annotations": m.get("annotations") or {}})
            return self._Response(200, {}, json.dumps({"schemaVersion": 2, "mediaType": INDEX,
                                                       "manifests": found}).encode())
        raise AssertionError(f"unexpected {method} {path}")


def test_a_registry_with_the_referrers_api_indexes_them_itself(tmp_path, keys):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    store = oci.Store(tmp_path / "store")
    p = package.package(model, store, created=T0, sign_key=keys["a"][0])
    reg = FakeReferrersRegistry()
    report = referrers.push_referrers(store, reg, "models/tiny", "tiny", p.artifact)  # type: ignore[arg-type]
    assert report.api and report.manifests == 6
    # no tag-schema index and no per-referrer tags: only cosign's own .sig/.att tags
    assert sorted(t.rpartition(".")[2] for t in reg.tags) == ["att", "sig"]
    listed = referrers.list_remote(reg, "models/tiny", p.artifact.digest)  # type: ignore[arg-type]
    assert {d.digest for d in listed} == {d.digest for d in referrers.list_local(store, "tiny", p.artifact.digest)}


def test_the_local_engine_keeps_the_signing_key_from_the_worker(monkeypatch):  # type: ignore[no-untyped-def]
    from builder.build import engine

    seen: dict[str, str] = {}

    class StopError(Exception):
        pass

    def fake_popen(args, **kw):  # type: ignore[no-untyped-def]
        seen.update(kw["env"])
        raise StopError

    monkeypatch.setattr(engine.subprocess, "Popen", fake_popen)
    monkeypatch.setenv(sign.ENV_SIGN_KEY, "/keys/ci.key")
    monkeypatch.setenv(sign.ENV_SIGN_PASSWORD, "pass")
    with pytest.raises(StopError):
        engine.LocalEngine().run(engine.Job("image", "builder.build.worker", (), {}, ()), lambda line: None)
    assert seen and sign.ENV_SIGN_KEY not in seen and sign.ENV_SIGN_PASSWORD not in seen
