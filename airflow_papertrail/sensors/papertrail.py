"""Sensor that waits for a person's consent and completes the code exchange."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout

from airflow_papertrail.authorization import AuthorizationStore, Outcome, discard, examine, redeem

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow.sdk import Context

#: Default wait: a little longer than the default authorization lifetime (10 minutes), so an
#: unanswered authorization ends as "expired" (with its own message), not as a sensor timeout.
DEFAULT_TIMEOUT = 15 * 60


def _resume_guard() -> float:
    """Seconds after deferring before the trigger may resume the task (see the trigger's ``not_before``)."""
    from airflow.sdk import conf

    return conf.getfloat("workers", "min_heartbeat_interval", fallback=5.0) + 1.0


class PapertrailAuthorizationSensor(BaseSensorOperator):
    """Wait for the OAuth callback of one authorization, then redeem the code and store the grant.

    Deferrable **by default**, unlike Airflow's global ``[operators] default_deferrable``
    (False): a wait on a person can take minutes to days and should not hold a worker slot.
    Pass ``deferrable=False`` to poke (``mode="poke"``/``"reschedule"``) instead. While
    deferred, the trigger exchanges the code as soon as the callback lands, in the
    triggerer, and the task resumes only to report.

    The task fails at once, without retrying, when access is denied
    (``error=access_denied``), the server returns another OAuth error, the code is refused,
    or the authorization expires; the message says to re-run the ``papertrail_authorize`` DAG.

    :param authorization_id: id returned by :class:`PapertrailAuthorizeOperator` (templated).
    :param papertrail_conn_id: the connection the grant is for (templated).
    :param deferrable: wait in the triggerer (default True).
    :param poll_interval: seconds between looks at the callback (trigger and poke).
    """

    template_fields: Sequence[str] = ("authorization_id", "papertrail_conn_id")
    ui_color = "#e8f1ff"

    def __init__(
        self,
        *,
        authorization_id: str,
        papertrail_conn_id: str = "papertrail_default",
        deferrable: bool = True,
        poll_interval: float = 0.25,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        if isinstance(timeout, timedelta):
            timeout = timeout.total_seconds()
        kwargs.setdefault("poke_interval", max(poll_interval, 0.1))
        super().__init__(timeout=timeout, **kwargs)
        self.authorization_id = authorization_id
        self.papertrail_conn_id = papertrail_conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            try:
                return super().execute(context)
            except AirflowSensorTimeout:
                self._discard_after_timeout()
                raise
        outcome = self._check_once()
        if outcome.status != "waiting":
            return self._finish(outcome)
        from airflow_papertrail.triggers.papertrail import PapertrailAuthorizationTrigger

        now = time.time()
        deadline = now + float(self.timeout)
        self.log.info(
            "Waiting (deferred) for consent on authorization %s of connection %r.",
            self.authorization_id[:12],
            self.papertrail_conn_id,
        )
        self.defer(
            trigger=PapertrailAuthorizationTrigger(
                papertrail_conn_id=self.papertrail_conn_id,
                authorization_id=self.authorization_id,
                deadline=deadline,
                poll_interval=self.poll_interval,
                not_before=now + _resume_guard(),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout) + 60),
        )

    def poke(self, context: Context) -> bool:
        outcome = self._check_once()
        if outcome.status == "waiting":
            return False
        self._finish(outcome)
        self._result = outcome.to_event()
        return True

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if not event:
            raise AirflowFailException(
                "the Papertrail-ai authorization trigger ended without an event; re-run the papertrail_authorize DAG"
            )
        outcome = Outcome(**event)
        if outcome.status == "success":
            self._forget_redeemed()
        return self._finish(outcome)

    # -- helpers ---------------------------------------------------------------------------
    def _check_once(self) -> Outcome:
        """One look; if the code is there, redeem it here (poke path and first look)."""
        from airflow_papertrail.hooks.papertrail import PapertrailHook, mask

        authorizations = AuthorizationStore(on_secret=mask)
        pending = authorizations.load(self.authorization_id)
        # examine() also refuses an entry of another connection (the trigger relies on the same check).
        outcome = examine(pending, conn_id=self.papertrail_conn_id, now=time.time())
        if outcome is not None:
            if outcome.status != "waiting":
                discard(pending, conn_id=self.papertrail_conn_id, authorizations=authorizations)
            return outcome
        assert pending is not None
        hook = PapertrailHook(self.papertrail_conn_id)
        outcome = redeem(pending, client=hook.oauth_client, authorizations=authorizations, grants=hook.token_store)
        if outcome.status == "success":  # redeemed right here: no trigger can run again, no record needed
            discard(pending, conn_id=self.papertrail_conn_id, authorizations=authorizations)
        return outcome

    def _forget_redeemed(self) -> None:
        """The trigger left the redeemed record for a possible re-run; the task has resumed: delete it."""
        from airflow_papertrail.hooks.papertrail import mask

        try:
            authorizations = AuthorizationStore(on_secret=mask)
            pending = authorizations.load(self.authorization_id)
        except Exception as exc:  # the grant is stored; a leftover record holds no secret
            self.log.warning("Could not read the redeemed authorization to delete it: %s", type(exc).__name__)
            return
        discard(pending, conn_id=self.papertrail_conn_id, authorizations=authorizations)

    def _discard_after_timeout(self) -> None:
        """Poke/reschedule mode ran out of time: the entry will never be redeemed, delete it."""
        from airflow_papertrail.hooks.papertrail import mask

        try:
            authorizations = AuthorizationStore(on_secret=mask)
            pending = authorizations.load(self.authorization_id)
        except Exception as exc:  # the timeout is what the task reports
            self.log.warning("Could not read the pending authorization to delete it: %s", type(exc).__name__)
            return
        discard(pending, conn_id=self.papertrail_conn_id, authorizations=authorizations)

    def _finish(self, outcome: Outcome) -> dict[str, Any]:
        if outcome.status == "success":
            self.log.info("%s", outcome.message)
            return outcome.to_event()
        raise AirflowFailException(outcome.message)
