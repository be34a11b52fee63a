"""The data operators in real Airflow runs (``dag.test()``, metadata DB, encrypted grant in a
Variable) against the emulator: the example extract DAG and the query operator."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, remember_secrets
from tests.integration.conftest import REPO, airflow_env, run

pytestmark = pytest.mark.integration

RUNNER = str(REPO / "tests" / "integration" / "dags" / "run_dag.py")
EXTRACT_DAG = str(REPO / "dags" / "papertrail_extract.py")
DATA_DAG = str(REPO / "tests" / "integration" / "dags" / "papertrail_data_it.py")
REPORTS = {"trial_balance", "income_statement", "balance_sheet", "cash_flow"}


def _connect(emulator, monkeypatch, conn_id: str) -> dict[str, str]:
    """Store a real grant for ``conn_id`` (encrypted Variable) and return the subprocess env."""
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", key)
    remember_secrets(key)
    config = OAuthClientConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        scope="accounting.read accounting.write",
        system="xero",
        base_url=emulator.base_url,
    )
    code = emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, scope=config.scope, system="xero")
    token = OAuthClient(config).exchange_code(code)
    remember_secrets(code, token.access_token, token.refresh_token)
    VariableTokenStore(conn_id, cipher=TokenCipher([key]), backend=OrmVariables()).save(token)
    conn = {
        "conn_type": "papertrail",
        "login": CLIENT_ID,
        "password": CLIENT_SECRET,
        "host": emulator.base_url,
        "extra": {"redirect_uri": REDIRECT_URI, "system": "xero", "scope": config.scope},
    }
    return airflow_env(
        **{f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(conn), "AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": key}
    )


def _example_dag_module():
    spec = importlib.util.spec_from_file_location("papertrail_extract_example", EXTRACT_DAG)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_secret(emulator, *texts: str) -> None:
    secrets = emulator.issued_secrets | {CLIENT_SECRET}
    for text in texts:
        leaked = [s for s in secrets if s in text]
        assert not leaked, "a token, code or secret reached the output"


def test_extract_dag_writes_every_file(airflow_db, emulator, monkeypatch, tmp_path):
    extracts = _example_dag_module().EXTRACTS  # the DAG's own list: one file per entry

    env = _connect(emulator, monkeypatch, "pt_extract_it")
    base = tmp_path / "books"
    conf = {"conn_id": "pt_extract_it", "base_path": str(base), "query_params": {"count": 40}}
    proc = run([sys.executable, RUNNER, EXTRACT_DAG, "papertrail_extract", json.dumps(conf)], env=env, timeout=600)
    assert "DAGRUN_STATE=success" in proc.stdout

    (day,) = base.iterdir()  # {base_path}/{ds}/
    assert len(day.name) == 10 and day.name[4] == "-"
    files = sorted(p.name for p in day.iterdir())
    assert files == sorted(f"{m}__{q}.jsonl" for m, q in extracts)  # and no temporary leftovers
    for module, query in extracts:
        lines = (day / f"{module}__{query}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        if query in REPORTS:
            assert len(records) == 1 and records[0]["currency"] == "GBP"
        else:
            assert len(records) == 40 and len({r["id"] for r in records}) == 40
    assert emulator.stats["api_requests"] == len(extracts)
    assert emulator.stats["records_streamed"] == 40 * sum(q not in REPORTS for _, q in extracts)
    texts = [proc.stdout, proc.stderr] + [p.read_text() for p in day.iterdir()]
    _no_secret(emulator, *texts)


def test_query_operator_read_write_and_one_refresh_after_401(airflow_db, emulator, monkeypatch):
    env = _connect(emulator, monkeypatch, "pt_query_it")
    # The stored token looks valid for an hour but the service has expired it: the first
    # call gets a 401, the hook refreshes once, every later call uses the refreshed grant.
    emulator.expire_access_tokens()
    conf = {"conn_id": "pt_query_it", "customer": "Widgets & Co"}
    proc = run([sys.executable, RUNNER, DATA_DAG, "papertrail_data_it", json.dumps(conf)], env=env, timeout=600)
    assert "DAGRUN_STATE=success" in proc.stdout
    assert "COMPANY=Emulated Trading Ltd (xero)" in proc.stdout
    (write,) = emulator.writes
    assert write["payload"] == {"name": "Widgets & Co", "currency": "GBP"}
    assert f"CREATED={write['id']}" in proc.stdout
    assert write["idempotency_key"]
    assert emulator.stats["refresh_grants"] == 1
    assert emulator.stats["invalid_token_errors"] == 1
    _no_secret(emulator, proc.stdout, proc.stderr)


def test_example_dag_parses_with_one_task_per_query():
    example = _example_dag_module()
    dag = example.papertrail_extract()
    assert dag.dag_id == "papertrail_extract" and dag.catchup is False
    assert {t.task_id for t in dag.tasks} == {f"{m}__{q}" for m, q in example.EXTRACTS}
    assert all(not t.upstream_task_ids for t in dag.tasks)  # all in parallel
    assert Path(EXTRACT_DAG).read_text().count("PapertrailExtractOperator(") == 1
