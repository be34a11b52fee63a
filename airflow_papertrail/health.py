"""Grant health: what a person (or a DAG) needs to know about a grant, without its secrets.

One plain JSON Variable per connection, ``papertrail_health__<conn_id>``, beside the
encrypted grant (``papertrail_grant__<conn_id>``). It holds no token, code or secret, only
states, times, the OAuth error code and a sanitized description, scopes and the
generation, so reading it needs no key and spends nothing: :func:`read_health` reads that
one Variable and decrypts nothing.

It is written by every path that stores a grant or fails to refresh one (the token
store's ``save``/``write``, the refresh coordinator after each committed transaction, the
authorization redemption through ``save``) and, throttled to once an hour
(:data:`USE_RECORD_INTERVAL`), by a task that uses the grant. Health is advisory: a failed
health write is logged and never fails the token path, and a write never moves the
recorded generation backwards.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from airflow_papertrail.exceptions import sanitize_description

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_papertrail.token_store import StoredGrant, VariableBackend

log = logging.getLogger(__name__)

HEALTH_VARIABLE_PREFIX = "papertrail_health__"

NOT_CONNECTED = "not_connected"
VALID = "valid"
#: The last refresh failed in a way that proves nothing was spent (connection error, 429,
#: the server's own refusal other than ``invalid_grant``): a later try can succeed.
REFRESH_FAILING = "refresh_failing"
REAUTHORIZATION_REQUIRED = "reauthorization_required"
#: The last refresh's answer was lost; the grant is kept (token-custody.md, "A lost refresh answer").
OUTCOME_UNKNOWN = "outcome_unknown"
#: A grant Variable exists but no health was recorded yet (stored before health existed, or
#: a health write failed); the next refresh, use or ``rotate-keys`` records it.
NOT_RECORDED = "not_recorded"
STATES = (NOT_CONNECTED, VALID, REFRESH_FAILING, REAUTHORIZATION_REQUIRED, OUTCOME_UNKNOWN, NOT_RECORDED)

#: A task records "last use" only when the recorded one is older than this (seconds): at most
#: one health write per connection and hour, not one per task.
USE_RECORD_INTERVAL = 3600.0

_DESCRIPTION_LIMIT = 200
#: conn_id -> when this process last looked at (or wrote) the recorded use.
_USE_NOTED: dict[str, float] = {}


def health_variable_key(conn_id: str) -> str:
    """Name of the plain Variable that holds the health of ``conn_id``'s grant."""
    return f"{HEALTH_VARIABLE_PREFIX}{conn_id}"


@dataclass(frozen=True)
class GrantHealth:
    """The health of one connection's grant; every field is safe to show and to log."""

    conn_id: str
    state: str = NOT_CONNECTED
    generation: int | None = None
    access_expires_at: float | None = None
    refresh_expires_at: float | None = None
    has_refresh_token: bool = False
    scopes: list[str] = field(default_factory=list)
    authorized_at: float | None = None
    last_refresh_at: float | None = None
    last_used_at: float | None = None
    #: ``{"code", "description", "at"}``: the OAuth error code (or ours) and a sanitized text.
    last_error: dict[str, Any] | None = None
    updated_at: float | None = None

    @property
    def reauthorization_error(self) -> str | None:
        if self.state == REAUTHORIZATION_REQUIRED and self.last_error:
            return str(self.last_error.get("code"))
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, conn_id: str, data: dict[str, Any]) -> GrantHealth:
        known = set(cls.__dataclass_fields__) - {"conn_id"}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("state") not in STATES:
            values["state"] = NOT_RECORDED
        return cls(conn_id=conn_id, **values)

    def as_of(self, now: float) -> GrantHealth:
        """The recorded health, with what time alone changes (an expiry that has passed)."""
        if self.state not in (VALID, REFRESH_FAILING):
            return self
        if self.refresh_expires_at is not None and self.refresh_expires_at <= now:
            return replace(
                self,
                state=REAUTHORIZATION_REQUIRED,
                last_error={"code": "refresh_token_expired", "description": "the refresh token expired", "at": now},
            )
        if not self.has_refresh_token and self.access_expires_at is not None and self.access_expires_at <= now:
            return replace(
                self,
                state=REAUTHORIZATION_REQUIRED,
                last_error={
                    "code": "no_refresh_token",
                    "description": "the access token expired and the grant has no refresh token",
                    "at": now,
                },
            )
        return self


def safe_error(code: str | None, description: object, now: float) -> dict[str, Any]:
    return {
        "code": sanitize_description(code, 64) or "unknown_error",
        "description": sanitize_description(description, _DESCRIPTION_LIMIT),
        "at": now,
    }


def _load(backend: VariableBackend, conn_id: str) -> GrantHealth | None:
    raw = backend.get(health_variable_key(conn_id))
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return GrantHealth.from_dict(conn_id, data) if isinstance(data, dict) else None


