"""OCI 1.1 referrers: manifests that point at another manifest through ``subject``.

A referrer is an image manifest with an ``artifactType``, the empty config
(``application/vnd.oci.empty.v1+json``) and its documents as layers. Finding a subject's
referrers:

- on a registry with the referrers API (``GET /v2/<repo>/referrers/<digest>``), the registry
  indexes every manifest pushed with a ``subject``; it says so with an ``OCI-Subject`` header
  on the manifest PUT;
- elsewhere (distribution 2.8, which Debian ships, and today's GHCR and Docker Hub), the
  referrers tag schema of the distribution spec: an image index tagged ``sha256-<hex>`` lists
  the referrers' descriptors. The local store (an OCI image layout) uses the same tag.

Two pushes racing on one subject would each read the index, add their entry and write it
back, and the later write would drop the earlier one's entry. So every referrer we push is
also tagged ``sha256-<subject hex>.ref.<referrer hex, 32>`` before the index is touched, and
a pusher does not stop until a fresh read of the index holds every referrer that a fresh
tag listing shows. Whichever pusher writes the index last therefore writes (or repairs it
to) the union, whatever the interleaving: a referrer's tag always exists before its pusher
reads the index, and the last writer re-lists after its write.

Cosign's own tags (``sha256-<hex>.sig`` and ``.att``) are written too, where cosign,
Kyverno and policy-controller look for signatures.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode, urljoin

from builder.contract import ADAPTER_ANNOTATION, CHUNK
from builder.errors import ContentError, RegistryError, StoreError
from builder.oci import layout as oci
from builder.oci.media import (
    ADAPTER_ARTIFACT_TYPE,
    COSIGN_ATT_ARTIFACT,
    COSIGN_SIG_ARTIFACT,
    EMPTY_MEDIA,
    IMAGE_CONFIG,
    INDEX,
    MANIFEST,
    SBOM_MEDIA,
    SIGSTORE_BUNDLE_MEDIA,
)
from builder.oci.registry import Registry

EMPTY_DATA = b"{}"
REF_TAG_INFIX = ".ref."
SIG_SUFFIX = ".sig"
ATT_SUFFIX = ".att"
ANN_CREATED = "org.opencontainers.image.created"
Event = Callable[[str, str], None]  # (stage, message): what the transfer loops report


def index_tag(subject_digest: str) -> str:
    """The referrers tag schema's tag of a subject: ``sha256-<hex>``."""
    algo, _, hexpart = subject_digest.partition(":")
    return f"{algo}-{hexpart}"


def referrer_tag(subject_digest: str, referrer_digest: str) -> str:
    return index_tag(subject_digest) + REF_TAG_INFIX + referrer_digest.split(":", 1)[1][:32]


def is_referrer_tag(tag: str) -> bool:
    """Tags that name referrer bookkeeping (hidden from listings of models)."""
    return tag.startswith("sha256-") and len(tag) >= 71


def empty_index(entries: Iterable[oci.Descriptor] = ()) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": INDEX, "manifests": [d.to_json() for d in entries]}


def _entries(index: dict[str, Any] | None) -> list[oci.Descriptor]:
    if not index:
        return []
    out = []
    for m in index.get("manifests") or []:
        try:
            out.append(oci.Descriptor.from_json(m))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _merge(*lists: Iterable[oci.Descriptor]) -> list[oci.Descriptor]:
    seen: dict[str, oci.Descriptor] = {}
    for entries in lists:
        for d in entries:
            seen.setdefault(d.digest, d)
    return sorted(seen.values(), key=lambda d: (d.artifact_type or "", d.digest))


def referrer_manifest(subject: oci.Descriptor, artifact_type: str, layers: list[oci.Descriptor],
                      annotations: dict[str, str] | None = None, config: oci.Descriptor | None = None) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "artifactType": artifact_type,
        "config": (config or oci.Descriptor(EMPTY_MEDIA, oci.digest_bytes(EMPTY_DATA), len(EMPTY_DATA))).to_json(),
        "layers": [d.to_json() for d in layers],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return manifest


# ---- the local store -------------------------------------------------------------------------

