"""PapertrailQueryOperator / PapertrailExtractOperator: cheap constructors, templating,
XCom size guard, writes that fail without retry, extraction summary."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_papertrail.exceptions import PapertrailConfigurationError
from airflow_papertrail.hooks.papertrail import PapertrailHook
from airflow_papertrail.operators.query import PapertrailExtractOperator, PapertrailQueryOperator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI
from tests.unit.api.support import TokenSource

CONN_ID = "pt_data_unit"


@pytest.fixture
def connected(emulator, monkeypatch):
    """A connection to the emulator and a real access token (the refresh path is the hook's own test)."""
    tokens = TokenSource(emulator)
    conn = {
        "conn_type": "papertrail",
        "login": CLIENT_ID,
        "password": CLIENT_SECRET,
        "host": emulator.base_url,
        "extra": {"redirect_uri": REDIRECT_URI, "system": "xero", "timeout": "5"},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    monkeypatch.setattr(PapertrailHook, "get_access_token", lambda self, force_refresh=False: tokens(force_refresh))
    return tokens


def _context(run_id: str = "scheduled__2024-05-01", try_number: int = 1) -> dict:
    return {"ti": SimpleNamespace(dag_id="books", task_id="t", run_id=run_id, map_index=-1, try_number=try_number)}


def test_constructors_do_no_io_and_declare_template_fields(monkeypatch):
    monkeypatch.delenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", raising=False)
    query = PapertrailQueryOperator(task_id="q", module="reports", query="trial_balance", papertrail_conn_id="nope")
    extract = PapertrailExtractOperator(task_id="e", module="bank", query="bank_list", destination="/x/{{ ds }}.jsonl")
    assert query.papertrail_conn_id == "nope" and extract.papertrail_conn_id == "papertrail_default"
    assert set(PapertrailQueryOperator.template_fields) == {
        "module",
        "query",
        "system",
        "query_params",
        "payload",
        "papertrail_conn_id",
    }
    assert set(PapertrailExtractOperator.template_fields) == {
        "module",
        "query",
        "destination",
        "system",
        "query_params",
        "papertrail_conn_id",
        "records_path",
    }


def test_literal_module_and_query_are_checked_at_parse_time_templated_ones_later():
    with pytest.raises(PapertrailConfigurationError, match="valid queries of 'bank'"):
        PapertrailQueryOperator(task_id="q", module="bank", query="list_banks")
    with pytest.raises(PapertrailConfigurationError, match="unknown Papertrail-ai module"):
        PapertrailExtractOperator(task_id="e", module="payroll", query="list_payslips", destination="/x")
    PapertrailQueryOperator(task_id="t", module="{{ params.module }}", query="list_banks")  # not judged yet
    PapertrailQueryOperator(task_id="u", module="customers", query="list_payments", allow_unknown=True)


def test_query_operator_returns_the_json_answer(emulator, connected):
    op = PapertrailQueryOperator(
        task_id="q",
        module="reports",
        query="trial_balance",
        query_params={"from_date": "2024-04-01"},
        papertrail_conn_id=CONN_ID,
    )
    result = op.execute(_context())
    assert result["data"]["from_date"] == "2024-04-01" and result["data"]["totals"]["debit"] == "2000.00"
    json.dumps(result)  # XCom-serialisable as is


def test_write_idempotency_key_is_stable_per_task_instance_and_payload(emulator, connected):
    def run(run_id: str, payload: dict, try_number: int = 1) -> str:
        op = PapertrailQueryOperator(
            task_id="t", module="customers", query="create_invoice", payload=payload, papertrail_conn_id=CONN_ID
        )
        op.execute(_context(run_id, try_number))
        return emulator.writes[-1]["idempotency_key"]

    first = run("r1", {"amount": "1.00"})
    assert run("r1", {"amount": "1.00"}, try_number=2) == first  # a retry: same key, the server can dedupe
    assert run("r2", {"amount": "1.00"}) != first
    assert run("r1", {"amount": "2.00"}) != first


def test_lost_write_fails_without_retry(emulator, connected):
    emulator.inject("api", drop_after_processing=True)
    op = PapertrailQueryOperator(
        task_id="t", module="vendors", query="create_invoice", payload={"amount": "9.99"}, papertrail_conn_id=CONN_ID
    )
    with pytest.raises(AirflowFailException, match="NOT retried"):
        op.execute(_context())
    assert len(emulator.writes) == 1 and emulator.stats["api_requests"] == 1


def test_answers_too_large_for_xcom_are_refused_with_the_alternative(emulator, connected):
    op = PapertrailQueryOperator(
        task_id="q",
        module="bank",
        query="bank_list",
        query_params={"count": 100},
        max_xcom_bytes=10_000,
        papertrail_conn_id=CONN_ID,
    )
    with pytest.raises(AirflowFailException, match="PapertrailExtractOperator") as err:
        op.execute(_context())
    assert "bytes of JSON" in str(err.value)  # measured exactly (the body is under 8x the limit)
    big = PapertrailQueryOperator(
        task_id="q",
        module="bank",
        query="bank_list",
        query_params={"count": 5000},
        max_xcom_bytes=10_000,
        papertrail_conn_id=CONN_ID,
    )
    with pytest.raises(AirflowFailException, match="more than 80000 bytes"):
        big.execute(_context())  # stopped while reading, never held whole


def test_query_params_that_rendered_to_a_string_are_explained(connected):
    op = PapertrailQueryOperator(
        task_id="q", module="company", query="users", query_params="{'count': 3}", papertrail_conn_id=CONN_ID
    )
    with pytest.raises(AirflowFailException, match="render_template_as_native_obj"):
        op.execute(_context())


def test_extract_operator_returns_only_the_summary(emulator, connected, tmp_path):
    destination = tmp_path / "2024-05-01" / "customers__list_customers.jsonl"
    op = PapertrailExtractOperator(
        task_id="e",
        module="customers",
        query="list_customers",
        destination=str(destination),
        query_params={"count": 42},
        papertrail_conn_id=CONN_ID,
    )
    result = op.execute(_context())
    assert result == {"path": str(destination), "records": 42, "bytes": destination.stat().st_size}
    assert len(destination.read_text().splitlines()) == 42


def test_configuration_errors_fail_without_retry(emulator, connected, monkeypatch, tmp_path):
    conn = json.loads(os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"])
    conn["extra"].pop("system")
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    op = PapertrailExtractOperator(
        task_id="e", module="bank", query="bank_list", destination=str(tmp_path / "x"), papertrail_conn_id=CONN_ID
    )
    with pytest.raises(AirflowFailException, match="system is required"):
        op.execute(_context())
    assert emulator.stats["api_requests"] == 0
