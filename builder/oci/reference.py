"""References to OCI content: ``[registry/]repository[:tag][@sha256:...]``, and push destinations.

The first path component is a registry when it has a dot or a port or is ``localhost``; a
reference without one names the local store. A malformed reference is the user's mistake: a
``ReferenceError_`` (exit 2) that quotes it sanitized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from builder.contract import OCI_REPOSITORY_RULE, OCI_TAG_RULE
from builder.errors import ReferenceError_
from builder.oci import layout as oci
from builder.oci.credentials import sanitize

MAX_REFERENCE = 512
_REPO_RE = re.compile(f"^{OCI_REPOSITORY_RULE}$")
_TAG_RE = re.compile(f"^{OCI_TAG_RULE}$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?$")


def _shown(text: str) -> str:
    return repr(sanitize(text, 120))


@dataclass(frozen=True)
class Reference:
    registry: str | None  # None: the local store
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def is_registry_host(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost"


def parse_reference(text: str) -> Reference:
    """Parse ``[registry/]repo[:tag][@digest]``; a reference without a registry names the local store.
    A malformed reference is the user's mistake: ReferenceError_ (exit 2)."""
    original = text
    if len(text) > MAX_REFERENCE or any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise ReferenceError_(f"{_shown(text)} is not a valid reference: spaces, control characters or more than "
                              f"{MAX_REFERENCE} characters.",
                              hint="Use [registry/]repository[:tag][@sha256:...], e.g. localhost:5000/models/qwen:1.0-cpu-int4.")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not oci.valid_digest(digest):
            raise ReferenceError_(f"{original!r}: {digest!r} is not a sha256 digest (sha256:<64 hex digits>).")
    registry = None
    first, _, rest = text.partition("/")
    if rest and is_registry_host(first):
        if not _HOST_RE.match(first):
            raise ReferenceError_(f"{original!r}: {first!r} is not a registry host[:port].")
        registry, text = first, rest
    tag = None
    last = text.rsplit("/", 1)[-1]
    if ":" in last:
        text, tag = text.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise ReferenceError_(f"{original!r}: {tag!r} is not a valid tag (OCI rule [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}).")
    if not _REPO_RE.match(text):
        raise ReferenceError_(f"{original!r} is not a valid reference.",
                            hint="Use [registry/]repository[:tag][@sha256:...], e.g. localhost:5000/models/qwen:1.0-cpu-int4.")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, text, tag, digest)


def parse_destination(text: str) -> tuple[str, str]:
    """``REGISTRY[/NAMESPACE]`` (where built models are pushed) -> (registry host, namespace)."""
    first, _, rest = text.strip().rstrip("/").partition("/")
    if not first or not is_registry_host(first):
        raise ReferenceError_(f"{text!r} does not start with a registry host.",
                            hint="Name the registry and an optional namespace, e.g. ghcr.io/acme/models or localhost:5000.")
    if not _HOST_RE.match(first):
        raise ReferenceError_(f"{text!r}: {first!r} is not a registry host[:port].")
    if rest and not _REPO_RE.match(rest):
        raise ReferenceError_(f"{text!r}: {rest!r} is not a valid repository namespace (lower-case, digits, . _ - and /).")
    return first, rest


def repository(namespace: str, name: str) -> str:
    """The repository a recipe named ``name`` is pushed to under ``namespace``."""
    return f"{namespace}/{name}" if namespace else name