def _store_lock(store: oci.Store) -> AbstractContextManager[None]:
    # Our own lock file: Store.tag takes the store's lock, and flock does not nest.
    return oci.file_lock(store.root / ".referrers.lock")


def attach(store: oci.Store, name: str, subject: oci.Descriptor, artifact_type: str,
           layers: list[tuple[bytes, str, dict[str, str]]], *, annotations: dict[str, str] | None = None,
           config: tuple[bytes, str] | None = None, tag: str | None = None) -> oci.Descriptor:
    """Store a referrer of ``subject`` (a manifest of repository ``name``) and list it in the subject's
    ``sha256-<hex>`` index. ``layers``: (bytes, media type, annotations). ``tag``: also tag it
    ``name:tag`` (cosign's ``.sig``/``.att``)."""
    if not store.has(subject.digest):
        raise StoreError(f"Cannot attach to {subject.digest}: it is not in the local store {store.root}.")
    descs = [store.put_bytes(data, media, annotations=ann) for data, media, ann in layers]
    config_desc = store.put_bytes(*config) if config else store.put_bytes(EMPTY_DATA, EMPTY_MEDIA)
    manifest = referrer_manifest(subject, artifact_type, descs, annotations, config_desc)
    desc = store.put_json(manifest, MANIFEST, artifact_type=artifact_type, annotations=dict(annotations or {}))
    add_local(store, name, subject.digest, desc)
    if tag:
        store.tag(f"{name}:{tag}", desc)
    return desc


def add_local(store: oci.Store, name: str, subject_digest: str, desc: oci.Descriptor) -> None:
    ref = f"{name}:{index_tag(subject_digest)}"
    with _store_lock(store):
        current = store.resolve(ref)
        entries = _entries(store.read_json(current.digest)) if current else []
        if any(d.digest == desc.digest for d in entries):
            return
        index = store.put_json(empty_index(_merge(entries, [desc])), INDEX)
        store.tag(ref, index)


def list_local(store: oci.Store, name: str, subject_digest: str) -> list[oci.Descriptor]:
    current = store.resolve(f"{name}:{index_tag(subject_digest)}")
    return _entries(store.read_json(current.digest)) if current else []


def attached_documents(store: oci.Store, name: str, subject_digest: str) -> list[oci.Descriptor]:
    """A subject's referrers but its LoRA adapters: adapters are artifacts of their own, which a push
    uploads with the model's blobs, tags and lists itself (``distribute.push``)."""
    return [d for d in list_local(store, name, subject_digest) if d.artifact_type != ADAPTER_ARTIFACT_TYPE]


def local_tagged(store: oci.Store, name: str, subject_digest: str, suffix: str) -> oci.Descriptor | None:
    """The manifest tagged with cosign's ``sha256-<hex>.sig``/``.att`` in the store."""
    return store.resolve(f"{name}:{index_tag(subject_digest)}{suffix}")


def replace_local_tagged(store: oci.Store, name: str, subject: oci.Descriptor, suffix: str, artifact_type: str,
                         layers: list[tuple[bytes, str, dict[str, str]]], annotations: dict[str, str] | None = None,
                         ) -> oci.Descriptor:
    """Write cosign's tagged manifest for ``subject`` holding the layers already there plus ``layers``
    (one manifest per subject and suffix, as cosign keeps it)."""
    old = local_tagged(store, name, subject.digest, suffix)
    kept: list[tuple[bytes, str, dict[str, str]]] = []
    if old is not None:
        for d in store.read_json(old.digest).get("layers") or []:
            layer = oci.Descriptor.from_json(d)
            kept.append((store.read_bytes(layer.digest), layer.media_type, layer.annotations))
    merged: dict[tuple[str, str], tuple[bytes, str, dict[str, str]]] = {}
    for data, media, ann in kept + layers:
        merged.setdefault((oci.digest_bytes(data), json.dumps(ann, sort_keys=True)), (data, media, ann))
    layers = list(merged.values())
    return attach(store, name, subject, artifact_type, layers, annotations=annotations,
                  tag=index_tag(subject.digest) + suffix, config=(cosign_config(layers), IMAGE_CONFIG))


