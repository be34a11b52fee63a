"""DataClient against the shipped emulator over real HTTP on 127.0.0.1: every documented
query, retry rules for reads and writes, the 401 refresh-once rule, error messages."""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from airflow_papertrail.api.client import DataClient, PapertrailApiError, TransientApiError, WriteOutcomeUnknown
from airflow_papertrail.api.modules import MODULES, is_write
from airflow_papertrail.exceptions import PapertrailConfigurationError, ReauthorizationRequired
from airflow_papertrail.testing.emulator import DEFAULT_LIST_COUNT, SYSTEMS
from tests.unit.api.support import FAST, Recorder, TokenSource, data_client
from tests.waiting import wait_until

LIST_QUERIES = {
    ("bank", "bank_list"),
    ("bank", "bank_accounts_list"),
    ("customers", "list_customers"),
    ("customers", "list_invoices"),
    ("vendors", "list_vendors"),
    ("vendors", "list_invoices"),
    ("gl", "list_gl_transaction"),
    ("gl", "list_gl_accounts"),
    ("company", "users"),
}


def _no_secret_in(text: str, tokens: TokenSource) -> None:
    for value in (tokens.token.access_token, tokens.token.refresh_token):
        assert value and value not in text


# -- every documented query ------------------------------------------------------------------
@pytest.mark.parametrize(("module", "query"), [(m, q) for m, qs in MODULES.items() for q in qs])
def test_every_documented_query_works(emulator, tokens, module, query):
    recorder = Recorder()
    client = data_client(emulator, tokens, session_factory=recorder)
    payload = {"name": "Acme Ltd", "amount": "10.00"} if is_write(query) else None
    answer = client.query(module, query, payload=payload)
    assert answer["status"] == "ok" and answer["module"] == module and answer["query"] == query
    assert answer["system"] == "xero"
    (request,) = recorder.requests
    assert request.url.startswith(f"{emulator.base_url}/api/api_{module}.php?")
    assert f"query={query}" in request.url and "system=xero" in request.url
    assert tokens.token.access_token not in request.url
    assert request.headers["Authorization"] == f"Bearer {tokens.token.access_token}"
    if is_write(query):
        assert request.method == "POST" and request.headers["Content-Type"] == "application/json"
        (write,) = emulator.writes
        assert write["payload"] == payload and write["query"] == query
        assert write["idempotency_key"] == request.headers["Idempotency-Key"]
        uuid.UUID(write["idempotency_key"])  # a UUID
        assert answer["data"]["id"]
    else:
        assert request.method == "GET" and "Idempotency-Key" not in request.headers
        if (module, query) in LIST_QUERIES:
            assert len(answer["data"]) == DEFAULT_LIST_COUNT
        else:
            assert isinstance(answer["data"], dict) and answer["data"]


def test_system_params_and_idempotency_key_are_passed(emulator, tokens):
    recorder = Recorder()
    client = data_client(emulator, tokens, session_factory=recorder)
    answer = client.query("reports", "trial_balance", system="quickbooks", params={"from_date": "2024-04-01"})
    assert answer["system"] == "quickbooks" and answer["data"]["from_date"] == "2024-04-01"
    assert answer["data"]["currency"] == "USD"
    client.query("customers", "create_customer", payload={"name": "A"}, idempotency_key="order-42")
    assert emulator.writes[0]["idempotency_key"] == "order-42"
    assert [r.method for r in recorder.requests] == ["GET", "POST"]
    assert "system=quickbooks" in recorder.requests[0].url


def test_query_params_are_validated(client):
    with pytest.raises(PapertrailConfigurationError, match="system/query arguments"):
        client.query("bank", "bank_list", params={"query": "x"})
    with pytest.raises(PapertrailConfigurationError, match="tokens never travel in the URL"):
        client.query("bank", "bank_list", params={"access_token": "x"})
    with pytest.raises(PapertrailConfigurationError, match="string, number or boolean"):
        client.query("bank", "bank_list", params={"filter": {"a": 1}})


def test_bool_and_none_params(emulator, tokens):
    recorder = Recorder()
    client = data_client(emulator, tokens, session_factory=recorder)
    client.query("company", "co_details", params={"archived": False, "page": None, "limit": 5})
    url = recorder.requests[0].url
    assert "archived=false" in url and "limit=5" in url and "page" not in url


def test_system_is_required(emulator, tokens):
    client = DataClient(api_url=emulator.base_url + "/api", default_system=None, token_provider=tokens)
    with pytest.raises(PapertrailConfigurationError, match="system is required"):
        client.query("bank", "bank_list")
    assert emulator.stats["api_requests"] == 0


@pytest.mark.parametrize(
    ("query", "payload", "message"),
    [
        ("bank_list", {"a": 1}, "payload is only for write queries"),
        ("create_invoice", None, "needs a payload"),
        ("create_invoice", "text", "is a string but not valid JSON"),
        ("create_invoice", '"just a string"', "must be a JSON object or array, got JSON str"),
        ("create_invoice", 42, "must be a JSON object"),
        ("create_invoice", {"amount": float("nan")}, "not valid JSON"),
        ("create_invoice", {"when": object()}, "not valid JSON"),
    ],
)
def test_payload_validation(emulator, client, query, payload, message):
    module = "bank" if query == "bank_list" else "customers"
    with pytest.raises(PapertrailConfigurationError, match=message):
        client.query(module, query, payload=payload)
    assert emulator.stats["api_requests"] == 0


