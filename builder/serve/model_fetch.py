"""Put a pinned ModelPack artifact's model folder in place, verified: the init container of a
Kubernetes pod that runs a model artifact in a runtime image (``build deploy``).

    python -m builder.serve.model_fetch --digest sha256:... --out /model \\
        (--from-dir /artifact --manifest FILE | --registry HOST --repository REPO [--plain-http] [--auth-file FILE])

Two sources, one check. ``--from-dir``: the artifact mounted as a Kubernetes image volume (CRI-O
mounts each layer blob as a file named by its ``org.opencontainers.image.title``; our layers are
tars of ``model/<file>``, so they still need unpacking); its manifest comes from ``--manifest``
(a ConfigMap written beside the Deployment). ``--registry``: where the runtime cannot mount
artifacts (containerd), the manifest and blobs are fetched over the OCI distribution API
(anonymous or with the pull secret's docker config; bearer tokens as registries hand them out).
Either way the manifest's sha256 must be ``--digest`` and every layer's bytes the sha256 and size
the manifest gives, hashed as they are unpacked; entries must be regular files or folders under
``model/`` (no links, no absolute paths, no ``..``). Files go into a hidden folder inside
``--out`` and are moved into place only once every layer checked out, so a failure leaves no
model behind and the server, which waits for the folder, never starts on a partial one.

Standard library only: it runs in the runtime images, which carry nothing else of olive-builder.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
MODEL_PREFIX = "model"  # every model layer's entries are model/<file> (builder.contract.MODEL_ROOT)
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1 << 20
MAX_MANIFEST = 4 << 20
TIMEOUT = 60.0


class FetchError(Exception):
    """Why the model could not be put in place (printed; exit code 1)."""


# ---- reading the layers ------------------------------------------------------------------------

class _Hashing:
    """A reader that hashes and counts what passes through it."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def _member_path(member: tarfile.TarInfo, layer: str) -> PurePosixPath | None:
    """The path below ``model/`` of a tar entry (None for ``model/`` itself); FetchError for anything
    that is not a regular file or folder inside it."""
    parts = PurePosixPath(member.name).parts
    if not parts or parts[0] != MODEL_PREFIX or any(p in ("..", "") for p in parts) or member.name.startswith("/"):
        raise FetchError(f"layer {layer}: the entry {member.name!r} lies outside {MODEL_PREFIX}/; refused")
    if not (member.isfile() or member.isdir()):
        raise FetchError(f"layer {layer}: the entry {member.name!r} is not a regular file or folder; refused")
    rest = parts[1:]
    return PurePosixPath(*rest) if rest else None