def cosign_config(layers: list[tuple[bytes, str, dict[str, str]]]) -> bytes:
    """The image config cosign gives its signature manifests (its layers are uncompressed, so the
    diff ids are the layer digests): tools that read them as images find what they expect."""
    zero = "0001-01-01T00:00:00Z"
    return oci.canonical_json({"architecture": "", "config": {}, "created": zero, "history": [{"created": zero}],
                               "os": "", "rootfs": {"type": "layers",
                                                    "diff_ids": [oci.digest_bytes(data) for data, _, _ in layers]}})


# ---- registries ----------------------------------------------------------------------------

def _get_json(registry: Registry, repo: str, reference: str) -> tuple[dict[str, Any], str] | None:
    got = registry.get_manifest(repo, reference)
    if got is None:
        return None
    data, _media, digest = got
    return json.loads(data), digest


def list_tags(registry: Registry, repo: str, prefix: str) -> list[str]:
    """Tags of ``repo`` that start with ``prefix`` (the listing is lexical, so it starts there)."""
    out: list[str] = []
    last = prefix[:-1] if prefix else ""
    url = f"{repo}/tags/list?" + urlencode({"n": 1000, "last": last})
    for _ in range(100):  # pages; a sane registry needs one or two here
        r = registry.request("GET", url, scope=f"repository:{repo}:pull", allow=(404,))
        if r.status_code == 404:
            return out
        tags = (r.json() or {}).get("tags") or []
        out.extend(t for t in tags if t.startswith(prefix))
        link = r.headers.get("Link", "")
        past = any(t > prefix and not t.startswith(prefix) for t in tags)  # the listing is sorted
        if not tags or past or 'rel="next"' not in link:
            break
        url = urljoin(registry.base, link.split(";")[0].strip().strip("<>"))
    return sorted(set(out))


def registry_referrers(registry: Registry, repo: str, subject_digest: str) -> list[oci.Descriptor] | None:
    """The referrers API's answer, or None where the registry has no referrers API."""
    r = registry.request("GET", f"{repo}/referrers/{subject_digest}", scope=f"repository:{repo}:pull",
                         headers={"Accept": INDEX}, allow=(404, 400, 405))
    if r.status_code != 200:
        return None
    try:
        body = r.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("mediaType", INDEX) != INDEX:
        return None
    return _entries(body)


def list_remote(registry: Registry, repo: str, subject_digest: str) -> list[oci.Descriptor]:
    """A subject's referrers: the API where there is one, else the tag schema's index."""
    api = registry_referrers(registry, repo, subject_digest)
    if api is not None:
        return api
    got = _get_json(registry, repo, index_tag(subject_digest))
    return _entries(got[0]) if got else []


def put_referrer(registry: Registry, repo: str, data: bytes, tag: str | None = None) -> bool:
    """PUT a referrer manifest (by tag if given, else by digest); True if the registry indexed its
    subject itself (the ``OCI-Subject`` header of the referrers API)."""
    digest = oci.digest_bytes(data)
    r = registry.request("PUT", f"{repo}/manifests/{tag or digest}", scope=f"repository:{repo}:pull,push",
                         ok=(201, 200), headers={"Content-Type": MANIFEST}, body=lambda: data)
    echoed = r.headers.get("Docker-Content-Digest")
    if echoed and echoed != digest:
        raise RegistryError(f"{registry.host} stored a referrer under {echoed}, not {digest}.")
    return bool(r.headers.get("OCI-Subject"))


def _descriptor(registry: Registry, repo: str, tag: str) -> oci.Descriptor | None:
    got = registry.get_manifest(repo, tag)
    if got is None:
        return None
    data, media, digest = got
    try:
        m = json.loads(data)
    except ValueError:
        return None
    return oci.Descriptor(media, digest, len(data), dict(m.get("annotations") or {}),
                          m.get("artifactType") or (m.get("config") or {}).get("mediaType"))


