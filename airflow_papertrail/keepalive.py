"""Keep-alive and alerts: refresh idle grants before they die, tell people when one will or did.

What the ``papertrail_grant_health`` example DAG runs (through
:class:`~airflow_papertrail.operators.grant_health.PapertrailGrantHealthOperator`), for each
connection:

1. Read its health (``health.py``: one plain Variable, nothing decrypted).
2. Refresh the grant if it was not refreshed for ``idle_refresh_after`` seconds, or if its
   refresh token expires within ``warning_horizon``, through the one serialized refresh path
   (:func:`airflow_papertrail.refresh.get_valid_token` with ``force_refresh=True``: the
   api-server coordinator, else this machine's lock). Idle time counts from the last
   refresh (or the consent): using an access token renews no refresh token, so use does not
   count. A grant whose last refresh answer was lost, or that is already dead, is left to
   the custody rules (token-custody.md) and not presented here.
3. Decide whether it needs attention: ``reauthorization_required`` (dead: a person must
   reconnect it), or ``expiring`` (a refresh-token expiry the server stated lies within
   ``warning_horizon``, even after the refresh of step 2).
4. Call every notifier once per *change* of that attention, never every run: what was last
   notified is kept per connection in the plain Variable ``papertrail_alerted__<conn_id>``
   (see :func:`alert_variable_key` for why it is not a field of the health Variable).

One connection's failure (an unreadable grant, a refresh the server refuses or cannot
answer) never stops the others: it is reported and the next connection is checked.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from airflow_papertrail.exceptions import (
    PapertrailConfigurationError,
    PapertrailError,
    ReauthorizationRequired,
    TransientOAuthError,
    sanitize_description,
)
from airflow_papertrail.health import (
    NOT_CONNECTED,
    NOT_RECORDED,
    OUTCOME_UNKNOWN,
    REAUTHORIZATION_REQUIRED,
    REFRESH_FAILING,
    VALID,
    GrantHealth,
    read_health,
)
from airflow_papertrail.links import connect_page_url

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from airflow_papertrail.hooks.papertrail import PapertrailHook
    from airflow_papertrail.token_store import VariableBackend

log = logging.getLogger(__name__)

DAY = 86_400.0
#: Default seconds without a refresh after which the keep-alive refreshes a grant: well inside
#: the shortest idle expiry known behind Papertrail-ai (Sage about 31 days; Xero 60, QuickBooks
#: 100), so that a daily run that fails for a few weeks still leaves time.
IDLE_REFRESH_AFTER = 7 * DAY
#: Default seconds before a stated refresh-token expiry from which a grant counts as ``expiring``.
WARNING_HORIZON = 14 * DAY

ALERT_VARIABLE_PREFIX = "papertrail_alerted__"

#: Attention classes: what a person has to do (nothing, reconnect soon, reconnect now).
OK = "ok"
EXPIRING = "expiring"
DEAD = REAUTHORIZATION_REQUIRED
#: Health states whose grant the keep-alive may refresh. ``outcome_unknown`` is left out on
#: purpose: after a lost answer the custody rules decide when the token is presented again.
#: ``outcome_unknown`` too: the look is :func:`refresh.plan`'s ``renew``, which for a grant with a
#: lost answer is the look any task gives it (use the access token until it expires, then
#: present the refresh token once more), so an idle grant whose keep-alive refresh lost its
#: answer is not left to die unseen.
_REFRESHABLE = (VALID, REFRESH_FAILING, NOT_RECORDED, OUTCOME_UNKNOWN)

#: The keys the keep-alive adds to the context every notifier receives.
CONTEXT_KEYS = (
    "papertrail_conn_id",
    "papertrail_grant_state",
    "papertrail_attention",
    "papertrail_reason",
    "papertrail_reason_code",
    "papertrail_connect_url",
    "papertrail_refresh_expires_at",
    "papertrail_previous_attention",
)


def alert_variable_key(conn_id: str) -> str:
    """The plain Variable that remembers what was last notified (and announced) for ``conn_id``.

    A Variable of its own rather than a field of ``papertrail_health__<conn_id>``: health is
    rewritten by every refresh, task use and failure (read-modify-write, from many processes,
    through code that drops fields it does not know), so a field there could be lost to a
    concurrent health write and the alert sent twice. This one has a single writer, the
    keep-alive task, and is written only when the attention changes.
    """
    return f"{ALERT_VARIABLE_PREFIX}{conn_id}"


@dataclass(frozen=True)
class GrantCheck:
    """What the keep-alive found and did for one connection (no secret in any field)."""

    conn_id: str
    #: The grant's health state after the keep-alive (``health.STATES``), or ``error``.
    state: str
    #: :data:`OK`, :data:`EXPIRING` or :data:`DEAD`.
    attention: str
    #: Why it needs attention (or what went wrong), for people.
    reason: str
    #: ``invalid_grant``, ``refresh_token_expired``, ``refresh_token_expiring``...; None when OK.
    reason_code: str | None
    connect_url: str
    refresh_expires_at: float | None = None
    #: The keep-alive refreshed the grant in this run.
    refreshed: bool = False
    #: What the keep-alive's own refresh or check ran into (the grant may still be fine).
    error: str | None = None
    #: The attention differs from what was last notified (``papertrail_alerted__<conn_id>``).
    changed: bool = False
    previous_attention: str = OK
    notified: bool = False
    #: The attention differs from the last announced one (asset events, see the operator).
    announce: bool = False
    #: Identifies the consent the attention is about (a reconnect is a new grant).
    grant: float | int | None = None
    #: Unexpected trouble checking this connection (not a grant state): fails the task too.
    failed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def notifier_context(self, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        expires = self.refresh_expires_at
        return {
            **(context or {}),
            "papertrail_conn_id": self.conn_id,
            "papertrail_grant_state": self.state,
            "papertrail_attention": self.attention,
            "papertrail_reason": self.reason,
            "papertrail_reason_code": self.reason_code,
            "papertrail_connect_url": self.connect_url,
            "papertrail_refresh_expires_at": (
                None if expires is None else datetime.fromtimestamp(expires, tz=timezone.utc)
            ),
            "papertrail_previous_attention": self.previous_attention,
        }


@dataclass
class KeepAliveReport:
    """Every connection's :class:`GrantCheck`, in the order checked."""

    checks: list[GrantCheck] = field(default_factory=list)

    @property
    def dead(self) -> list[GrantCheck]:
        return [c for c in self.checks if c.attention == DEAD]

    @property
    def failed(self) -> list[GrantCheck]:
        return [c for c in self.checks if c.failed]

    def failure_message(self) -> str | None:
        """Why the task fails (grants to reconnect, connections that could not be checked), or None."""
        parts = []
        if self.dead:
            names = ", ".join(f"{c.conn_id!r} ({c.reason})" for c in self.dead)
            parts.append(
                f"Papertrail-ai grants need re-authorization: {names}. Reconnect them on the Connect page "
                f"({connect_page_url()}), or trigger the papertrail_authorize DAG for each connection."
            )
        if self.failed:
            names = ", ".join(f"{c.conn_id!r} ({c.error})" for c in self.failed)
            parts.append(f"Could not check the grants of: {names}.")
        return " ".join(parts) or None

    def to_dict(self) -> dict[str, Any]:
        return {"checks": [c.to_dict() for c in self.checks]}


