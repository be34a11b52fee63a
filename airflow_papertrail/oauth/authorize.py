"""Authorization request: state, PKCE (RFC 7636, S256 only) and the consent URL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from collections.abc import Mapping

    from airflow_papertrail.oauth.config import OAuthClientConfig

#: State entropy in bytes: 256 bits (RFC 9700 asks for at least 128).
STATE_BYTES = 32
#: PKCE verifier entropy: 32 random bytes -> 43 base64url characters (RFC 7636 4.1).
VERIFIER_BYTES = 32
#: Default lifetime of a pending authorization.
DEFAULT_AUTHORIZATION_TTL = 600.0


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def new_state() -> str:
    """A fresh single-use ``state``: 256 bits from :mod:`secrets`."""
    return _b64url(secrets.token_bytes(STATE_BYTES))


def new_code_verifier() -> str:
    """A fresh PKCE verifier, drawn independently of the state (never derived from it)."""
    return _b64url(secrets.token_bytes(VERIFIER_BYTES))


def code_challenge_s256(verifier: str) -> str:
    """``BASE64URL(SHA256(ASCII(verifier)))`` (RFC 7636 4.2)."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def states_match(expected: str | None, received: str | None) -> bool:
    """Constant-time comparison of two states; a missing value never matches."""
    if not expected or not received:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), received.encode("utf-8"))


@dataclass(frozen=True, repr=False)
class AuthorizationRequest:
    """A pending authorization: what was sent to the consent page and must be checked on return."""

    url: str
    state: str
    redirect_uri: str
    created_at: float
    expires_at: float
    code_verifier: str | None = None
    scope: str = ""
    system: str | None = None

    def __repr__(self) -> str:
        return (
            f"AuthorizationRequest(redirect_uri={self.redirect_uri!r}, scope={self.scope!r}, "
            f"system={self.system!r}, pkce={self.code_verifier is not None}, expires_at={self.expires_at!r})"
        )


def build_authorization_request(
    config: OAuthClientConfig,
    *,
    now: float,
    ttl: float = DEFAULT_AUTHORIZATION_TTL,
    extra_params: Mapping[str, str] | None = None,
) -> AuthorizationRequest:
    """Build the consent URL for ``config`` with a new state and (if enabled) a PKCE pair.

    The URL carries only public values: client ID, redirect URI, scope, system, state and
    the PKCE *challenge*; never the secret or the verifier.
    """
    config.validate(need_redirect_uri=True)
    assert config.redirect_uri is not None  # validated above
    state = new_state()
    verifier = new_code_verifier() if config.use_pkce else None
    params: dict[str, str] = {
        "response_type": "code",
        "client_id": config.client_id,
        "redirect_uri": config.redirect_uri,
        "state": state,
    }
    if config.scope:
        params["scope"] = config.scope
    if config.system:
        params["system"] = config.system
    if verifier:
        params["code_challenge"] = code_challenge_s256(verifier)
        params["code_challenge_method"] = "S256"
    reserved = set(params) | {"client_secret", "code_verifier", "code"}
    for key, value in (extra_params or {}).items():
        if key in reserved:
            raise ValueError(
                f"extra authorization parameter {key!r} is reserved (protocol parameters are set by the provider "
                "and cannot be overridden); remove it from extra_authorize_params"
            )
        params[key] = value
    parts = urlsplit(config.effective_authorize_url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
    return AuthorizationRequest(
        url=url,
        state=state,
        redirect_uri=config.redirect_uri,
        created_at=now,
        expires_at=now + ttl,
        code_verifier=verifier,
        scope=config.scope,
        system=config.system,
    )