def test_unknown_query_with_allow_unknown_is_sent_as_a_write(emulator, tokens):
    recorder = Recorder()
    client = data_client(emulator, tokens, session_factory=recorder)
    with pytest.raises(PapertrailApiError) as err:
        client.query("customers", "list_payments", allow_unknown=True)
    assert recorder.requests[0].method == "POST"
    # the emulator does not know it either: its list of valid queries reaches the message
    assert err.value.status == 400 and err.value.error == "invalid_query"
    assert "list_customers" in str(err.value)


# -- reads: retried -------------------------------------------------------------------------
def test_read_429_honours_retry_after(emulator, client):
    emulator.inject("api", retry_after=1)
    started = time.monotonic()
    answer = client.query("company", "users")
    assert time.monotonic() - started >= 0.9
    assert len(answer["data"]) == DEFAULT_LIST_COUNT
    assert emulator.stats["api_requests"] == 2


def test_read_retry_after_beyond_the_cap_fails_fast_and_quotes_it(emulator, client):
    emulator.inject("api", retry_after=30)
    started = time.monotonic()
    with pytest.raises(TransientApiError, match="asked to wait 30 s") as err:
        client.query("company", "users")
    assert time.monotonic() - started < 5
    assert err.value.status == 429 and emulator.stats["api_requests"] == 1


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500},
        {"status": 502, "body": "<html>Bad gateway</html>"},
        {"status": 503, "retry_after": 0},
        {"drop": True},
        {"drop_after_processing": True},
    ],
)
def test_reads_are_retried_on_5xx_and_lost_answers(emulator, client, fault):
    emulator.inject("api", times=2, **fault)
    answer = client.query("gl", "list_gl_accounts")
    assert len(answer["data"]) == DEFAULT_LIST_COUNT
    assert emulator.stats["api_requests"] == 3


def test_reads_give_up_after_the_policy_total(emulator, client):
    emulator.inject("api", status=503, times=10)
    with pytest.raises(TransientApiError, match="HTTP 503") as err:
        client.query("gl", "list_gl_accounts")
    assert err.value.status == 503
    assert emulator.stats["api_requests"] == FAST.total + 1


def test_iter_records_is_retried_before_the_body_starts(emulator, client):
    emulator.inject("api", drop=True)
    assert len(list(client.iter_records("bank", "bank_list"))) == DEFAULT_LIST_COUNT
    assert emulator.stats["api_requests"] == 2


# -- writes: never replayed once they may have arrived ---------------------------------------
@pytest.mark.parametrize(
    ("fault", "processed"),
    [
        ({"status": 500}, 0),
        ({"status": 502}, 0),
        ({"status": 503}, 0),
        ({"drop": True}, 0),
        ({"drop_after_processing": True}, 1),
    ],
)
def test_writes_are_not_retried_once_they_may_have_arrived(emulator, tokens, client, fault, processed):
    emulator.inject("api", times=5, **fault)
    with pytest.raises(WriteOutcomeUnknown) as err:
        client.query("customers", "create_invoice", payload={"customer_id": "CU-000001", "amount": "120.00"})
    message = str(err.value)
    assert "NOT retried" in message and "duplicate" in message and "accounting system" in message
    assert emulator.stats["api_requests"] == 1
    assert len(emulator.writes) == processed
    _no_secret_in(message, tokens)


def test_write_timeout_is_not_retried_and_the_write_still_happened(emulator, tokens):
    client = data_client(emulator, tokens, timeout=0.5)
    emulator.inject("api", delay=1.5)
    with pytest.raises(WriteOutcomeUnknown, match="NOT retried"):
        client.query("vendors", "create_vendor", payload={"name": "Slow Supplies"})
    # the server finishes the request the client gave up on
    wait_until(lambda: emulator.writes, timeout=5, interval=0.05, message="the write never reached the emulator")
    assert len(emulator.writes) == 1 and emulator.stats["api_requests"] == 1


def test_write_429_was_not_processed_and_says_so(emulator, client):
    emulator.inject("api", retry_after=1)
    with pytest.raises(TransientApiError, match="not processed") as err:
        client.query("customers", "create_customer", payload={"name": "A"})
    assert not isinstance(err.value, WriteOutcomeUnknown)
    assert emulator.stats["api_requests"] == 1 and emulator.writes == []


def test_write_to_a_closed_port_is_retried_because_it_never_left(tokens):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = DataClient(
        api_url=f"http://127.0.0.1:{port}/api", default_system="xero", token_provider=tokens, retry_policy=FAST
    )
    with pytest.raises(TransientApiError, match="not sent; trying again is safe"):
        client.query("customers", "create_customer", payload={"name": "A"})


