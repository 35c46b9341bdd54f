"""Registry credentials, and the secrets kept out of every message.

Credentials for a registry host, in this order:

- ``OLIVE_BUILDER_REGISTRY_USERNAME``/``_PASSWORD``, only for the registries they are for
  (``OLIVE_BUILDER_REGISTRY_HOST``, comma-separated, else the host of ``OLIVE_BUILDER_REGISTRY``):
  never to any registry that asks, or a hostile one would only have to answer 401;
- the docker config (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``):
  ``credHelpers``, ``auths`` and ``credsStore``, the way ``docker login`` leaves them.

Whatever a server says is cut short, stripped of control characters (``sanitize``) and
redacted for every secret this process holds (``redact``, ``known_secrets``: the registry
password and the Hugging Face tokens) before it is put in a message.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from builder.errors import AuthError

ENV_USERNAME = "OLIVE_BUILDER_REGISTRY_USERNAME"
ENV_PASSWORD = "OLIVE_BUILDER_REGISTRY_PASSWORD"
ENV_HOST = "OLIVE_BUILDER_REGISTRY_HOST"  # the registries the two above are for
ENV_REGISTRY = "OLIVE_BUILDER_REGISTRY"  # the default push destination (its host, if ENV_HOST is unset)

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


def env_hint(host: str) -> str:
    """The end of a login hint for ``host``: where the environment's credentials are for another host, says so."""
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
