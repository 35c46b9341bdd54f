"""Push, pull and inspect: moving OCI content between the local store, registries and model folders.

Push order: every blob (config and layers) first, then manifests, the model artifact
before the runnable image. A registry rejects a manifest whose blobs it lacks, and tags
are written only by manifest PUTs, so an interrupted push never leaves a tag pointing at
incomplete content; the next push skips what already arrived (HEAD first) and finishes.
Blobs this store pushed to another repository of the same registry are mounted from
there instead of uploaded. A manifest that records a build cache key is also tagged
``cache-<hex>`` (``-serve`` for the image), so later builds of the same inputs find it.

Pull verifies every blob's digest and size as it arrives (nothing unverified is kept),
then unpacks the model layers into a hidden folder beside the destination, checks it,
and renames it into place.

LoRA adapters (finetuned builds) are artifacts of their own whose ``subject`` is the base
model's manifest (see ``package``). A push of the base takes its adapters along: their blobs
with the model's (so a second adapter of a base uploads only its own file and the small
documents that name the build), their manifests after the base's, listed among the base's
referrers (the referrers API, or the ``sha256-<hex>`` index where there is none) and tagged
``<tag>--<adapter>``. A push of an adapter's tag alone puts its base by digest and moves no
base tag. A pull of an adapter's tag fetches the base its subject names, by digest, from the
same repository (one hop: a base must be a model artifact, never another adapter) and writes
the adapter into the folder's adapters/ before the folder is put in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from builder.build.check import check_files
from builder.contract import (
    ADAPTER_ANNOTATION,
    ADAPTER_SUFFIX,
    ADAPTERS_ANNOTATION,
    ADAPTERS_DIR,
    CHUNK,
    KEY_ANNOTATION,
    MODEL_ROOT,
    SERVE_SUFFIX,
    adapter_names,
    adapter_tag,
    atomic_write,
    key_tag,
    valid_adapter_name,
)
from builder.errors import ContentError, OutputExistsError, PlanError, StoreError
from builder.oci import layout as oci
from builder.oci import referrers
from builder.oci.content import remote_manifest
from builder.oci.media import (
    ADAPTER_ARTIFACT_TYPE,
    IMAGE_CONFIG,
    IMAGE_LAYER_PREFIX,
    MANIFEST,
    MODEL_ARTIFACT,
    MODEL_CONFIG,
    MODEL_LAYER_TYPES,
)
from builder.oci.reference import Reference, parse_reference, repository
from builder.oci.referrers import Content, Event
from builder.oci.registry import Registry
from builder.reporting import NullReporter, Reporter
from builder.trust.verify import AdapterInfo, PullGuard, adapter_of, verify_signature

LOCATIONS = "locations.json"


@dataclass(frozen=True)
class Published:
    """One manifest at a reference: ``name:tag`` in the local store, or ``host/repo:tag`` in a registry."""

    ref: str
    digest: str


@dataclass
class PushReport:
    """What a push did (``push``), or what a registry cache hit tagged there (only ``pushed``)."""

    pushed: list[tuple[str, str]] = field(default_factory=list)  # (remote reference, digest)
    uploaded: int = 0
    uploaded_bytes: int = 0
    existing: int = 0
    mounted: int = 0
    total_bytes: int = 0
    referrers: int = 0  # referrer manifests (SBOM, provenance, evaluation, signatures) pushed
    referrer_uploaded_bytes: int = 0  # bytes of their blobs the registry did not have
    adapters: int = 0  # adapter manifests pushed (their blobs count in uploaded/existing/mounted)

    @property
    def refs(self) -> tuple[Published, ...]:
        """The remote references and digests the registry holds now."""
        return tuple(Published(ref, digest) for ref, digest in self.pushed)


@dataclass(frozen=True)
class LocalAdapter:
    """An adapter artifact in the local store: its name, manifest descriptor and manifest."""

    name: str
    desc: oci.Descriptor
    manifest: dict[str, Any]


def local_adapters(store: oci.Store, name: str, base_digest: str) -> list[LocalAdapter]:
    """The adapters the local store lists among the referrers of ``name``'s manifest ``base_digest``."""
    out: dict[str, LocalAdapter] = {}
    for d in referrers.list_local(store, name, base_digest):
        if d.artifact_type != ADAPTER_ARTIFACT_TYPE:
            continue
        manifest = oci.parse_manifest(store.read_bytes(d.digest), f"{name}@{d.digest}")
        found = adapter_of(manifest, f"{name}@{d.digest}")
        out.setdefault(found.name, LocalAdapter(found.name, d, manifest))
    return [out[n] for n in sorted(out)]


