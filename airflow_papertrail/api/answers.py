"""Is an HTTP 2xx answer really a complete success? Error envelopes and paging hints.

Papertrail-ai's answer shapes are not published (see docs/data-access.md). A PHP wrapper
over six accounting systems may answer HTTP 200 with a body that reports an error, or
with one page of a longer list. For accounting data a green task with missing rows is the
worst outcome, so an answer is refused (:class:`~airflow_papertrail.exceptions.AnswerRefused`)
when its top-level object (the *envelope*: every member except the records) says so:

Error envelopes (``error="error_envelope"``), at the top level and inside ``links``,
``paging``, ``pagination``, ``meta`` or ``_links``:

* ``error``, ``error_code``, ``error_message`` or ``error_description`` is set (not
  ``null``/``false``/``0``/``""``/``{}``/``[]``): ``"invalid_token"``, ``{"code": ...}``, ``401``;
* ``errors`` is a non-empty array or object;
* ``success`` or ``ok`` is false: ``false``, ``0``, ``"false"``, ``"0"``, ``"no"``;
* ``status`` or ``result`` is ``false``, a number >= 400 (``500``, ``"401"``), or a failure
  word: ``error``, ``errors``, ``fail``, ``failed``, ``failure``, ``denied``, ``invalid``,
  ``unauthorized``/``unauthorised``, ``forbidden``, ``rejected``, ``refused``, ``partial``,
  ``incomplete``, ``exception``, ``ko``, ``nok``, or any word starting with ``error``,
  ``fail``, ``invalid``, ``denied``, ``reject``. Other words (``ok``, and a record's own
  ``draft``, ``authorised``, ``created``) are not errors;
* ``status_code``, ``http_code`` or ``http_status`` is a number >= 400 (not a bare
  ``code``: records carry account codes such as ``"4000"``).

Paging hints (``error="paged_answer"``), checked when the records were an array (a list
query's answer without its records member is refused as ``records_not_found`` instead):

* a count member (``count``, ``total``, ``total_count``, ``total_records``,
  ``total_results``, ``record_count``, ``num_records``) that is an integer (``3``, ``3.0``,
  ``"3"``) larger than the number of records delivered;
* a next-page member (``next``, ``next_page``, ``next_page_url``, ``next_url``,
  ``next_cursor``, ``cursor``, ``next_page_token``, ``page_token``, ``continuation``,
  ``continuation_token``, ``scroll_id``, ``offset_next``) that is set (not ``null``,
  ``false``, ``0`` or ``""``), or a ``links`` array with a ``rel: "next"`` entry;
* a more-flag (``has_more``, ``more``, ``has_next``, ``more_results``, ``more_records``)
  that is true (``true``, ``1``, ``"true"``, ``"1"``, ``"yes"``);
* a page count (``total_pages``, ``pages``, ``page_count``, ``last_page``) above the
  current ``page`` (or above 1 when there is no ``page``);
* the same members inside ``links``, ``paging``, ``pagination``, ``meta`` or ``_links``.

A member that means something else for one query (a ``total`` that is an amount) can be
left out with ``ignore_members=[...]`` on the operators and the client (at the top level
and inside the nested members above).
Member names are compared without case and with ``-``/camelCase folded to ``_``
(``nextPageToken``, ``hasMore``, ``Status``). The provider does not follow paging: its
form is not documented. The message says what was seen and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from airflow_papertrail.exceptions import AnswerRefused, sanitize_description

#: ``status``/``result``/``state`` words that say the call failed (a record's own status,
#: ``draft``, ``authorised``, ``created``, is not one of them).
_FAILURE_WORDS = frozenset(
    {
        "error",
        "errors",
        "fail",
        "failed",
        "failure",
        "denied",
        "invalid",
        "unauthorized",
        "unauthorised",
        "forbidden",
        "rejected",
        "refused",
        "partial",
        "incomplete",
        "exception",
        "ko",
        "nok",
    }
)
_FAILURE_PREFIXES = ("error", "fail", "invalid", "denied", "reject")
_COUNT_KEYS = (
    "count",
    "total",
    "total_count",
    "total_records",
    "total_results",
    "record_count",
    "num_records",
)
_NEXT_KEYS = (
    "next",
    "next_page",
    "next_page_url",
    "next_url",
    "next_cursor",
    "cursor",
    "next_page_token",
    "page_token",
    "continuation",
    "continuation_token",
    "scroll_id",
    "offset_next",
)
_MORE_KEYS = ("has_more", "more", "has_next", "more_results", "more_records")
_PAGES_KEYS = ("total_pages", "pages", "page_count", "last_page")
_NESTED = ("links", "paging", "pagination", "meta", "_links")
_MESSAGE_KEYS = ("message", "error_description", "error_message", "detail", "description", "reason", "msg")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _norm(name: object) -> str:
    return _CAMEL.sub("_", str(name)).replace("-", "_").lower()


def _folded(members: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in members.items():
        out.setdefault(_norm(name), value)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _set(value: Any) -> bool:
    return value is not None and value is not False and value != "" and value != {} and value != []


def _service_message(members: dict[str, Any]) -> str:
    """The service's own words, sanitised (never a token: sanitize_description redacts)."""
    candidates: list[Any] = [members.get(k) for k in _MESSAGE_KEYS]
    error = members.get("error")
    if isinstance(error, Mapping):
        inner = _folded(error)
        candidates = [inner.get(k) for k in _MESSAGE_KEYS] + [inner.get("code")] + candidates
    errors = members.get("errors")
    if isinstance(errors, list) and errors:
        first = errors[0]
        if isinstance(first, Mapping):
            inner = _folded(first)
            candidates += [inner.get(k) for k in _MESSAGE_KEYS]
        else:
            candidates.append(first)
    elif isinstance(errors, Mapping) and errors:
        candidates.append("; ".join(f"{k}: {v}" for k, v in list(errors.items())[:3]))
    for candidate in candidates:
        if isinstance(candidate, (str, int)) and not isinstance(candidate, bool) and str(candidate).strip():
            return sanitize_description(candidate, 200)
    return ""


