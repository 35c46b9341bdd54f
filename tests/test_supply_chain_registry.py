"""Referrers on a real registry (Debian's docker-registry 2.8, which has no referrers API, so the
OCI 1.1 tag schema is used): attached on push, listed, racing pushes both surviving, signatures
read back and verified, the model_signing CLI on a pulled folder."""

from __future__ import annotations

import json
import threading

import pytest

from builder.errors import VerificationError
from builder.oci import layout as oci
from builder.oci import referrers
from builder.oci.media import INDEX, MANIFEST
from builder.oci.registry import Registry
from builder.publish import distribute, package
from builder.trust import attach, sign, verify
from test_supply_chain import T0, fake_model, run_model_signing

pytestmark = pytest.mark.integration


@pytest.fixture
def signed_build(tmp_path):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m", evaluation={"passed": True})
    store = oci.Store(tmp_path / "store")
    p = package.package(model, store, created=T0)
    sign.keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    key = sign.load_signing_key(str(tmp_path / "k.pem"), env={})
    info = json.loads((model / "olive-builder.json").read_text())
    attach.attach_build(store, model, artifact_ref=p.artifact_ref, artifact=p.artifact, created=T0, info=info, key=key)
    return model, store, p, tmp_path / "k.pub"


def test_the_registry_has_no_referrers_api_so_the_tag_schema_is_used(registry, signed_build):  # type: ignore[no-untyped-def]
    _model, store, p, pub = signed_build
    distribute.push(store, [p.artifact_ref], registry.host, "models")
    reg = Registry(registry.host)
    try:
        report = referrers.push_referrers(store, reg, "models/tiny", "tiny", p.artifact)
        assert report.manifests == 6 and not report.api
        assert referrers.registry_referrers(reg, "models/tiny", p.artifact.digest) is None
        index = reg.get_manifest("models/tiny", referrers.index_tag(p.artifact.digest))
        assert index is not None and index[1] == INDEX
        listed = referrers.list_remote(reg, "models/tiny", p.artifact.digest)
        assert {d.digest for d in listed} == {d.digest for d in referrers.list_local(store, "tiny", p.artifact.digest)}
        for d in listed:  # every entry is a manifest with this subject and its artifactType
            data, _media, _digest = reg.get_manifest("models/tiny", d.digest)  # type: ignore[misc]
            m = json.loads(data)
            assert m["subject"]["digest"] == p.artifact.digest and m["artifactType"] == d.artifact_type
        # cosign's tags are where cosign looks
        assert reg.get_manifest("models/tiny", referrers.index_tag(p.artifact.digest) + ".sig") is not None
        assert reg.get_manifest("models/tiny", referrers.index_tag(p.artifact.digest) + ".att") is not None
        # and our verifier accepts what the registry holds
        content = referrers.RemoteContent(reg, "models/tiny")
        v = verify.verify_subject(content, p.artifact.digest, sign.load_public_key(pub), p.artifact_ref)
        assert v.evaluation_result == "PASSED" and v.model_bundle is not None
        # re-pushing uploads nothing
        again = referrers.push_referrers(store, reg, "models/tiny", "tiny", p.artifact)
        assert again.uploaded == 0
    finally:
        reg.close()


