"""Issue 13: a 2xx answer is not a success until its body says so, numbers stay exact,
writes are never sent twice, and refusals an Airflow retry would only repeat fail at once.

Every test here runs against the real emulator on 127.0.0.1 (faults injected with
``emulator.inject``); each failed on the code before issue 13 (see the closing note).
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_papertrail.api.client import DataClient, PapertrailApiError, TransientApiError
from airflow_papertrail.exceptions import AnswerRefused, WriteAnswerUnreadable
from airflow_papertrail.operators.query import PapertrailExtractOperator, PapertrailQueryOperator
from tests.unit.api.test_query_operators import CONN_ID, _context
from tests.unit.api.test_query_operators import connected as _connected_fixture

connected = _connected_fixture  # the same fixture: a papertrail connection to the emulator

ERROR_BODIES = [
    {"error": "invalid_token", "message": "The access token expired"},
    {"status": "error", "data": None},
    {"success": False, "message": "Xero is not connected"},
    {"status": "ok", "errors": [{"message": "account 4000 is archived"}], "data": []},
    {"ok": False, "data": [{"id": 1}]},
    {"status": "partial", "data": [{"id": 1}]},
    {"status": 500, "data": []},
]

PAGED_BODIES = [
    ({"count": 5, "data": [{"id": 1}, {"id": 2}]}, "'count' is 5 but 2 records arrived"),
    ({"total": 3, "data": [{"id": 1}]}, "'total' is 3"),
    ({"data": [{"id": 1}], "next_page": "https://example.invalid/p2"}, "'next_page' is set"),
    ({"data": [{"id": 1}], "nextPageToken": "abc"}, "'next_page_token' is set"),
    ({"data": [{"id": 1}], "has_more": True}, "'has_more' is true"),
    ({"data": [{"id": 1}], "links": {"next": {"href": "/p2"}}}, "'links.next' is set"),
    ({"data": [{"id": 1}], "meta": {"page": 1, "total_pages": 4}}, "'meta.total_pages' is 4 and this is page 1"),
]

NOT_PAGED = [
    {"count": 2, "data": [{"id": 1}, {"id": 2}]},
    {"data": [{"id": 1}], "next_page": None, "has_more": False, "cursor": ""},
    {"data": [{"id": 1}], "meta": {"page": 2, "total_pages": 2}},
]


def _read(client, call, tmp_path):
    if call == "query":
        return client.query("bank", "bank_list")
    if call == "extract":
        return client.extract("bank", "bank_list", tmp_path / "bank.jsonl")
    return list(client.iter_records("bank", "bank_list"))


# -- 1. an error or partial answer is never a success -------------------------------------
@pytest.mark.parametrize("body", ERROR_BODIES)
def test_a_200_whose_body_is_an_error_fails_every_read_path(emulator, client, tmp_path, body):
    for call in ("query", "extract", "iter"):
        emulator.inject("api", status=200, body=body)
        with pytest.raises(AnswerRefused, match="body reports an error") as info:
            _read(client, call, tmp_path)
        assert info.value.error == "error_envelope" and info.value.status == 200
    assert list(tmp_path.iterdir()) == []  # nothing published, no temporary leftovers


def test_the_service_message_is_quoted_and_sanitised(emulator, client):
    emulator.inject("api", status=200, body={"error": {"code": "E42", "message": "Xero said no"}})
    with pytest.raises(AnswerRefused, match="Xero said no"):
        client.query("bank", "bank_list")
    emulator.inject("api", status=200, body={"error": "invalid_token", "message": "token " + "A" * 40})
    with pytest.raises(AnswerRefused) as info:
        client.query("bank", "bank_list")
    assert "A" * 40 not in str(info.value) and "[redacted]" in str(info.value)


def test_a_write_whose_200_reports_an_error_fails_and_is_sent_once(emulator, client):
    emulator.inject("api", status=200, body={"success": False, "message": "duplicate reference"})
    with pytest.raises(AnswerRefused, match="NOT retried") as info:
        client.query("customers", "create_customer", payload={"name": "Acme"})
    assert "duplicate reference" in str(info.value)
    assert emulator.stats["api_requests"] == 1


@pytest.mark.parametrize(("body", "why"), PAGED_BODIES)
def test_an_answer_that_announces_more_records_is_refused(emulator, client, tmp_path, body, why):
    for call in ("query", "extract", "iter"):
        emulator.inject("api", status=200, body=body)
        with pytest.raises(AnswerRefused, match="is paged") as info:
            _read(client, call, tmp_path)
        assert why in str(info.value) and info.value.error == "paged_answer"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("body", NOT_PAGED)
def test_complete_answers_with_paging_members_pass(emulator, client, tmp_path, body):
    emulator.inject("api", status=200, body=body)
    result = client.extract("bank", "bank_list", tmp_path / "bank.jsonl")
    assert result["records"] == len(body["data"])


def test_ignore_members_lets_an_amount_named_total_through(emulator, client):
    body = {"data": [{"id": 1, "amount": "10.00"}], "total": 1000}
    emulator.inject("api", status=200, body=body)
    with pytest.raises(AnswerRefused, match="'total' is 1000"):
        client.query("bank", "bank_list")
    emulator.inject("api", status=200, body=body)
    assert client.query("bank", "bank_list", ignore_members=["total"])["total"] == 1000


def test_records_elsewhere_are_refused_then_read_with_records_path(emulator, client, tmp_path):
    body = {"Status": "OK", "Invoices": [{"InvoiceID": "a", "Total": 1150.00}, {"InvoiceID": "b", "Total": 2.5}]}
    emulator.inject("api", status=200, body=json.dumps(body).replace("1150.0", "1150.00"))
    with pytest.raises(AnswerRefused, match="records_path='Invoices'") as info:
        client.extract("customers", "list_invoices", tmp_path / "inv.jsonl")
    assert info.value.error == "records_not_found" and list(tmp_path.iterdir()) == []

    emulator.inject("api", status=200, body=json.dumps(body).replace("1150.0", "1150.00"))
    result = client.extract("customers", "list_invoices", tmp_path / "inv.jsonl", records_path="Invoices")
    lines = (tmp_path / "inv.jsonl").read_text().splitlines()
    assert result["records"] == 2 and lines == [
        '{"InvoiceID": "a", "Total": 1150.00}',
        '{"InvoiceID": "b", "Total": 2.5}',
    ]

    emulator.inject("api", status=200, body=body)
    assert [r["InvoiceID"] for r in client.iter_records("customers", "list_invoices", records_path="Invoices")] == [
        "a",
        "b",
    ]


# -- 2. numbers and text exactly as the service sent them ---------------------------------
EXACT_BODY = (
    '{"status": "ok", "data": [\n'
    '  {"id": "é-1", "amount": 1150.00, "big": 12345678901234567.89, "huge": 1e400, "tiny": 1E-7,\n'
    '   "neg": -0.0, "n": 100000000000000000001, "s": "line\\u2028sep \\"q\\" \\ud83d\\ude00 😀"},\n'
    '  {"id": 2, "nested": {"data": [1, 2]}}\n'
    "]}"
)


def test_extract_writes_each_record_byte_for_byte(emulator, client, tmp_path):
    emulator.inject("api", status=200, body=EXACT_BODY)
    client.extract("bank", "bank_list", tmp_path / "exact.jsonl")
    lines = (tmp_path / "exact.jsonl").read_bytes().decode("utf-8").split("\n")
    assert lines == [
        '{"id": "é-1", "amount": 1150.00, "big": 12345678901234567.89, "huge": 1e400, "tiny": 1E-7,    "neg": -0.0, '
        '"n": 100000000000000000001, "s": "line\\u2028sep \\"q\\" \\ud83d\\ude00 😀"}',
        '{"id": 2, "nested": {"data": [1, 2]}}',
        "",
    ]


def test_query_and_iter_records_keep_amounts_exact(emulator, client):
    emulator.inject("api", status=200, body=EXACT_BODY)
    record = client.query("bank", "bank_list")["data"][0]
    assert record["amount"] == Decimal("1150.00") and str(record["amount"]) == "1150.00"
    assert record["big"] == Decimal("12345678901234567.89") and record["huge"] == Decimal("1e400")
    assert record["n"] == 100000000000000000001 and record["id"] == "é-1"
    emulator.inject("api", status=200, body=EXACT_BODY)
    first = next(iter(client.iter_records("bank", "bank_list")))
    assert first["big"] == Decimal("12345678901234567.89")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_constants_are_refused_everywhere(emulator, client, tmp_path, constant):
    body = '{"data": [{"id": 1, "amount": ' + constant + "}]}"
    for call in ("query", "extract", "iter"):
        emulator.inject("api", status=200, body=body)
        with pytest.raises(PapertrailApiError, match=constant.lstrip("-")):
            _read(client, call, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_query_operator_xcom_keeps_the_text_of_amounts(emulator, connected):
    emulator.inject("api", status=200, body=EXACT_BODY)
    op = PapertrailQueryOperator(task_id="q", module="bank", query="bank_list", papertrail_conn_id=CONN_ID)
    record = op.execute(_context())["data"][0]
    assert record["amount"] == "1150.00" and record["big"] == "12345678901234567.89" and record["huge"] == "1e400"
    assert record["n"] == 100000000000000000001 and record["id"] == "é-1"
    json.dumps(record)  # what XCom stores: plain JSON, nothing Airflow's serde would turn into a float


# -- 4. writes are never sent twice ----------------------------------------------------------
@pytest.mark.parametrize(
    "body", ['<b>Notice</b>: Undefined index in x.php {"status":"ok"}', "\xff\xfe not utf-8", '{"id": NaN}']
)
def test_a_write_with_an_unreadable_2xx_is_done_and_never_resent(emulator, client, body):
    emulator.inject("api", status=201, body=body.encode("latin-1"), after_processing=True)
    with pytest.raises(WriteAnswerUnreadable, match=r"was DONE .* NOT retried and must not be sent again"):
        client.query("customers", "create_customer", payload={"name": "Acme"})
    assert len(emulator.writes) == 1 and emulator.stats["api_requests"] == 1


def test_query_operator_fails_an_unreadable_write_without_airflow_retry(emulator, connected):
    emulator.inject("api", status=200, body=b"<html>ok</html>", after_processing=True)
    op = PapertrailQueryOperator(
        task_id="w", module="customers", query="create_customer", payload={"name": "Acme"}, papertrail_conn_id=CONN_ID
    )
    with pytest.raises(AirflowFailException, match="DONE"):
        op.execute(_context())
    assert len(emulator.writes) == 1


def test_a_large_write_answer_is_truncated_in_xcom_not_refused(emulator, connected):
    op = PapertrailQueryOperator(
        task_id="w",
        module="customers",
        query="create_customer",
        payload={"name": "Acme", "notes": "x" * 5000},
        papertrail_conn_id=CONN_ID,
        max_xcom_bytes=1000,
    )
    result = op.execute(_context())
    assert result["papertrail_truncated"] is True and result["bytes"] > 5000
    assert len(json.dumps(result)) <= 1000 and result["head"].startswith('{"status":"ok"')
    assert len(emulator.writes) == 1


def test_a_large_read_answer_is_still_refused(emulator, connected):
    op = PapertrailQueryOperator(
        task_id="r", module="bank", query="bank_list", query_params={"count": 50}, papertrail_conn_id=CONN_ID
    )
    op.max_xcom_bytes = 1000
    with pytest.raises(AirflowFailException, match="max_xcom_bytes"):
        op.execute(_context())


# -- 6. templated values keep their types -----------------------------------------------------
def test_json_text_query_params_and_payload_keep_their_text(emulator, connected):
    op = PapertrailQueryOperator(
        task_id="q",
        module="reports",
        query="trial_balance",
        query_params='{"from_date": "2024-04-01", "limit": 200, "min_amount": 1150.00, "posted": true}',
        papertrail_conn_id=CONN_ID,
    )
    op.execute(_context())
    seen = emulator.api_params[-1]
    assert (seen["from_date"], seen["limit"], seen["min_amount"], seen["posted"]) == (
        "2024-04-01",
        "200",
        "1150.00",
        "true",
    )

    text = '{"name": "Acme", "amount": 1150.00, "ref": "200", "big": 12345678901234567.89}'
    write = PapertrailQueryOperator(
        task_id="w", module="customers", query="create_customer", payload=text, papertrail_conn_id=CONN_ID
    )
    write.execute(_context())
    assert emulator.writes[-1]["body"] == text  # byte for byte


def test_dict_payloads_with_decimals_are_sent_exactly(emulator, client):
    client.query("customers", "create_customer", payload={"name": "Acme", "amount": Decimal("1150.00")})
    assert emulator.writes[-1]["body"] == '{"name":"Acme","amount":1150.00}'
    with pytest.raises(Exception, match="not a JSON number"):
        client.query("customers", "create_customer", payload={"amount": Decimal("NaN")})


@pytest.mark.parametrize("value", ["not json", "[1, 2]", '{"a": NaN}', "{{ params.x }}"])
def test_query_params_that_are_not_a_json_object_fail_with_the_template_hint(emulator, connected, value):
    op = PapertrailQueryOperator(
        task_id="q", module="reports", query="trial_balance", query_params=value, papertrail_conn_id=CONN_ID
    )
    with pytest.raises(AirflowFailException, match=r"\| tojson"):
        op.execute(_context())
    assert emulator.stats["api_requests"] == 0


# -- 7. refusals an Airflow retry would only repeat ------------------------------------------
@pytest.mark.parametrize("status", [400, 403, 404, 405, 409, 413, 422])
def test_4xx_other_than_401_and_429_fail_without_airflow_retry(emulator, connected, tmp_path, status):
    emulator.inject("api", status=status, times=2)
    query = PapertrailQueryOperator(task_id="q", module="bank", query="bank_list", papertrail_conn_id=CONN_ID)
    with pytest.raises(AirflowFailException, match=f"HTTP {status}"):
        query.execute(_context())
    extract = PapertrailExtractOperator(
        task_id="e", module="bank", query="bank_list", destination=str(tmp_path / "b.jsonl"), papertrail_conn_id=CONN_ID
    )
    with pytest.raises(AirflowFailException, match=f"HTTP {status}"):
        extract.execute(_context())


def test_429_and_5xx_and_error_envelopes_on_reads_keep_airflow_retries(emulator, connected, tmp_path):
    emulator.inject("api", retry_after=120)
    op = PapertrailQueryOperator(task_id="q", module="bank", query="bank_list", papertrail_conn_id=CONN_ID)
    with pytest.raises(TransientApiError):
        op.execute(_context())
    emulator.inject("api", status=200, body={"status": "error", "message": "upstream busy"})
    with pytest.raises(AnswerRefused) as info:
        op.execute(_context())
    assert not isinstance(info.value, AirflowFailException)
    emulator.inject("api", status=200, body={"data": [{"id": 1}], "has_more": True})
    extract = PapertrailExtractOperator(
        task_id="e", module="bank", query="bank_list", destination=str(tmp_path / "b.jsonl"), papertrail_conn_id=CONN_ID
    )
    with pytest.raises(AirflowFailException, match="is paged"):
        extract.execute(_context())


def test_data_client_is_usable_without_airflow_context(emulator, tokens):
    """The framework-free client: same checks with any token callable."""
    c = DataClient(api_url=emulator.base_url + "/api", default_system="xero", token_provider=tokens)
    emulator.inject("api", status=200, body={"success": False})
    with pytest.raises(AnswerRefused):
        c.query("bank", "bank_list")
    c.close()


# -- found by review (each failed before its fix) --------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {"status": "ok", "module": "bank", "query": "bank_list", "count": 0},
        {"status": "ok", "count": 250},
        {},
    ],
)
def test_a_list_answer_without_its_records_member_is_refused_not_written_as_one_record(
    emulator, client, tmp_path, body
):
    for call in ("extract", "iter"):
        emulator.inject("api", status=200, body=body)
        with pytest.raises(AnswerRefused, match="has no 'data' member") as info:
            _read(client, call, tmp_path)
        assert info.value.error == "records_not_found"
    assert list(tmp_path.iterdir()) == []


def test_a_single_object_answer_of_a_report_is_still_one_record(emulator, client, tmp_path):
    emulator.inject("api", status=200, body={"assets": {"total": "10.00"}, "status": "ok", "count": 7})
    assert client.extract("reports", "balance_sheet", tmp_path / "b.jsonl")["records"] == 1
    emulator.inject("api", status=200, body={"id": "INV-1", "status": "authorised", "total": 1150})
    assert client.extract("customers", "invoice_detail", tmp_path / "i.jsonl")["records"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {"success": 0, "data": []},
        {"success": "false", "data": []},
        {"result": "error", "data": []},
        {"statusCode": 500, "data": []},
        {"status": "401", "data": []},
        {"meta": {"error": "invalid_token"}, "data": []},
        {"error_code": 401, "error_message": "Invalid token"},
    ],
)
def test_php_shaped_error_envelopes_are_refused(emulator, client, tmp_path, body):
    emulator.inject("api", status=200, body=body)
    with pytest.raises(AnswerRefused, match="body reports an error"):
        client.extract("bank", "bank_list", tmp_path / "b.jsonl")


@pytest.mark.parametrize(
    "body",
    [
        {"total": "3", "data": [{"id": 1}]},
        {"has_more": "true", "data": [{"id": 1}]},
        {"has_more": 1, "data": [{"id": 1}]},
        {"total_pages": "4", "page": "1", "data": [{"id": 1}]},
        {"count": 3.0, "data": [{"id": 1}]},
        {"links": [{"rel": "next", "href": "/p2"}], "data": [{"id": 1}]},
    ],
)
def test_php_shaped_paging_hints_are_refused(emulator, client, tmp_path, body):
    emulator.inject("api", status=200, body=body)
    with pytest.raises(AnswerRefused, match="is paged"):
        client.extract("bank", "bank_list", tmp_path / "b.jsonl")


@pytest.mark.parametrize(
    "body",
    [
        {"status": "created", "data": {"id": "C-1"}},
        {"id": "SI-9", "status": "draft"},
        {"status": 1, "data": {"id": "C-2"}},
    ],
)
def test_a_write_answer_with_a_records_own_status_is_a_success(emulator, client, body):
    emulator.inject("api", status=201, body=body, after_processing=True)
    assert client.query("customers", "create_customer", payload={"name": "Acme"}) is not None
    assert len(emulator.writes) == 1


def test_paging_checks_skip_a_report_object_and_null_data(emulator, client, tmp_path):
    for body, expected in (
        ({"status": "ok", "total": 1150, "data": {"account": "x"}}, 1),
        ({"count": 2, "data": None}, 0),
    ):
        emulator.inject("api", status=200, body=body)
        assert client.extract("reports", "trial_balance", tmp_path / "r.jsonl")["records"] == expected
        emulator.inject("api", status=200, body=body)
        assert len(list(client.iter_records("reports", "trial_balance"))) == expected


@pytest.mark.parametrize(
    "answer",
    ['{"data": ' + "[" * 100000 + "]" * 100000 + "}", '{"data": {"fx": 1e1000000000000000000}}'],
    ids=["deeply-nested", "huge-exponent"],
)
def test_any_unreadable_2xx_write_answer_is_done_never_retryable(emulator, client, connected, answer):
    emulator.inject("api", status=201, body=answer, after_processing=True)
    with pytest.raises(WriteAnswerUnreadable, match="was DONE"):
        client.query("customers", "create_customer", payload={"name": "Acme"})
    emulator.inject("api", status=201, body=answer, after_processing=True)
    op = PapertrailQueryOperator(
        task_id="w", module="customers", query="create_customer", payload={"name": "Acme"}, papertrail_conn_id=CONN_ID
    )
    if "fx" in answer:  # the operator keeps numbers as text: the huge exponent is just "1e1000000000000000000"
        assert op.execute(_context())["data"]["fx"] == "1e1000000000000000000"
    else:
        with pytest.raises(AirflowFailException, match="was DONE"):
            op.execute(_context())
    assert len(emulator.writes) == 2  # one per call, none resent


def test_numbers_beyond_python_limits_fail_clearly_in_object_mode_and_pass_raw(emulator, client, tmp_path):
    big = "1" * 5000
    body = '{"data": [{"id": 1}, {"n": ' + big + '}, {"fx": 1e1000000000000000000}, {"id": 3}]}'
    emulator.inject("api", status=200, body=body)
    assert client.extract("bank", "bank_list", tmp_path / "b.jsonl")["records"] == 4
    assert (tmp_path / "b.jsonl").read_text().splitlines()[1] == '{"n": ' + big + "}"
    emulator.inject("api", status=200, body=body)
    with pytest.raises(PapertrailApiError, match="cannot be read exactly"):
        list(client.iter_records("bank", "bank_list"))


def test_a_token_in_bad_query_params_is_not_echoed(emulator, connected):
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl"
    op = PapertrailQueryOperator(
        task_id="q",
        module="reports",
        query="trial_balance",
        query_params="{'access_token': '" + token + "'}",
        papertrail_conn_id=CONN_ID,
    )
    with pytest.raises(AirflowFailException) as info:
        op.execute(_context())
    assert token not in str(info.value)


def test_ignore_members_reaches_nested_paging_members(emulator, client):
    body = {"data": [{"id": 1}], "meta": {"total": 1150}}
    emulator.inject("api", status=200, body=body)
    with pytest.raises(AnswerRefused, match=r"'meta\.total' is 1150"):
        client.query("bank", "bank_list")
    emulator.inject("api", status=200, body=body)
    assert client.query("bank", "bank_list", ignore_members=["total"])["meta"] == {"total": 1150}