def update_tag_index(registry: Registry, repo: str, subject_digest: str, ours: list[oci.Descriptor], *,
                     attempts: int = 12, on_event: Event = lambda s, m: None) -> list[oci.Descriptor]:
    """Make the subject's ``sha256-<hex>`` index list ``ours`` and every referrer another push has
    tagged, without dropping any (see the module docstring). Returns the final entries."""
    tag = index_tag(subject_digest)
    prefix = tag + REF_TAG_INFIX
    resolved: dict[str, oci.Descriptor] = {}  # referrer tag -> descriptor (a referrer tag never moves)
    for attempt in range(attempts):
        got = _get_json(registry, repo, tag)
        current = _entries(got[0]) if got else []
        have = {d.digest for d in current}
        for t in list_tags(registry, repo, prefix):
            if t in resolved:
                continue
            short = t[len(prefix):]
            known = next((d for d in [*current, *ours] if d.digest.split(":", 1)[1].startswith(short)), None)
            found = known or _descriptor(registry, repo, t)
            if found is not None:
                resolved[t] = found
        wanted = _merge(current, ours, resolved.values())
        if all(d.digest in have for d in wanted):
            return current
        index = oci.canonical_json(empty_index(wanted))
        registry.put_manifest(repo, tag, index, INDEX)
        on_event("push", f"referrers {tag[:19]}... lists {len(wanted)}")
        # Another pusher may have written between our read and our write: read again (after a
        # short random pause, so two pushers do not keep overwriting in lock step) until stable.
        time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
    raise RegistryError(f"The referrers index {repo}:{tag} on {registry.host} kept changing; "
                        f"gave up after {attempts} attempts.", hint="Push again: nothing is lost by it.")


@dataclass
class ReferrerPush:
    manifests: int = 0
    uploaded: int = 0
    uploaded_bytes: int = 0
    api: bool = False


def push_referrer_blobs(store: oci.Store, registry: Registry, repo: str, name: str, subject: oci.Descriptor,
                        report: ReferrerPush | None = None) -> ReferrerPush:
    """Upload the blobs (configs, documents) of ``subject``'s referrers. They are small and do not
    depend on the subject being there, so a push runs this beside its large uploads."""
    report = report or ReferrerPush()
    done: set[str] = set()
    for desc in attached_documents(store, name, subject.digest):
        manifest = store.read_json(desc.digest)
        for blob in [manifest["config"], *manifest.get("layers", [])]:
            b = oci.Descriptor.from_json(blob)
            if b.digest in done:
                continue
            done.add(b.digest)
            if registry.push_blob(repo, b, store.blob_path(b.digest)) == "uploaded":
                report.uploaded += 1
                report.uploaded_bytes += b.size
    return report


def push_referrers(store: oci.Store, registry: Registry, repo: str, name: str, subject: oci.Descriptor, *,
                   on_event: Event = lambda s, m: None, blobs_pushed: ReferrerPush | None = None) -> ReferrerPush:
    """Push every referrer of ``subject`` in the local store (and cosign's tags) to ``repo``; with
    ``blobs_pushed`` (what ``push_referrer_blobs`` did) only the manifests and the index."""
    report = blobs_pushed or push_referrer_blobs(store, registry, repo, name, subject)
    entries = attached_documents(store, name, subject.digest)
    if not entries:
        return report
    tagged = {}
    for suffix in (SIG_SUFFIX, ATT_SUFFIX):
        d = local_tagged(store, name, subject.digest, suffix)
        if d is not None:
            tagged[d.digest] = index_tag(subject.digest) + suffix
    api: bool | None = None  # unknown until the first referrer's PUT answers
    extra: list[oci.Descriptor] = []

    def put(data: bytes, digest: str) -> None:
        nonlocal api
        if api is False:  # a registry without the API: straight to the referrer's own tag
            put_referrer(registry, repo, data, referrer_tag(subject.digest, digest))
            return
        api = put_referrer(registry, repo, data)
        if not api:  # the tag schema: the referrer's own tag makes it findable by a later merge
            put_referrer(registry, repo, data, referrer_tag(subject.digest, digest))

    for desc in entries:
        data = store.read_bytes(desc.digest)
        put(data, desc.digest)
        if desc.digest in tagged:
            merged = _merge_cosign_tag(store, registry, repo, tagged[desc.digest], json.loads(data))
            if merged is not None:  # another signer's layers were there: keep them beside ours
                data = oci.canonical_json(merged)
                merged_desc = oci.Descriptor(MANIFEST, oci.digest_bytes(data), len(data),
                                             artifact_type=merged.get("artifactType"))
                put(data, merged_desc.digest)
                extra.append(merged_desc)
            registry.put_manifest(repo, tagged[desc.digest], data, MANIFEST)
        report.manifests += 1
        on_event("push", f"referrer {desc.digest[:19]} {desc.artifact_type or ''}")
    report.api = bool(api)
    if not api:
        update_tag_index(registry, repo, subject.digest, entries + extra, on_event=on_event)
    return report


