"""A small client for the OCI distribution API: what push, pull and inspect need, and no more.

- References: ``[registry/]repository[:tag][@sha256:...]``. The first path component is a
  registry when it has a dot or a port or is ``localhost``. A malformed one is a usage error.
- Credentials, in this order: ``OLIVE_BUILDER_REGISTRY_USERNAME``/``_PASSWORD``, only for the
  registry they are for (``OLIVE_BUILDER_REGISTRY_HOST``, else the host of
  ``OLIVE_BUILDER_REGISTRY``); the docker config (``$DOCKER_CONFIG/config.json`` or
  ``~/.docker/config.json``): ``credHelpers``, ``auths`` and ``credsStore``, the way
  ``docker login`` leaves them. Basic and bearer-token challenges are both answered; a
  token service on another host gets credentials only over HTTPS (or on loopback).
- A registry is not trusted to behave: every request has connect and read timeouts and the
  whole operation (retries, redirects and the token included) a deadline
  (``OLIVE_BUILDER_REGISTRY_TIMEOUT``, 60 s); a blob transfer must move 64 kB per such
  period. Only http(s) redirects are followed, at most 5, and credentials go to the
  registry's own host only. Bodies are read with a cap (manifests 4 MiB, token answers 1 MiB,
  error answers 64 kB, anything else read whole 64 MiB; blobs stream to disk within their
  declared size), and whatever a server says is cut short, stripped of control characters
  and redacted for every secret we hold before it is put in a message.
- Plain HTTP only for loopback registries or those named in ``OLIVE_BUILDER_INSECURE_REGISTRIES``
  (comma-separated hosts) or with ``insecure=True``.
- Transient failures (connection resets, timeouts, 408/429/5xx: decided on
  ``RegistryError.status``) are retried with exponential backoff within the deadline; a blob
  upload is restarted as a whole.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode, urljoin, urlsplit

import requests
import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from builder.contract import OCI_REPOSITORY_RULE, OCI_TAG_RULE
from builder.errors import (
    AuthError,
    ContentError,
    ReferenceError_,
    RegistryError,
    StoreError,
    UsageError,
)
from builder.oci import layout as oci

ENV_USERNAME = "OLIVE_BUILDER_REGISTRY_USERNAME"
ENV_PASSWORD = "OLIVE_BUILDER_REGISTRY_PASSWORD"
ENV_HOST = "OLIVE_BUILDER_REGISTRY_HOST"  # the registries the two above are for
ENV_REGISTRY = "OLIVE_BUILDER_REGISTRY"  # the default push destination (its host, if ENV_HOST is unset)
ENV_INSECURE = "OLIVE_BUILDER_INSECURE_REGISTRIES"
ENV_TIMEOUT = "OLIVE_BUILDER_REGISTRY_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
MAX_REDIRECTS = 5
MAX_MANIFEST_BYTES = 4 << 20  # what the distribution spec asks registries to accept at least
MAX_BODY_BYTES = 1 << 20  # token answers
MAX_ANSWER_BYTES = 64 << 20  # any other answer read whole (tag lists, referrer indexes, signatures, SBOMs)
MAX_ERROR_BYTES = 64 << 10  # what an error answer may say
MIN_PROGRESS = 64 << 10  # bytes a blob transfer must move per timeout period
MAX_REFERENCE = 512
MANIFEST_ACCEPT = ", ".join([oci.MANIFEST, oci.INDEX, oci.DOCKER_MANIFEST])
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
REDIRECT_STATUS = (301, 302, 303, 307, 308)
_REPO_RE = re.compile(f"^{OCI_REPOSITORY_RULE}$")
_TAG_RE = re.compile(f"^{OCI_TAG_RULE}$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?$")


def timeout_setting() -> float:
    """``OLIVE_BUILDER_REGISTRY_TIMEOUT`` in seconds (60 if unset)."""
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise UsageError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds between 0 and 86400.")
    return value


# ---- what servers say -----------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def sanitize(text: str, limit: int = 300) -> str:
    """Server text fit for a terminal: no control characters (escape sequences), cut short."""
    text = _CONTROL.sub("?", text.replace("\r", " ").replace("\n", " ").replace("\t", " "))
    return text if len(text) <= limit else text[:limit] + "..."


def hf_tokens() -> list[str]:
    """The Hugging Face tokens this process holds (a registry error body might echo them)."""
    out = [os.environ.get(n, "") for n in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    try:
        out.append(Path(os.environ.get("HF_TOKEN_PATH") or Path(home) / "token").read_text()[:4096].strip())
    except (OSError, UnicodeDecodeError):
        pass
    return [t for t in out if t]


def known_secrets() -> list[str]:
    """Every secret this process holds from its environment: the registry password and the HF
    tokens. For whoever prints text that might echo them (the CLI's error printer)."""
    return [s for s in (os.environ.get(ENV_PASSWORD, ""), *hf_tokens()) if s]


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret (and its URL- and base64-encoded forms) replaced by ***."""
    forms: set[str] = set()
    for secret in secrets:
        if len(secret) < 4:  # too short to search for without mangling the message
            continue
        forms.update({secret, quote(secret, safe=""), base64.b64encode(secret.encode()).decode()})
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def _shown(text: str) -> str:
    return repr(sanitize(text, 120))


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
        out = subprocess.run([program, "get"], check=False, input=host, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise AuthError(f"The docker config names the credential helper {program!r} for {host}, but it is not installed.",
                        hint=f"Install {program}, or remove it from {docker_config_path()}.") from None
    except subprocess.TimeoutExpired:
        raise AuthError(f"The credential helper {program} did not answer within 30 s.") from None
    if out.returncode != 0:
        if "credentials not found" in (out.stdout + out.stderr).lower():
            return None
        said = out.stderr.strip() or out.stdout.strip()
        raise AuthError(f"The credential helper {program} failed for {host}: {sanitize(said)}")
    try:
        data = json.loads(out.stdout)
        user, secret = data.get("Username"), data["Secret"]
    except (ValueError, KeyError):
        raise AuthError(f"The credential helper {program} gave an answer that is not Docker's JSON.") from None
    if user == "<token>":
        return Credentials(None, secret, f"credential helper {program}", identity_token=True)
    return Credentials(user, secret, f"credential helper {program}")


def env_credentials_hosts() -> list[str]:
    """The registries ``OLIVE_BUILDER_REGISTRY_USERNAME``/``_PASSWORD`` are for: the hosts in
    ``OLIVE_BUILDER_REGISTRY_HOST`` (comma-separated), else the host of ``OLIVE_BUILDER_REGISTRY``."""
    named = [h.strip().lower() for h in os.environ.get(ENV_HOST, "").split(",") if h.strip()]
    if named:
        return named
    default = os.environ.get(ENV_REGISTRY, "").strip()
    return [default.split("/", 1)[0].lower()] if default else []


def _env_credentials(host: str) -> Credentials | None:
    user, password = os.environ.get(ENV_USERNAME), os.environ.get(ENV_PASSWORD)
    if not password:
        return None
    # Never to any registry that asks: a hostile one would only have to answer 401.
    if host.lower() not in env_credentials_hosts():
        return None
    return Credentials(user or "", password, f"{ENV_USERNAME}/{ENV_PASSWORD}")


def _env_hint(host: str) -> str:
    if os.environ.get(ENV_PASSWORD) and host.lower() not in env_credentials_hosts():
        named = ", ".join(env_credentials_hosts()) or "no registry"
        return (f" {ENV_USERNAME}/{ENV_PASSWORD} are set but are for {named}: set {ENV_HOST}={host} "
                "to use them here.")
    return ""


def credentials_for(host: str) -> Credentials | None:
    env = _env_credentials(host)
    if env is not None:
        return env
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


class _Watchdog:
    """Cuts a session's connections when an operation runs past its deadline.

    A socket timeout bounds each read, not a whole answer: a registry that sends a byte every
    few seconds never trips it. So a thread watches the clock and shuts the sockets down,
    which makes the blocked read return at once. With a window, every ``MIN_PROGRESS`` bytes
    moved push the deadline on by the window: long transfers live, stalled ones do not.
    """

    def __init__(self) -> None:
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._window = 0.0
        self._moved = 0
        self.expired = False
        self._thread: threading.Thread | None = None

    def track(self, conn: Any) -> None:
        with self._lock:
            self._conns.add(conn)

    def arm(self, seconds: float, *, window: bool = False) -> None:
        with self._lock:
            self._deadline = time.monotonic() + seconds
            self._window = seconds if window else 0.0
            self._moved = 0
            self.expired = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="registry-deadline", daemon=True)
                self._thread.start()

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def progress(self, n: int) -> None:
        if n <= 0 or not self._window:
            return
        with self._lock:
            self._moved += n
            if self._moved >= MIN_PROGRESS and self._deadline is not None:
                self._deadline = time.monotonic() + self._window
                self._moved = 0

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            time.sleep(0.1)
            with self._lock:
                now = time.monotonic()
                if self._deadline is None:
                    if now - idle_since > 5:  # nothing to watch: let the thread go
                        self._thread = None
                        return
                    continue
                idle_since = now
                if now < self._deadline:
                    continue
                self.expired = True
                self._deadline = None
                conns = list(self._conns)
            for conn in conns:
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


def _watched_adapter(watchdog: _Watchdog) -> requests.adapters.HTTPAdapter:
    """An adapter whose every connection (proxied ones included) the watchdog can cut."""

    class Conn(HTTPConnection):
        def connect(self) -> None:
            super().connect()
            watchdog.track(self)

    class TLSConn(HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            watchdog.track(self)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TLSConn

    classes = {"http": Pool, "https": TLSPool}

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = classes

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            manager.pool_classes_by_scheme = classes
            return manager

    return Adapter(max_retries=0)


def _read_capped(r: requests.Response, cap: int, what: str) -> bytes:
    """The body of a streamed response, refusing more than ``cap`` bytes."""
    declared = r.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > cap:
        r.close()
        raise ContentError(f"{what} is {int(declared)} bytes, more than the {cap} allowed; refused.")
    chunks: list[bytes] = []
    size = 0
    for chunk in r.iter_content(65536):
        size += len(chunk)
        if size > cap:
            r.close()
            raise ContentError(f"{what} is more than the {cap} bytes allowed; refused.")
        chunks.append(chunk)
    return b"".join(chunks)


class Registry:
    """One registry host."""

    def __init__(self, host: str, *, insecure: bool | None = None, credentials: Credentials | None | bool = True,
                 retries: int = 4, backoff: float = 0.5, timeout: float | None = None):
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
        self.timeout = timeout if timeout is not None else timeout_setting()
        self._watch = _Watchdog()
        self.session = requests.Session()
        adapter = _watched_adapter(self._watch)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.max_redirects = MAX_REDIRECTS
        self._auth: dict[str, str] = {}  # scope -> Authorization header
        self.uploaded_bytes = 0

    def close(self) -> None:
        self._watch.disarm()
        self.session.close()

    # ---- secrets and messages ----
    def _secrets(self) -> list[str]:
        out = hf_tokens()
        creds = self._creds
        if creds is not None:
            out += [creds.secret, f"{creds.username or ''}:{creds.secret}"]
        for value in self._auth.values():
            out += [value, value.partition(" ")[2]]
        return out

    def said(self, text: str, limit: int = 300) -> str:
        """What a server sent, fit to print: redacted, without control characters, short."""
        return sanitize(redact(text, self._secrets()), limit)

    def _short(self, url: str) -> str:
        return self.said(url.replace(self.base, "/v2/"), 160)

    def _timed_out(self, method: str, url: str) -> RegistryError:
        return RegistryError(
            f"{method} {self._short(url)} on {self.host}: no complete answer within {self.timeout:.0f} s "
            "(the registry is silent or sends too slowly).",
            hint=f"Is {self.scheme}://{self.host} up? On a slow link allow more with {ENV_TIMEOUT}=SECONDS.")

    # credentials are looked up only when a registry asks for them
    def _credentials(self) -> Credentials | None:
        if not self._creds_loaded:
            arg = self._creds_arg
            self._creds = credentials_for(self.host) if arg is True else (arg or None)
            self._creds_loaded = True
        return self._creds

    def _same_origin(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme == self.scheme and parts.netloc.lower() == self.host.lower()

    def _authorize(self, response: requests.Response, scope: str, deadline: float) -> None:
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, params = _parse_challenge(challenge)
        creds = self._credentials()
        if scheme == "basic":
            if creds is None:
                raise AuthError(f"{self.host} requires a login and no credentials for it were found.",
                                hint=f"Run `docker login {self.host}`, or set {ENV_USERNAME} and {ENV_PASSWORD} "
                                     f"with {ENV_HOST}={self.host}.{_env_hint(self.host)}")
            raw = f"{creds.username or ''}:{creds.secret}".encode()
            self._auth[scope] = "Basic " + base64.b64encode(raw).decode()
            return
        if scheme == "bearer" and params.get("realm"):
            realm = params["realm"]
            parts = urlsplit(realm)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise RegistryError(f"{self.host} names a token service {self.said(realm, 120)!r} that is not an "
                                    "http(s) URL; refused.")
            same_host = (parts.hostname or "").lower() == self.host.rsplit(":", 1)[0].lower().strip("[]")
            plain_ok = is_loopback(parts.netloc) or (same_host and self.scheme == "http")
            if creds is not None and parts.scheme == "http" and not plain_ok:
                raise AuthError(f"{self.host} asks for credentials to be sent to {self.said(realm, 120)} over plain "
                                "HTTP; refused (a token service on another host gets them only over HTTPS).",
                                hint="If this registry is yours, configure its token realm as an https:// URL.")
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
            url = realm + ("&" if "?" in realm else "?") + urlencode(query)
            try:
                # no redirects: one could carry the credentials to another host
                if data is not None:
                    r = self.session.post(realm, data=data, timeout=self._timeouts(deadline), stream=True,
                                          allow_redirects=False)
                else:
                    r = self.session.get(url, auth=auth, timeout=self._timeouts(deadline), stream=True,
                                         allow_redirects=False)
                with r:
                    body = _read_capped(r, MAX_BODY_BYTES, f"The token service answer of {self.host}")
            except requests.RequestException as e:
                if self._watch.expired:
                    raise self._timed_out("GET", realm) from None
                raise RegistryError(f"Cannot reach the token service of {self.host}: {type(e).__name__}") from None
            if r.status_code in (401, 403):
                raise self._auth_error(creds)
            if r.status_code != 200:
                raise RegistryError(f"The token service of {self.host} answered {r.status_code}.", status=r.status_code)
            try:
                answer = json.loads(body)
            except ValueError:
                answer = None
            token = None
            if isinstance(answer, dict):
                token = answer.get("token") or answer.get("access_token")
            if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
                raise RegistryError(f"The token service of {self.host} gave no token.")
            self._auth[scope] = f"Bearer {token}"
            return
        raise RegistryError(f"{self.host} asks for an authentication scheme this client does not speak: "
                            f"{self.said(scheme, 40) or '?'}.")

    def _auth_error(self, creds: Credentials | None) -> AuthError:
        if creds is None:
            return AuthError(f"{self.host} refused access without credentials.",
                             hint=f"Run `docker login {self.host}`, or set {ENV_USERNAME} and {ENV_PASSWORD} "
                                  f"with {ENV_HOST}={self.host}.{_env_hint(self.host)}")
        who = f"user {creds.username!r}" if creds.username else "an identity token"
        return AuthError(f"{self.host} refused the credentials for {who} (from {creds.source}).",
                         hint=f"Check them with `docker login {self.host}`; they need push and pull rights on the repository.")

    def _timeouts(self, deadline: float) -> tuple[float, float]:
        left = max(deadline - time.monotonic(), 0.1)
        return min(CONNECT_TIMEOUT, left), min(self.timeout, max(left, 0.1))

    def _send(self, method: str, url: str, *, scope: str, body: Callable[[], Any] | None,
              headers: dict[str, str] | None, deadline: float) -> requests.Response:
        """One request, following at most MAX_REDIRECTS http(s) redirects; credentials only to our own host."""
        for _hop in range(MAX_REDIRECTS + 1):
            h = dict(headers or {})
            if scope in self._auth and self._same_origin(url):
                h["Authorization"] = self._auth[scope]
            data = body() if body is not None else None
            try:
                r = self.session.request(method, url, data=data, headers=h, stream=True,
                                         timeout=self._timeouts(deadline), allow_redirects=False)
            finally:
                if data is not None and hasattr(data, "close"):
                    data.close()
            if r.status_code not in REDIRECT_STATUS:
                return r
            location = r.headers.get("Location", "")
            r.close()
            target = urljoin(url, location)
            parts = urlsplit(target)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise RegistryError(f"{method} {self._short(url)} on {self.host} redirected to "
                                    f"{self.said(target, 120)!r}; only http(s) redirects are followed.",
                                    status=r.status_code)
            if urlsplit(url).scheme == "https" and parts.scheme == "http" and not is_loopback(parts.netloc):
                raise RegistryError(f"{method} {self._short(url)} on {self.host} redirected from HTTPS to plain "
                                    f"HTTP ({self.said(target, 120)!r}); refused.", status=r.status_code)
            if r.status_code == 303 or (r.status_code in (301, 302) and method == "POST"):
                method, body = "GET", None
            url = target
        raise RegistryError(f"{method} {self._short(url)} on {self.host}: more than {MAX_REDIRECTS} redirects "
                            "(a redirect loop?).")

    def request(self, method: str, path_or_url: str, *, scope: str, body: Callable[[], Any] | None = None,
                headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200,), stream: bool = False,
                allow: tuple[int, ...] = (), retry: bool = True, window: bool = False) -> requests.Response:
        """Send one request with auth, redirects, retries and backoff, all within the deadline.
        Statuses in ``allow`` are returned, not raised. ``retry=False`` for requests that cannot
        simply be repeated (the PUT that ends an upload). ``window``: the deadline moves on while
        the body moves (uploads). A ``stream`` response stays under the watchdog until
        ``done(response)``; any other is read (capped) before it is returned."""
        retries = self.retries if retry else 0
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else urljoin(self.base, path_or_url)
        deadline = time.monotonic() + self.timeout
        self._watch.arm(self.timeout, window=window)
        attempt = 0
        authed_once = False
        kept = False
        try:
            while True:
                try:
                    r = self._send(method, url, scope=scope, body=body, headers=headers, deadline=deadline)
                except requests.exceptions.SSLError as e:
                    raise RegistryError(f"TLS with {self.host} failed: {self.said(str(e), 200)}",
                                        hint=f"For a plain-HTTP registry, add {self.host} to {ENV_INSECURE}.") from None
                except requests.RequestException as e:
                    if self._watch.expired or (not window and time.monotonic() >= deadline):
                        raise self._timed_out(method, url) from None
                    if attempt >= retries or not self._sleep(attempt, None, deadline):
                        raise RegistryError(f"{method} {self.host}: {type(e).__name__} after {attempt + 1} attempt(s).",
                                            hint=f"Is the registry at {self.scheme}://{self.host} up and reachable?") from None
                    attempt += 1
                    continue
                if r.status_code == 401 and not authed_once and self._same_origin(r.url or url):
                    r.close()
                    authed_once = True
                    self._authorize(r, scope, deadline)
                    continue
                if r.status_code in (401, 403):
                    r.close()
                    raise self._auth_error(self._credentials())
                if r.status_code in ok or r.status_code in allow:
                    if stream:
                        kept = True
                        return r
                    if method == "HEAD":  # no body; Content-Length is the blob's size
                        r._content = b""
                        r.close()
                        return r
                    try:
                        r._content = _read_capped(r, MAX_ANSWER_BYTES, f"The answer of {self.host} to {method}")
                    except requests.RequestException:
                        if self._watch.expired:
                            raise self._timed_out(method, url) from None
                        raise RegistryError(f"{method} {self.host}: the answer broke off.") from None
                    return r
                text = self._error_text(r)
                if r.status_code in TRANSIENT_STATUS and attempt < retries and \
                        self._sleep(attempt, r.headers.get("Retry-After"), deadline):
                    attempt += 1
                    continue
                raise RegistryError(f"{method} {self._short(url)} on {self.host} answered {r.status_code}: {text}",
                                    status=r.status_code)
        finally:
            if not kept:
                self._watch.disarm()

    def _error_text(self, r: requests.Response) -> str:
        try:
            raw = _read_capped(r, MAX_ERROR_BYTES, "An error answer")
        except (ContentError, requests.RequestException):
            return r.reason or ""
        finally:
            r.close()
        try:
            errors = json.loads(raw).get("errors") or []
            if isinstance(errors, list) and errors:
                return self.said("; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip()
                                           for e in errors[:5] if isinstance(e, dict)))
        except (ValueError, AttributeError):
            pass
        return self.said(raw.decode("utf-8", "replace").strip() or (r.reason or ""), 200)

    def _sleep(self, attempt: int, retry_after: str | None, deadline: float) -> bool:
        """Back off before the next attempt; False if that would pass the deadline."""
        delay = min(self.backoff * (2 ** attempt), 8.0)
        if retry_after and retry_after.isdigit():
            delay = min(float(retry_after), 30.0)
        if time.monotonic() + delay >= deadline:
            return False
        time.sleep(delay)
        return True

    @contextmanager
    def _streaming(self, r: requests.Response) -> Iterator[requests.Response]:
        """A streamed body under the watchdog: it must move MIN_PROGRESS bytes per timeout period."""
        self._watch.arm(self.timeout, window=True)
        try:
            with r:
                yield r
        finally:
            self._watch.disarm()

    def check_push(self, repo: str) -> None:
        """Fail now, not after a long build, if we may not push to ``repo``: open an upload and cancel it."""
        r = self.request("POST", f"{repo}/blobs/uploads/", scope=f"repository:{repo}:pull,push", ok=(202,))
        location = r.headers.get("Location")
        if location:
            try:
                self.request("DELETE", urljoin(self.base, location), scope=f"repository:{repo}:pull,push",
                             ok=(200, 202, 204), allow=(404, 405), retry=False)
            except RegistryError:
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
                self._watch.progress(n)
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
                    body=lambda: _Body(path, desc.size, count), retry=False, window=True)
                self.uploaded_bytes += desc.size
                return "uploaded"
            except RegistryError as e:
                # Retry what may pass: no answer (status None) or a transient status; never a
                # refusal (4xx), a login problem or a registry that ran out the deadline.
                transient = e.status is None or e.status in TRANSIENT_STATUS
                if isinstance(e, AuthError) or not transient or self._watch.expired or attempt >= self.retries:
                    raise
                on_bytes(-sent)
                self._sleep(attempt, None, time.monotonic() + self.timeout)
                attempt += 1

    def fetch_blob(self, repo: str, desc: oci.Descriptor, store: oci.Store,
                   on_bytes: Callable[[int], None] = lambda n: None) -> None:
        """Download a blob into ``store``, refusing content whose digest or size is wrong."""
        attempt = 0
        while True:
            got = 0
            try:
                r = self.request("GET", f"{repo}/blobs/{desc.digest}", scope=f"repository:{repo}:pull", stream=True)
                with self._streaming(r), store.writer() as w:
                    for chunk in r.iter_content(64 << 10):
                        got += len(chunk)
                        if got > desc.size:
                            raise ContentError(
                                f"Blob {desc.digest} from {self.host}/{repo} is larger than its manifest says "
                                f"({desc.size} bytes): the registry's copy was tampered with or is damaged. Nothing was kept.")
                        w.write(chunk)
                        self._watch.progress(len(chunk))
                        on_bytes(len(chunk))
                    if self._watch.expired:
                        raise self._timed_out("GET", f"{repo}/blobs/{desc.digest}")
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
            except requests.RequestException as e:
                if self._watch.expired:
                    raise self._timed_out("GET", f"{repo}/blobs/{desc.digest}") from None
                if attempt >= self.retries:
                    raise RegistryError(f"Downloading {desc.digest} from {self.host}/{repo} failed: {type(e).__name__}.") from None
                on_bytes(-got)
                self._sleep(attempt, None, time.monotonic() + self.timeout)
                attempt += 1

    # ---- manifests ----
    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        r = self.request("PUT", f"{repo}/manifests/{reference}", scope=f"repository:{repo}:pull,push", ok=(201, 200),
                         headers={"Content-Type": media_type}, body=lambda: data)
        digest = oci.digest_bytes(data)
        echoed = r.headers.get("Docker-Content-Digest")
        if echoed and echoed != digest:
            raise RegistryError(f"{self.host} stored the manifest under {self.said(echoed, 80)}, not {digest}.")
        return digest

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str] | None:
        """(bytes, media type, digest), verified and at most 4 MiB; None if the registry has no such manifest."""
        shown = f"{self.host}/{repo}:{reference}"
        r = self.request("GET", f"{repo}/manifests/{reference}", scope=f"repository:{repo}:pull",
                         headers={"Accept": MANIFEST_ACCEPT}, allow=(404,), stream=True)
        with self._streaming(r):
            if r.status_code == 404:
                return None
            try:
                data = _read_capped(r, MAX_MANIFEST_BYTES, f"The manifest {shown}")
            except requests.RequestException:
                if self._watch.expired:
                    raise self._timed_out("GET", f"{repo}/manifests/{reference}") from None
                raise RegistryError(f"Reading the manifest {shown} broke off.") from None
        digest = oci.digest_bytes(data)
        expected = reference if reference.startswith("sha256:") else r.headers.get("Docker-Content-Digest")
        if expected and expected != digest:
            raise ContentError(f"The manifest {shown} does not match its digest "
                               f"({self.said(expected, 80)}, content is {digest}): tampered with or damaged.")
        media = r.headers.get("Content-Type", "").split(";")[0].strip()
        parsed = oci.json_object(data, f"The manifest {shown}")
        declared = parsed.get("mediaType")
        media = declared if isinstance(declared, str) and declared else media
        return data, self.said(media, 100), digest
