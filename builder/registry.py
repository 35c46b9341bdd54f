"""A small client for the OCI distribution API: what push, pull and inspect need, and no more.

- References: ``[registry/]repository[:tag][@sha256:...]``. The first path component is a
  registry when it has a dot or a port or is ``localhost``.
- Credentials, in this order: ``OLIVE_BUILDER_REGISTRY_USERNAME``/``_PASSWORD``; the docker
  config (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``): ``credHelpers``,
  ``auths`` and ``credsStore``, the way ``docker login`` leaves them. Basic and bearer-token
  challenges are both answered. A secret is never put in a message or a log.
- Plain HTTP only for loopback registries or those named in ``OLIVE_BUILDER_INSECURE_REGISTRIES``
  (comma-separated hosts) or with ``insecure=True``.
- Transient failures (connection resets, timeouts, 408/429/5xx) are retried with
  exponential backoff; a blob upload is restarted as a whole.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urljoin

import requests

from . import oci
from .errors import AuthError, ContentError, RegistryError, StoreError

ENV_USERNAME = "OLIVE_BUILDER_REGISTRY_USERNAME"
ENV_PASSWORD = "OLIVE_BUILDER_REGISTRY_PASSWORD"
ENV_INSECURE = "OLIVE_BUILDER_INSECURE_REGISTRIES"
MANIFEST_ACCEPT = ", ".join([oci.MANIFEST, oci.INDEX, oci.DOCKER_MANIFEST])
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


# ---- references -----------------------------------------------------------------------------

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
    """Parse ``[registry/]repo[:tag][@digest]``; a reference without a registry names the local store."""
    original = text
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not oci.valid_digest(digest):
            raise RegistryError(f"{original!r}: {digest!r} is not a sha256 digest (sha256:<64 hex digits>).")
    registry = None
    first, _, rest = text.partition("/")
    if rest and is_registry_host(first):
        registry, text = first, rest
    tag = None
    last = text.rsplit("/", 1)[-1]
    if ":" in last:
        text, tag = text.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise RegistryError(f"{original!r}: {tag!r} is not a valid tag.")
    if not _REPO_RE.match(text):
        raise RegistryError(f"{original!r} is not a valid reference.",
                            hint="Use [registry/]repository[:tag][@sha256:...], e.g. localhost:5000/models/qwen:1.0-cpu-int4.")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, text, tag, digest)


def parse_destination(text: str) -> tuple[str, str]:
    """``REGISTRY[/NAMESPACE]`` (where built models are pushed) -> (registry host, namespace)."""
    first, _, rest = text.strip().rstrip("/").partition("/")
    if not first or not is_registry_host(first):
        raise RegistryError(f"{text!r} does not start with a registry host.",
                            hint="Name the registry and an optional namespace, e.g. ghcr.io/acme/models or localhost:5000.")
    if rest and not _REPO_RE.match(rest):
        raise RegistryError(f"{text!r}: {rest!r} is not a valid repository namespace (lower-case, digits, . _ - and /).")
    return first, rest


def repository(namespace: str, name: str) -> str:
    """The repository a recipe named ``name`` is pushed to under ``namespace``."""
    return f"{namespace}/{name}" if namespace else name


# ---- credentials ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    username: str | None
    secret: str
    source: str  # where they came from, for messages (never the secret itself)
    identity_token: bool = False

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, source={self.source!r})"


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _config_keys(host: str) -> list[str]:
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        keys.append("https://index.docker.io/v1/")
    return keys


def _helper(name: str, host: str) -> Credentials | None:
    program = f"docker-credential-{name}"
    try:
        out = subprocess.run([program, "get"], input=host, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise AuthError(f"The docker config names the credential helper {program!r} for {host}, but it is not installed.",
                        hint=f"Install {program}, or remove it from {docker_config_path()}.") from None
    except subprocess.TimeoutExpired:
        raise AuthError(f"The credential helper {program} did not answer within 30 s.") from None
    if out.returncode != 0:
        if "credentials not found" in (out.stdout + out.stderr).lower():
            return None
        raise AuthError(f"The credential helper {program} failed for {host}: {out.stderr.strip() or out.stdout.strip()}")
    try:
        data = json.loads(out.stdout)
        user, secret = data.get("Username"), data["Secret"]
    except (ValueError, KeyError):
        raise AuthError(f"The credential helper {program} gave an answer that is not Docker's JSON.") from None
    if user == "<token>":
        return Credentials(None, secret, f"credential helper {program}", identity_token=True)
    return Credentials(user, secret, f"credential helper {program}")


def credentials_for(host: str) -> Credentials | None:
    user, password = os.environ.get(ENV_USERNAME), os.environ.get(ENV_PASSWORD)
    if password:
        return Credentials(user or "", password, f"{ENV_USERNAME}/{ENV_PASSWORD}")
    path = docker_config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AuthError(f"Cannot read the docker config {path}: {e}") from None
    keys = _config_keys(host)
    helpers = config.get("credHelpers") or {}
    for key in keys:
        if key in helpers:
            return _helper(helpers[key], host)
    auths = config.get("auths") or {}
    for key in keys:
        entry = auths.get(key)
        if not entry:
            continue
        if entry.get("identitytoken"):
            return Credentials(None, entry["identitytoken"], str(path), identity_token=True)
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise AuthError(f"The auth entry for {key} in {path} is not base64 of user:password.") from None
            return Credentials(user, password, str(path))
        if entry.get("username") and entry.get("password"):
            return Credentials(entry["username"], entry["password"], str(path))
    if config.get("credsStore"):
        return _helper(config["credsStore"], host)
    return None


# ---- the client -----------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
    return name == "localhost" or name.startswith("127.") or name == "::1"


class _Body:
    """A re-openable upload body with a length (so requests sends Content-Length) and progress."""

    def __init__(self, path: Path, size: int, on_bytes: Callable[[int], None]):
        self._f: BinaryIO = path.open("rb")
        self._size = size
        self._on_bytes = on_bytes

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n if n and n > 0 else oci.CHUNK)
        if data:
            self._on_bytes(len(data))
        return data

    def close(self) -> None:
        self._f.close()


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class Registry:
    """One registry host."""

    def __init__(self, host: str, *, insecure: bool | None = None, credentials: Credentials | None | bool = True,
                 retries: int = 4, backoff: float = 0.5, timeout: float = 60.0):
        self.host = host
        listed = {h.strip() for h in os.environ.get(ENV_INSECURE, "").split(",") if h.strip()}
        if insecure is None:
            insecure = is_loopback(host) or host in listed
        self.scheme = "http" if insecure else "https"
        self.base = f"{self.scheme}://{host}/v2/"
        self._creds_arg = credentials
        self._creds: Credentials | None = None
        self._creds_loaded = False
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.session = requests.Session()
        self._auth: dict[str, str] = {}  # scope -> Authorization header
        self.uploaded_bytes = 0

    def close(self) -> None:
        self.session.close()

    # credentials are looked up only when a registry asks for them
    def _credentials(self) -> Credentials | None:
        if not self._creds_loaded:
            arg = self._creds_arg
            self._creds = credentials_for(self.host) if arg is True else (arg or None)  # type: ignore[assignment]
            self._creds_loaded = True
        return self._creds

    def _authorize(self, response: requests.Response, scope: str) -> None:
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, params = _parse_challenge(challenge)
        creds = self._credentials()
        if scheme == "basic":
            if creds is None:
                raise AuthError(f"{self.host} requires a login and no credentials for it were found.",
                                hint=f"Run `docker login {self.host}`, or set {ENV_USERNAME} and {ENV_PASSWORD}.")
            raw = f"{creds.username or ''}:{creds.secret}".encode()
            self._auth[scope] = "Basic " + base64.b64encode(raw).decode()
            return
        if scheme == "bearer" and params.get("realm"):
            query = {"service": params.get("service", self.host)}
            if scope:
                query["scope"] = scope
            auth = None
            data = None
            if creds is not None and creds.identity_token:
                data = {"grant_type": "refresh_token", "refresh_token": creds.secret, "service": query["service"],
                        "scope": scope, "client_id": "olive-builder"}
            elif creds is not None:
                auth = (creds.username or "", creds.secret)
            try:
                if data is not None:
                    r = self.session.post(params["realm"], data=data, timeout=self.timeout)
                else:
                    r = self.session.get(params["realm"] + "?" + urlencode(query), auth=auth, timeout=self.timeout)
            except requests.RequestException as e:
                raise RegistryError(f"Cannot reach the token service of {self.host}: {type(e).__name__}") from None
            if r.status_code in (401, 403):
                raise self._auth_error(creds)
            if r.status_code != 200:
                raise RegistryError(f"The token service of {self.host} answered {r.status_code}.")
            token = (r.json() or {}).get("token") or (r.json() or {}).get("access_token")
            if not token:
                raise RegistryError(f"The token service of {self.host} gave no token.")
            self._auth[scope] = f"Bearer {token}"
            return
        raise RegistryError(f"{self.host} asks for an authentication scheme this client does not speak: {scheme or '?'}.")

    def _auth_error(self, creds: Credentials | None) -> AuthError:
        if creds is None:
            return AuthError(f"{self.host} refused access without credentials.",
                             hint=f"Run `docker login {self.host}`, or set {ENV_USERNAME} and {ENV_PASSWORD}.")
        who = f"user {creds.username!r}" if creds.username else "an identity token"
        return AuthError(f"{self.host} refused the credentials for {who} (from {creds.source}).",
                         hint=f"Check them with `docker login {self.host}`; they need push and pull rights on the repository.")

    def request(self, method: str, path_or_url: str, *, scope: str, body: Callable[[], Any] | None = None,
                headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200,), stream: bool = False,
                allow: tuple[int, ...] = (), retry: bool = True) -> requests.Response:
        """Send one request with auth, retries and backoff. Statuses in ``allow`` are returned, not raised.
        ``retry=False`` for requests that cannot simply be repeated (the PUT that ends an upload)."""
        retries = self.retries if retry else 0
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else urljoin(self.base, path_or_url)
        attempt = 0
        authed_once = False
        while True:
            h = dict(headers or {})
            if scope in self._auth:
                h["Authorization"] = self._auth[scope]
            data = body() if body is not None else None
            try:
                r = self.session.request(method, url, data=data, headers=h, stream=stream, timeout=self.timeout,
                                         allow_redirects=True)
            except requests.exceptions.SSLError as e:
                raise RegistryError(f"TLS with {self.host} failed: {e}",
                                    hint=f"For a plain-HTTP registry, add {self.host} to {ENV_INSECURE}.") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                if attempt >= retries:
                    raise RegistryError(f"{method} {self.host}: {type(e).__name__} after {attempt + 1} attempt(s).",
                                        hint=f"Is the registry at {self.scheme}://{self.host} up and reachable?") from None
                self._sleep(attempt, None)
                attempt += 1
                continue
            finally:
                if hasattr(data, "close"):
                    data.close()
            if r.status_code == 401 and not authed_once:
                authed_once = True
                self._authorize(r, scope)
                continue
            if r.status_code in (401, 403):
                raise self._auth_error(self._credentials())
            if r.status_code in ok or r.status_code in allow:
                return r
            if r.status_code in TRANSIENT_STATUS and attempt < retries:
                self._sleep(attempt, r.headers.get("Retry-After"))
                attempt += 1
                continue
            raise RegistryError(f"{method} {url.replace(self.base, '/v2/')} on {self.host} answered "
                                f"{r.status_code}: {_error_text(r)}")

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.backoff * (2 ** attempt), 8.0)
        if retry_after and retry_after.isdigit():
            delay = min(float(retry_after), 30.0)
        time.sleep(delay)

    def check_push(self, repo: str) -> None:
        """Fail now, not after a long build, if we may not push to ``repo``: open an upload and cancel it."""
        r = self.request("POST", f"{repo}/blobs/uploads/", scope=f"repository:{repo}:pull,push", ok=(202,))
        location = r.headers.get("Location")
        if location:
            try:
                self.session.delete(urljoin(self.base, location), headers={"Authorization": self._auth.get(
                    f"repository:{repo}:pull,push", "")}, timeout=self.timeout)
            except requests.RequestException:
                pass  # an abandoned upload session expires by itself

    # ---- blobs ----
    def has_blob(self, repo: str, digest: str) -> bool:
        r = self.request("HEAD", f"{repo}/blobs/{digest}", scope=f"repository:{repo}:pull", allow=(404,))
        return r.status_code == 200

    def push_blob(self, repo: str, desc: oci.Descriptor, path: Path, *, mount_from: list[str] = (),  # type: ignore[assignment]
                  on_bytes: Callable[[int], None] = lambda n: None) -> str:
        """Make ``desc`` exist in ``repo``: 'exists', 'mounted' or 'uploaded'."""
        if self.has_blob(repo, desc.digest):
            return "exists"
        scope = f"repository:{repo}:pull,push"
        for source in mount_from:
            if source == repo:
                continue
            r = self.request("POST", f"{repo}/blobs/uploads/?" + urlencode({"mount": desc.digest, "from": source}),
                             scope=f"{scope} repository:{source}:pull", ok=(201, 202))
            if r.status_code == 201:
                return "mounted"
            break  # a 202 opened an upload session; start a fresh one below instead
        attempt = 0
        while True:
            sent = 0

            def count(n: int) -> None:
                nonlocal sent
                sent += n
                on_bytes(n)

            try:
                start = self.request("POST", f"{repo}/blobs/uploads/", scope=scope, ok=(202,))
                location = start.headers.get("Location")
                if not location:
                    raise RegistryError(f"{self.host} opened an upload without a Location.")
                url = urljoin(self.base, location)
                url += ("&" if "?" in url else "?") + urlencode({"digest": desc.digest})
                self.request("PUT", url, scope=scope, ok=(201,), headers={
                    "Content-Type": "application/octet-stream", "Content-Length": str(desc.size)},
                    body=lambda: _Body(path, desc.size, count), retry=False)
                self.uploaded_bytes += desc.size
                return "uploaded"
            except RegistryError as e:
                if isinstance(e, AuthError) or attempt >= self.retries or " answered 4" in e.message:
                    raise
                on_bytes(-sent)
                self._sleep(attempt, None)
                attempt += 1

    def fetch_blob(self, repo: str, desc: oci.Descriptor, store: oci.Store,
                   on_bytes: Callable[[int], None] = lambda n: None) -> None:
        """Download a blob into ``store``, refusing content whose digest or size is wrong."""
        attempt = 0
        while True:
            got = 0
            try:
                r = self.request("GET", f"{repo}/blobs/{desc.digest}", scope=f"repository:{repo}:pull", stream=True)
                with r, store.writer() as w:
                    for chunk in r.iter_content(oci.CHUNK):
                        got += len(chunk)
                        if got > desc.size:
                            raise ContentError(
                                f"Blob {desc.digest} from {self.host}/{repo} is larger than its manifest says "
                                f"({desc.size} bytes): the registry's copy was tampered with or is damaged. Nothing was kept.")
                        w.write(chunk)
                        on_bytes(len(chunk))
                    if got < desc.size:
                        raise ContentError(
                            f"Blob {desc.digest} from {self.host}/{repo} is truncated: {got} of {desc.size} bytes. "
                            "Nothing was kept.")
                    try:
                        w.commit(expected=desc.digest)
                    except StoreError as e:
                        raise ContentError(
                            f"Blob {desc.digest} from {self.host}/{repo} does not match its digest ({e}): "
                            "the registry's copy was tampered with or is damaged. Nothing was kept.",
                            hint="Push the model again from a good copy; do not use this registry content.") from None
                return
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as e:
                if attempt >= self.retries:
                    raise RegistryError(f"Downloading {desc.digest} from {self.host}/{repo} failed: {type(e).__name__}.") from None
                on_bytes(-got)
                self._sleep(attempt, None)
                attempt += 1

    # ---- manifests ----
    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        r = self.request("PUT", f"{repo}/manifests/{reference}", scope=f"repository:{repo}:pull,push", ok=(201, 200),
                         headers={"Content-Type": media_type}, body=lambda: data)
        digest = oci.digest_bytes(data)
        echoed = r.headers.get("Docker-Content-Digest")
        if echoed and echoed != digest:
            raise RegistryError(f"{self.host} stored the manifest under {echoed}, not {digest}.")
        return digest

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str] | None:
        """(bytes, media type, digest), verified; None if the registry has no such manifest."""
        r = self.request("GET", f"{repo}/manifests/{reference}", scope=f"repository:{repo}:pull",
                         headers={"Accept": MANIFEST_ACCEPT}, allow=(404,))
        if r.status_code == 404:
            return None
        data = r.content
        digest = oci.digest_bytes(data)
        expected = reference if reference.startswith("sha256:") else r.headers.get("Docker-Content-Digest")
        if expected and expected != digest:
            raise ContentError(f"The manifest {self.host}/{repo}:{reference} does not match its digest "
                               f"({expected}, content is {digest}): tampered with or damaged.")
        media = r.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            media = json.loads(data).get("mediaType") or media
        except ValueError:
            raise ContentError(f"The manifest {self.host}/{repo}:{reference} is not JSON.") from None
        return data, media, digest


def _error_text(r: requests.Response) -> str:
    try:
        errors = r.json().get("errors") or []
        if errors:
            return "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors)
    except ValueError:
        pass
    return (r.text or r.reason or "").strip()[:200]
