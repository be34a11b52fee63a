"""Trigger that waits for an OAuth callback and redeems the code inside the triggerer.

Doing the exchange here (not after the task resumes on a worker) keeps callback-to-stored
latency at the poll interval plus one token request, instead of a scheduler round trip
(~10 s measured). Everything that blocks (Variable and Connection reads and writes through
the Task SDK, and the token request) runs on a worker thread through :func:`_blocking`, so the
triggerer's event loop never waits on the network or the supervisor, whatever the Airflow
version does with sync SDK calls made on the loop's own thread (3.2.0/3.2.1 send them with
``async_to_sync``, which refuses to run there; 3.2.2+ use a greenback portal that
``AIRFLOW_DISABLE_GREENBACK_PORTAL`` turns off). Tested with a real triggerer on 3.2.0, 3.2.2
and 3.3.2.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_papertrail.authorization import (
    AuthorizationStore,
    Outcome,
    begin_redemption,
    discard,
    examine,
    failure_outcome,
    finish_redemption,
    store_grant,
)
from airflow_papertrail.exceptions import OAuthError, PapertrailError, TransientOAuthError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _blocking(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking work (Task SDK calls, HTTP) off the event loop, on a worker thread.

    ``asgiref``'s ``sync_to_async`` (not ``asyncio.to_thread``) because the Task SDK in Airflow
    3.2.0/3.2.1's triggerer talks to its supervisor with ``async_to_sync``, which finds the
    triggerer's loop only from a ``sync_to_async`` thread. ``thread_sensitive=False``: concurrent
    triggers must not queue behind one shared thread.
    """
    from asgiref.sync import sync_to_async

    return await sync_to_async(func, thread_sensitive=False)(*args, **kwargs)


class PapertrailAuthorizationTrigger(BaseTrigger):
    """Wait for the callback of one authorization, then exchange its code and store the grant.

    :param papertrail_conn_id: connection the grant is for.
    :param authorization_id: id of the pending authorization (a hash of its state).
    :param deadline: absolute epoch seconds after which the wait ends with ``timeout``.
    :param poll_interval: seconds between looks at the pending entry.
    :param not_before: absolute epoch seconds before which no event is fired. The grant is
        stored as soon as the code arrives; only the task's resumption waits. Airflow 3.3.2
        can mark a deferred task failed when its trigger fires before the worker that
        deferred it has reported its exit (apache/airflow#67287, #72716: the supervisor may
        notice the exit only after ``[workers] min_heartbeat_interval``); the sensor sets
        this just past that window.
    """

    def __init__(
        self,
        papertrail_conn_id: str,
        authorization_id: str,
        deadline: float,
        poll_interval: float = 0.25,
        not_before: float = 0.0,
    ) -> None:
        super().__init__()
        self.papertrail_conn_id = papertrail_conn_id
        self.authorization_id = authorization_id
        self.deadline = float(deadline)
        self.poll_interval = float(poll_interval)
        self.not_before = float(not_before)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "papertrail_conn_id": self.papertrail_conn_id,
                "authorization_id": self.authorization_id,
                "deadline": self.deadline,
                "poll_interval": self.poll_interval,
                "not_before": self.not_before,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        outcome = await self._wait()
        hold = self.not_before - time.time()
        if hold > 0:
            await asyncio.sleep(hold)
        yield TriggerEvent(outcome.to_event())

    async def _wait(self) -> Outcome:
        from airflow_papertrail.hooks.papertrail import PapertrailHook, mask

        conn_id = self.papertrail_conn_id
        try:
            authorizations = AuthorizationStore(on_secret=mask)
            while True:
                pending = await _blocking(authorizations.load, self.authorization_id)
                outcome = examine(pending, conn_id=conn_id, now=time.time())
                if outcome is None:
                    assert pending is not None
                    assert pending.code is not None
                    break
                if outcome.status != "waiting":
                    # denied, OAuth error, expired, missing or another connection's (discard() skips those
                    # two); a redeemed record stays for another re-run until the resumed sensor deletes it
                    await _blocking(
                        discard, pending, conn_id=conn_id, authorizations=authorizations, keep_redeemed=True
                    )
                    return outcome
                if time.time() >= self.deadline:
                    await _blocking(discard, pending, conn_id=conn_id, authorizations=authorizations)
                    return Outcome(
                        "timeout",
                        f"no answer to the Papertrail-ai authorization of {conn_id!r} before the sensor's timeout; re-run the papertrail_authorize DAG.",
                        conn_id,
                    )
                await asyncio.sleep(self.poll_interval)

            hook = PapertrailHook(conn_id)
            client = await _blocking(lambda: hook.oauth_client)  # reads the connection
            await _blocking(begin_redemption, pending, authorizations)  # single use, before anything else
            try:
                token = await _blocking(
                    client.exchange_code_unmasked,
                    pending.code,
                    code_verifier=pending.code_verifier,
                    redirect_uri=pending.redirect_uri,  # the one the consent used, whatever the connection says now
                )
            except (OAuthError, TransientOAuthError) as exc:
                await _blocking(discard, pending, conn_id=conn_id, authorizations=authorizations)
                return failure_outcome(conn_id, exc)
            for value in token.secrets:
                mask(value)
            outcome = await _blocking(
                lambda: store_grant(conn_id, token, hook.token_store, issued_for=client.config.binding())
            )
            await _blocking(finish_redemption, pending, outcome, authorizations)
            return outcome
        except PapertrailError as exc:
            return Outcome("failed", str(exc), conn_id)
        except Exception as exc:  # never let a secret-bearing traceback into the triggerer log
            return Outcome(
                "failed", f"unexpected {type(exc).__name__} while completing the authorization of {conn_id!r}", conn_id
            )
