"""The incremental record parser: same records as json.loads, whatever the chunking.

Floats are compared with ``json.loads(..., parse_float=Decimal)``: object mode parses them
as :class:`decimal.Decimal` (see test_jsonstream_exact.py for raw mode and the strict oracle).
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_papertrail.api.jsonstream import JsonStreamError, RecordStream, iter_records


def feed_all(body: bytes, cuts: list[int] | None = None, **kwargs) -> tuple[list, RecordStream]:
    stream = RecordStream(**kwargs)
    out: list = []
    points = sorted(set(cuts or []))
    start = 0
    for point in [*points, len(body)]:
        out.extend(stream.feed(body[start:point]))
        start = point
    out.extend(stream.close())
    return out, stream


def bytewise(body: bytes) -> list:
    return feed_all(body, list(range(len(body))))[0]


# Strings built to break naive scanners: brackets, quotes, escapes, separators, unicode.
TEXT = st.text(alphabet=st.sampled_from(list('"\\[]{},: \n\t\x00\u2028éau0€😀')), max_size=8)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
RECORDS = st.lists(st.dictionaries(TEXT, VALUES, max_size=5), max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=RECORDS,
    top_level_array=st.booleans(),
    indent=st.sampled_from([None, 0, 2, "\t"]),
    ensure_ascii=st.booleans(),
    before=st.dictionaries(st.sampled_from(["status", "count", "x]"]), VALUES, max_size=2),
    after=st.dictionaries(st.sampled_from(["next", "meta"]), VALUES, max_size=2),
    data=st.data(),
)
def test_same_records_as_json_loads_for_any_chunking(
    records, top_level_array, indent, ensure_ascii, before, after, data
):
    if top_level_array:
        document = records
    else:
        document = {**before, "data": records, **after}
    body = json.dumps(document, indent=indent, ensure_ascii=ensure_ascii).encode("utf-8")
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=40))
    expected = json.loads(body, parse_float=Decimal)
    got, stream = feed_all(body, cuts)
    assert got == (expected if top_level_array else expected["data"])
    assert stream.records == len(records)
    if not top_level_array:
        assert stream.envelope == {k: v for k, v in expected.items() if k != "data"}


def test_byte_by_byte_with_multibyte_characters_and_escapes():
    records = [{"name": "Café ☕ 😀", "memo": 'he said "]}," \\ ok', "n": -12.5e-3}, {"x": [1, [2, {"y": "]"}]]}]
    body = json.dumps({"status": "ok", "data": records}, ensure_ascii=False).encode("utf-8")
    assert bytewise(body) == json.loads(body, parse_float=Decimal)["data"]
    assert bytewise(body)[0]["n"] == Decimal("-0.0125")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"data": {"net_profit": "1.00"}}', [{"net_profit": "1.00"}]),  # a report: one record
        ('{"status": "ok", "data": null}', []),
        ('{"data": "done"}', ["done"]),
        ('{"data": []}', []),
        ("[]", []),
        ('{"status": "ok", "id": 7}', [{"status": "ok", "id": 7}]),  # no data member: the object
        ('{"status": "ok", "meta": {"pages": [1]}}', [{"status": "ok", "meta": {"pages": [1]}}]),
        ("{}", [{}]),
        ("\ufeff[1]", [1]),  # byte order mark
        ("  \n[ 1 ,\t2 ]\n ", [1, 2]),
    ],
)
def test_shapes_other_than_a_data_array(body, expected):
    assert feed_all(body.encode())[0] == expected
    assert bytewise(body.encode()) == expected


def test_a_number_split_across_chunks_is_not_cut_short():
    assert feed_all(b"[12345,678]", [3, 8])[0] == [12345, 678]
    assert feed_all(b"[-0.25]", [2, 3, 4, 5])[0] == [Decimal("-0.25")]
    numbers = [1.5e10, -0.25, 12345, 1e-07, 0, -3, 2.5e-300, 10**30]
    for body in (json.dumps(numbers), json.dumps({"data": numbers, "count": 8}), json.dumps({"data": 1.25e3})):
        expected = json.loads(body, parse_float=Decimal)
        assert bytewise(body.encode()) == (
            expected
            if isinstance(expected, list)
            else [expected["data"]]
            if not isinstance(expected["data"], list)
            else expected["data"]
        )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "the body is empty"),
        (b"   ", "the body is empty"),
        (b"42", "expected a JSON object or array"),
        (b"[1,]", "trailing comma"),
        (b"[1 2]", "expected ',' or ']'"),
        (b'{"data": [1, 2]', "ended before the JSON document was complete"),
        (b'[{"a": "unterminated', "ended inside a JSON value"),
        (b"[1]x", "unexpected data after the end"),
        (b'{"data": [1], "data": [2]}', "appears twice"),
        (b'{"a" 1}', "expected ':'"),
        (b"{1: 2}", "member name in double quotes"),
        (b"[nul]", "malformed JSON"),
        (b'[{"a": 1}}]', "expected ',' or ']'"),
        (b"[\xff]", "not valid UTF-8"),
        (b'["\xc3', "UTF-8"),
        (b'["a\x01b"]', "Invalid control character"),
    ],
)
def test_malformed_input_raises_a_clear_error(body, message):
    for cuts in ([], list(range(len(body)))):
        with pytest.raises(JsonStreamError, match=message) as err:
            feed_all(body, cuts)
        assert err.value.position is not None and 0 <= err.value.position <= len(body)


def test_malformed_record_fails_before_the_rest_arrives():
    stream = RecordStream()
    assert stream.feed(b'[{"a": 1}, ') == [{"a": 1}]
    # garbage far from the end of the buffer cannot be a record that is still arriving
    with pytest.raises(JsonStreamError, match="malformed JSON"):
        stream.feed(b"@@@ " + b" " * 100 + b'{"b": 2}')


def test_a_huge_record_is_rescanned_only_logarithmically_often():
    big = {"blob": "x" * 2_000_000, "tail": "]}"}
    body = json.dumps([big, {"small": 1}]).encode()
    stream = RecordStream()
    calls = 0
    scan = stream._scan

    def counting(text, pos):
        nonlocal calls
        calls += 1
        return scan(text, pos)

    stream._scan = counting
    out = []
    for i in range(0, len(body), 1024):  # ~2000 chunks
        out.extend(stream.feed(body[i : i + 1024]))
    out.extend(stream.close())
    assert out == [big, {"small": 1}]
    assert calls < 40, calls


def test_a_record_larger_than_the_limit_is_refused():
    stream = RecordStream(max_record_chars=1000)
    stream.feed(b'[{"a": "')
    for _ in range(9):
        stream.feed(b"y" * 100)
    with pytest.raises(JsonStreamError, match="larger than 1000 characters"):
        stream.feed(b"y" * 100)


def test_feed_after_close_is_an_error_and_iter_records_checks_completeness():
    stream = RecordStream()
    stream.feed(b"[1]")
    assert stream.close() == [] and stream.done
    with pytest.raises(JsonStreamError, match="after close"):
        stream.feed(b"[2]")
    assert list(iter_records([b'{"data":[', b"1,2", b"]}"])) == [1, 2]
    with pytest.raises(JsonStreamError):
        list(iter_records([b'{"data":[', b"1,2"]))