# -- the memory of what was notified -----------------------------------------------------------
def _load_alert(backend: VariableBackend, conn_id: str) -> dict[str, Any]:
    raw = backend.get(alert_variable_key(conn_id))
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _mark(attention: str, grant: float | int | None, now: float) -> dict[str, Any]:
    return {"attention": attention, "grant": grant, "at": now}


def _same(mark: Any, attention: str, grant: float | int | None) -> bool:
    if not isinstance(mark, dict):
        return attention == OK  # nothing recorded: a grant that never needed attention
    if mark.get("attention") != attention:
        return False
    return attention == OK or mark.get("grant") == grant


def _save_alert(backend: VariableBackend, conn_id: str, data: dict[str, Any]) -> None:
    backend.set(
        alert_variable_key(conn_id),
        json.dumps(data, separators=(",", ":"), sort_keys=True),
        f"What the Papertrail-ai keep-alive last notified about connection {conn_id!r} (no secrets). "
        "Managed by airflow-provider-papertrail: delete it to be notified again.",
    )


def record_announced(backend: VariableBackend, checks: Iterable[GrantCheck], *, now: float) -> None:
    """Remember that asset events for ``checks`` went out (call only once they are emitted)."""
    for check in checks:
        if check.failed:
            continue
        data = _load_alert(backend, check.conn_id)
        data["announced"] = _mark(check.attention, check.grant, now)
        _save_alert(backend, check.conn_id, data)


