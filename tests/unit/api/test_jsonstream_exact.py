"""Byte-exact (raw) mode, exact numbers, strictness and linear time (issue 13).

The property tests build bodies as *text* with known record spans (random whitespace,
newlines included, between every token) and compare the stream, on arbitrary chunk
splits, with a strict oracle: ``json.loads(body, parse_constant=<raise>, parse_float=Decimal)``
for validity and values, and the exact slices of the body for raw mode.

Tests marked "fails on the old code" failed against the parser before this change
(C-scanner floats, NaN accepted, re-encoding, per-chunk buffer rebuild); the rest pin
behaviour that already held.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_papertrail.api.jsonstream import JsonStreamError, RecordsNotFound, RecordStream


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _split(body: bytes, cuts: list[int] | None) -> list[bytes]:
    points = sorted(set(cuts or []))
    out, start = [], 0
    for point in [*points, len(body)]:
        out.append(body[start:point])
        start = point
    return out


def run(body: bytes, cuts: list[int] | None = None, **kwargs: Any) -> tuple[list[Any], RecordStream]:
    stream = RecordStream(**kwargs)
    out: list[Any] = []
    for piece in _split(body, cuts):
        out.extend(stream.feed(piece))
    out.extend(stream.close())
    return out, stream


def run_lines(body: bytes, cuts: list[int] | None = None, **kwargs: Any) -> tuple[bytes, int]:
    stream = RecordStream(raw=True, **kwargs)
    blobs, total = [], 0
    for piece in _split(body, cuts):
        blob, count = stream.feed_lines(piece)
        assert blob.count(b"\n") == count
        blobs.append(blob)
        total += count
    blob, count = stream.close_lines()
    assert blob.count(b"\n") == count
    return b"".join([*blobs, blob]), total + count


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def oracle_records(body: bytes) -> list[Any]:
    """The records by the rules of the module docstring, from a strict json.loads."""
    text = body.decode("utf-8")  # strict
    dup = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        dup.append(sum(1 for k, _ in items if k == "data") > 1)
        return dict(items)

    doc = json.loads(text, parse_constant=_refuse, parse_float=Decimal, object_pairs_hook=pairs)
    if isinstance(doc, list):
        return doc
    if not isinstance(doc, dict):
        raise ValueError("not an object or array")
    if dup[-1]:
        raise ValueError("data twice")
    if "data" in doc:
        data = doc["data"]
        return data if isinstance(data, list) else [] if data is None else [data]
    if any(isinstance(v, list) for v in doc.values()):
        raise LookupError("records not found")
    return [doc]


def exact(text: str) -> bytes:
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8")


# ---------------------------------------------------------------------------------------
# body generator: text with known record spans
# ---------------------------------------------------------------------------------------
WS = st.text(alphabet=" \t\n\r", max_size=3)
NUMBERS = st.one_of(
    st.sampled_from(
        ["0", "-0", "1150.00", "-0.0", "12345678901234567.89", "1e400", "1E-7", "-1.5e+10", "2.50", "10" * 15, "7"]
    ),
    st.integers(min_value=-(10**6), max_value=10**6).map(str),
)
STRINGS = st.one_of(
    st.tuples(
        st.lists(st.sampled_from([*'ab"\\/é😀\u2028\u2029],{:[\x00\x1f\t', '],{"data":[']), max_size=6).map("".join),
        st.booleans(),
    ).map(lambda t: json.dumps(t[0], ensure_ascii=t[1])),
    st.sampled_from(
        ['"\\/"', '"\\u00e9"', '"\\ud83d\\ude00"', '"\\ud800"', '"],{\\"data\\":["', '"\\"}"', '""', '"é€😀"']
    ),
)
KEYS = st.one_of(st.sampled_from(['"data"', '"id"', '"lines"', '"amount"']), STRINGS)
SCALARS = st.one_of(NUMBERS, STRINGS, st.sampled_from(["true", "false", "null"]))


def _array(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        WS.map(lambda w: "[" + w + "]"),
        st.lists(st.tuples(WS, children, WS), min_size=1, max_size=4).map(
            lambda items: "[" + ",".join(a + v + b for a, v, b in items) + "]"
        ),
    )


def _object(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        WS.map(lambda w: "{" + w + "}"),
        st.lists(st.tuples(WS, KEYS, WS, WS, children, WS), min_size=1, max_size=4).map(
            lambda items: "{" + ",".join(f"{a}{k}{b}:{c}{v}{d}" for a, k, b, c, v, d in items) + "}"
        ),
    )


VALUE_TEXT = st.recursive(SCALARS, lambda c: st.one_of(_array(c), _object(c)), max_leaves=10)
# Mostly objects (the hot path's shape), invoice-like ones with nested arrays of objects.
RECORD_TEXT = st.one_of(
    _object(VALUE_TEXT),
    _object(VALUE_TEXT),
    st.tuples(WS, _array(_object(VALUE_TEXT)), NUMBERS).map(lambda t: f'{{"id":{t[2]},"lines":{t[0]}{t[1]}}}'),
    VALUE_TEXT,
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, list[tuple[int, int]]]:
    """(body text, [(start, end) of each record in it])."""
    records = draw(st.lists(RECORD_TEXT, max_size=8))
    shape = draw(st.sampled_from(["array", "data", "data-first"]))
    ws = lambda: draw(WS)  # noqa: E731
    parts: list[str] = [ws()]
    spans: list[tuple[int, int]] = []
    size = len(parts[0])

    def put(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)

    if shape != "array":
        put("{")
        if shape == "data":
            put(f'{ws()}"status"{ws()}:{ws()}"ok"{ws()},{ws()}"count"{ws()}:{ws()}{len(records)}{ws()},')
        put(f'{ws()}"data"{ws()}:{ws()}')
    put("[")
    for i, record in enumerate(records):
        put(ws())
        spans.append((size, size + len(record)))
        put(record)
        put(ws())
        if i < len(records) - 1:
            put(",")
    if not records:
        put(ws())
    put("]")
    if shape != "array":
        put(f'{ws()},{ws()}"next"{ws()}:{ws()}null{ws()}' if shape == "data-first" else ws())
        put("}")
    put(ws())
    return "".join(parts), spans


def _cuts(data: st.DataObject, length: int) -> list[int]:
    return data.draw(st.lists(st.integers(min_value=0, max_value=length), max_size=30))


# ---------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(generated=bodies(), data=st.data())
def test_raw_mode_is_the_exact_text_and_object_mode_the_strict_values(generated, data):
    text, spans = generated
    body = text.encode("utf-8")
    expected = oracle_records(body)
    cuts = _cuts(data, len(body))
    records, stream = run(body, cuts)
    assert records == expected
    raw, raw_stream = run(body, cuts, raw=True)
    assert raw == [exact(text[s:e]) for s, e in spans]
    assert all(b"\n" not in r and b"\r" not in r for r in raw)
    assert raw_stream.records == stream.records == len(spans)
    assert raw_stream.envelope == stream.envelope
    blob, count = run_lines(body, cuts)
    assert count == len(spans)
    assert blob == b"".join(r + b"\n" for r in raw)
    assert [json.loads(line, parse_float=Decimal) for line in blob.splitlines()] == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(generated=bodies(), data=st.data())
def test_every_truncation_raises(generated, data):
    text, _ = generated
    body = text.encode("utf-8")
    end = len(body.rstrip(b" \t\n\r"))
    prefixes = data.draw(st.lists(st.integers(min_value=0, max_value=end - 1), min_size=1, max_size=6))
    for k in prefixes:
        for raw in (False, True):
            with pytest.raises(JsonStreamError):
                run(body[:k], _cuts(data, k), raw=raw)


MUTANTS = [*b'"\\,:[]{}0123456789-+.eENaItfn \n\r\t\x00\x7f', 0xFF, 0xC3, 0xE2, 0x80]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(generated=bodies(), data=st.data())
def test_a_changed_or_inserted_byte_is_either_accepted_by_both_or_refused_by_both(generated, data):
    text, _ = generated
    body = bytearray(text.encode("utf-8"))
    where = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    if data.draw(st.booleans()):
        body[where] = data.draw(st.sampled_from(MUTANTS))  # a byte changed
    else:
        body[where:where] = bytes([data.draw(st.sampled_from(MUTANTS))])  # a byte inserted
    body = bytes(body)
    try:
        expected: list[Any] | None = oracle_records(body)
    except LookupError:
        for raw in (False, True):
            with pytest.raises(RecordsNotFound):
                run(body, raw=raw)
        return
    except ValueError:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
        expected = None
    cuts = _cuts(data, len(body))
    for raw in (False, True):
        if expected is None:
            with pytest.raises(JsonStreamError):
                run(body, cuts, raw=raw)
            continue
        records, _ = run(body, cuts, raw=raw)
        if raw:
            assert all(b"\n" not in r and b"\r" not in r for r in records)
            records = [json.loads(r, parse_float=Decimal) for r in records]
        assert records == expected


# ---------------------------------------------------------------------------------------
# examples (issue 13)
# ---------------------------------------------------------------------------------------
AMOUNTS = '{"data": [{"amount": 1150.00, "big": 12345678901234567.89, "huge": 1e400, "tiny": 1E-7, "neg": -0.0}]}'


def test_object_mode_keeps_amounts_exact():  # fails on the old code (floats)
    (record,), _ = run(AMOUNTS.encode())
    assert record == {
        "amount": Decimal("1150.00"),
        "big": Decimal("12345678901234567.89"),
        "huge": Decimal("1e400"),
        "tiny": Decimal("1E-7"),
        "neg": Decimal("-0.0"),
    }
    assert str(record["amount"]) == "1150.00" and isinstance(run(b"[7]")[0][0], int)
    (value,), _ = run(b"[1.5]", parse_float=float)
    assert value == 1.5 and isinstance(value, float)


def test_raw_mode_keeps_the_text_as_sent():  # fails on the old code (no raw mode)
    body = '{"data": [{"amount": 1150.00,\r\n "name": "Café \\u00e9 😀\u2028", "n": 1e400}, {"a": [1, 2]}]}'
    blob, count = run_lines(body.encode())
    assert count == 2
    assert blob == ('{"amount": 1150.00,   "name": "Café \\u00e9 😀\u2028", "n": 1e400}\n{"a": [1, 2]}\n'.encode())


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", ["record", "nested", "envelope", "single"])
def test_non_finite_constants_are_refused(constant, where):  # fails on the old code (accepted)
    body = {
        "record": f'[{{"a": 1}}, {constant}]',
        "nested": f'{{"data": [{{"a": [1, {{"b": {constant}}}]}}, {{"c": 2}}]}}',
        "envelope": f'{{"total": {constant}, "data": [1]}}',
        "single": f'{{"data": {{"x": {constant}}}}}',
    }[where].encode()
    for raw in (False, True):
        for cuts in ([], list(range(len(body)))):
            with pytest.raises(JsonStreamError, match=f"{constant} is not JSON") as err:
                run(body, cuts, raw=raw)
            assert err.value.position is not None


def test_records_not_found_names_the_arrays():  # fails on the old code (the object was one record)
    body = b'{"status": "ok", "Invoices": [{"id": 1}], "meta": {}, "Lines": []}'
    for raw in (False, True):
        with pytest.raises(RecordsNotFound, match="'Invoices', 'Lines'") as err:
            run(body, raw=raw)
        assert err.value.members == ["Invoices", "Lines"]
        assert "'data'" in str(err.value)
        records, stream = run(body, raw=raw, key="Invoices")
        assert records == ([b'{"id": 1}'] if raw else [{"id": 1}])
        assert stream.key_seen and stream.envelope == {"status": "ok", "meta": {}, "Lines": []}
    assert issubclass(RecordsNotFound, JsonStreamError)


def test_shapes_in_raw_mode():
    cases = {
        b'{"data": null, "status": "ok"}': [],
        b'{"data": {"net_profit": 1.00}}': [b'{"net_profit": 1.00}'],
        b'{"data": "done"}': [b'"done"'],
        b"[]": [],
        b'{ "status" : "ok",\n "id" : 7.50 , "x": {"y": [1, 2]} }': [b'{"status":"ok","id":7.50,"x":{"y": [1, 2]}}'],
        b"{}": [b"{}"],
        b"\xef\xbb\xbf[1, 2.0]": [b"1", b"2.0"],
    }
    for body, expected in cases.items():
        for cuts in ([], list(range(len(body)))):
            records, stream = run(body, cuts, raw=True)
            assert records == expected, body
    _, stream = run(b"[1]", raw=True)
    assert stream.top_array and not stream.key_seen and stream.done
    _, stream = run(b'{"status": 1.10, "data": []}', raw=True)
    assert not stream.top_array and stream.key_seen and stream.envelope == {"status": Decimal("1.10")}


def test_feed_lines_needs_raw_mode():
    with pytest.raises(TypeError, match="raw=True"):
        RecordStream().feed_lines(b"[1]")


def test_lone_surrogates_and_deep_nesting_take_the_slow_path():
    # msgspec refuses these; json.loads accepts them, so the stream must too (same text).
    body = b'[{"a": "\\ud800"}, {"b": 1}, {"c": "\\udfff x"}, {"d": 2}]'
    assert run(body, raw=True)[0] == [b'{"a": "\\ud800"}', b'{"b": 1}', b'{"c": "\\udfff x"}', b'{"d": 2}']
    assert run(body)[0] == json.loads(body)
    for depth in (50, 400, 700, 5000):
        deep = ("[" * depth + "]" * depth).encode()
        body = b'{"data": [{"a": 1}, ' + deep + b', {"b": 2}]}'
        try:
            expected: Any = json.loads(body)["data"]
        except RecursionError:
            expected = None
        for raw in (False, True):
            if expected is None:
                with pytest.raises(JsonStreamError, match="nested too deeply"):
                    run(body, raw=raw)
            else:
                records, _ = run(body, raw=raw)
                assert records == ([b'{"a": 1}', deep, b'{"b": 2}'] if raw else expected)


def test_the_hot_path_takes_nearly_every_record():
    # ~200 records per 64 KiB chunk: the C scanner should see about one record per chunk.
    records = [{"id": f"GL-{i:06d}", "lines": [{"n": j, "amount": "1.00"} for j in range(3)]} for i in range(20_000)]
    body = json.dumps({"status": "ok", "data": records}).encode()
    stream = RecordStream(raw=True)
    calls = 0
    scan = stream._scan

    def counting(text: str, pos: int) -> Any:
        nonlocal calls
        calls += 1
        return scan(text, pos)

    stream._scan = counting
    blob = b""
    for i in range(0, len(body), 65536):
        blob += stream.feed_lines(body[i : i + 65536])[0]
    blob += stream.close_lines()[0]
    chunks = len(body) // 65536 + 1
    assert [json.loads(line) for line in blob.splitlines()] == records
    assert calls <= 3 * chunks, (calls, chunks)


@pytest.mark.parametrize("raw", [False, True])
def test_a_large_record_is_joined_once_per_doubling(raw):  # fails on the old code (rebuilt per chunk)
    big = {"id": "INV-1", "lines": [{"line": i, "memo": '],{"data":['} for i in range(40_000)]}
    body = json.dumps({"data": [{"small": 0}, big, {"small": 1}]}).encode()  # ~1.3 MB
    stream = RecordStream(raw=raw)
    out: list[Any] = []
    rebuilt = 0
    for i in range(0, len(body), 1024):  # ~1300 chunks
        before = stream._buf
        out.extend(stream.feed(body[i : i + 1024]))
        rebuilt += stream._buf is not before
    out.extend(stream.close())
    expected = [{"small": 0}, big, {"small": 1}]
    assert (out if not raw else [json.loads(r) for r in out]) == expected
    assert stream._joins < 20, stream._joins
    assert rebuilt < 40, rebuilt


def test_the_size_limit_counts_pending_text():
    stream = RecordStream(max_record_chars=10_000)
    stream.feed(b'[{"a": "')
    for _ in range(99):
        stream.feed(b"y" * 100)
    with pytest.raises(JsonStreamError, match="larger than 10000 characters"):
        stream.feed(b"y" * 100)
    assert len(stream._buf) <= 10_100  # the pending text was never joined in


@pytest.mark.parametrize("items", [list(range(30_000)), ["x"] * 20_000, [[i] for i in range(20_000)]])
def test_arrays_without_cuts_look_for_one_once_per_chunk(items):  # was quadratic before the fix
    body = json.dumps(items).encode()
    stream = RecordStream(raw=True)
    calls = 0
    candidates = stream._candidates

    def counting(pos: int, n: int) -> Any:
        nonlocal calls
        calls += 1
        return candidates(pos, n)

    stream._candidates = counting  # type: ignore[method-assign]
    out: list[bytes] = []
    for i in range(0, len(body), 4096):
        out.extend(stream.feed(body[i : i + 4096]))
    out.extend(stream.close())
    assert [json.loads(r) for r in out] == items
    assert calls <= 3 * (len(body) // 4096 + 1), calls


@pytest.mark.parametrize("control", [b"\n", b"\r", b"\t", b"\x00", b"\x1f"])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_raw_control_character_in_a_string_is_refused(control, where):
    # CR/LF become spaces only once they are proven whitespace between tokens (regression:
    # the hot path blanked them before validating, accepting "x<LF>y" as "x y").
    items = [b'{"a":"x"}', b'{"b":1}', b'{"c":2}']
    items[where] = b'{"a":"x' + control + b'y"}'
    body = b'{"data": [' + b",\n".join(items) + b"]}"
    for raw in (False, True):
        for cuts in ([], list(range(len(body)))):
            with pytest.raises(JsonStreamError, match="Invalid control character"):
                run(body, cuts, raw=raw)
