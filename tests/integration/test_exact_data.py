"""Issue 13 in a real Airflow run (``dag.test()``, metadata DB, XCom, retries): amounts
stay exact through XCom, JSON-text templates keep their types, and a write whose 2xx
answer is unreadable is sent once although the task has retries."""

from __future__ import annotations

import json
import sys

import pytest

from tests.integration.conftest import REPO, run
from tests.integration.test_data_operators import RUNNER, _connect, _no_secret

pytestmark = pytest.mark.integration

DAG_FILE = str(REPO / "tests" / "integration" / "dags" / "papertrail_exact_it.py")
BODY = '{"status": "ok", "data": [{"id": 1, "amount": 1150.00, "big": 12345678901234567.89}]}'


def test_amounts_stay_exact_through_xcom_and_templates_keep_their_text(airflow_db, emulator, monkeypatch):
    env = _connect(emulator, monkeypatch, "pt_exact_it")
    emulator.inject("api", status=200, body=BODY, after_processing=True)  # processed: its params are recorded
    conf = {"conn_id": "pt_exact_it", "mode": "exact"}
    proc = run([sys.executable, RUNNER, DAG_FILE, "papertrail_exact_it", json.dumps(conf)], env=env, timeout=600)
    assert "DAGRUN_STATE=success" in proc.stdout, proc.stdout[-3000:]
    # XCom went through Airflow's serializer and the metadata DB: still the service's text
    assert "AMOUNT='1150.00' BIG='12345678901234567.89' DECIMAL=Decimal('12345678901234567.89')" in proc.stdout
    read = next(p for p in emulator.api_params if p["query"] == "bank_list")
    assert (read["from_date"], read["limit"]) == ("2024-04-01", "200")  # "200" stayed a string, not 200
    (write,) = emulator.writes
    assert write["body"] == '{"name": "Acme", "amount": 1150.00, "ref": "200"}'  # byte for byte
    _no_secret(emulator, proc.stdout, proc.stderr)


def test_an_unreadable_write_answer_fails_once_and_is_never_resent(airflow_db, emulator, monkeypatch):
    env = _connect(emulator, monkeypatch, "pt_exact_w_it")
    emulator.inject("api", status=201, body=b'<b>Notice</b>: Undefined index {"status":', after_processing=True)
    conf = {"conn_id": "pt_exact_w_it", "mode": "unreadable_write"}
    proc = run(
        [sys.executable, RUNNER, DAG_FILE, "papertrail_exact_it", json.dumps(conf)], env=env, timeout=600, check=False
    )
    assert "DAGRUN_STATE=failed" in proc.stdout
    assert "was DONE" in proc.stdout + proc.stderr
    assert len(emulator.writes) == 1 and emulator.stats["api_requests"] == 1  # retries=2, sent once
    _no_secret(emulator, proc.stdout, proc.stderr)