def manifest_blobs(manifest: dict[str, Any]) -> list[oci.Descriptor]:
    return [oci.Descriptor.from_json(manifest["config"])] + [oci.Descriptor.from_json(d) for d in manifest["layers"]]


def local_manifest(store: oci.Store, ref: str) -> tuple[oci.Descriptor, dict[str, Any]]:
    desc = store.resolve(ref)
    if desc is None:
        known = sorted(store.refs())
        hint = ("Known here: " + ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")) if known else \
            "The local store is empty: `build recipe FILE` or `build pull REF DIR` puts models there."
        raise StoreError(f"{ref} is not in the local store {store.root}.", hint=hint)
    data = store.read_bytes(desc.digest)
    if oci.digest_bytes(data) != desc.digest:
        raise ContentError(f"The local store's copy of {ref} ({desc.digest}) is damaged.",
                           hint="Rebuild or pull it again.")
    return desc, oci.parse_manifest(data, ref)


def _locations(store: oci.Store) -> dict[str, dict[str, str]]:
    try:
        data = json.loads((store.root / LOCATIONS).read_text())
        if isinstance(data, dict):
            return {str(h): dict(v) for h, v in data.items() if isinstance(v, dict)}
        return {}
    except (FileNotFoundError, ValueError):
        return {}


def _remember(store: oci.Store, host: str, repo: str, digests: list[str]) -> None:
    with store.locked():
        data = _locations(store)
        data.setdefault(host, {}).update({d: repo for d in digests})
        atomic_write(store.root / LOCATIONS, json.dumps(data, sort_keys=True))


def push_total(store: oci.Store, refs: list[str]) -> int:
    """The bytes ``push`` sends for ``refs`` at most (their blobs and those of the adapters they take along)."""
    total = 0
    for ref in refs:
        desc, manifest = local_manifest(store, ref)
        total += sum(b.size for b in manifest_blobs(manifest))
        if manifest.get("artifactType") == MODEL_ARTIFACT:
            for a in local_adapters(store, _name_of(ref), desc.digest):
                total += sum(b.size for b in manifest_blobs(a.manifest))
    return total


def push(store: oci.Store, refs: list[str], host: str, namespace: str, *, insecure: bool | None = None,
         reporter: Reporter | None = None) -> PushReport:
    """Push local store ``refs`` (``name:tag``) to ``host/namespace/name:tag``; ``reporter`` hears
    each blob and manifest and counts the bytes."""
    reporter = reporter or NullReporter()
    progress = reporter.progress("uploading", push_total(store, refs))
    try:
        return _push(store, refs, host, namespace, insecure=insecure, on_event=_events(reporter), on_bytes=progress)
    finally:
        progress.close()


def _events(reporter: Reporter) -> Event:
    """The (stage, message) callback the transfer loops call, for a Reporter."""
    return lambda stage, message: reporter.event(message)


def _push(store: oci.Store, refs: list[str], host: str, namespace: str, *, insecure: bool | None,
          on_event: Event, on_bytes: Callable[[int], None]) -> PushReport:
    report = PushReport()
    items: list[tuple[str, str, str, oci.Descriptor, dict[str, Any]]] = []
    # (tag, adapter) to push after each manifest; an adapter's base goes up first (by digest when
    # the adapter alone was asked for: the base's tag may name a newer build by now)
    adapters: dict[str, list[tuple[str, LocalAdapter]]] = {}
    for ref in refs:
        desc, manifest = local_manifest(store, ref)
        name, _, tag = ref.rpartition(":")
        repo = repository(namespace, name)
        if manifest.get("artifactType") == ADAPTER_ARTIFACT_TYPE:
            info = adapter_of(manifest, ref)
            if not store.has(info.base.digest):
                raise StoreError(f"The local store lacks {info.base.digest}, the base model of the adapter {ref}.",
                                 hint="Package or pull the base model again.")
            base_manifest = oci.parse_manifest(store.read_bytes(info.base.digest), f"{name}@{info.base.digest}")
            if not any(d.digest == info.base.digest for _r, _rp, _t, d, _m in items):
                items.append((f"{name}@{info.base.digest}", repo, info.base.digest, info.base, base_manifest))
            adapters.setdefault(info.base.digest, []).append((tag, LocalAdapter(info.name, desc, manifest)))
            continue
        items.append((ref, repo, tag, desc, manifest))
        if manifest.get("artifactType") == MODEL_ARTIFACT:
            adapters[desc.digest] = [(adapter_tag(tag, a.name), a) for a in local_adapters(store, name, desc.digest)]
    registry = Registry(host, insecure=insecure)
    known = _locations(store).get(host, {})
    # The referrers' blobs (SBOMs, statements, signatures: kilobytes) go up on a second connection
    # while the model's layers upload, so attaching them adds almost nothing to a push's time.
    side = _ReferrerBlobs(store, host, insecure, [(repo, _name_of(ref), desc) for ref, repo, _t, desc, _m in items])
    try:
        done: set[tuple[str, str]] = set()
        for ref, repo, _tag, desc, manifest in items:
            blobs = manifest_blobs(manifest)
            for _t, adapter in adapters.get(desc.digest, []):
                blobs += manifest_blobs(adapter.manifest)
            for blob in blobs:
                if (repo, blob.digest) in done:
                    continue
                path = store.blob_path(blob.digest)
                if not path.is_file():
                    raise StoreError(f"The local store lacks {blob.digest}, a blob of {ref}.",
                                     hint="Rebuild or pull the model again.")
                sources = [known[blob.digest]] if blob.digest in known and known[blob.digest] != repo else []
                status = registry.push_blob(repo, blob, path, mount_from=sources, on_bytes=on_bytes)
                done.add((repo, blob.digest))
                report.total_bytes += blob.size
                if status == "uploaded":
                    report.uploaded += 1
                    report.uploaded_bytes += blob.size
                elif status == "mounted":
                    report.mounted += 1
                    on_bytes(blob.size)  # done without a transfer: progress counts it as done
                else:
                    report.existing += 1
                    on_bytes(blob.size)
                label = _label(blob)
                on_event("push", f"{status:8} {blob.digest[:19]} {_human(blob.size):>9}  {label}")
            _remember(store, host, repo, [b.digest for b in blobs])
        for _ref, repo, tag, desc, manifest in items:
            data = store.read_bytes(desc.digest)
            digest = registry.put_manifest(repo, tag, data, desc.media_type)
            if tag == desc.digest:  # a base pushed for its adapter: by digest, no tag moved
                on_event("push", f"put      {host}/{repo}@{digest}")
                continue
            remote = f"{host}/{repo}:{tag}"
            report.pushed.append((remote, digest))
            on_event("push", f"tagged   {remote}@{digest}")
            key = (manifest.get("annotations") or {}).get(KEY_ANNOTATION)
            if key:
                suffix = "" if manifest.get("artifactType") == MODEL_ARTIFACT else SERVE_SUFFIX
                registry.put_manifest(repo, key_tag(key) + suffix, data, desc.media_type)
        # Referrer manifests last: a registry lists a referrer only once its subject is there.
        blobs_pushed = side.join()
        for ref, repo, _tag, desc, _manifest in items:
            attached = referrers.push_referrers(store, registry, repo, _name_of(ref), desc, on_event=on_event,
                                                blobs_pushed=blobs_pushed[desc.digest])
            report.referrers += attached.manifests
            report.referrer_uploaded_bytes += attached.uploaded_bytes
            for tag, adapter in adapters.get(desc.digest, []):
                digest = _push_adapter(store, registry, repo, _name_of(ref), desc, tag, adapter, on_event)
                report.pushed.append((f"{host}/{repo}:{tag}", digest))
                report.adapters += 1
    finally:
        side.join(raise_errors=False)
        registry.close()
    return report


def retag_adapters(registry: Registry, repo: str, base_digest: str, base_tag: str) -> list[tuple[str, str]]:
    """Tag the adapters the registry lists for ``base_digest`` to go with its tag ``base_tag`` (a
    registry cache hit); returns (reference, digest) of each. Nothing is downloaded but manifests."""
    got = registry.get_manifest(repo, base_digest)
    if got is None or not adapter_names(oci.json_object(got[0], f"{registry.host}/{repo}@{base_digest}")):
        return []  # a plain model: no adapters to look for
    out = []
    for d in referrers.list_remote(registry, repo, base_digest):
        name = d.annotations.get(ADAPTER_ANNOTATION, "")
        if d.artifact_type != ADAPTER_ARTIFACT_TYPE or not valid_adapter_name(name):
            continue
        got = registry.get_manifest(repo, d.digest)
        if got is None:
            continue
        data, media, digest = got
        tag = adapter_tag(base_tag, name)
        registry.put_manifest(repo, tag, data, media)
        out.append((f"{registry.host}/{repo}:{tag}", digest))
    return out


def _name_of(ref: str) -> str:
    """The repository part of a local ``name:tag`` or ``name@digest``."""
    return ref.partition("@")[0] if "@" in ref else ref.rpartition(":")[0]


def _push_adapter(store: oci.Store, registry: Registry, repo: str, name: str, base: oci.Descriptor, tag: str,
                  adapter: LocalAdapter, on_event: Event) -> str:
    """PUT an adapter manifest (its blobs are up), list it among its base's referrers (the API, or
    the tag schema's index on registries without one), tag it, and push its signature."""
    data = store.read_bytes(adapter.desc.digest)
    api = referrers.put_referrer(registry, repo, data)
    if not api:
        referrers.put_referrer(registry, repo, data, referrers.referrer_tag(base.digest, adapter.desc.digest))
        referrers.update_tag_index(registry, repo, base.digest, [adapter.desc], on_event=on_event)
    digest = registry.put_manifest(repo, tag, data, MANIFEST)
    on_event("push", f"tagged   {registry.host}/{repo}:{tag}@{digest}  (adapter {adapter.name})")
    referrers.push_referrers(store, registry, repo, name, adapter.desc, on_event=on_event)
    return digest


class _ReferrerBlobs:
    """``referrers.push_referrer_blobs`` for every pushed manifest, on a thread of its own."""

    def __init__(self, store: oci.Store, host: str, insecure: bool | None,
                 subjects: list[tuple[str, str, oci.Descriptor]]):
        import threading

        self._results: dict[str, referrers.ReferrerPush] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(store, host, insecure, subjects), daemon=True,
                                        name="referrer-blobs")
        self._thread.start()

    def _run(self, store: oci.Store, host: str, insecure: bool | None,
             subjects: list[tuple[str, str, oci.Descriptor]]) -> None:
        registry = Registry(host, insecure=insecure)
        try:
            for repo, name, desc in subjects:
                self._results[desc.digest] = referrers.push_referrer_blobs(store, registry, repo, name, desc)
        except BaseException as e:  # noqa: BLE001 - handed to the pushing thread, which raises it
            self._error = e
        finally:
            registry.close()

    def join(self, raise_errors: bool = True) -> dict[str, referrers.ReferrerPush]:
        self._thread.join()
        if self._error is not None and raise_errors:
            raise self._error
        return self._results


