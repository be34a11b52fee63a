"""The keep-alive renews through refresh.plan's ``renew`` look, decided on the stored grant, never a
forced presentation (review findings M3, M4, L1 and M5; each of these tests failed before the fix)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from airflow_papertrail import keepalive, refresh
from airflow_papertrail.exceptions import ReauthorizationRequired
from airflow_papertrail.health import NOT_RECORDED, OUTCOME_UNKNOWN, VALID, GrantHealth
from airflow_papertrail.oauth.tokens import Token
from airflow_papertrail.token_store import StoredGrant
from tests.unit.test_token_store import MemoryVariables

DAY = 86400.0


def _grant(*, refresh_token: str | None = "rt", expires_in: float = 3000, **changes) -> StoredGrant:
    now = time.time()
    token = Token("at", "Bearer", now - 100, now + expires_in, refresh_token=refresh_token, scope="s")
    return StoredGrant(conn_id="pt", token=token, generation=5, updated_at=now - 10 * DAY, **changes)


def test_renew_refreshes_a_healthy_grant_whose_token_is_still_valid():
    now = time.time()
    assert refresh.plan(_grant(), seen_generation=5, force=False, leeway=300, now=now, renew=True) == refresh.REFRESH
    # someone refreshed meanwhile: that newer generation is used, not refreshed again
    assert refresh.plan(_grant(), seen_generation=4, force=False, leeway=300, now=now, renew=True) == refresh.USE


def test_renew_never_presents_a_token_whose_last_answer_was_lost():
    now = time.time()
    lost = _grant(unknown_refresh_outcomes=1, unknown_at=now - 120)
    assert refresh.plan(lost, seen_generation=5, force=False, leeway=300, now=now, renew=True) == refresh.USE
    # once the access token has expired, the one re-presentation the custody rules allow
    expired = _grant(expires_in=-10, unknown_refresh_outcomes=1, unknown_at=now - 3600)
    assert refresh.plan(expired, seen_generation=5, force=False, leeway=300, now=now, renew=True) == refresh.REFRESH


def test_renew_of_a_grant_without_refresh_token_uses_its_valid_access_token():
    now = time.time()
    grant = _grant(refresh_token=None)
    assert refresh.plan(grant, seen_generation=5, force=False, leeway=300, now=now, renew=True) == refresh.USE
    with pytest.raises(ReauthorizationRequired):  # what a forced refresh did (L1): a working grant called dead
        refresh.plan(grant, seen_generation=5, force=True, leeway=300, now=now)


def test_renew_never_presents_a_refused_grant():
    now = time.time()
    dead = _grant(reauthorization_error="invalid_grant", reauthorization_reason="revoked")
    assert refresh.plan(dead, seen_generation=5, force=False, leeway=300, now=now, renew=True) == refresh.USE


def test_the_keep_alive_decides_on_the_stored_grant_not_the_advisory_health(monkeypatch):
    """Health says valid and idle (a lost health write); the grant has a lost refresh answer."""
    now = time.time()
    backend = MemoryVariables()
    health = GrantHealth(
        conn_id="pt",
        state=VALID,
        generation=5,
        has_refresh_token=True,
        authorized_at=now - 30 * DAY,
        last_refresh_at=now - 8 * DAY,
    )
    backend.set("papertrail_health__pt", health.to_json(), "")
    grant = _grant(unknown_refresh_outcomes=1, unknown_at=now - 120)
    hook = SimpleNamespace(
        papertrail_conn_id="pt", token_store=SimpleNamespace(load=lambda: grant), config=SimpleNamespace(leeway=300)
    )
    presented = []
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR", "local")
    monkeypatch.setattr(refresh, "_locally", lambda h, s, f, **kw: presented.append(s) or s.token)
    monkeypatch.setattr(refresh, "_via_api_server", lambda h, s, f, **kw: presented.append(s) or s.token)
    result = keepalive.check_grants(["pt"], backend=backend, hook_factory=lambda c: hook)
    assert presented == [], "the keep-alive presented the refresh token of a grant whose last answer was lost"
    assert [c.refreshed for c in result.checks] == [False]


def test_an_idle_grant_with_a_lost_answer_is_looked_at_again():
    now = time.time()
    health = GrantHealth(
        conn_id="pt",
        state=OUTCOME_UNKNOWN,
        generation=5,
        has_refresh_token=True,
        authorized_at=now - 60 * DAY,
        last_refresh_at=now - 25 * DAY,
        access_expires_at=now - 24 * DAY,
    )
    assert keepalive._refresh_due(health, now, 7 * DAY, 14 * DAY) is not None


def test_not_recorded_health_is_looked_at_without_forcing():
    assert keepalive._refresh_due(GrantHealth(conn_id="pt", state=NOT_RECORDED), time.time(), 7 * DAY, 14 * DAY)


def test_a_refused_fresh_token_is_recorded_in_the_health(monkeypatch):
    """Review finding M5: a data-API 401 after a successful refresh failed the task but left the
    health 'valid', so neither the Connect page nor the keep-alive saw it."""
    import airflow_papertrail.hooks.papertrail as hooks
    from airflow_papertrail.operators.query import ReauthorizationFailure

    recorded = []

    class Hook:
        def __init__(self, conn_id: str) -> None:
            self.token_store = SimpleNamespace(record_failure=lambda *a: recorded.append((conn_id, *a)))

    monkeypatch.setattr(hooks, "PapertrailHook", Hook)
    refused = ReauthorizationRequired(
        "pt", "the data API refused a freshly refreshed access token", status=401, error="invalid_token"
    )
    failure = ReauthorizationFailure.of(refused)
    assert recorded == [("pt", "reauthorization_required", "invalid_token", refused.description)]
    assert "Connect page" in str(failure)
    # a refresh refusal (recorded where it happened) or a missing grant is not recorded again here
    ReauthorizationFailure.of(ReauthorizationRequired("pt", "no grant is stored for this connection"))
    assert len(recorded) == 1
