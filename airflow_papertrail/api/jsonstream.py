"""Incremental parsing of a large JSON answer into its records, chunk by chunk.

Papertrail-ai answers a list query with one JSON document; for years of ledger lines that
document is large. :class:`RecordStream` takes the body in chunks (as they come off the
socket) and hands back the records as soon as each one is complete, so memory stays
bounded by the largest single record plus one chunk, never by the body.

Which values are "the records" (the same rules for every answer):

* a top-level array: its items;
* a top-level object with a ``"data"`` member that is an array: the items of that array
  (the other members, e.g. ``status`` or ``count``, end up in :attr:`RecordStream.envelope`);
* ``"data"`` that is an object or another non-null value (a report, one invoice): that
  value, as a single record; ``"data": null``: no record;
* a top-level object without ``"data"``: the whole object as a single record (nothing is
  silently dropped because the service used another shape).

Each record is decoded by the standard library's C scanner (``json`` module), on a rolling
text buffer; only the structure around the records is walked here. Records split across
chunks, multi-byte UTF-8 characters split across chunks, whitespace anywhere and strings
holding brackets, quotes or escapes are all handled. Malformed or truncated input raises
:class:`JsonStreamError` with the character position.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import re
from json.scanner import make_scanner
from typing import TYPE_CHECKING, Any, NoReturn, cast

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


class JsonStreamError(ValueError):
    """The body is not the JSON document it should be (malformed, truncated, too large).

    :param message: what is wrong and where.
    :param position: character offset in the body (0-based) where it was noticed.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        self.position = position
        where = f" (at character {position})" if position is not None else ""
        super().__init__(f"{message}{where}")


class _NeedMore(Exception):
    """Internal: the buffer ends before the value does."""


class RecordStream:
    """Feed a JSON body in chunks, get its records back (see the module docstring).

    ::

        stream = RecordStream()
        for chunk in chunks:
            for record in stream.feed(chunk):
                ...
        for record in stream.close():  # also checks the document was complete
            ...

    :param key: the member of a top-level object that holds the records.
    :param max_record_chars: refuse a single record (or envelope member) larger than this.
    """

    def __init__(self, *, key: str = "data", max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> None:
        self.key = key
        self.max_record_chars = max_record_chars
        #: Top-level members other than ``key`` (e.g. ``status``, ``count``), once seen.
        self.envelope: dict[str, Any] = {}
        #: Whether the top level was an object with ``key`` in it.
        self.key_seen = False
        #: Records handed out so far.
        self.records = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        # The C scanner when available; typeshed types make_scanner's argument oddly.
        self._scan: Callable[[str, int], tuple[Any, int]] = make_scanner(cast("Any", json.JSONDecoder()))
        self._buf = ""
        self._pos = 0
        self._offset = 0  # characters dropped from the front of _buf so far
        self._state = _START
        self._top_array = False
        self._member: str | None = None
        self._retry_len = 0  # do not re-try a partial value before this many chars are pending
        self._first = True
        self._closed = False

    # -- public ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """The document is complete (only whitespace may follow)."""
        return self._state == _DONE

    def feed(self, chunk: bytes) -> list[Any]:
        """Add the next piece of the body; return the records it completed (maybe none)."""
        if self._closed:
            raise JsonStreamError("feed() after close()")
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise JsonStreamError(
                f"the body is not valid UTF-8 ({exc.reason})", self._offset + len(self._buf)
            ) from None
        if not text:
            return []
        if self._first:
            self._first = False
            if text[0] == "\ufeff":  # tolerate a byte order mark
                text = text[1:]
                self._offset += 1
        self._buf = self._buf[self._pos :] + text if self._pos else self._buf + text
        self._offset += self._pos
        self._pos = 0
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
                f"the body ends inside a UTF-8 character ({exc.reason})", self._offset + len(self._buf)
            ) from None
        self._closed = True
        self._buf = self._buf[self._pos :] + tail
        self._offset += self._pos
        self._pos = 0
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
        if not self._top_array and not self.key_seen:
            # No "data" member: the object itself is the record.
            out.append(dict(self.envelope))
            self.records += 1
        return out

    # -- machinery ------------------------------------------------------------------------
    def _error(self, message: str, pos: int) -> JsonStreamError:
        return JsonStreamError(message, self._offset + pos)

    def _skip_ws(self, pos: int) -> int:
        buf = self._buf
        if pos < len(buf) and buf[pos] in _WS_CHARS:
            return _WS.match(buf, pos).end()  # type: ignore[union-attr]  # '*' always matches
        return pos

    def _decode(self, pos: int, eof: bool) -> tuple[Any, int]:
        """Decode one value at ``pos``; raise _NeedMore when the buffer may end inside it."""
        buf = self._buf
        n = len(buf)
        if not eof and n - pos < self._retry_len:
            raise _NeedMore
        try:
            value, end = self._scan(buf, pos)
        except StopIteration as stop:
            err_pos = stop.value if isinstance(stop.value, int) else pos
            self._decode_failed("Expecting value", err_pos, pos, eof)
        except json.JSONDecodeError as exc:
            self._decode_failed(exc.msg, exc.pos, pos, eof)
        except RecursionError:
            raise self._error("a record is nested too deeply", pos) from None
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
        # Re-try only once the buffer has doubled: a huge record costs O(size), not O(size^2).
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
                continue
            pos = self._skip_ws(self._pos)
            if pos >= n:
                self._pos = pos
                return
            char = buf[pos]
            if state == _START:
                if char == "[":
                    self._top_array = True
                    self._state, self._pos = _ARRAY_FIRST, pos + 1
                elif char == "{":
                    self._state, self._pos = _OBJ_FIRST, pos + 1
                else:
                    raise self._error("expected a JSON object or array at the top level", pos)
            elif state in (_OBJ_FIRST, _OBJ_KEY):
                if char == '"':
                    self._pos = pos
                    key, end = self._decode(pos, eof)
                    if key == self.key:
                        if self.key_seen:
                            raise self._error(f"the member {self.key!r} appears twice", pos)
                        self.key_seen = True
                    self._member = key
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
                    self._state, self._pos = _ARRAY_FIRST, pos + 1
                    continue
                self._pos = pos
                value, end = self._decode(pos, eof)
                if member == self.key:
                    if value is not None:
                        out.append(value)
                        self.records += 1
                else:
                    self.envelope[str(member)] = value
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
        self._state = _DONE if self._top_array else _OBJ_NEXT
        self._pos = pos

    def _items(self, out: list[Any], eof: bool) -> None:
        """The hot loop: the records of an array, one C-scanner call each."""
        buf = self._buf
        n = len(buf)
        pos = self._pos
        scan = self._scan
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
                if self._retry_len:
                    value, end = self._decode(pos, eof)
                else:
                    try:
                        value, end = scan(buf, pos)
                    except (StopIteration, json.JSONDecodeError, RecursionError):
                        value, end = self._decode(pos, eof)
                    else:
                        if not eof and (end >= n or buf[end] in _NUMBER_GOES_ON) and _may_go_on(buf, end, n):
                            return
                first = False
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


__all__ = ["DEFAULT_MAX_RECORD_CHARS", "JsonStreamError", "RecordStream", "iter_records"]