def _label(blob: oci.Descriptor) -> str:
    if blob.annotations.get(oci.ANN_TITLE):
        return blob.annotations[oci.ANN_TITLE]
    if blob.media_type in (MODEL_CONFIG, IMAGE_CONFIG):
        return "config"
    return "runtime layer" if blob.media_type.startswith(IMAGE_LAYER_PREFIX) else blob.media_type


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ---- fetching into the store ---------------------------------------------------------------

def fetch(ref: Reference, store: oci.Store, *, insecure: bool | None = None, layers: bool = True,
          on_event: Event = lambda s, m: None, on_bytes: Callable[[int], None] = lambda n: None,
          on_start: Callable[[int], None] = lambda total: None,
          verify: Callable[[Content, str], None] | None = None, name_it: bool = True,
          verify_adapter: Callable[[Content, str], None] | None = None,
          ) -> tuple[str, oci.Descriptor, dict[str, Any]]:
    """Make ``ref``'s manifest (and, with ``layers``, its blobs) present and verified in ``store``.
    ``verify(content, digest)`` (see ``referrers.LocalContent``) runs once the manifest's digest is
    known and before any blob is downloaded; it raises to refuse the content. Where the manifest
    is an adapter's, ``verify_adapter`` (if given) runs instead."""
    if ref.registry is None:
        if ref.digest:
            for name, d in store.refs().items():
                if d.digest == ref.digest:
                    found = (name, *local_manifest(store, name))
                    break
            else:
                if not store.has(ref.digest):  # an adapter's base may be untagged by now
                    raise StoreError(f"No manifest {ref.digest} in the local store {store.root}.")
                data = store.read_bytes(ref.digest)
                if oci.digest_bytes(data) != ref.digest:
                    raise ContentError(f"The local store's copy of {ref.digest} is damaged.",
                                       hint="Rebuild or pull it again.")
                m = oci.parse_manifest(data, str(ref))
                found = (f"{ref.repository}@{ref.digest}",
                         oci.Descriptor(MANIFEST, ref.digest, len(data), artifact_type=m.get("artifactType")), m)
        else:
            found = (f"{ref.repository}:{ref.tag}", *local_manifest(store, f"{ref.repository}:{ref.tag}"))
        if verify is not None:
            check = verify_adapter if verify_adapter and found[2].get("artifactType") == ADAPTER_ARTIFACT_TYPE \
                else verify
            check(referrers.LocalContent(store, ref.repository), found[1].digest)
        return found
    registry = Registry(ref.registry, insecure=insecure)
    try:
        data, media, digest = remote_manifest(
            registry, ref, hint=f"Check the name and tag; `build inspect {ref.name}:TAG` shows one.")
        if media != MANIFEST:
            raise ContentError(f"{ref} is a {media or 'document without a media type'}, not an OCI image manifest: "
                               "it is not a model built by olive-builder.")
        manifest = oci.parse_manifest(data, str(ref))  # shape and size, before anything is downloaded
        if verify is not None:
            check = verify_adapter if verify_adapter and manifest.get("artifactType") == ADAPTER_ARTIFACT_TYPE \
                else verify
            check(referrers.RemoteContent(registry, ref.repository), digest)
        blobs = manifest_blobs(manifest) if layers else manifest_blobs(manifest)[:1]
        on_start(sum(b.size for b in blobs if not store.has(b.digest)))  # bytes to download
        for blob in blobs:
            if store.has(blob.digest):
                continue
            label = _label(blob)
            on_event("pull", f"fetching {blob.digest[:19]} {_human(blob.size):>9}  {label}")
            registry.fetch_blob(ref.repository, blob, store, on_bytes=on_bytes)
    finally:
        registry.close()
    desc = store.put_bytes(data, MANIFEST, artifact_type=manifest.get("artifactType"))
    name = str(ref)
    if layers and name_it:  # only complete content gets a name in the store
        store.tag(name, desc)
    return name, desc, manifest