def read_health(
    conn_id: str, *, backend: VariableBackend | None = None, clock: Callable[[], float] = time.time
) -> GrantHealth:
    """The health of ``conn_id``'s grant from its plain Variable; decrypts nothing, spends nothing.

    Without a health Variable, only whether the grant Variable exists is looked at.
    """
    from airflow_papertrail.token_store import default_backend, grant_variable_key

    backend = backend or default_backend()
    health = _load(backend, conn_id)
    if health is None:
        state = NOT_RECORDED if backend.get(grant_variable_key(conn_id)) else NOT_CONNECTED
        return GrantHealth(conn_id=conn_id, state=state)
    return health.as_of(clock())


def _write(backend: VariableBackend, health: GrantHealth) -> None:
    backend.set(
        health_variable_key(health.conn_id),
        health.to_json(),
        f"Health of the Papertrail-ai grant of connection {health.conn_id!r} (no secrets). "
        "Managed by airflow-provider-papertrail: do not edit.",
    )


def _advisory(what: str, conn_id: str, action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as exc:  # health never fails the token path
        log.warning("Could not record the grant health of %r (%s: %s).", conn_id, what, type(exc).__name__)


def from_grant(grant: StoredGrant, previous: GrantHealth | None, now: float, *, authorized: bool) -> GrantHealth:
    """The health after ``grant`` was stored (a consent, a refresh, or a marker change)."""
    base = previous if previous is not None else GrantHealth(conn_id=grant.conn_id)
    # A refresh stores generation + 1 (a marker change keeps the generation); without a
    # recorded health, a grant past generation 1 was last renewed at its updated_at.
    refreshed = not authorized and grant.generation > (base.generation if base.generation is not None else 1)
    from airflow_papertrail.refresh import MAX_UNKNOWN_REFRESH_OUTCOMES

    if grant.reauthorization_error is not None:
        state = REAUTHORIZATION_REQUIRED
        error: dict[str, Any] | None = safe_error(grant.reauthorization_error, grant.reauthorization_reason, now)
    elif grant.unknown_refresh_outcomes >= MAX_UNKNOWN_REFRESH_OUTCOMES:
        state = REAUTHORIZATION_REQUIRED
        error = safe_error(
            "refresh_outcome_unknown",
            f"{grant.unknown_refresh_outcomes} refresh answers in a row were lost; the refresh token is not "
            "presented again",
            now,
        )
    elif grant.unknown_refresh_outcomes:
        state = OUTCOME_UNKNOWN
        error = safe_error("refresh_outcome_unknown", "the answer to the last refresh was lost; the grant is kept", now)
    else:
        state = VALID
        error = None if (authorized or refreshed or base.state == VALID) else base.last_error
    token = grant.token
    return replace(
        base,
        state=state,
        generation=grant.generation,
        access_expires_at=token.expires_at,
        refresh_expires_at=token.refresh_expires_at,
        has_refresh_token=bool(token.refresh_token),
        scopes=(token.scope or "").split(),
        authorized_at=now if authorized else base.authorized_at,
        last_refresh_at=grant.updated_at if refreshed else base.last_refresh_at,
        last_error=error if error is not None or state == VALID else base.last_error,
        updated_at=now,
    )


def record_grant(
    backend: VariableBackend, grant: StoredGrant, *, authorized: bool = False, now: float | None = None
) -> None:
    """Record the health of a grant that was just stored (never moves the generation back)."""

    def action() -> None:
        at = time.time() if now is None else now
        previous = _load(backend, grant.conn_id)
        if previous is not None and previous.generation is not None and previous.generation > grant.generation:
            return  # a newer grant's health is already recorded
        _write(backend, from_grant(grant, previous, at, authorized=authorized))

    _advisory("stored grant", grant.conn_id, action)


def record_failure(
    backend: VariableBackend,
    conn_id: str,
    *,
    state: str,
    code: str | None,
    description: object,
    now: float | None = None,
) -> None:
    """Record a refresh that failed without storing anything (``refresh_failing``, or a refusal)."""

    def action() -> None:
        at = time.time() if now is None else now
        previous = _load(backend, conn_id) or GrantHealth(conn_id=conn_id, state=NOT_RECORDED)
        _write(backend, replace(previous, state=state, last_error=safe_error(code, description, at), updated_at=at))

    _advisory("failure", conn_id, action)


def record_use(backend: VariableBackend, conn_id: str, *, now: float | None = None) -> bool:
    """Record that a task used the grant, at most once per :data:`USE_RECORD_INTERVAL`.

    One plain Variable read per call; a write only when the recorded use is older than the
    interval. Returns whether it wrote.
    """
    written = False
    at = time.time() if now is None else now
    noted = _USE_NOTED.get(conn_id)
    if noted is not None and at - noted < USE_RECORD_INTERVAL:
        return False  # this process looked (or wrote) within the interval: not even a read

    def action() -> None:
        nonlocal written
        _USE_NOTED[conn_id] = at
        previous = _load(backend, conn_id)
        if previous is None:
            return  # nothing recorded yet: the next store or refresh records the grant itself
        if previous.last_used_at is not None and at - previous.last_used_at < USE_RECORD_INTERVAL:
            _USE_NOTED[conn_id] = previous.last_used_at  # look again once the recorded use is an hour old
            return
        latest = _load(backend, conn_id)  # a refresh may have recorded a newer grant meanwhile: keep it
        _write(backend, replace(latest or previous, last_used_at=at))
        written = True

    _advisory("use", conn_id, action)
    return written