# -- one connection ------------------------------------------------------------------------------
def _grant_identity(health: GrantHealth) -> float | int | None:
    """The consent this health is about: a reconnect stores a new ``authorized_at``."""
    return health.authorized_at


def _idle_for(health: GrantHealth, now: float) -> float | None:
    since = health.last_refresh_at or health.authorized_at
    return None if since is None else now - since


def _refresh_due(health: GrantHealth, now: float, idle_refresh_after: float, warning_horizon: float) -> str | None:
    """Why the keep-alive refreshes this grant now, or None."""
    if health.state not in _REFRESHABLE:
        return None
    if health.state != NOT_RECORDED and not health.has_refresh_token:
        return None  # nothing can renew it: the expiry check below reports it
    idle = _idle_for(health, now)
    if idle is None:
        return "no refresh or consent is recorded"
    if idle >= idle_refresh_after:
        return f"not refreshed for {idle / DAY:.1f} days"
    if health.refresh_expires_at is not None and health.refresh_expires_at - now <= warning_horizon:
        return "its refresh token expires soon"  # a server with rolling expiry renews it
    return None


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def _attention(health: GrantHealth, now: float, warning_horizon: float) -> tuple[str, str, str | None]:
    """(attention, reason for people, reason code) of a health already taken :meth:`as_of` now."""
    if health.state == REAUTHORIZATION_REQUIRED:
        error = health.last_error or {}
        code = str(error.get("code") or "invalid_grant")
        description = sanitize_description(error.get("description"), 200)
        return DEAD, f"{code}: {description}" if description else code, code
    expires = health.refresh_expires_at
    if health.state != NOT_CONNECTED and expires is not None and expires - now <= warning_horizon:
        days = (expires - now) / DAY
        return (
            EXPIRING,
            f"the refresh token expires at {_when(expires)} (in {days:.1f} days); reconnect before then",
            "refresh_token_expiring",
        )
    return OK, "" if health.state != NOT_CONNECTED else "no grant is stored (never connected)", None


def _force_refresh(hook: PapertrailHook, generation: int | None) -> bool:
    """Renew through the one serialized path (coordinator, else this machine's lock); whether a
    new generation came back.

    ``renew``, not ``force_refresh`` (which means "the server refused the token"): the
    decision is :func:`refresh.plan`'s, made on the stored grant under the lock, not on the
    advisory health. A grant with a lost refresh answer, a refusal or no refresh token is
    never presented early; a healthy one is refreshed although its access token is valid.
    """
    from airflow_papertrail.refresh import get_valid_token

    get_valid_token(hook, renew=True)
    issued = getattr(hook, "issued_generation", None)
    return issued is not None and (generation is None or issued > generation)