def model_layers(manifest: dict[str, Any], shown: str) -> list[oci.Descriptor]:
    out = [oci.Descriptor.from_json(d) for d in manifest.get("layers", [])
           if d.get("mediaType") in MODEL_LAYER_TYPES or oci.ANN_FILEPATH in (d.get("annotations") or {})]
    if not out:
        raise ContentError(f"{shown} has no model layers: it is not a model artifact or runnable image made by olive-builder.")
    return out


class _HashingReader:
    def __init__(self, f: BinaryIO):
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


_NAME_PART_MAX = 255  # bytes, as in most filesystems
_NAME_MAX = 1024


class _Budget:
    """What a pull may unpack in all: the model layers' declared sizes together."""

    def __init__(self, total: int):
        self.left = total
        self.names: dict[str, bool] = {}  # unpacked path -> is a folder


def _check_name(member: tarfile.TarInfo, layer: oci.Descriptor, shown: str) -> tuple[str, ...]:
    """The path parts under ``model/`` of an entry, or ContentError: only plain, relative, short names."""
    name = member.name
    parts = PurePosixPath(name).parts

    def refuse(why: str) -> ContentError:
        return ContentError(f"{shown}: layer {layer.digest} holds an entry {name[:200]!r}: {why}; refused.",
                            hint="This content was not made by olive-builder or was tampered with; do not use it.")

    if "\0" in name or any(ord(c) < 0x20 for c in name):
        raise refuse("its name has control characters")
    if len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX or \
            any(len(p.encode("utf-8", "surrogateescape")) > _NAME_PART_MAX for p in parts):
        raise refuse("its name is too long")
    if name.startswith("/") or len(parts) < 2 or parts[0] != MODEL_ROOT or ".." in parts or "." in name.split("/"):
        raise refuse(f"it lies outside {MODEL_ROOT}/")
    return parts[1:]