def unpack_layer(stream: IO[bytes], layer: dict[str, Any], dest: Path) -> None:
    """Unpack one layer's tar into ``dest``, hashing every byte read; FetchError when the bytes are
    not the layer's digest and size (the files written are then discarded with ``dest``)."""
    digest, size = str(layer.get("digest")), int(layer.get("size") or -1)
    hashing = _Hashing(stream)
    with tarfile.open(fileobj=hashing, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            rel = _member_path(member, digest)
            if rel is None:
                continue
            target = dest / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with open(target, "xb") as out:  # "x": a second entry for one file is refused
                shutil.copyfileobj(src, out, CHUNK)
    while hashing.read(CHUNK):  # the tar's end padding counts too
        pass
    if "sha256:" + hashing.sha.hexdigest() != digest or hashing.size != size:
        raise FetchError(f"layer {digest}: its bytes do not match the pinned manifest "
                         f"(sha256:{hashing.sha.hexdigest()}, {hashing.size} bytes); refused")


def check_manifest(data: bytes, digest: str) -> list[dict[str, Any]]:
    """The layers of the manifest ``data``, once its sha256 is ``digest``."""
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise FetchError(f"the manifest is {got}, not the pinned {digest}; refused")
    try:
        manifest = json.loads(data)
        layers = [d for d in manifest["layers"] if isinstance(d, dict)]
    except (ValueError, KeyError, TypeError):
        raise FetchError("the manifest is not an OCI image manifest") from None
    for d in layers:
        if not DIGEST_RE.match(str(d.get("digest"))) or not isinstance(d.get("size"), int):
            raise FetchError(f"the manifest has a layer without a sha256 digest and size: {d!r:.200}")
    if not layers:
        raise FetchError("the manifest has no layers")
    return layers


# ---- the registry (OCI distribution API, stdlib) ---------------------------------------------------

class _NoAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """Blob downloads redirect to storage (S3, a CDN) that must not see the registry's token:
    the token is an unredirected header, and plain HTTP is never followed from HTTPS."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        if req.full_url.startswith("https:") and not newurl.startswith("https:"):
            raise FetchError(f"the registry redirected to a plain-HTTP address ({newurl[:80]}); refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class RegistryClient:
    def __init__(self, host: str, repository: str, *, plain_http: bool, auth_file: Path | None):
        self.base = f"{'http' if plain_http else 'https'}://{host}/v2/{repository}"
        self.host, self.repository = host, repository
        self.basic = _basic_auth(auth_file, host) if auth_file else None
        self.token: str | None = None
        self.opener = urllib.request.build_opener(_NoAuthOnRedirect())

    def _request(self, path: str, accept: str | None = None) -> Any:
        for attempt in range(2):
            req = urllib.request.Request(f"{self.base}/{path}")
            if accept:
                req.add_header("Accept", accept)
            if self.token:
                req.add_unredirected_header("Authorization", f"Bearer {self.token}")
            elif self.basic:
                req.add_unredirected_header("Authorization", f"Basic {self.basic}")
            try:
                return self.opener.open(req, timeout=TIMEOUT)
            except urllib.error.HTTPError as e:
                challenge = e.headers.get("WWW-Authenticate", "")
                e.close()
                if e.code == 401 and attempt == 0 and challenge.lower().startswith("bearer "):
                    self.token = self._token(challenge)
                    continue
                if e.code in (401, 403):
                    raise FetchError(f"{self.host} refused access to {self.repository} (HTTP {e.code}): "
                                     "mount the image pull secret (its .dockerconfigjson) and pass --auth-file") from None
                raise FetchError(f"{self.host}/{self.repository}/{path[:80]}: HTTP {e.code}") from None
            except (urllib.error.URLError, OSError) as e:
                raise FetchError(f"{self.host} does not answer: {getattr(e, 'reason', e)}") from None
        raise FetchError(f"{self.host} asked for a login again after its token was given")

    def _token(self, challenge: str) -> str:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise FetchError(f"{self.host} gave an unusable token realm {realm[:80]!r}")
        params.setdefault("scope", f"repository:{self.repository}:pull")
        req = urllib.request.Request(realm + "?" + urllib.parse.urlencode(sorted(params.items())))
        if self.basic:
            req.add_unredirected_header("Authorization", f"Basic {self.basic}")
        try:
            with self.opener.open(req, timeout=TIMEOUT) as r:
                answer = json.loads(r.read(1 << 20))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise FetchError(f"{self.host}'s token service failed: {getattr(e, 'reason', e)}") from None
        token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise FetchError(f"{self.host}'s token service gave no token")
        return token

    def manifest(self, digest: str) -> bytes:
        with self._request(f"manifests/{digest}", accept=MANIFEST_MEDIA) as r:
            data: bytes = r.read(MAX_MANIFEST + 1)
        if len(data) > MAX_MANIFEST:
            raise FetchError("the manifest is larger than 4 MiB; refused")
        return data

    def blob(self, digest: str) -> Any:
        return self._request(f"blobs/{digest}")


def _basic_auth(path: Path, host: str) -> str | None:
    """The base64 ``user:password`` for ``host`` in a docker config (a pull secret's .dockerconfigjson)."""
    try:
        auths = json.loads(path.read_text(encoding="utf-8")).get("auths") or {}
    except (OSError, ValueError, AttributeError):
        raise FetchError(f"{path} is not a readable docker config") from None
    for key in (host, f"https://{host}", f"http://{host}"):
        entry = auths.get(key)
        if isinstance(entry, dict):
            if isinstance(entry.get("auth"), str):
                return str(entry["auth"])
            if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
                return base64.b64encode(f"{entry['username']}:{entry['password']}".encode()).decode()
    return None


# ---- putting the folder in place ------------------------------------------------------------------

def _layer_streams(args: argparse.Namespace, layers: list[dict[str, Any]],
                   client: RegistryClient | None) -> Iterator[tuple[dict[str, Any], IO[bytes]]]:
    for layer in layers:
        if client is not None:
            with client.blob(str(layer["digest"])) as r:
                yield layer, r
            continue
        title = str((layer.get("annotations") or {}).get("org.opencontainers.image.title") or "")
        if not title or "/" in title or title in (".", ".."):
            raise FetchError(f"layer {layer['digest']} has no usable title: an image volume cannot name its file")
        path = Path(args.from_dir) / title
        if not path.is_file():
            raise FetchError(f"{path} is missing (is the artifact mounted there as an image volume?)")
        with open(path, "rb") as f:
            yield layer, f


def fetch(args: argparse.Namespace) -> Path:
    """Put the verified model folder in ``args.out``; returns it."""
    if not DIGEST_RE.match(args.digest):
        raise FetchError(f"--digest {args.digest[:80]!r} is not sha256:<64 hex digits>")
    out = Path(args.out)
    client = None
    if args.registry:
        client = RegistryClient(args.registry, args.repository, plain_http=args.plain_http,
                                auth_file=Path(args.auth_file) if args.auth_file else None)
        data = client.manifest(args.digest)
    else:
        data = Path(args.manifest).read_bytes()
    layers = check_manifest(data, args.digest)
    done = out / ".complete"
    if done.is_file() and done.read_text(encoding="utf-8").strip() == args.digest:
        return out  # the init container ran before in this pod (a restart): the folder is in place
    for stale in out.glob(".partial-*"):  # a run of this init container that was killed
        shutil.rmtree(stale, ignore_errors=True)
    work = out / f".partial-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        for layer, stream in _layer_streams(args, layers, client):
            unpack_layer(stream, layer, work)
        for entry in sorted(work.iterdir()):
            if (out / entry.name).exists():
                raise FetchError(f"{out / entry.name} exists already; refused")
            entry.rename(out / entry.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    done.write_text(args.digest + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m builder.serve.model_fetch",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--digest", required=True, help="the pinned manifest digest (sha256:...)")
    parser.add_argument("--out", required=True, help="the model folder to fill (an emptyDir)")
    parser.add_argument("--from-dir", help="the artifact mounted as an image volume")
    parser.add_argument("--manifest", help="the manifest's bytes (with --from-dir)")
    parser.add_argument("--registry", help="registry host[:port] to pull from")
    parser.add_argument("--repository", help="repository at the registry")
    parser.add_argument("--plain-http", action="store_true", help="HTTP, not HTTPS (loopback or in-cluster registries)")
    parser.add_argument("--auth-file", help="a docker config (a pull secret's .dockerconfigjson)")
    args = parser.parse_args(argv)
    if bool(args.from_dir) == bool(args.registry) or (args.from_dir and not args.manifest) \
            or (args.registry and not args.repository):
        parser.error("give --from-dir DIR --manifest FILE, or --registry HOST --repository REPO")
    try:
        out = fetch(args)
    except (FetchError, tarfile.TarError, OSError) as e:
        print(f"model_fetch: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"model_fetch: {args.digest} verified and unpacked into {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