def _merge_cosign_tag(store: oci.Store, registry: Registry, repo: str, tag: str,
                      ours: dict[str, Any]) -> dict[str, Any] | None:
    """Cosign keeps one manifest per subject under ``.sig``/``.att``, every signature a layer: if the
    registry's holds layers ours lacks, our manifest with both sets of layers; else None."""
    got = _get_json(registry, repo, tag)
    if got is None:
        return None
    theirs = got[0]

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return str(d.get("digest")), json.dumps(d.get("annotations") or {}, sort_keys=True)

    have = {key(d) for d in ours.get("layers", [])}
    missing = [d for d in theirs.get("layers", []) if key(d) not in have]
    if not missing:
        return None
    layers = list(ours.get("layers", [])) + missing
    config = store.put_bytes(oci.canonical_json(json.loads(cosign_config([]))
                                                | {"rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layers]}}),
                             IMAGE_CONFIG)
    registry.push_blob(repo, config, store.blob_path(config.digest))
    return {**ours, "config": config.to_json(), "layers": layers}


# ---- reading a subject's signatures and attestations, locally or from a registry ------------

class Content(Protocol):
    """The few reads verification and `build inspect` need, the same from the local store
    (``LocalContent``) and from a registry (``RemoteContent``); ``builder.oci.content.open_content``
    gives the one a reference names."""

    def tagged(self, tag: str) -> tuple[oci.Descriptor, dict[str, Any]] | None:
        """The manifest tagged ``tag`` in this repository, if there is one."""
        ...

    def manifest(self, desc: oci.Descriptor) -> dict[str, Any]:
        """The manifest ``desc`` names."""
        ...

    def blob(self, desc: oci.Descriptor) -> bytes:
        """A small blob's bytes, checked against ``desc``."""
        ...

    def referrers(self, subject_digest: str) -> list[oci.Descriptor]:
        """The referrers of the manifest ``subject_digest``."""
        ...

    def check_blob(self, desc: oci.Descriptor) -> None:
        """Refuse a blob of any size whose bytes are not ``desc``'s."""
        ...


class LocalContent:
    """The local store seen through the few reads verification needs."""

    def __init__(self, store: oci.Store, name: str):
        self.store = store
        self.name = name

    def tagged(self, tag: str) -> tuple[oci.Descriptor, dict[str, Any]] | None:
        d = self.store.resolve(f"{self.name}:{tag}")
        return (d, self.store.read_json(d.digest)) if d else None

    def manifest(self, desc: oci.Descriptor) -> dict[str, Any]:
        data = self.store.read_bytes(desc.digest)
        if oci.digest_bytes(data) != desc.digest:
            raise StoreError(f"The local store's copy of {desc.digest} is damaged.")
        result: dict[str, Any] = json.loads(data)
        return result

    def blob(self, desc: oci.Descriptor) -> bytes:
        data = self.store.read_bytes(desc.digest)
        if oci.digest_bytes(data) != desc.digest or len(data) != desc.size:
            raise StoreError(f"The local store's copy of {desc.digest} is damaged.")
        return data

    def referrers(self, subject_digest: str) -> list[oci.Descriptor]:
        return list_local(self.store, self.name, subject_digest)

    def check_blob(self, desc: oci.Descriptor) -> None:
        """Refuse a blob (of any size: it is hashed as it is read) whose bytes are not ``desc``'s."""
        if not self.store.has(desc.digest):
            raise StoreError(f"The local store lacks {desc.digest}.", hint="Pull or package it again.")
        h = hashlib.sha256()
        size = 0
        with self.store.open_blob(desc.digest) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        if "sha256:" + h.hexdigest() != desc.digest or size != desc.size:
            raise ContentError(f"The local store's copy of {desc.digest} does not match its digest: it was changed "
                               "or is damaged.", hint="Do not use it; pull or package it again from a good copy.")


class RemoteContent:
    """A registry repository seen through the same reads (every byte checked against its digest)."""

    MAX_BLOB = 64 << 20  # signatures and attestations are small; refuse to buffer anything huge

    def __init__(self, registry: Registry, repo: str):
        self.registry = registry
        self.repo = repo

    def tagged(self, tag: str) -> tuple[oci.Descriptor, dict[str, Any]] | None:
        got = self.registry.get_manifest(self.repo, tag)
        if got is None:
            return None
        data, media, digest = got
        m: dict[str, Any] = json.loads(data)
        return oci.Descriptor(media, digest, len(data), artifact_type=m.get("artifactType")), m

    def manifest(self, desc: oci.Descriptor) -> dict[str, Any]:
        got = self.registry.get_manifest(self.repo, desc.digest)
        if got is None:
            raise RegistryError(f"{self.registry.host}/{self.repo} lists {desc.digest} but does not have it.")
        result: dict[str, Any] = json.loads(got[0])
        return result

    def blob(self, desc: oci.Descriptor) -> bytes:
        if desc.size > self.MAX_BLOB:
            raise RegistryError(f"{desc.digest} is {desc.size} bytes: too large for a signature or attestation.")
        r = self.registry.request("GET", f"{self.repo}/blobs/{desc.digest}", scope=f"repository:{self.repo}:pull")
        data = r.content
        if oci.digest_bytes(data) != desc.digest or len(data) != desc.size:
            raise ContentError(f"Blob {desc.digest} from {self.registry.host}/{self.repo} does not match its digest.")
        return data

    def referrers(self, subject_digest: str) -> list[oci.Descriptor]:
        return list_remote(self.registry, self.repo, subject_digest)

    def check_blob(self, desc: oci.Descriptor) -> None:
        """Download a blob into a throwaway store, refusing it unless its digest and size are ``desc``'s."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="olive-builder-check-") as tmp:
            self.registry.fetch_blob(self.repo, desc, oci.Store(Path(tmp)))


def describe(content: Content, digest: str) -> list[dict[str, Any]]:
    """The referrers of ``digest`` as rows for `build inspect`."""
    rows = []
    for d in content.referrers(digest):
        row = {"digest": d.digest, "artifactType": d.artifact_type, "size": d.size,
               "kind": d.annotations.get("org.olive-builder.referrer") or _kind(d.artifact_type),
               "predicateType": d.annotations.get("in-toto.io/predicate-type")}
        if d.artifact_type == ADAPTER_ARTIFACT_TYPE:
            row["adapter"] = d.annotations.get(ADAPTER_ANNOTATION)
        rows.append(row)
    return sorted(rows, key=lambda r: (str(r["kind"]), r["digest"]))


def _kind(artifact_type: str | None) -> str:
    return {COSIGN_SIG_ARTIFACT: "signature",
            COSIGN_ATT_ARTIFACT: "attestations",
            SIGSTORE_BUNDLE_MEDIA: "model-signature",
            SBOM_MEDIA: "sbom",
            ADAPTER_ARTIFACT_TYPE: "adapter"}.get(artifact_type or "", artifact_type or "?")


def document(content: Content, digest: str, kind: str) -> bytes | None:
    """The first document of the referrer of ``kind`` (sbom, provenance, evaluation) of ``digest``."""
    for row in describe(content, digest):
        if row["kind"] != kind:
            continue
        m = content.manifest(oci.Descriptor(MANIFEST, row["digest"], row["size"]))
        for layer in m.get("layers") or []:
            return bytes(content.blob(oci.Descriptor.from_json(layer)))
    return None
