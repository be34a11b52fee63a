"""Incremental parsing of a large JSON answer into its records, chunk by chunk.

Papertrail-ai answers a list query with one JSON document; for years of ledger lines that
document is large. :class:`RecordStream` takes the body in chunks (as they come off the
socket) and hands back the records as soon as each one is complete, so memory stays
bounded by about twice the largest single record plus one chunk, never by the body.

Which values are "the records" (the same rules for every answer; ``key`` is ``"data"``
unless another member name is given):

* a top-level array: its items (:attr:`RecordStream.top_array` is then true);
* a top-level object with a ``key`` member that is an array: the items of that array
  (the other members, e.g. ``status`` or ``count``, end up in :attr:`RecordStream.envelope`);
* ``key`` that is an object or another non-null value (a report, one invoice): that
  value, as a single record; ``key`` that is ``null``: no record;
* a top-level object without ``key``: if one of its members is an array, the records were
  probably meant to be that array and :meth:`RecordStream.close` raises
  :class:`RecordsNotFound` naming the array-valued members; otherwise the whole object is a
  single record (nothing is silently dropped because the service used another shape). In
  raw mode that record is rebuilt from its members' text as ``{`` + the ``"name":value``
  texts joined by ``,`` + ``}``: whitespace between the top-level members is dropped, the
  member names and values are as sent.

Two modes:

* **object mode** (the default): each record is decoded by the standard library's C
  scanner (``json`` module) on a rolling text buffer, with floats parsed by
  ``parse_float`` (default :class:`decimal.Decimal`, so ``1150.00`` stays ``1150.00`` and
  ``12345678901234567.89`` stays exact); integers are ``int``.
* **raw mode** (``raw=True``, for extraction): each record is its text exactly as the
  service sent it, as UTF-8 bytes, except that every CR and LF character becomes a space
  (in valid JSON a raw CR/LF can only be whitespace between tokens, so the record's
  meaning is unchanged and it fits on one line). Numbers are never converted (``1e400``
  stays ``1e400``), non-ASCII characters stay as sent. :meth:`RecordStream.feed_lines`
  returns the records of a chunk as one JSON-lines blob. Inside an array of records the
  hot path cuts the buffer at a ``,`` between two records (a ``}``/``]``, the comma, a
  ``{``/``[``) near its end and validates everything before the cut with msgspec
  (``msgspec.json.Decoder(list[msgspec.Raw])`` on ``"[" + prefix + "]"``, as sent): a cut
  that is in fact inside a string or a nested array cannot parse, so a successful parse
  proves the prefix is a sequence of complete, valid records, and msgspec hands back each
  one's exact bytes (CR/LF, now proven to be whitespace, are turned into spaces after that). Cuts are tried from the last one
  backwards, at most six per attempt: first those followed by the text the first record
  started with (its ``{`` and first member name), then any. When none parses (the last
  record before ``]``, arrays of scalars, a record larger than the buffer, nesting deeper
  than msgspec allows, ``"\\ud800"``-style lone surrogate escapes that ``json.loads``
  accepts and msgspec refuses, and every error), records are taken one at a time by the C
  scanner until past the lowest cut tried (past the buffer's end if there was none), so
  what is accepted and the error messages and positions are those of the C scanner.

In both modes ``NaN``, ``Infinity`` and ``-Infinity`` are refused (they are not JSON), the
envelope is decoded as in object mode, and the body is checked to be strict UTF-8 (by an
incremental decoder, chunk by chunk). Records split across chunks, multi-byte UTF-8
characters split across chunks, whitespace anywhere and strings holding brackets, quotes
or escapes are all handled. Malformed or truncated input raises :class:`JsonStreamError`
with the character position.

A record that spans many chunks costs time linear in its size: while it is incomplete the
arriving chunks are kept in a list, and the buffer is rebuilt (one join) and the record
re-scanned only each time the pending text has doubled.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import decimal
import json
import re
from json.scanner import make_scanner
from typing import TYPE_CHECKING, Any, NoReturn, cast

import msgspec

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

#: Default ceiling on one record's size (characters); a larger one is refused rather than
#: buffered without end (a record that never ends is usually a malformed body).
DEFAULT_MAX_RECORD_CHARS = 64 * 1024 * 1024

_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = " \t\n\r"
# A number that ends where the buffer ends, or is followed only by these, may go on
# ("12" + "34", "1" + ".5", "1e" + "3") once more arrives.
_NUMBER_GOES_ON = "0123456789.eE+-"
_NUMBER_TAIL = re.compile(r"[0-9.eE+\-]+")
# A decode error this close to the end of the buffer may only mean "more bytes needed".
_TAIL = 8

# Raw-mode hot path: a cut candidate is a ',' between a closing and an opening bracket.
_CUT = re.compile(r"[}\]][ \t\n\r]*,[ \t\n\r]*(?=[{\[])")
# How a record starts: its opening bracket and first member name; once learnt from the
# first record, candidates followed by the same text are tried first.
_SIGNATURE = re.compile(r'\{[ \t\n\r]*"[^"\\]{1,64}"[ \t\n\r]*:')
_HOT_TRIES = 6  # msgspec parses tried per hot-path attempt

# parser states
_START = 0
_OBJ_FIRST = 1  # after '{': a key or '}'
_OBJ_KEY = 2  # after ',': a key
_COLON = 3
_VALUE = 4
_OBJ_NEXT = 5  # after a member: ',' or '}'
_ARRAY_FIRST = 6  # after '[': an item or ']'
_ITEM = 7  # after ',': an item
_ARRAY_NEXT = 8  # after an item: ',' or ']'
_DONE = 9


def _may_go_on(buf: str, end: int, n: int) -> bool:
    """Whether a value decoded up to ``end`` may be the start of a longer number."""
    return end >= n or _NUMBER_TAIL.fullmatch(buf, end) is not None


def _one_line(text: str) -> str:
    """CR and LF (whitespace between tokens in valid JSON) become spaces."""
    if "\n" in text:
        text = text.replace("\n", " ")
    if "\r" in text:
        text = text.replace("\r", " ")
    return text


class JsonStreamError(ValueError):
    """The body is not the JSON document it should be (malformed, truncated, too large).

    :param message: what is wrong and where.
    :param position: character offset in the body (0-based) where it was noticed.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        self.position = position
        where = f" (at character {position})" if position is not None else ""
        super().__init__(f"{message}{where}")


