"""Is an HTTP 2xx answer really a complete success? Error envelopes and paging hints.

Papertrail-ai's answer shapes are not published (see docs/data-access.md). A PHP wrapper
over six accounting systems may answer HTTP 200 with a body that reports an error, or
with one page of a longer list. For accounting data a green task with missing rows is the
worst outcome, so an answer is refused (:class:`~airflow_papertrail.exceptions.AnswerRefused`)
when its top-level object (the *envelope*: every member except the records) says so:

Error envelopes (``error="error_envelope"``):

* ``error`` is anything but ``null``/``false``/``""``/``{}``/``[]`` (``"invalid_token"``,
  ``{"code": ...}``, ``true``);
* ``errors`` is a non-empty array or object;
* ``success`` or ``ok`` is ``false``;
* ``status`` is ``false``, an integer outside 200-299, or a string other than ``ok``,
  ``success``, ``succeeded``, ``successful``, ``complete``, ``completed``, ``done``
  (``"error"``, ``"fail"``, and also ``"partial"``: anything else is ambiguous).

Paging hints (``error="paged_answer"``), checked when the records were an array:

* a count member (``count``, ``total``, ``total_count``, ``total_records``,
  ``total_results``, ``record_count``, ``num_records``) that is an integer larger than the
  number of records delivered;
* a next-page member (``next``, ``next_page``, ``next_page_url``, ``next_url``,
  ``next_cursor``, ``cursor``, ``next_page_token``, ``page_token``, ``continuation``,
  ``continuation_token``, ``scroll_id``, ``offset_next``) that is set (not ``null``,
  ``false`` or ``""``);
* a more-flag (``has_more``, ``more``, ``has_next``, ``more_results``, ``more_records``)
  that is ``true``;
* a page count (``total_pages``, ``pages``, ``page_count``, ``last_page``) above the
  current ``page`` (or above 1 when there is no ``page``);
* the same members inside ``links``, ``paging``, ``pagination``, ``meta`` or ``_links``.

A member that means something else for one query (a ``total`` that is an amount) can be
left out with ``ignore_members=[...]`` on the operators and the client.
Member names are compared without case and with ``-``/camelCase folded to ``_``
(``nextPageToken``, ``hasMore``, ``Status``). The provider does not follow paging: its
form is not documented. The message says what was seen and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from airflow_papertrail.exceptions import AnswerRefused, sanitize_description

_SUCCESS_STATUS = frozenset({"ok", "success", "succeeded", "successful", "complete", "completed", "done"})
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


def error_in(members: Mapping[str, Any]) -> str | None:
    """Why ``members`` (an envelope) reports an error, or ``None`` when it does not."""
    folded = _folded(members)
    error = folded.get("error")
    if _set(error):
        code = sanitize_description(error, 64) if isinstance(error, str) else "error"
        message = _service_message(folded)
        return f"error {code!r}" + (f": {message}" if message and message != code else "")
    errors = folded.get("errors")
    if isinstance(errors, (list, Mapping)) and errors:
        message = _service_message(folded)
        return "errors" + (f": {message}" if message else "")
    for flag in ("success", "ok"):
        if folded.get(flag) is False:
            message = _service_message(folded)
            return f"{flag}: false" + (f": {message}" if message else "")
    if "status" in folded:
        status = folded["status"]
        bad = (
            status is False
            or (_is_int(status) and not 200 <= status < 300)
            or (isinstance(status, str) and status.strip().lower() not in _SUCCESS_STATUS)
        )
        if bad:
            message = _service_message(folded)
            shown = sanitize_description(status, 40)
            return f"status {shown!r}" + (f": {message}" if message else "")
    return None


def paging_in(members: Mapping[str, Any], records: int) -> str | None:
    """Why ``members`` says the answer holds only part of the list, or ``None``."""
    scopes = [_folded(members)]
    for name in _NESTED:
        nested = scopes[0].get(name)
        if isinstance(nested, Mapping):
            scopes.append(_folded(nested))
    for scope in scopes:
        for key in _COUNT_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > records:
                return f"{key!r} is {value} but {records} records arrived"
        for key in _NEXT_KEYS:
            value = scope.get(key)
            if _set(value) and not (isinstance(value, Mapping) and not any(map(_set, value.values()))):
                return f"{key!r} is set (a next page)"
        for key in _MORE_KEYS:
            if scope.get(key) is True:
                return f"{key!r} is true"
        raw_page = scope.get("page", scope.get("current_page"))
        page: int | None = raw_page if _is_int(raw_page) else None
        for key in _PAGES_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > (page or 1):
                return f"{key!r} is {value}" + (f" and this is page {page}" if page is not None else "")
    return None


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
        skip = {_norm(name) for name in ignore}
        members = {k: v for k, v in members.items() if _norm(k) not in skip}
    why = error_in(members)
    if why is not None:
        if write:
            raise AnswerRefused(
                f"Papertrail-ai answered the write {label} with HTTP {status} but its body reports an error ({why}). "
                "It was NOT retried. Check in the accounting system whether the record exists, fix the payload, "
                "then run it again.",
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
