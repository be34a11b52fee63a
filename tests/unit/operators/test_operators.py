"""Operator and sensor construction: cheap (no I/O), templated fields, validation, failure mapping."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_papertrail.authorization import Outcome
from airflow_papertrail.operators.papertrail import PapertrailAuthorizeOperator
from airflow_papertrail.sensors.papertrail import PapertrailAuthorizationSensor


def test_constructors_do_no_io(monkeypatch):
    # No connection, no key, no DB: building operators (DAG parsing) must still work.
    monkeypatch.delenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", raising=False)
    op = PapertrailAuthorizeOperator(task_id="authorize", papertrail_conn_id="nope")
    sensor = PapertrailAuthorizationSensor(task_id="wait", authorization_id="{{ x }}", papertrail_conn_id="nope")
    assert op.papertrail_conn_id == "nope"
    assert sensor.deferrable is True  # a wait on a person defers by default
    assert set(PapertrailAuthorizeOperator.template_fields) == {"papertrail_conn_id", "extra_authorize_params"}
    assert set(PapertrailAuthorizationSensor.template_fields) == {"papertrail_conn_id", "authorization_id"}


@pytest.mark.parametrize("ttl", [0, 10, 10**6])
def test_authorization_ttl_is_bounded(ttl):
    with pytest.raises(ValueError, match="authorization_ttl"):
        PapertrailAuthorizeOperator(task_id="a", authorization_ttl=ttl)


def test_sensor_timeout_accepts_timedelta():
    from datetime import timedelta

    assert PapertrailAuthorizationSensor(task_id="w", authorization_id="x", timeout=timedelta(minutes=2)).timeout == 120


@pytest.mark.parametrize("status", ["denied", "failed", "expired", "timeout"])
def test_every_non_success_event_fails_without_retry(status):
    sensor = PapertrailAuthorizationSensor(task_id="w", authorization_id="x")
    with pytest.raises(AirflowFailException, match="re-run"):
        sensor.execute_complete({}, Outcome(status, f"{status}: re-run the papertrail_authorize DAG", "pt").to_event())


def test_success_event_returns_a_summary_without_tokens():
    sensor = PapertrailAuthorizationSensor(task_id="w", authorization_id="x")
    event = Outcome("success", "stored", "pt", generation=3, expires_at=1.0, scope="s").to_event()
    result = sensor.execute_complete({}, event)
    assert result["generation"] == 3
    assert set(result) == {"status", "message", "conn_id", "generation", "expires_at", "scope"}


def test_missing_event_fails():
    with pytest.raises(AirflowFailException):
        PapertrailAuthorizationSensor(task_id="w", authorization_id="x").execute_complete({}, None)
