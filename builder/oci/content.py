"""Opening OCI content by reference, from the local store or from a registry.

A reference without a registry (``name:tag``, ``name@sha256:...``) names the local store; one
with a registry names a repository there. ``open_content`` gives either as the same
``referrers.Content`` (what verification and ``build inspect`` read) together with the
manifest's digest; ``remote_manifest`` is the one lookup of a reference's manifest on a
registry, for ``open_content`` and for ``publish.distribute``'s fetch alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from builder.errors import RegistryError, StoreError
from builder.oci import layout as oci
from builder.oci.reference import Reference, parse_reference
from builder.oci.referrers import Content, LocalContent, RemoteContent
from builder.oci.registry import Registry


def remote_manifest(registry: Registry, ref: Reference, *, hint: str | None = None) -> tuple[bytes, str, str]:
    """(bytes, media type, digest) of the manifest ``ref`` names on ``registry``, verified
    (``Registry.get_manifest``); RegistryError, with ``hint``, where the registry has none."""
    got = registry.get_manifest(ref.repository, ref.reference)
    if got is None:
        raise RegistryError(f"{ref} does not exist (the registry has no such tag or digest).", hint=hint)
    return got


@contextmanager
def open_content(ref_text: str, store: oci.Store, *, insecure: bool | None = None) -> Iterator[tuple[Content, str]]:
    """(content, manifest digest) of a reference: the local store's ``<name>:<tag>`` or a registry's.
    A registry's connection is closed when the ``with`` block ends."""
    ref = parse_reference(ref_text)
    if ref.registry is None:
        if ref.digest:
            digest = ref.digest
        else:
            found = store.resolve(f"{ref.repository}:{ref.tag}")
            if found is None:
                raise StoreError(f"{ref.repository}:{ref.tag} is not in the local store {store.root}.",
                                 hint="`build inspect` lists what it holds.")
            digest = found.digest
        yield LocalContent(store, ref.repository), digest
        return
    registry = Registry(ref.registry, insecure=insecure)
    try:
        _data, _media, digest = remote_manifest(registry, ref)
        yield RemoteContent(registry, ref.repository), digest
    finally:
        registry.close()