class RecordsNotFound(JsonStreamError):
    """A top-level object has no ``key`` member but has array-valued members.

    :param message: what is wrong.
    :param members: the names of the array-valued members, in document order.
    """

    def __init__(self, message: str, members: list[str]) -> None:
        self.members = members
        super().__init__(message)


class _NeedMore(Exception):
    """Internal: the buffer ends before the value does."""


class _NonFinite(Exception):
    """Internal: the C scanner met NaN, Infinity or -Infinity."""


def _refuse_constant(name: str) -> NoReturn:
    raise _NonFinite(name)


def _scanner(
    parse_float: Callable[[str], Any], parse_int: Callable[[str], Any] | None = None
) -> Callable[[str, int], tuple[Any, int]]:
    decoder = json.JSONDecoder(parse_float=parse_float, parse_int=parse_int, parse_constant=_refuse_constant)
    # The C scanner when available; typeshed types make_scanner's argument oddly.
    return cast("Callable[[str, int], tuple[Any, int]]", make_scanner(cast("Any", decoder)))


class RecordStream:
    """Feed a JSON body in chunks, get its records back (see the module docstring).

    ::

        stream = RecordStream()
        for chunk in chunks:
            for record in stream.feed(chunk):
                ...
        for record in stream.close():  # also checks the document was complete
            ...

        stream = RecordStream(raw=True)  # extraction: exact text, one JSON line each
        for chunk in chunks:
            blob, count = stream.feed_lines(chunk)
            out.write(blob)
        blob, count = stream.close_lines()
        out.write(blob)

    :param key: the member of a top-level object that holds the records (any name).
    :param max_record_chars: refuse a single record (or envelope member) larger than this.
    :param raw: records are their UTF-8 text as sent (CR/LF turned into spaces), as bytes.
    :param parse_float: turns the text of a JSON number with a fraction or exponent into a
        value (object mode and the envelope); integers are always ``int``.
    """

    def __init__(
        self,
        *,
        key: str = "data",
        max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
        raw: bool = False,
        parse_float: Callable[[str], Any] = decimal.Decimal,
    ) -> None:
        self.key = key
        self.max_record_chars = max_record_chars
        self.raw = raw
        #: Top-level members other than ``key`` (e.g. ``status``, ``count``), once seen.
        self.envelope: dict[str, Any] = {}
        #: Whether the top level was an object with ``key`` in it.
        self.key_seen = False
        #: Whether the key's value was an array (then paging hints apply to its records).
        self.key_array = False
        #: Whether the body is a top-level array (its items are the records).
        self.top_array = False
        #: Records handed out so far.
        self.records = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._env_scan = _scanner(parse_float)
        # Records: in raw mode only their span matters (floats parsed the cheap way).
        # Raw mode only needs a record's span: numbers stay text (no 4300-digit int limit, no
        # Decimal exponent limit), so both modes accept the same numbers.
        self._scan = _scanner(str, str) if raw else self._env_scan
        self._msgspec = msgspec.json.Decoder(list[msgspec.Raw])
        self._buf = ""
        self._pos = 0
        self._offset = 0  # characters dropped from the front of _buf so far
        self._pending: list[str] = []  # text arrived while a record is incomplete, not in _buf yet
        self._pending_len = 0
        self._joins = 0  # times the pending text was joined into _buf (tests)
        self._state = _START
        self._member: str | None = None
        self._member_raw = ""  # raw mode: the member name's text, as sent
        self._members_raw: list[str] = []  # raw mode: '"name":value' of the envelope members
        self._retry_len = 0  # do not re-try a partial value before this many chars are pending
        self._hot_block = 0  # raw mode: no hot path before this body position (a failed cut)
        self._signature: str | None = None  # raw mode: how the first record started ("": unknown)
        self._lines = False  # feed_lines/close_lines: records are collected as JSON lines
        self._first = True
        self._closed = False

    # -- public ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """The document is complete (only whitespace may follow)."""
        return self._state == _DONE

    def feed(self, chunk: bytes) -> list[Any]:
        """Add the next piece of the body; return the records it completed (maybe none).

        Object mode: decoded values; raw mode: each record's text as UTF-8 ``bytes``.
        """
        if self._closed:
            raise JsonStreamError("feed() after close()")
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise JsonStreamError(
                f"the body is not valid UTF-8 ({exc.reason})", self._offset + len(self._buf) + self._pending_len
            ) from None
        if not text:
            return []
        if self._first:
            self._first = False
            if text[0] == "\ufeff":  # tolerate a byte order mark
                text = text[1:]
                self._offset += 1
        if self._retry_len:
            # A record is incomplete: keep the text aside until re-trying is worth it.
            pending = len(self._buf) - self._pos + self._pending_len + len(text)
            if pending < self._retry_len:
                self._pending.append(text)
                self._pending_len += len(text)
                if pending > self.max_record_chars:
                    raise self._error(f"a single record is larger than {self.max_record_chars} characters", self._pos)
                return []
        self._take(text)
        out: list[Any] = []
        self._run(out, eof=False)
        return out

    def close(self) -> list[Any]:
        """Signal the end of the body; return the last records and check completeness."""
        if self._closed:
            return []
        try:
            tail = self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise JsonStreamError(
                f"the body ends inside a UTF-8 character ({exc.reason})",
                self._offset + len(self._buf) + self._pending_len,
            ) from None
        self._closed = True
        self._take(tail)
        self._retry_len = 0
        out: list[Any] = []
        self._run(out, eof=True)
        if self._state == _START:
            raise JsonStreamError("the body is empty; expected a JSON object or array", self._offset)
        if self._state != _DONE:
            raise JsonStreamError(
                "the body ended before the JSON document was complete (truncated answer?)",
                self._offset + len(self._buf),
            )
        if not self.top_array and not self.key_seen:
            arrays = [name for name, value in self.envelope.items() if isinstance(value, list)]
            if arrays:
                listing = ", ".join(repr(name) for name in arrays)
                raise RecordsNotFound(
                    f"the top-level object has no {self.key!r} member, but array-valued members {listing}: "
                    "name the one that holds the records (key=...)",
                    arrays,
                )
            # No key member and nothing that looks like records: the object itself is the record.
            if self.raw:
                self._emit_text("{" + ",".join(self._members_raw) + "}", out)
            else:
                out.append(dict(self.envelope))
            self.records += 1
        return out

    def feed_lines(self, chunk: bytes) -> tuple[bytes, int]:
        """Raw mode: :meth:`feed`, the records as one JSON-lines blob (each ``\\n``-terminated) and their count."""
        return self._as_lines(self.feed, chunk)

    def close_lines(self) -> tuple[bytes, int]:
        """Raw mode: :meth:`close`, the last records as one JSON-lines blob and their count."""
        return self._as_lines(self.close)

    # -- machinery ------------------------------------------------------------------------
    def _as_lines(self, call: Callable[..., list[Any]], *args: bytes) -> tuple[bytes, int]:
        if not self.raw:
            raise TypeError("feed_lines()/close_lines() need RecordStream(raw=True)")
        before = self.records
        self._lines = True
        try:
            parts = call(*args)
        finally:
            self._lines = False
        return b"".join(parts), self.records - before

    def _take(self, text: str) -> None:
        """Drop what is consumed from the buffer and append the pending text and ``text``."""
        if self._pending:
            self._pending.append(text)
            self._buf = "".join([self._buf[self._pos :], *self._pending])
            self._pending = []
            self._pending_len = 0
            self._joins += 1
        elif self._pos:
            self._buf = self._buf[self._pos :] + text
        else:
            self._buf += text
        self._offset += self._pos
        self._pos = 0

    def _error(self, message: str, pos: int) -> JsonStreamError:
        return JsonStreamError(message, self._offset + pos)

    def _emit_text(self, text: str, out: list[Any]) -> None:
        """Raw mode: one record given as its text."""
        text = _one_line(text)
        out.append((text + "\n").encode() if self._lines else text.encode())

    def _skip_ws(self, pos: int) -> int:
        buf = self._buf
        if pos < len(buf) and buf[pos] in _WS_CHARS:
            return _WS.match(buf, pos).end()  # type: ignore[union-attr]  # '*' always matches
        return pos

    def _decode(
        self, pos: int, eof: bool, scan: Callable[[str, int], tuple[Any, int]] | None = None
    ) -> tuple[Any, int]:
        """Decode one value at ``pos``; raise _NeedMore when the buffer may end inside it."""
        buf = self._buf
        n = len(buf)
        if not eof and n - pos < self._retry_len:
            raise _NeedMore
        try:
            value, end = (scan or self._scan)(buf, pos)
        except StopIteration as stop:
            err_pos = stop.value if isinstance(stop.value, int) else pos
            self._decode_failed("Expecting value", err_pos, pos, eof)
        except json.JSONDecodeError as exc:
            self._decode_failed(exc.msg, exc.pos, pos, eof)
        except RecursionError:
            raise self._error("a record is nested too deeply", pos) from None
        except _NonFinite as exc:
            raise self._error(
                f"{exc.args[0]} is not JSON (non-finite numbers are refused; in the value starting here)", pos
            ) from None
        except (ValueError, ArithmeticError) as exc:  # a 5000-digit int, a Decimal exponent out of range
            raise self._error(
                f"a number in the value starting here cannot be read exactly ({type(exc).__name__}: "
                f"{str(exc)[:80]}); read it with raw extraction (PapertrailExtractOperator), which keeps its text",
                pos,
            ) from None
        if not eof and _may_go_on(buf, end, n):
            self._retry_len = 0
            raise _NeedMore
        self._retry_len = 0
        return value, end

    def _decode_failed(self, msg: str, err_pos: int, start: int, eof: bool) -> NoReturn:
        n = len(self._buf)
        # Near the end of what has arrived, an error may only mean "the value goes on".
        maybe_truncated = err_pos >= (n if eof else n - _TAIL) or msg.startswith("Unterminated string")
        if eof or not maybe_truncated:
            if eof and maybe_truncated:
                raise self._error(f"the body ended inside a JSON value ({msg})", err_pos) from None
            raise self._error(f"malformed JSON: {msg}", err_pos) from None
        if n - start > self.max_record_chars:
            raise self._error(
                f"a single record is larger than {self.max_record_chars} characters (or the body is malformed: {msg})",
                start,
            ) from None
        # Re-try only once the pending text has doubled: a huge record costs O(size), not
        # O(size^2); feed() keeps the chunks aside until then.
        self._retry_len = 2 * (n - start) + 1
        raise _NeedMore

    def _run(self, out: list[Any], *, eof: bool) -> None:
        with contextlib.suppress(_NeedMore):
            self._step(out, eof)
        if not eof and len(self._buf) - self._pos > self.max_record_chars:
            raise self._error(f"a single record is larger than {self.max_record_chars} characters", self._pos)

    def _step(self, out: list[Any], eof: bool) -> None:
        buf = self._buf
        n = len(buf)
        while True:
            state = self._state
            if state in (_ITEM, _ARRAY_FIRST):
                self._items(out, eof)
                if self._state in (_ITEM, _ARRAY_FIRST, _ARRAY_NEXT):
                    return
                buf = self._buf  # _items may have dropped what it consumed
                n = len(buf)
                continue
            pos = self._skip_ws(self._pos)
            if pos >= n:
                self._pos = pos
                return
            char = buf[pos]
            if state == _START:
                if char == "[":
                    self.top_array = True
                    self._state, self._pos = _ARRAY_FIRST, pos + 1
                elif char == "{":
                    self._state, self._pos = _OBJ_FIRST, pos + 1
                else:
                    raise self._error("expected a JSON object or array at the top level", pos)
            elif state in (_OBJ_FIRST, _OBJ_KEY):
                if char == '"':
                    self._pos = pos
                    key, end = self._decode(pos, eof, self._env_scan)
                    if key == self.key:
                        if self.key_seen:
                            raise self._error(f"the member {self.key!r} appears twice", pos)
                        self.key_seen = True
                    self._member = key
                    self._member_raw = buf[pos:end]
                    self._state, self._pos = _COLON, end
                elif char == "}" and state == _OBJ_FIRST:
                    self._state, self._pos = _DONE, pos + 1
                else:
                    raise self._error("expected a member name in double quotes", pos)
            elif state == _COLON:
                if char != ":":
                    raise self._error("expected ':' after a member name", pos)
                self._state, self._pos = _VALUE, pos + 1
            elif state == _VALUE:
                member = self._member
                if member == self.key and char == "[":
                    self.key_array = True
                    self._state, self._pos = _ARRAY_FIRST, pos + 1
                    continue
                self._pos = pos
                if member == self.key:
                    value, end = self._decode(pos, eof)
                    if value is not None:
                        if self.raw:
                            self._emit_text(buf[pos:end], out)
                        else:
                            out.append(value)
                        self.records += 1
                else:
                    value, end = self._decode(pos, eof, self._env_scan)
                    self.envelope[str(member)] = value
                    if self.raw:
                        self._members_raw.append(self._member_raw + ":" + buf[pos:end])
                self._state, self._pos = _OBJ_NEXT, end
            elif state == _OBJ_NEXT:
                if char == ",":
                    self._state, self._pos = _OBJ_KEY, pos + 1
                elif char == "}":
                    self._state, self._pos = _DONE, pos + 1
                else:
                    raise self._error("expected ',' or '}' after an object member", pos)
            elif state == _ARRAY_NEXT:
                if char == ",":
                    self._state, self._pos = _ITEM, pos + 1
                elif char == "]":
                    self._end_array(pos + 1)
                else:
                    raise self._error("expected ',' or ']' after a record", pos)
            else:  # _DONE
                raise self._error("unexpected data after the end of the JSON document", pos)

    def _end_array(self, pos: int) -> None:
        self._state = _DONE if self.top_array else _OBJ_NEXT
        self._pos = pos

    def _candidates(self, pos: int, n: int) -> Iterator[tuple[int, int]]:
        """Raw mode: possible cuts ``(end of a record, start of the next)`` after ``pos``, last first.

        First the places where the text the first record started with (its ``{`` and first
        member name) follows ``,`` after a ``}``/``]`` (``str.rfind``, no per-character
        Python work); then any ``}``/``]``, ``,``, ``{``/``[`` sequence, looked for in a
        window at the end that grows fourfold up to the whole buffer.
        """
        buf = self._buf
        sig = self._signature
        if sig:
            end = n
            looked = 0
            while looked < 8 * _HOT_TRIES and (found := buf.rfind(sig, pos, end)) > pos:
                end = found
                looked += 1
                j = found - 1
                while buf[j] in _WS_CHARS:
                    j -= 1
                if buf[j] != "," or j <= pos:
                    continue
                j -= 1
                while buf[j] in _WS_CHARS:
                    j -= 1
                if buf[j] in "}]":
                    yield j + 1, found
        size = 1024
        high = n
        while high > pos:
            low = max(pos, n - size)
            matches = collections.deque(_CUT.finditer(buf, low, high), maxlen=_HOT_TRIES)
            for match in reversed(matches):
                yield match.start() + 1, match.end()
            high, size = low, size * 4

    def _hot(self, out: list[Any], pos: int, n: int) -> tuple[int, int] | None:
        """Raw mode: the complete records from ``pos`` up to a cut near the end, in one msgspec call.

        Returns (position of the next record, number of records) or None if no cut parsed.
        """
        buf = self._buf
        if self._signature is None:
            sig = _SIGNATURE.match(buf, pos)
            self._signature = sig.group() if sig is not None else ""
        tried: set[int] = set()
        lowest = n
        for cut, after in self._candidates(pos, n):
            if cut in tried:
                continue
            tried.add(cut)
            segment = buf[pos:cut]
            try:
                # Validated as sent: a raw CR/LF inside a string must be refused, not blanked.
                raws = self._msgspec.decode("[" + segment + "]")
            except (msgspec.DecodeError, RecursionError):
                lowest = min(lowest, cut)
                if len(tried) >= _HOT_TRIES:
                    break
                continue
            count = len(raws)
            items = cast("list[Any]", raws)
            breaks = "\n" in segment or "\r" in segment  # then only whitespace between tokens
            if self._lines:
                items.append(b"")  # the join then ends with a separator
                if breaks:
                    # NUL cannot occur in valid JSON text: join with it, blank CR/LF, then
                    # turn the separators into newlines.
                    blob = b"\0".join(items).replace(b"\n", b" ").replace(b"\r", b" ")
                    out.append(blob.replace(b"\0", b"\n"))
                else:
                    out.append(b"\n".join(items))
            elif breaks:
                out.extend([bytes(raw).replace(b"\n", b" ").replace(b"\r", b" ") for raw in raws])
            else:
                out.extend([bytes(raw) for raw in raws])
            return after, count
        # Take records one by one (C scanner) past the failed cuts, or past the end of the
        # buffer if it has no candidate at all (an array of scalars), before trying again.
        self._hot_block = self._offset + lowest
        return None

    def _items(self, out: list[Any], eof: bool) -> None:
        """The hot loop: the records of an array (raw mode: msgspec cuts, else one C-scanner call each)."""
        buf = self._buf
        n = len(buf)
        pos = self._pos
        scan = self._scan
        raw = self.raw
        first = self._state == _ARRAY_FIRST  # right after '[': ']' may close an empty array
        count = 0
        after: int | None = None  # None: still expecting a record at pos
        try:
            while True:
                if pos < n and buf[pos] in _WS_CHARS:
                    pos = _WS.match(buf, pos).end()  # type: ignore[union-attr]  # '*' always matches
                if pos >= n:
                    return
                if buf[pos] == "]":
                    if not first:
                        raise self._error("a ',' is followed by ']' (trailing comma)", pos)
                    after, pos = _DONE, pos + 1
                    return
                if raw and not self._retry_len and self._offset + pos >= self._hot_block:
                    taken = self._hot(out, pos, n)
                    if taken is not None:
                        pos, taken_count = taken
                        count += taken_count
                        first = False
                        if 2 * (n - pos) < n:
                            # Drop the records just taken: a C-scanner error on the incomplete
                            # record that follows would count the lines of all of them.
                            buf = self._buf = buf[pos:]
                            self._offset += pos
                            n, pos = len(buf), 0
                        continue
                if self._retry_len:
                    value, end = self._decode(pos, eof)
                else:
                    try:
                        value, end = scan(buf, pos)
                    except (StopIteration, RecursionError, _NonFinite, ValueError, ArithmeticError):
                        value, end = self._decode(pos, eof)
                    else:
                        if not eof and (end >= n or buf[end] in _NUMBER_GOES_ON) and _may_go_on(buf, end, n):
                            return
                first = False
                if raw:
                    self._emit_text(buf[pos:end], out)
                else:
                    out.append(value)
                count += 1
                pos = end
                if pos < n and buf[pos] in _WS_CHARS:
                    pos = _WS.match(buf, pos).end()  # type: ignore[union-attr]
                if pos >= n:
                    after = _ARRAY_NEXT
                    return
                char = buf[pos]
                if char == ",":
                    pos += 1
                elif char == "]":
                    after, pos = _DONE, pos + 1
                    return
                else:
                    raise self._error("expected ',' or ']' after a record", pos)
        except _NeedMore:
            return
        finally:
            self.records += count
            if after == _DONE:
                self._end_array(pos)
            elif after == _ARRAY_NEXT:
                self._state, self._pos = _ARRAY_NEXT, pos
            else:
                self._state, self._pos = (_ARRAY_FIRST if first else _ITEM), pos


def iter_records(chunks: Iterable[bytes], **kwargs: Any) -> Iterator[Any]:
    """The records of a JSON body given as an iterable of byte chunks (see :class:`RecordStream`)."""
    stream = RecordStream(**kwargs)
    for chunk in chunks:
        yield from stream.feed(chunk)
    yield from stream.close()


__all__ = ["DEFAULT_MAX_RECORD_CHARS", "JsonStreamError", "RecordStream", "RecordsNotFound", "iter_records"]