def _check_one(
    conn_id: str,
    *,
    backend: VariableBackend,
    hook_factory: Callable[[str], PapertrailHook],
    refresh: bool,
    idle_refresh_after: float,
    warning_horizon: float,
    clock: Callable[[], float],
) -> GrantCheck:
    url = connect_page_url(conn_id)
    now = clock()
    health = read_health(conn_id, backend=backend, clock=lambda: now)
    refreshed = failed = False
    error: str | None = None
    dead_error: ReauthorizationRequired | None = None
    why = _refresh_due(health, now, idle_refresh_after, warning_horizon) if refresh else None
    if why is not None:
        log.info("Refreshing the Papertrail-ai grant of %r: %s.", conn_id, why)
        try:
            refreshed = _force_refresh(hook_factory(conn_id), health.generation)
        except ReauthorizationRequired as exc:
            dead_error = exc
            error = str(exc)
        except TransientOAuthError as exc:
            error = f"{type(exc).__name__}: {sanitize_description(exc, 400)}"
            log.warning("The keep-alive refresh of %r failed; it is tried again next run: %s", conn_id, error)
        except Exception as exc:  # the connection, its configuration, the keys...: reported, fails the task
            failed = True
            error = f"{type(exc).__name__}: {sanitize_description(exc, 400)}"
            log.error("The keep-alive refresh of %r failed: %s", conn_id, error)
        now = clock()
        health = read_health(conn_id, backend=backend, clock=lambda: now)
    attention, reason, code = _attention(health, now, warning_horizon)
    state = health.state
    if dead_error is not None and attention != DEAD:
        # The refusal is certain even if recording it in the health Variable failed.
        attention, state = DEAD, REAUTHORIZATION_REQUIRED
        code = dead_error.error
        reason = f"{code}: {dead_error.description}" if dead_error.description else code
    return GrantCheck(
        conn_id=conn_id,
        state=state,
        attention=attention,
        reason=reason,
        reason_code=code,
        connect_url=url,
        refresh_expires_at=health.refresh_expires_at,
        refreshed=refreshed,
        error=error,
        grant=_grant_identity(health),
        failed=failed,
    )


# -- every connection ------------------------------------------------------------------------------
def default_connection_ids() -> list[str]:
    """Every ``papertrail`` connection (``airflow papertrail grants`` lists the same).

    Needs the metadata DB (``dag.test()``, or a worker that may reach it). A Task SDK worker
    may not: then the ``papertrail`` connections of ``AIRFLOW_CONN_*`` are all that can be
    listed, and a task that finds none asks for ``conn_ids``.
    """
    from airflow_papertrail.cli import _env_conn_type, papertrail_connection_ids

    try:
        return papertrail_connection_ids()
    except Exception as exc:
        found = sorted(
            name[len("AIRFLOW_CONN_") :].lower()
            for name, value in os.environ.items()
            if name.startswith("AIRFLOW_CONN_") and _env_conn_type(value) == "papertrail"
        )
        if not found:
            raise PapertrailConfigurationError(
                f"cannot list the papertrail connections here ({type(exc).__name__}: the metadata DB is not "
                "reachable from this task); pass conn_ids=[...] to the grant health task"
            ) from None
        log.warning(
            "Cannot list connections in the metadata DB from this task (%s); checking the papertrail connections "
            "of AIRFLOW_CONN_* only: %s. Pass conn_ids=[...] to check others.",
            type(exc).__name__,
            ", ".join(found),
        )
        return found


def _notify(
    check: GrantCheck, notifiers: Sequence[Callable[..., Any]], context: Mapping[str, Any] | None
) -> tuple[int, int]:
    """Call every notifier with its own context; (sent, failed)."""
    sent = failed = 0
    for notifier in notifiers:
        # BaseNotifier renders its templated fields onto itself: a copy per grant, so the second
        # grant's message is not the first one's already-rendered text.
        try:
            target = copy.copy(notifier)
        except Exception:
            target = notifier
        try:
            target(check.notifier_context(context))
            sent += 1
        except Exception as exc:
            failed += 1
            log.error(
                "Notifier %s failed for the grant of %r (%s: %s); the others still run.",
                type(notifier).__name__,
                check.conn_id,
                type(exc).__name__,
                sanitize_description(exc, 300),
            )
    return sent, failed


