"""The grant health task: keep grants alive, notify once per change, fail on dead grants.

A thin operator over :func:`airflow_papertrail.keepalive.check_grants` (docs/grant-lifecycle.md,
"Keep-alive and alerts"). The constructor does no I/O.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import Asset, AssetAlias, BaseOperator

from airflow_papertrail.keepalive import IDLE_REFRESH_AFTER, WARNING_HORIZON

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from airflow.sdk import Context

    from airflow_papertrail.keepalive import GrantCheck, KeepAliveReport

#: The asset alias the operator emits grant state changes through (``emit_asset_events``).
GRANT_ASSET_ALIAS = "papertrail_grant_health"


def grant_asset(conn_id: str) -> Asset:
    """The asset whose events announce changes of ``conn_id``'s grant: schedule fix-up DAGs on it."""
    return Asset(name=f"papertrail_grant__{conn_id}", uri=f"papertrail://grants/{quote(conn_id, safe='')}")


def _seconds(name: str, value: float | timedelta) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise ValueError(f"{name} must not be negative")
    return seconds


def _conn_ids(value: Any) -> list[str] | None:
    """A list, or the text a template renders (``"a, b"``, ``"['a', 'b']"``); empty means all."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]")
        names = [part.strip().strip("'\"") for part in text.replace(",", " ").split()]
    else:
        names = [str(v).strip() for v in value]
    names = [n for n in names if n]
    return names or None


class PapertrailGrantHealthOperator(BaseOperator):
    """Refresh idle Papertrail-ai grants and tell people about grants that will die or did.

    For each connection: refreshes the grant when it was not refreshed for
    ``idle_refresh_after`` (through the serialized refresh path every task uses), then calls
    every notifier **once per change** of its attention (``expiring``: a stated refresh-token
    expiry within ``warning_horizon``; ``reauthorization_required``: dead). The notifier
    context is the task context plus ``papertrail_conn_id``, ``papertrail_grant_state``,
    ``papertrail_attention``, ``papertrail_reason``, ``papertrail_reason_code``,
    ``papertrail_connect_url``, ``papertrail_refresh_expires_at`` and
    ``papertrail_previous_attention``. Returns (XCom) ``{"checks": [...]}``, one entry per
    connection.

    :param conn_ids: the ``papertrail`` connections to check; None or empty: all of them
        (needs the metadata DB; see ``keepalive.default_connection_ids``). A list, or a
        comma-separated text. (templated)
    :param notifiers: callables taking a context dict, e.g. Airflow ``BaseNotifier`` objects
        (Slack, SMTP, Apprise...).
    :param idle_refresh_after: refresh a grant not refreshed for this long (seconds or a
        timedelta; default 7 days, inside Sage's ~31, Xero's 60 and QuickBooks' 100 idle days).
    :param warning_horizon: notify this long before a stated refresh-token expiry (seconds
        or a timedelta; default 14 days).
    :param refresh_idle: refresh idle grants; False only checks and notifies.
    :param fail_on_attention: after notifying, fail the task if a grant needs
        re-authorization (or a connection could not be checked), so ordinary
        ``on_failure_callback`` functions fire too. The message names them and the Connect page.
    :param emit_asset_events: emit an asset event per change of a grant's attention (back
        to ``ok`` included) through the asset alias :data:`GRANT_ASSET_ALIAS`, on the asset
        ``papertrail://grants/<conn_id>`` with extra ``{conn_id, state, attention,
        previous_attention, reason_code, refresh_expires_at}``. Airflow sends outlet events
        only with a successful task: a run that fails (``fail_on_attention``) emits none, and
        the change is announced by the next run that succeeds.
    """

    template_fields: Sequence[str] = ("conn_ids",)
    ui_color = "#fde9c4"

    def __init__(
        self,
        *,
        conn_ids: Sequence[str] | str | None = None,
        notifiers: Sequence[Callable[..., Any]] | None = None,
        idle_refresh_after: float | timedelta = IDLE_REFRESH_AFTER,
        warning_horizon: float | timedelta = WARNING_HORIZON,
        refresh_idle: bool = True,
        fail_on_attention: bool = True,
        emit_asset_events: bool = True,
        **kwargs: Any,
    ) -> None:
        if emit_asset_events:
            outlets = list(kwargs.pop("outlets", None) or [])
            if not any(isinstance(o, AssetAlias) and o.name == GRANT_ASSET_ALIAS for o in outlets):
                outlets.append(AssetAlias(name=GRANT_ASSET_ALIAS))
            kwargs["outlets"] = outlets
        super().__init__(**kwargs)
        self.conn_ids = conn_ids
        self.notifiers = list(notifiers or [])
        self.idle_refresh_after = _seconds("idle_refresh_after", idle_refresh_after)
        self.warning_horizon = _seconds("warning_horizon", warning_horizon)
        self.refresh_idle = refresh_idle
        self.fail_on_attention = fail_on_attention
        self.emit_asset_events = emit_asset_events

    def execute(self, context: Context) -> dict[str, Any]:
        import time

        from airflow_papertrail.exceptions import GrantsNeedReauthorization
        from airflow_papertrail.keepalive import check_grants, record_announced
        from airflow_papertrail.token_store import default_backend

        backend = default_backend()
        report = check_grants(
            _conn_ids(self.conn_ids),
            notifiers=self.notifiers,
            context=context,
            idle_refresh_after=self.idle_refresh_after,
            warning_horizon=self.warning_horizon,
            refresh_idle=self.refresh_idle,
            backend=backend,
        )
        message = report.failure_message() if self.fail_on_attention else None
        if message:
            raise GrantsNeedReauthorization(
                message,
                conn_ids=[c.conn_id for c in report.dead],
                failed_conn_ids=[c.conn_id for c in report.failed],
            )
        if self.emit_asset_events:
            announced = self._announce(context, report)
            record_announced(backend, announced, now=time.time())
        return report.to_dict()

    def _announce(self, context: Context, report: KeepAliveReport) -> list[GrantCheck]:
        changes = [c for c in report.checks if c.announce and not c.failed]
        if not changes:
            return []
        events = context["outlet_events"][AssetAlias(name=GRANT_ASSET_ALIAS)]
        for check in changes:
            events.add(
                grant_asset(check.conn_id),
                extra={
                    "conn_id": check.conn_id,
                    "state": check.state,
                    "attention": check.attention,
                    "previous_attention": check.previous_attention,
                    "reason_code": check.reason_code,
                    "refresh_expires_at": check.refresh_expires_at,
                },
            )
            self.log.info("Asset event for %s: %s.", grant_asset(check.conn_id).uri, check.attention)
        return changes
