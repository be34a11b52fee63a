"""The token model: absolute expiry, leeway, tolerant parsing of token responses."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from airflow_papertrail.exceptions import OAuthError

#: Assumed lifetime when a token response carries no ``expires_in`` (nothing published says
#: otherwise; OAuth servers behind Papertrail-ai use about an hour).
ASSUMED_EXPIRES_IN = 3600


@dataclass(frozen=True, repr=False)
class Token:
    """An OAuth 2 grant as obtained from the token endpoint.

    ``expires_at`` is absolute (epoch seconds), computed once from ``expires_in`` when the
    response arrived, so a token read back later never looks younger than it is.
    """

    access_token: str
    token_type: str
    obtained_at: float
    expires_at: float
    refresh_token: str | None = None
    scope: str | None = None
    expiry_assumed: bool = False
    #: Absolute expiry of the refresh token (epoch s) when the server states one
    #: (``refresh_token_expires_in``, or Intuit's ``x_refresh_token_expires_in``); None when unknown.
    refresh_expires_at: float | None = None

    def __repr__(self) -> str:  # never show token values
        return (
            f"Token(token_type={self.token_type!r}, expires_at={self.expires_at!r}, scope={self.scope!r}, "
            f"refresh_token={'present' if self.refresh_token else 'absent'})"
        )

    __str__ = __repr__

    def expires_within(self, seconds: float, now: float) -> bool:
        """True when the access token is expired or will be within ``seconds``."""
        return self.expires_at - seconds <= now

    @property
    def lifetime(self) -> float:
        """Seconds the server gave this access token (``expires_at - obtained_at``)."""
        return max(0.0, self.expires_at - self.obtained_at)

    def refresh_leeway(self, leeway: float) -> float:
        """The effective leeway: ``min(leeway, lifetime / 2)``.

        A token is refreshed ``leeway`` seconds before it expires, but never before half its
        lifetime has passed: with 5-minute (Sage) or 60-second tokens a 120 s leeway would
        otherwise make every fresh token look "expiring" and every caller refresh again.
        """
        return max(0.0, min(leeway, self.lifetime / 2))

    def due_for_refresh(self, leeway: float, now: float) -> bool:
        """True once the token is within its effective leeway (:meth:`refresh_leeway`) of expiry."""
        return self.expires_within(self.refresh_leeway(leeway), now)

    def is_expired(self, now: float) -> bool:
        return self.expires_at <= now

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(v for v in (self.access_token, self.refresh_token) if v)

    def to_dict(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "obtained_at": self.obtained_at,
            "expires_at": self.expires_at,
            "refresh_token": self.refresh_token,
            "scope": self.scope,
            "expiry_assumed": self.expiry_assumed,
            "refresh_expires_at": self.refresh_expires_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Token:
        return cls(
            access_token=str(data["access_token"]),
            token_type=str(data.get("token_type") or "Bearer"),
            obtained_at=float(data["obtained_at"]),
            expires_at=float(data["expires_at"]),
            refresh_token=data.get("refresh_token") or None,
            scope=data.get("scope"),
            expiry_assumed=bool(data.get("expiry_assumed", False)),
            refresh_expires_at=_finite_or_none(data.get("refresh_expires_at")),
        )

    @classmethod
    def from_response(
        cls,
        payload: Any,
        *,
        now: float,
        requested_scope: str | None = None,
        previous: Token | None = None,
        status: int | None = None,
    ) -> Token:
        """Build a token from a successful token response (RFC 6749 5.1).

        Unknown members are ignored. A missing ``refresh_token`` on refresh keeps the
        previous one (the server chose not to rotate); a missing ``scope`` means the
        requested scope was granted.
        """
        if not isinstance(payload, dict):
            raise OAuthError("invalid_response", "the token response is not a JSON object", status)
        access_token = payload.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise OAuthError("invalid_response", "the token response has no access_token", status)
        token_type = payload.get("token_type") or "Bearer"
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise OAuthError("invalid_response", f"unsupported token_type {token_type!r} (only Bearer)", status)
        expires_in = _parse_expires_in(payload.get("expires_in"))
        refresh_token = payload.get("refresh_token")
        refresh_expires_in = _parse_expires_in(payload.get("refresh_token_expires_in"))
        if refresh_expires_in is None:
            refresh_expires_in = _parse_expires_in(payload.get("x_refresh_token_expires_in"))
        refresh_expires_at = now + refresh_expires_in if refresh_expires_in is not None else None
        if not isinstance(refresh_token, str) or not refresh_token:
            # Not rotated: the previous refresh token, and its known expiry unless a new one is stated.
            refresh_token = previous.refresh_token if previous else None
            if refresh_expires_at is None and previous is not None:
                refresh_expires_at = previous.refresh_expires_at
        scope = payload.get("scope")
        if isinstance(scope, list):
            scope = " ".join(str(s) for s in scope)
        if not isinstance(scope, str):
            scope = requested_scope if requested_scope is not None else (previous.scope if previous else None)
        return cls(
            access_token=access_token,
            token_type="Bearer",
            obtained_at=now,
            expires_at=now + (expires_in if expires_in is not None else ASSUMED_EXPIRES_IN),
            refresh_token=refresh_token,
            scope=scope,
            expiry_assumed=expires_in is None,
            refresh_expires_at=refresh_expires_at if refresh_token else None,
        )

    def with_expiry(self, expires_at: float) -> Token:
        return replace(self, expires_at=expires_at)


def _parse_expires_in(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        # 0 (or less) says nothing usable: a token that is dead on arrival cannot be what the
        # server meant. Treated like a missing expires_in (ASSUMED_EXPIRES_IN, expiry_assumed),
        # so a 401 forces one refresh instead of every call refreshing (token-custody.md).
        return None
    return seconds


def _finite_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