def test_two_racing_pushes_of_different_referrers_both_survive(registry, tmp_path):  # type: ignore[no-untyped-def]
    """Two stores with the same model artifact, each with its own referrers (different SBOM
    annotations), push at the same moment, many times over: the index ends with every entry."""
    model = fake_model(tmp_path / "m")
    stores = [oci.Store(tmp_path / f"store{i}") for i in range(2)]
    subject = None
    for store in stores:
        subject = package.package(model, store, created=T0, attestations=False).artifact
    assert subject is not None
    distribute.push(stores[0], ["tiny:1.0-cpu-int4"], registry.host, "race")  # the subject, no referrers yet
    for i, store in enumerate(stores):
        for round_ in range(4):
            referrers.attach(store, "tiny", subject, "application/vnd.example.note",
                             [(f"note {i}/{round_}".encode(), "text/plain", {})])
    wanted = {d.digest for s in stores for d in referrers.list_local(s, "tiny", subject.digest)}
    assert len(wanted) == 8
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def push(store: oci.Store) -> None:
        reg = Registry(registry.host)
        try:
            barrier.wait()
            referrers.push_referrers(store, reg, "race/tiny", "tiny", subject)  # type: ignore[arg-type]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            reg.close()

    threads = [threading.Thread(target=push, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    reg = Registry(registry.host)
    try:
        final = {d.digest for d in referrers.list_remote(reg, "race/tiny", subject.digest)}
    finally:
        reg.close()
    assert final == wanted


def test_the_index_is_repaired_when_another_writer_dropped_entries(registry, tmp_path):  # type: ignore[no-untyped-def]
    """The lost-update case made deterministic: after our push, a stale writer overwrites the index
    with only its own entry; the next push of any referrer puts every tagged referrer back."""
    model = fake_model(tmp_path / "m")
    store = oci.Store(tmp_path / "store")
    p = package.package(model, store, created=T0, attestations=False)
    for n in range(3):
        referrers.attach(store, "tiny", p.artifact, "application/vnd.example.note", [(f"n{n}".encode(), "text/plain", {})])
    distribute.push(store, [p.artifact_ref], registry.host, "fix")
    reg = Registry(registry.host)
    try:
        referrers.push_referrers(store, reg, "fix/tiny", "tiny", p.artifact)
        entries = referrers.list_remote(reg, "fix/tiny", p.artifact.digest)
        assert len(entries) == 3
        reg.put_manifest("fix/tiny", referrers.index_tag(p.artifact.digest),
                         oci.canonical_json(referrers.empty_index(entries[:1])), INDEX)
        assert len(referrers.list_remote(reg, "fix/tiny", p.artifact.digest)) == 1
        referrers.update_tag_index(reg, "fix/tiny", p.artifact.digest, [])
        assert {d.digest for d in referrers.list_remote(reg, "fix/tiny", p.artifact.digest)} == {d.digest for d in entries}
    finally:
        reg.close()


def test_model_signing_cli_verifies_a_pulled_folder_and_refuses_a_tampered_one(registry, signed_build, tmp_path):  # type: ignore[no-untyped-def]
    _model, store, p, pub = signed_build
    distribute.push(store, [p.artifact_ref], registry.host, "models")
    reg = Registry(registry.host)
    try:
        referrers.push_referrers(store, reg, "models/tiny", "tiny", p.artifact)
        bundle = verify.verify_subject(referrers.RemoteContent(reg, "models/tiny"), p.artifact.digest,
                                     sign.load_public_key(pub), p.artifact_ref).model_bundle
    finally:
        reg.close()
    assert bundle is not None
    (tmp_path / "model.sig").write_bytes(bundle)
    pulled_store = oci.Store(tmp_path / "other-store")
    distribute.pull(f"{registry.host}/models/tiny:1.0-cpu-int4", tmp_path / "pulled", pulled_store)
    ok = run_model_signing(pub, tmp_path / "model.sig", tmp_path / "pulled")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (tmp_path / "pulled" / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    bad = run_model_signing(pub, tmp_path / "model.sig", tmp_path / "pulled")
    assert bad.returncode != 0
    with pytest.raises(VerificationError):
        sign.verify_model(pub, tmp_path / "pulled", tmp_path / "model.sig")



# ------------------------------------------------------------------------------- pull --verify

def test_push_attaches_referrers_and_a_repush_uploads_nothing(registry, signed_build):  # type: ignore[no-untyped-def]
    _model, store, p, _pub = signed_build
    first = distribute.push(store, [p.artifact_ref], registry.host, "models")
    assert first.referrers == 6 and first.referrer_uploaded_bytes > 0
    again = distribute.push(store, [p.artifact_ref], registry.host, "models")
    assert (again.uploaded, again.uploaded_bytes, again.referrer_uploaded_bytes) == (0, 0, 0)


def test_pull_verify_accepts_signed_content_and_writes_the_model_signature(registry, signed_build, tmp_path):  # type: ignore[no-untyped-def]
    _model, store, p, pub = signed_build
    distribute.push(store, [p.artifact_ref], registry.host, "models")
    ref = f"{registry.host}/models/tiny:1.0-cpu-int4"
    dest = tmp_path / "pulled"
    distribute.pull(ref, dest, oci.Store(tmp_path / "s2"), verify_key=pub, signature_out=tmp_path / "out" / "model.sig")
    assert (dest / "model.onnx.data").is_file()
    ok = run_model_signing(pub, tmp_path / "out" / "model.sig", dest)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def _refused(ref: str, tmp_path, pub, match: str) -> None:  # type: ignore[no-untyped-def]
    tmp_path.mkdir(parents=True, exist_ok=True)
    pulled_store = oci.Store(tmp_path / "refused-store")
    with pytest.raises(VerificationError, match=match) as info:
        distribute.pull(ref, tmp_path / "refused", pulled_store, verify_key=pub)
    assert info.value.exit_code == 5
    assert not (tmp_path / "refused").exists()
    assert not list(tmp_path.glob(".refused.partial-*"))
    # nothing was downloaded: only the manifest was read, no layer reached the store
    assert list(pulled_store.blobs.iterdir()) == []


def test_pull_verify_refuses_unsigned_content_with_nothing_written(registry, tmp_path):  # type: ignore[no-untyped-def]
    model = fake_model(tmp_path / "m")
    store = oci.Store(tmp_path / "store")
    p = package.package(model, store, created=T0)  # attestations, but no signature
    distribute.push(store, [p.artifact_ref], registry.host, "models")
    sign.keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    _refused(f"{registry.host}/models/tiny:1.0-cpu-int4", tmp_path, tmp_path / "k.pub", "is not signed")


def test_pull_verify_refuses_another_key(registry, signed_build, tmp_path):  # type: ignore[no-untyped-def]
    _model, store, p, _pub = signed_build
    distribute.push(store, [p.artifact_ref], registry.host, "models")
    sign.keygen(tmp_path / "other.pem", tmp_path / "other.pub")
    _refused(f"{registry.host}/models/tiny:1.0-cpu-int4", tmp_path, tmp_path / "other.pub", "not signed by the key")


def test_pull_verify_refuses_a_tampered_manifest(registry, signed_build, tmp_path):  # type: ignore[no-untyped-def]
    """Someone with push rights replaces the tag with a changed manifest and copies the old signature
    to the new digest's signature tag: the signature names the old digest, so it is refused."""
    _model, store, p, pub = signed_build
    distribute.push(store, [p.artifact_ref], registry.host, "models")
    reg = Registry(registry.host)
    try:
        data, _media, digest = reg.get_manifest("models/tiny", "1.0-cpu-int4")  # type: ignore[misc]
        manifest = json.loads(data)
        manifest["annotations"]["org.opencontainers.image.description"] = "tampered"
        forged = oci.canonical_json(manifest)
        reg.put_manifest("models/tiny", "1.0-cpu-int4", forged, MANIFEST)
        ref = f"{registry.host}/models/tiny:1.0-cpu-int4"
        _refused(ref, tmp_path / "a", pub, "is not signed")
        sig, _m, _d = reg.get_manifest("models/tiny", referrers.index_tag(digest) + ".sig")  # type: ignore[misc]
        reg.put_manifest("models/tiny", referrers.index_tag(oci.digest_bytes(forged)) + ".sig", sig, MANIFEST)
        _refused(ref, tmp_path / "b", pub, f"the signature is for {digest}")
    finally:
        reg.close()


# ------------------------------------------------------------------------------- the commands

def test_the_commands_keygen_package_push_verify_inspect_pull(registry, tmp_path, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    from conftest import run_cli

    model = fake_model(tmp_path / "m", evaluation={"passed": True})
    store = str(tmp_path / "store")
    code, out, err = run_cli(capsys, "keygen", str(tmp_path / "keys" / "ci"))
    assert code == 0, err
    key, pub = tmp_path / "keys" / "ci.key", tmp_path / "keys" / "ci.pub"
    assert "PRIVATE" not in out and key.is_file() and pub.is_file()
    # the key from the environment, as a CI secret holds it (the PEM text itself)
    monkeypatch.setenv("OLIVE_BUILDER_SIGN_KEY", key.read_text())
    code, out, err = run_cli(capsys, "package", str(model), "--no-image", "--store", store,
                             "--push", f"{registry.host}/models")
    assert code == 0, err
    assert "PRIVATE" not in out + err
    monkeypatch.delenv("OLIVE_BUILDER_SIGN_KEY")
    ref = f"{registry.host}/models/tiny:1.0-cpu-int4"
    code, out, err = run_cli(capsys, "verify", ref, "--key", str(pub))
    assert code == 0, err
    assert "https://slsa.dev/provenance/v1" in out and "PASSED" in out
    code, out, err = run_cli(capsys, "inspect", ref, "--store", str(tmp_path / "s-inspect"))
    assert code == 0, err
    for kind in ("sbom", "provenance", "evaluation", "signature", "attestations", "model-signature"):
        assert kind in out
    code, out, err = run_cli(capsys, "inspect", ref, "--sbom", "--store", str(tmp_path / "s-inspect"))
    assert code == 0 and json.loads(out)["bomFormat"] == "CycloneDX"
    code, out, err = run_cli(capsys, "inspect", ref, "--provenance", "--store", str(tmp_path / "s-inspect"))
    assert code == 0 and json.loads(out)["predicateType"] == "https://slsa.dev/provenance/v1"
    code, out, err = run_cli(capsys, "inspect", "--store", store)  # the store listing hides referrer tags
    assert "sha256-" not in out
    code, out, err = run_cli(capsys, "pull", ref, str(tmp_path / "pulled"), "--verify", str(pub),
                             "--signature-out", str(tmp_path / "model.sig"), "--store", str(tmp_path / "s-pull"))
    assert code == 0, err
    ok = run_model_signing(pub, tmp_path / "model.sig", tmp_path / "pulled")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # another key: refused, exit 5, a reason, nothing written
    run_cli(capsys, "keygen", str(tmp_path / "keys" / "other"))
    code, out, err = run_cli(capsys, "pull", ref, str(tmp_path / "refused"), "--verify", str(tmp_path / "keys" / "other.pub"),
                             "--store", str(tmp_path / "s-refused"))
    assert code == 5 and "not signed by the key" in err and "Traceback" not in err
    assert not (tmp_path / "refused").exists()
    code, out, err = run_cli(capsys, "verify", ref, "--key", str(tmp_path / "keys" / "other.pub"))
    assert code == 5 and "not signed by the key" in err
    # a bad key file is a usage error that names the file, not its content
    (tmp_path / "bad.key").write_text("not a key")
    code, out, err = run_cli(capsys, "push", "tiny:1.0-cpu-int4", "--to", f"{registry.host}/models", "--store", store,
                             "--sign-key", str(tmp_path / "bad.key"))
    assert code == 2 and "bad.key" in err and "not a key" not in err


def test_serve_verify_refuses_an_unsigned_reference_before_unpacking(registry, tmp_path, capsys):  # type: ignore[no-untyped-def]
    from builder.contract import cache_dir
    from conftest import run_cli

    model = fake_model(tmp_path / "m")
    store = oci.Store(tmp_path / "store")
    package.package(model, store, created=T0)
    distribute.push(store, ["tiny:1.0-cpu-int4"], registry.host, "models")
    sign.keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    for ref in ("tiny:1.0-cpu-int4", f"{registry.host}/models/tiny:1.0-cpu-int4"):
        code, out, err = run_cli(capsys, "serve", ref, "--verify", str(tmp_path / "k.pub"), "--store", str(store.root))
        assert code == 5 and "is not signed" in err, err
    assert not (cache_dir() / "models").exists()
    code, out, err = run_cli(capsys, "serve", str(model), "--verify", str(tmp_path / "k.pub"))
    assert code == 2 and "is a folder" in err


@pytest.mark.docker
def test_the_runnable_images_sbom_lists_what_its_layers_hold(tmp_path, runtime_image, docker_client):  # type: ignore[no-untyped-def]
    """The runtime's Python packages (dist-info METADATA) and the base image's Debian packages
    (var/lib/dpkg/status), read from the image's own layers; validated against CycloneDX 1.6."""
    from test_supply_chain import assert_cyclonedx_16

    model = fake_model(tmp_path / "m")
    store = oci.Store(tmp_path / "store")
    runtime = package.import_runtime(docker_client, runtime_image, store)
    p = package.package(model, store, created=T0, runtime=runtime)
    assert p.image is not None
    content = referrers.LocalContent(store, "tiny")
    doc = referrers.document(content, p.image.digest, "sbom")
    assert doc is not None
    assert_cyclonedx_16(doc)
    components = json.loads(doc)["components"]
    purls = {c.get("purl", "") for c in components}
    assert any(u.startswith("pkg:pypi/onnxruntime-genai@0.18") for u in purls), sorted(purls)[:20]
    assert any(u.startswith("pkg:deb/debian/libc6@") for u in purls)
    assert any(u.startswith("pkg:deb/debian/python3") for u in purls)
    # the model artifact's SBOM has no runtime packages
    artifact_doc = referrers.document(content, p.artifact.digest, "sbom")
    assert artifact_doc is not None and "pkg:deb/" not in artifact_doc.decode()
    # provenance names both manifests
    prov = json.loads(referrers.document(content, p.image.digest, "provenance") or b"{}")
    assert {s["digest"]["sha256"] for s in prov["subject"]} == {p.artifact.digest[7:], p.image.digest[7:]}


def test_a_second_signer_keeps_the_first_signers_signature_on_the_registry(registry, tmp_path):  # type: ignore[no-untyped-def]
    """cosign keeps one `.sig` manifest per image with one layer per signature: a push by another
    signer merges its layers with those already there instead of replacing them."""
    model = fake_model(tmp_path / "m", evaluation={"passed": True})
    pubs = []
    for name in ("a", "b"):
        sign.keygen(tmp_path / f"{name}.pem", tmp_path / f"{name}.pub")
        store = oci.Store(tmp_path / f"store-{name}")
        key = sign.load_signing_key(str(tmp_path / f"{name}.pem"), env={})
        p = package.package(model, store, created=T0, sign_key=key)
        distribute.push(store, [p.artifact_ref], registry.host, "two")
        pubs.append(tmp_path / f"{name}.pub")
    reg = Registry(registry.host)
    try:
        content = referrers.RemoteContent(reg, "two/tiny")
        for pub in pubs:
            verify.verify_subject(content, p.artifact.digest, sign.load_public_key(pub), p.artifact_ref)
        sig = reg.get_manifest("two/tiny", referrers.index_tag(p.artifact.digest) + ".sig")
        assert sig is not None
        manifest = json.loads(sig[0])
        assert len(manifest["layers"]) == 2
        config = json.loads(content.blob(oci.Descriptor.from_json(manifest["config"])))
        assert config["rootfs"]["diff_ids"] == [d["digest"] for d in manifest["layers"]]
    finally:
        reg.close()


def test_a_real_build_signed_pushed_verified_and_pulled(capsys, tmp_path, tiny_model, local_engine_ready, registry):  # type: ignore[no-untyped-def]
    """`build recipe --sign-key --push` with real Olive; `build verify`; `build pull --verify
    --signature-out`; the model_signing CLI on the pulled folder; the provenance names the recipe."""
    from conftest import run_cli, tiny_recipe

    recipe = tiny_recipe(tmp_path, tiny_model)
    run_cli(capsys, "keygen", str(tmp_path / "k"))
    code, out, err = run_cli(capsys, "recipe", str(recipe), "--engine", "local", "-q", "--no-image",
                             "-o", str(tmp_path / "out"), "--sign-key", str(tmp_path / "k.key"),
                             "--push", f"{registry.host}/models")
    assert code == 0, err
    ref = f"{registry.host}/models/tiny-qwen2:0.1.0-cpu-int4"
    code, out, err = run_cli(capsys, "verify", ref, "--key", str(tmp_path / "k.pub"))
    assert code == 0, err
    code, out, err = run_cli(capsys, "inspect", ref, "--provenance")
    assert code == 0, err
    recipe_param = json.loads(out)["predicate"]["buildDefinition"]["externalParameters"]["recipe"]
    assert recipe_param["content"] == recipe.read_text() and recipe_param["digest"].startswith("sha256:")
    assert recipe_param["path"] == recipe.name  # not where this machine keeps it (not in a git repository here)
    code, out, err = run_cli(capsys, "pull", ref, str(tmp_path / "pulled"), "--verify", str(tmp_path / "k.pub"),
                             "--signature-out", str(tmp_path / "model.sig"), "--store", str(tmp_path / "s2"))
    assert code == 0, err
    ok = run_model_signing(tmp_path / "k.pub", tmp_path / "model.sig", tmp_path / "pulled")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the same recipe again with a second key: a cache hit (Olive does not run), signed by it too
    run_cli(capsys, "keygen", str(tmp_path / "k2"))
    code, out, err = run_cli(capsys, "recipe", str(recipe), "--engine", "local", "-q", "--no-image",
                             "-o", str(tmp_path / "out"), "--sign-key", str(tmp_path / "k2.key"),
                             "--push", f"{registry.host}/models")
    assert code == 0, err
    assert "Olive does not run" in out + err
    for pub in ("k.pub", "k2.pub"):
        code, out, err = run_cli(capsys, "verify", ref, "--key", str(tmp_path / pub))
        assert code == 0, err


def test_push_sign_key_signs_what_the_store_holds(registry, tmp_path, capsys):  # type: ignore[no-untyped-def]
    """Packaged without a key, signed at `build push --sign-key`: the model folder is unpacked from
    the store to sign it (OpenSSF format), both formats verify after the push."""
    from conftest import run_cli

    model = fake_model(tmp_path / "m", evaluation={"passed": True})
    store = oci.Store(tmp_path / "store")
    package.package(model, store, created=T0)
    run_cli(capsys, "keygen", str(tmp_path / "k"))
    code, out, err = run_cli(capsys, "push", "tiny:1.0-cpu-int4", "--to", f"{registry.host}/models",
                             "--store", str(store.root), "--sign-key", str(tmp_path / "k.key"))
    assert code == 0, err
    ref = f"{registry.host}/models/tiny:1.0-cpu-int4"
    code, out, err = run_cli(capsys, "verify", ref, "--key", str(tmp_path / "k.pub"))
    assert code == 0, err
    code, out, err = run_cli(capsys, "pull", ref, str(tmp_path / "pulled"), "--verify", str(tmp_path / "k.pub"),
                             "--signature-out", str(tmp_path / "model.sig"), "--store", str(tmp_path / "s2"))
    assert code == 0, err
    assert run_model_signing(tmp_path / "k.pub", tmp_path / "model.sig", tmp_path / "pulled").returncode == 0