# -- 401: one forced refresh, one more attempt ----------------------------------------------
def test_401_refreshes_once_and_retries(emulator, tokens, client):
    client.query("company", "co_details")
    assert emulator.expire_access_tokens() == 1
    answer = client.query("company", "co_details")
    assert answer["status"] == "ok"
    assert tokens.calls == [False, False, True]
    assert emulator.stats["refresh_grants"] == 1
    assert emulator.stats["invalid_token_errors"] == 1
    assert emulator.stats["api_requests"] == 3


def test_401_on_a_write_is_safe_to_retry_once(emulator, tokens, client):
    emulator.expire_access_tokens()
    client.query("accounts", "account_create", payload={"code": "4010", "name": "Consulting"})
    assert len(emulator.writes) == 1 and tokens.calls == [False, True]


def test_second_401_asks_for_reauthorization(emulator, tokens):
    calls: list[bool] = []

    def stale(force: bool) -> str:
        calls.append(force)
        return tokens.token.access_token  # the "refreshed" token is refused too

    emulator.expire_access_tokens()
    client = data_client(emulator, stale, conn_id="papertrail_books")
    with pytest.raises(ReauthorizationRequired) as err:
        client.query("company", "co_details")
    assert calls == [False, True]
    assert emulator.stats["api_requests"] == 2
    assert err.value.status == 401 and err.value.error == "invalid_token"
    message = str(err.value)
    assert "papertrail_authorize" in message and "'papertrail_books'" in message
    _no_secret_in(message, tokens)


def test_token_provider_errors_propagate(emulator):
    def dead(force: bool) -> str:
        raise ReauthorizationRequired("pt", "no grant is stored for this connection")

    with pytest.raises(ReauthorizationRequired, match="no grant is stored"):
        data_client(emulator, dead).query("company", "users")
    assert emulator.stats["api_requests"] == 0


# -- refusals and unusable answers ----------------------------------------------------------
def test_invalid_system_is_refused_with_the_valid_list_and_not_retried(emulator, client):
    with pytest.raises(PapertrailApiError) as err:
        client.query("bank", "bank_list", system="lotus123")
    assert err.value.status == 400 and err.value.error == "invalid_system"
    assert all(system in str(err.value) for system in SYSTEMS)
    assert emulator.stats["api_requests"] == 1


def test_unknown_module_404_points_at_api_url(emulator, client):
    with pytest.raises(PapertrailApiError, match="check the connection's api_url") as err:
        client.query("payroll", "list_payslips", allow_unknown=True)
    assert err.value.status == 404


def test_server_descriptions_are_sanitised(emulator, tokens, client):
    echoed = "Bearer " + tokens.token.access_token
    emulator.inject("api", status=403, body={"error": "insufficient_scope", "error_description": echoed})
    with pytest.raises(PapertrailApiError) as err:
        client.query("company", "users")
    message = str(err.value)
    assert "[redacted]" in message and "insufficient_scope" in message and "scope" in message
    _no_secret_in(message, tokens)


def test_non_json_answer(emulator, client):
    emulator.inject("api", status=200, body="<html>maintenance</html>")
    with pytest.raises(PapertrailApiError, match="not JSON") as err:
        client.query("company", "users")
    assert err.value.error == "invalid_response"
    emulator.inject("api", status=200, body="<html>maintenance</html>")
    with pytest.raises(PapertrailApiError, match="not the expected JSON"):
        list(client.iter_records("company", "users"))


def test_max_bytes_stops_a_large_answer(client):
    with pytest.raises(PapertrailApiError, match="larger than 10000 bytes") as err:
        client.query("bank", "bank_list", params={"count": 1000}, max_bytes=10_000)
    assert err.value.error == "response_too_large"


# -- streaming ------------------------------------------------------------------------------
def test_iter_records_streams_lists_and_single_objects(emulator, client):
    records = list(client.iter_records("customers", "list_invoices", params={"count": 1234}))
    assert len(records) == 1234
    assert records[0]["id"] == "SI-000001" and records[-1]["id"] == "SI-001234"
    (report,) = client.iter_records("reports", "balance_sheet")
    assert set(report) >= {"assets", "liabilities", "equity"}
    (company,) = client.iter_records("company", "co_details")
    assert company["system"] == "xero"


def test_iter_records_refuses_writes_at_once_and_sends_unknown_reads_as_get(emulator, tokens):
    recorder = Recorder()
    client = data_client(emulator, tokens, session_factory=recorder)
    with pytest.raises(PapertrailConfigurationError, match="changes data"):
        client.iter_records("customers", "create_invoice")  # no next(): checked at once
    with pytest.raises(PapertrailConfigurationError, match="changes data"):
        client.iter_records("customers", "create_refund", allow_unknown=True)
    with pytest.raises(PapertrailApiError, match="invalid_query"):
        list(client.iter_records("customers", "list_payments", allow_unknown=True))
    assert [r.method for r in recorder.requests] == ["GET"]


def test_early_stop_closes_the_stream(emulator, client):
    it = client.iter_records("gl", "list_gl_transaction", params={"count": 200_000})
    first = next(it)
    it.close()
    assert first["id"] == "GL-000001"
    # the connection was released: the next call works at once
    assert client.query("company", "co_details")["status"] == "ok"