def _unpack(store: oci.Store, layer: oci.Descriptor, dest: Path, shown: str, budget: _Budget) -> None:
    """Unpack one model layer into ``dest``. Whatever the tar says, no more is written than the
    layer's declared size and what is left of the pull's budget; sparse entries, links,
    devices, names outside model/, a name given twice, a file where a folder is (or the
    other way round) are refused. Every failure is a ContentError."""
    with store.open_blob(layer.digest) as raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                written = 0
                for member in tar:
                    if member.name.rstrip("/") == MODEL_ROOT and member.isdir():
                        continue
                    rel = _check_name(member, layer, shown)
                    key = "/".join(rel)
                    if member.issparse() or any(k.startswith("GNU.sparse") for k in member.pax_headers):
                        raise ContentError(f"{shown}: layer {layer.digest} holds {member.name[:200]!r} as a sparse "
                                           "file, which olive-builder never writes; refused.")
                    if member.isfile():
                        written += member.size
                        if written > layer.size or member.size > budget.left:
                            raise ContentError(f"{shown}: layer {layer.digest} holds {member.name[:200]!r} of "
                                               f"{member.size} bytes, more than the layer's declared {layer.size} "
                                               "bytes allow; refused.")
                        budget.left -= member.size
                    elif not member.isdir():
                        raise ContentError(f"{shown}: layer {layer.digest} holds {member.name[:200]!r}, which is not a "
                                           "plain file or folder; refused.")
                    for i in range(1, len(rel)):  # every parent must be (or become) a folder
                        parent = "/".join(rel[:i])
                        if budget.names.get(parent) is False:
                            raise ContentError(f"{shown}: {parent!r} is both a file and a folder; refused.")
                        budget.names[parent] = True
                    seen = budget.names.get(key)
                    if seen is not None and not (seen and member.isdir()):
                        raise ContentError(f"{shown}: {key!r} appears twice (or as both a file and a folder); refused.")
                    budget.names[key] = member.isdir()
                    target = dest.joinpath(*rel)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    if src is None:
                        raise ContentError(f"{shown}: layer {layer.digest}: {member.name[:200]!r} has no content.")
                    with target.open("xb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                while reader.read(CHUNK):
                    pass
        except ContentError:
            raise
        except (tarfile.TarError, EOFError, ValueError, UnicodeError) as e:
            raise ContentError(f"{shown}: layer {layer.digest} is not a valid tar ({str(e)[:200]}): "
                               "damaged or tampered with.") from None
        except OSError as e:
            raise ContentError(f"{shown}: layer {layer.digest} cannot be unpacked here: {e.strerror or e}.",
                               hint="If the disk is full, free space; otherwise the content is not olive-builder's.") from None
    if "sha256:" + reader.hash.hexdigest() != layer.digest or reader.size != layer.size:
        raise ContentError(f"{shown}: the stored layer {layer.digest} does not match its digest or size; "
                           "it was damaged or tampered with.", hint="Pull it again from the registry.")


def _write_adapter(store: oci.Store, adapter: AdapterInfo, model: Path, shown: str) -> None:
    """Copy a stored adapter blob to ``model/adapters/<name>.onnx_adapter``, checking its digest and
    size on the way (the name was checked by ``adapter_of``: no path can come out of it)."""
    folder = model / ADAPTERS_DIR
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ContentError(f"{shown}: the base model holds {ADAPTERS_DIR} as something else than a folder; refused.")
    folder.mkdir(exist_ok=True)
    target = folder / f"{adapter.name}{ADAPTER_SUFFIX}"
    try:
        with store.open_blob(adapter.layer.digest) as src, target.open("xb") as out:
            reader = _HashingReader(src)
            while chunk := reader.read(CHUNK):
                out.write(chunk)
                if reader.size > adapter.layer.size:
                    break
    except FileExistsError:
        raise ContentError(f"{shown}: the base model already holds {ADAPTERS_DIR}/{adapter.name}{ADAPTER_SUFFIX}; "
                           "refused.") from None
    except OSError as e:
        raise ContentError(f"{shown}: the adapter {adapter.name} cannot be written here: {e.strerror or e}.") from None
    if "sha256:" + reader.hash.hexdigest() != adapter.layer.digest or reader.size != adapter.layer.size:
        raise ContentError(f"{shown}: the stored adapter blob {adapter.layer.digest} does not match its digest or "
                           "size; it was damaged or tampered with.", hint="Pull it again from the registry.")


def materialize(store: oci.Store, manifest: dict[str, Any], dest: Path, *, force: bool, shown: str,
                check: Callable[[Path], None] | None = None, adapters: Sequence[AdapterInfo] = ()) -> Path:
    """Unpack the model layers of ``manifest`` into ``dest``, all or nothing. ``check(folder)`` may
    refuse the unpacked folder (a model signature) before it is put in place. ``adapters`` (whose
    blobs are in the store) go into its adapters/ folder once the base is checked, as a build
    writes them."""
    dest = dest.absolute()
    if dest.exists() and not force:
        raise PlanError(f"{dest} already exists.", hint="Pass --force to replace it, or choose another folder.")
    if dest.exists() and not dest.is_dir():
        raise PlanError(f"{dest} exists and is not a folder.")
    layers = model_layers(manifest, shown)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        model = work / "model"
        model.mkdir()
        budget = _Budget(sum(layer.size for layer in layers))
        for layer in layers:
            _unpack(store, layer, model, shown, budget)
        check_files(model)
        if check is not None:
            check(model)
        for adapter in adapters:
            _write_adapter(store, adapter, model, shown)
        if force and dest.exists():
            os.replace(dest, work / "previous")
        try:
            oci.rename_noreplace(model, dest)  # without --force, never over a folder that appeared meanwhile
        except FileExistsError:
            raise OutputExistsError(f"{dest} appeared meanwhile (another build or pull wrote it); this one was "
                                    "not put in its place.",
                                    hint="Pass --force to replace it, or choose another folder.") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class Fetched:
    """A reference made present in the store: its name, manifest descriptor and manifest; for an
    adapter also the adapter and its base model's manifest (``model``: what to unpack)."""

    name: str
    desc: oci.Descriptor
    manifest: dict[str, Any]
    model: dict[str, Any]
    adapter: AdapterInfo | None
    base_guard: PullGuard  # what checks the folder unpacked from ``model`` (for an adapter: its base's guard)


def fetch_model(ref: Reference, store: oci.Store, *, insecure: bool | None = None,
                reporter: Reporter | None = None, verify_key: Path | None = None,
                signature_out: Path | None = None, name_it: bool = True) -> Fetched:
    """``fetch`` of a model, an image or an adapter (see ``_fetch_model``); ``reporter`` hears
    each blob and counts the bytes."""
    reporter = reporter or NullReporter()
    progress = reporter.progress("downloading", 0)
    try:
        return _fetch_model(ref, store, insecure=insecure, on_event=_events(reporter), on_bytes=progress,
                            on_start=progress.start, verify_key=verify_key, signature_out=signature_out,
                            name_it=name_it)
    finally:
        progress.close()


def _fetch_model(ref: Reference, store: oci.Store, *, insecure: bool | None, on_event: Event,
                 on_bytes: Callable[[int], None], on_start: Callable[[int], None], verify_key: Path | None,
                 signature_out: Path | None, name_it: bool) -> Fetched:
    """``fetch`` of a model, an image or an adapter. An adapter brings its base: the manifest its
    ``subject`` names, fetched by digest from the same repository and required to be a model
    artifact (one hop: an adapter's base is never followed further). With ``verify_key`` both
    manifests must be signed by it; the model signature (``signature_out``) is the base's."""
    guard = PullGuard(str(ref), verify_key, signature_out)
    name, desc, manifest = fetch(ref, store, insecure=insecure, on_event=on_event, on_bytes=on_bytes,
                                 on_start=on_start, name_it=False,
                                 verify=guard.verify if guard.active else None, verify_adapter=_adapter_check(guard))
    if manifest.get("artifactType") != ADAPTER_ARTIFACT_TYPE:
        if name_it:
            store.tag(name, desc)
        return Fetched(name, desc, manifest, manifest, None, guard)
    adapter = adapter_of(manifest, str(ref))
    base_ref = Reference(ref.registry, ref.repository, None, adapter.base.digest)
    base_guard = PullGuard(f"{ref} (its base {adapter.base.digest})", verify_key, signature_out)
    try:
        _, base_desc, base = fetch(base_ref, store, insecure=insecure, on_event=on_event, on_bytes=on_bytes,
                                   on_start=on_start, name_it=False,
                                   verify=base_guard.verify if base_guard.active else None)
    except StoreError:
        raise StoreError(f"The local store lacks {adapter.base.digest}, the base model of the adapter {ref}.",
                         hint="Package or pull the base model again.") from None
    if base_desc.digest != adapter.base.digest:
        raise ContentError(f"{ref}: its base {adapter.base.digest} came back as {base_desc.digest}; refused.")
    if base.get("artifactType") != MODEL_ARTIFACT:
        raise ContentError(f"{ref}: its base {adapter.base.digest} is not a model artifact "
                           f"({base.get('artifactType') or 'no artifactType'}); refused.",
                           hint="This content was not made by olive-builder or was tampered with; do not use it.")
    names = [n for n in ((base.get("annotations") or {}).get(ADAPTERS_ANNOTATION) or "").split(",") if n]
    if names and adapter.name not in names:
        raise ContentError(f"{ref}: its base {adapter.base.digest} lists the adapters {', '.join(names)}, "
                           f"not {adapter.name}; refused.")
    if name_it:
        store.tag(name, desc)
    return Fetched(name, desc, manifest, base, adapter, base_guard)


def _adapter_check(guard: PullGuard) -> Callable[[Content, str], None]:
    """The guard's check for an adapter manifest: only its cosign signature (it has no model
    signature of its own; the base's covers the base's files, and the adapter's manifest names
    its file by digest)."""
    def verify(content: Content, digest: str) -> None:
        if guard.key is not None:
            verify_signature(content, digest, guard.key, guard.shown)

    return verify


def pull(ref_text: str, dest: Path, store: oci.Store, *, force: bool = False, insecure: bool | None = None,
         reporter: Reporter | None = None, verify_key: Path | None = None,
         signature_out: Path | None = None) -> tuple[str, oci.Descriptor, Path]:
    """Fetch ``ref_text`` into ``dest``. With ``verify_key`` (a public key), content without a cosign
    signature by it is refused before any blob is downloaded, and the unpacked files must match
    the model's OpenSSF signature by it before the folder is put in place. ``signature_out``
    receives that model signature (for ``model_signing verify``). An adapter's reference gives its
    base model with the adapter in adapters/, as the build wrote them."""
    ref = parse_reference(ref_text)
    dest = dest.absolute()
    if dest.exists() and not force:  # before any download
        raise PlanError(f"{dest} already exists.", hint="Pass --force to replace it, or choose another folder.")
    got = fetch_model(ref, store, insecure=insecure, reporter=reporter, verify_key=verify_key,
                      signature_out=signature_out, name_it=False)
    guard = got.base_guard
    materialize(store, got.model, dest, force=force, shown=str(ref), check=guard.check_folder if guard.active else None,
                adapters=[got.adapter] if got.adapter else [])
    store.tag(got.name, got.desc)  # named only once it unpacked: content that does not is left to `build gc`
    guard.write_signature()
    return got.name, got.desc, dest


# ---- inspect ------------------------------------------------------------------------------

def describe(ref_text: str, store: oci.Store, *, insecure: bool | None = None) -> dict[str, Any]:
    ref = parse_reference(ref_text)
    name, desc, manifest = fetch(ref, store, insecure=insecure, layers=False)
    config_desc = oci.Descriptor.from_json(manifest["config"])
    config: Any = None
    if config_desc.media_type == MODEL_CONFIG:
        config = store.read_json(config_desc.digest)
    out: dict[str, Any] = {
        "reference": str(ref) if ref.registry else name,
        "digest": desc.digest,
        "mediaType": manifest.get("mediaType"),
        "artifactType": manifest.get("artifactType"),
        "kind": "model artifact" if manifest.get("artifactType") == MODEL_ARTIFACT else
                ("LoRA adapter" if manifest.get("artifactType") == ADAPTER_ARTIFACT_TYPE else
                 ("runnable image" if config_desc.media_type == IMAGE_CONFIG else "other")),
        "annotations": manifest.get("annotations") or {},
        "layers": [{"mediaType": d["mediaType"], "digest": d["digest"], "size": d["size"],
                    "path": (d.get("annotations") or {}).get(oci.ANN_FILEPATH),
                    "title": (d.get("annotations") or {}).get(oci.ANN_TITLE)} for d in manifest["layers"]],
        "size": sum(d["size"] for d in manifest["layers"]) + config_desc.size,
        "config": config,
    }
    if ref.registry is None and not name.endswith(SERVE_SUFFIX) and store.resolve(name + SERVE_SUFFIX):
        out["runnableImage"] = name + SERVE_SUFFIX
    if manifest.get("artifactType") == ADAPTER_ARTIFACT_TYPE:
        adapter = adapter_of(manifest, out["reference"])
        out["adapter"] = {"name": adapter.name, "base": adapter.base.digest,
                          "baseReference": f"{ref.name}@{adapter.base.digest}"}
    return out


def adapter_rows(referrer_rows: list[dict[str, Any]], base_ref: str) -> list[dict[str, Any]]:
    """`build inspect`'s adapters of a base, from its referrer rows (``referrers.describe``)."""
    ref = parse_reference(base_ref)
    out = []
    for row in referrer_rows:
        if row.get("artifactType") != ADAPTER_ARTIFACT_TYPE or not row.get("adapter"):
            continue
        tag = adapter_tag(ref.tag, str(row["adapter"])) if ref.tag and not ref.digest else None
        out.append({"name": row["adapter"], "digest": row["digest"],
                    "reference": f"{ref.name}:{tag}" if tag else f"{ref.name}@{row['digest']}"})
    return sorted(out, key=lambda r: str(r["name"]))