def _as_int(value: Any) -> int | None:
    """An integer written the ways a PHP service writes one: 3, 3.0, "3"; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (float, Decimal)) and value == value and value == int(value):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value.strip()) < 19:
        return int(value.strip())
    return None


def _true(value: Any) -> bool:
    """``true``, ``1``, ``"true"``, ``"1"``, ``"yes"``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return _as_int(value) == 1


def _false(value: Any) -> bool:
    """``false``, ``0``, ``"false"``, ``"0"``, ``"no"`` (``null`` is not false: it says nothing)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return value.strip().lower() in ("false", "0", "no")
    return _as_int(value) == 0


def _failure_word(value: str) -> bool:
    word = value.strip().lower()
    return word in _FAILURE_WORDS or word.startswith(_FAILURE_PREFIXES)


def _error_here(folded: dict[str, Any]) -> str | None:
    for key in ("error", "error_code", "error_message", "error_description"):
        value = folded.get(key)
        if _set(value) and not _false(value):
            code = sanitize_description(value, 64) if isinstance(value, (str, int)) else "error"
            message = _service_message(folded)
            return f"{key} {code!r}" + (f": {message}" if message and message != code else "")
    errors = folded.get("errors")
    if isinstance(errors, (list, Mapping)) and errors:
        message = _service_message(folded)
        return "errors" + (f": {message}" if message else "")
    for flag in ("success", "ok"):
        if flag in folded and _false(folded[flag]):
            message = _service_message(folded)
            return f"{flag}: {sanitize_description(folded[flag], 20)}" + (f": {message}" if message else "")
    for key in ("status", "result"):
        value = folded.get(key)
        number = _as_int(value)
        bad = (
            value is False
            or (number is not None and number >= 400)
            or (isinstance(value, str) and number is None and _failure_word(value))
        )
        if bad:
            message = _service_message(folded)
            shown = sanitize_description(value, 40)
            return f"{key} {shown!r}" + (f": {message}" if message else "")
    # not a bare "code": records carry account codes such as "4000"
    for key in ("status_code", "http_code", "http_status"):
        number = _as_int(folded.get(key))
        if number is not None and number >= 400:
            message = _service_message(folded)
            return f"{key} {number}" + (f": {message}" if message else "")
    return None


def error_in(members: Mapping[str, Any]) -> str | None:
    """Why ``members`` (an envelope) reports an error, or ``None`` when it does not.

    Checked at the top level and inside ``links``/``paging``/``pagination``/``meta``/``_links``.
    """
    folded = _folded(members)
    why = _error_here(folded)
    if why is not None:
        return why
    for name in _NESTED:
        nested = folded.get(name)
        if isinstance(nested, Mapping):
            why = _error_here(_folded(nested))
            if why is not None:
                return f"{name}.{why}"
    return None


def paging_in(members: Mapping[str, Any], records: int) -> str | None:
    """Why ``members`` says the answer holds only part of the list, or ``None``."""
    top = _folded(members)
    scopes: list[tuple[str, dict[str, Any]]] = [("", top)]
    for name in _NESTED:
        nested = top.get(name)
        if isinstance(nested, Mapping):
            scopes.append((f"{name}.", _folded(nested)))
        elif isinstance(nested, list):  # "links": [{"rel": "next", "href": ...}]
            for link in nested:
                if isinstance(link, Mapping):
                    folded_link = _folded(link)
                    if str(folded_link.get("rel", "")).lower() == "next" and _set(folded_link.get("href", True)):
                        return f"'{name}' has a rel=next link (a next page)"
    for prefix, scope in scopes:
        for key in _COUNT_KEYS:
            value = _as_int(scope.get(key))
            if value is not None and value > records:
                return f"'{prefix}{key}' is {value} but {records} records arrived"
        for key in _NEXT_KEYS:
            value = scope.get(key)
            if (
                _set(value)
                and not _false(value)
                and not (isinstance(value, Mapping) and not any(map(_set, value.values())))
            ):
                return f"'{prefix}{key}' is set (a next page)"
        for key in _MORE_KEYS:
            if _true(scope.get(key)):
                return f"'{prefix}{key}' is true"
        page = _as_int(scope.get("page", scope.get("current_page")))
        for key in _PAGES_KEYS:
            value = _as_int(scope.get(key))
            if value is not None and value > (page or 1):
                return f"'{prefix}{key}' is {value}" + (f" and this is page {page}" if page is not None else "")
    return None


def _without(members: Mapping[str, Any], skip: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in members.items():
        name = _norm(key)
        if name in skip:
            continue
        if name in _NESTED and isinstance(value, Mapping):
            value = _without(value, skip)
        out[key] = value
    return out


def check_envelope(
    members: Mapping[str, Any],
    *,
    ignore: tuple[str, ...] | list[str] = (),
    records: int | None,
    label: str,
    records_path: str = "data",
    write: bool = False,
    status: int | None = None,
    module: str | None = None,
    query: str | None = None,
) -> None:
    """Raise :class:`AnswerRefused` when the envelope reports an error or a partial answer.

    :param members: the top-level members other than the records.
    :param records: records delivered when they were an array (paging is checked), else ``None``.
    :param ignore: member names that mean something else for this query (a ``total`` that
        is an amount, not a count): left out of both checks.
    """
    common: dict[str, Any] = {"status": status, "module": module, "query": query}
    if ignore:
        members = _without(members, {_norm(name) for name in ignore})
    why = error_in(members)
    if why is not None:
        if write:
            raise AnswerRefused(
                f"Papertrail-ai answered the write {label} with HTTP {status} but its body reports an error ({why}). "
                "It was NOT retried. The service may still have created the record: look it up in the accounting "
                "system before you run the write again.",
                error="error_envelope",
                **common,
            )
        raise AnswerRefused(
            f"Papertrail-ai answered {label} with HTTP {status} but its body reports an error ({why}); "
            "nothing was written. If it names the token or the grant, re-run the papertrail_authorize DAG; "
            "otherwise check the query, system and query_params.",
            error="error_envelope",
            **common,
        )
    if records is None:
        return
    hint = paging_in(members, records)
    if hint is not None:
        raise AnswerRefused(
            f"the answer of Papertrail-ai {label} is paged ({hint}): it carries only part of the list, and the "
            "provider does not follow paging because Papertrail-ai does not document its form. Nothing was "
            f"written. Narrow the query with query_params (e.g. a date range) so one answer holds every record, "
            f"or ask the service for the rest with its page parameter in query_params (records were read from "
            f"{records_path!r}).",
            error="paged_answer",
            **common,
        )


__all__ = ["check_envelope", "error_in", "paging_in"]