def check_grants(
    conn_ids: Sequence[str] | None = None,
    *,
    notifiers: Sequence[Callable[..., Any]] = (),
    context: Mapping[str, Any] | None = None,
    idle_refresh_after: float = IDLE_REFRESH_AFTER,
    warning_horizon: float = WARNING_HORIZON,
    refresh_idle: bool = True,
    clock: Callable[[], float] = time.time,
    backend: VariableBackend | None = None,
    hook_factory: Callable[[str], PapertrailHook] | None = None,
) -> KeepAliveReport:
    """Keep every grant alive and notify once per change of its attention (module docstring).

    :param conn_ids: connections to check; default :func:`default_connection_ids`.
    :param notifiers: callables taking a context dict (any Airflow ``BaseNotifier``), called
        once per change with ``context`` plus :data:`CONTEXT_KEYS`.
    :param context: the task context to pass on to the notifiers.
    :param idle_refresh_after: refresh grants not refreshed for this many seconds.
    :param warning_horizon: seconds before a stated refresh-token expiry from which a grant
        is ``expiring``.
    :param refresh_idle: refresh idle grants (False: only check and notify).
    :param clock: epoch seconds (injected in tests).
    :param backend: Variables for health and alert memory; default the token store's.
    :param hook_factory: builds the hook of a connection (its token store must use ``backend``).
    """
    from airflow_papertrail.token_store import default_backend

    if idle_refresh_after <= 0 or warning_horizon < 0:
        raise PapertrailConfigurationError("idle_refresh_after must be positive and warning_horizon not negative")
    backend = backend or default_backend()
    if hook_factory is None:
        from airflow_papertrail.hooks.papertrail import PapertrailHook

        def hook_factory(conn_id: str) -> PapertrailHook:
            return PapertrailHook(papertrail_conn_id=conn_id)

    ids = list(dict.fromkeys(conn_ids if conn_ids is not None else default_connection_ids()))
    report = KeepAliveReport()
    for conn_id in ids:
        try:
            check = _check_one(
                conn_id,
                backend=backend,
                hook_factory=hook_factory,
                refresh=refresh_idle,
                idle_refresh_after=idle_refresh_after,
                warning_horizon=warning_horizon,
                clock=clock,
            )
            check = _remember(check, backend, notifiers, context, clock())
        except Exception as exc:  # one connection never stops the others
            message = f"{type(exc).__name__}: {sanitize_description(exc, 400)}"
            if not isinstance(exc, PapertrailError):
                log.exception("Checking the Papertrail-ai grant of %r failed", conn_id)
            else:
                log.error("Checking the Papertrail-ai grant of %r failed: %s", conn_id, message)
            check = GrantCheck(
                conn_id=conn_id,
                state="error",
                attention=OK,
                reason=message,
                reason_code=None,
                connect_url=connect_page_url(conn_id),
                error=message,
                failed=True,
            )
        log.info(
            "Papertrail-ai grant %r: state %s, attention %s%s%s.",
            conn_id,
            check.state,
            check.attention,
            f" ({check.reason})" if check.reason else "",
            ", notified" if check.notified else "",
        )
        report.checks.append(check)
    return report


def _remember(
    check: GrantCheck,
    backend: VariableBackend,
    notifiers: Sequence[Callable[..., Any]],
    context: Mapping[str, Any] | None,
    now: float,
) -> GrantCheck:
    """Notify if the attention changed since the last notification, and remember it."""
    memory = _load_alert(backend, check.conn_id)
    notified_mark = memory.get("notified")
    previous = notified_mark.get("attention", OK) if isinstance(notified_mark, dict) else OK
    changed = not _same(notified_mark, check.attention, check.grant)
    announce = not _same(memory.get("announced"), check.attention, check.grant)
    check = replace(check, changed=changed, previous_attention=str(previous), announce=announce)
    if not changed:
        return check
    notified = False
    if check.attention != OK:
        sent, failed = _notify(check, notifiers, context)
        if notifiers and sent == 0:
            return check  # every notifier failed: remember nothing, so the next run tries again
        notified = sent > 0
    memory["notified"] = _mark(check.attention, check.grant, now)
    _save_alert(backend, check.conn_id, memory)
    return replace(check, notified=notified)
