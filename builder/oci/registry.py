"""A small client for the OCI distribution API: what push, pull and inspect need, and no more.

References are parsed in ``builder.oci.reference``, credentials found in
``builder.oci.credentials``, and every connection is watched by ``builder.transport``'s
deadline watchdog. This module is the conversation with one registry host:

- Credentials are looked up only when the registry asks. Basic and bearer-token challenges
  are both answered; a token service on another host gets credentials only over HTTPS (or on
  loopback).
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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from builder.contract import CHUNK
from builder.errors import AuthError, ContentError, RegistryError, StoreError, UsageError
from builder.oci import layout as oci
from builder.oci.credentials import (
    ENV_HOST,
    ENV_PASSWORD,
    ENV_USERNAME,
    Credentials,
    credentials_for,
    env_hint,
    hf_tokens,
    redact,
    sanitize,
)
from builder.oci.media import DOCKER_MANIFEST, INDEX, MANIFEST
from builder.transport import Watchdog, read_capped, watched_session

ENV_INSECURE = "OLIVE_BUILDER_INSECURE_REGISTRIES"
ENV_TIMEOUT = "OLIVE_BUILDER_REGISTRY_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
MAX_REDIRECTS = 5
MAX_MANIFEST_BYTES = 4 << 20  # what the distribution spec asks registries to accept at least
MAX_BODY_BYTES = 1 << 20  # token answers
MAX_ANSWER_BYTES = 64 << 20  # any other answer read whole (tag lists, referrer indexes, signatures, SBOMs)
MAX_ERROR_BYTES = 64 << 10  # what an error answer may say
MANIFEST_ACCEPT = ", ".join([MANIFEST, INDEX, DOCKER_MANIFEST])
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
REDIRECT_STATUS = (301, 302, 303, 307, 308)


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
        data = self._f.read(n if n and n > 0 else CHUNK)
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
        self._watch = Watchdog()
        self.session = watched_session(self._watch)
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
                                     f"with {ENV_HOST}={self.host}.{env_hint(self.host)}")
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
                    body = read_capped(r, MAX_BODY_BYTES, f"The token service answer of {self.host}")
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
                                  f"with {ENV_HOST}={self.host}.{env_hint(self.host)}")
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
                        r._content = read_capped(r, MAX_ANSWER_BYTES, f"The answer of {self.host} to {method}")
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
            raw = read_capped(r, MAX_ERROR_BYTES, "An error answer")
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
        """A streamed body under the watchdog: it must move ``MIN_PROGRESS`` bytes per timeout period."""
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
                data = read_capped(r, MAX_MANIFEST_BYTES, f"The manifest {shown}")
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
