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
    assert set(PapertrailAuthorizeOperator.template_fields) == {
        "papertrail_conn_id",
        "extra_authorize_params",
        "authorization_id",
        "notify",
    }
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


class _Health:
    """A loopback stand-in for the api-server's /api/v2/monitor/health (and nothing else)."""

    def __init__(self, answer: bytes, status: int = 200) -> None:
        import http.server
        import threading

        outer = self
        self.paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.execution_url = f"http://127.0.0.1:{self.server.server_address[1]}/execution/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _triggerer_warning(monkeypatch, capsys, caplog, answer: bytes, status: int = 200) -> str:
    health = _Health(answer, status)
    try:
        monkeypatch.setenv("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", health.execution_url)
        PapertrailAuthorizeOperator(task_id="authorize")._warn_without_triggerer()
        assert health.paths == ["/api/v2/monitor/health"]
    finally:
        health.close()
    return capsys.readouterr().out + caplog.text


@pytest.mark.parametrize(
    "answer",
    [
        b'{"triggerer": {"status": "unhealthy", "latest_triggerer_heartbeat": "2026-01-01T00:00:00Z"}}',
        b'{"triggerer": {"status": null, "latest_triggerer_heartbeat": null}}',
        b'{"metadatabase": {"status": "healthy"}}',
    ],
)
def test_authorize_warns_when_no_triggerer_is_healthy(monkeypatch, capsys, caplog, answer):
    shown = _triggerer_warning(monkeypatch, capsys, caplog, answer)
    assert "no healthy triggerer" in shown and "airflow triggerer" in shown


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b'{"triggerer": {"status": "healthy"}}', 200),
        (b"<html>not json</html>", 200),  # a proxy page: say nothing rather than guess
        (b'{"detail": "oops"}', 500),
    ],
)
def test_authorize_triggerer_check_is_quiet_otherwise(monkeypatch, capsys, caplog, answer, status):
    assert "no healthy triggerer" not in _triggerer_warning(monkeypatch, capsys, caplog, answer, status)


def test_authorize_triggerer_check_never_fails(monkeypatch):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://127.0.0.1:{port}/execution/")
    PapertrailAuthorizeOperator(task_id="authorize")._warn_without_triggerer()  # no exception
