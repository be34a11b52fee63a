"""DataClient: the data modules of Papertrail-ai (``<api_url>/api_<module>.php``).

Framework-free (no Airflow import at module level): the hook builds it with a token
provider; tests and scripts build it with any callable that returns a bearer token.

* Reads are GETs, retried by the shared :class:`~airflow_papertrail.oauth.retry.RetryPolicy`
  (connection errors, lost answers, 429 with ``Retry-After``, 5xx).
* Writes (``create_*``, ``account_*`` and anything not documented) are POSTs with a JSON
  body and an ``Idempotency-Key``; they are retried only when the request certainly never
  left. Once a write may have reached the server (timeout, dropped connection, 5xx) it is
  **not** replayed: :class:`WriteOutcomeUnknown` says to check the accounting system.
* An HTTP 401 gets exactly one forced token refresh and one more attempt.
* Large lists are streamed: :meth:`DataClient.iter_records` and :meth:`DataClient.extract`
  hold one network chunk and one record at a time, never the whole body.

No message contains a token: the bearer token only ever travels in the ``Authorization``
header, and error texts quote the module file, the query, the system and a sanitised
server description.
"""

from __future__ import annotations

import contextlib
import decimal
import json
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from airflow_papertrail.api.answers import check_envelope
from airflow_papertrail.api.jsonstream import DEFAULT_MAX_RECORD_CHARS, JsonStreamError, RecordsNotFound, RecordStream
from airflow_papertrail.api.modules import QuerySpec, is_list, is_write, validate
from airflow_papertrail.api.sink import Sink
from airflow_papertrail.exceptions import (
    AnswerRefused,
    PapertrailApiError,
    PapertrailConfigurationError,
    ReauthorizationRequired,
    TransientApiError,
    WriteAnswerUnreadable,
    WriteOutcomeUnknown,
    sanitize_description,
)
from airflow_papertrail.oauth.client import USER_AGENT, _never_sent
from airflow_papertrail.oauth.retry import RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from typing import BinaryIO

    from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 16
# Error answers are read only this far (an HTML error page can be large).
_ERROR_BODY_LIMIT = 64 * 1024
_RESERVED_PARAMS = frozenset({"system", "query", "access_token"})
#: A write's answer is read this far (it is done whatever its size; beyond this it is not parsed).
WRITE_ANSWER_LIMIT = 64 * 1024 * 1024


class _NonFinite(ValueError):
    """Internal: NaN/Infinity in an answer (not JSON; BigQuery, Spark and jq refuse it)."""


def _reject_constant(name: str) -> Any:
    raise _NonFinite(f"{name} is not a JSON number")


def _loads(raw: bytes, parse_float: Callable[[str], Any]) -> Any:
    """``json.loads`` with exact numbers (``parse_float``) and NaN/Infinity refused."""
    return json.loads(raw, parse_float=parse_float, parse_constant=_reject_constant)


def _dumps(payload: Any) -> bytes:
    """Compact JSON of a payload; ``Decimal`` amounts are written as the exact number they hold.

    NaN and Infinity (float or Decimal) are refused: they are not JSON.
    """
    decimals = False

    def walk(value: Any, depth: int) -> None:
        nonlocal decimals
        if depth > 500:
            raise ValueError("it is nested too deeply")
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"{value} is not a JSON number")
        elif isinstance(value, decimal.Decimal):
            if not value.is_finite():
                raise ValueError(f"{value} is not a JSON number")
            decimals = True
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise TypeError(f"keys must be strings, not {type(key).__name__}")
                walk(item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, depth + 1)

    walk(payload, 0)
    if decimals:
        import msgspec

        return msgspec.json.Encoder(decimal_format="number").encode(payload)
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
class _BearerAuth(AuthBase):
    """Sets the bearer token per request; as an ``auth`` it also stops requests from
    replacing the header with ``~/.netrc`` credentials (``trust_env``)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


def _query_params(spec: QuerySpec, system: str, params: Mapping[str, Any] | None) -> dict[str, str]:
    out = {"system": system, "query": spec.query}
    for name, value in (params or {}).items():
        if not isinstance(name, str) or not name:
            raise PapertrailConfigurationError(f"parameter names must be non-empty strings, got {name!r}")
        if name in _RESERVED_PARAMS:
            raise PapertrailConfigurationError(
                f"parameter {name!r} cannot be passed in params: use the system/query arguments "
                "(and tokens never travel in the URL)"
            )
        if value is None:
            continue
        if isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, (float, decimal.Decimal)) and (value != value or abs(value) == float("inf")):
            raise PapertrailConfigurationError(f"parameter {name!r} is {value}, which is not a number to send")
        elif isinstance(value, (str, int, float, decimal.Decimal)):
            out[name] = str(value)
        else:
            raise PapertrailConfigurationError(
                f"parameter {name!r} must be a string, number or boolean (it is sent in the query string), "
                f"got {type(value).__name__}"
            )
    return out


def _json_body(spec: QuerySpec, payload: Any) -> bytes | None:
    if not spec.write:
        if payload is not None:
            raise PapertrailConfigurationError(
                f"{spec.label} is a read query; payload is only for write queries (create_*, account_*)"
            )
        return None
    if payload is None:
        if spec.documented:
            raise PapertrailConfigurationError(
                f"{spec.label} changes data and needs a payload: a JSON object with the record's fields"
            )
        return None
    if isinstance(payload, (str, bytes)):
        # JSON text (what a template renders): sent byte for byte, so "1150.00" stays 1150.00.
        raw = payload.encode("utf-8") if isinstance(payload, str) else payload
        try:
            value = _loads(raw, decimal.Decimal)
        except (UnicodeDecodeError, ValueError) as exc:
            raise PapertrailConfigurationError(
                f"the payload of {spec.label} is a string but not valid JSON ({exc}); pass a JSON object, "
                'e.g. \'{"name": "Acme Ltd"}\', or a dict'
            ) from None
        if not isinstance(value, (dict, list)):
            raise PapertrailConfigurationError(
                f"the payload of {spec.label} must be a JSON object or array, got JSON {type(value).__name__}"
            )
        return raw.strip()
    if not isinstance(payload, (dict, list)):
        raise PapertrailConfigurationError(
            f"the payload of {spec.label} must be a JSON object (dict) or array (list), or its JSON text, "
            f"got {type(payload).__name__}"
        )
    try:
        return _dumps(payload)
    except (TypeError, ValueError) as exc:
        raise PapertrailConfigurationError(f"the payload of {spec.label} is not valid JSON: {exc}") from None


def _error_details(response: requests.Response) -> tuple[str | None, str, list[str]]:
    """(error code, sanitised description, valid values the service listed) of an error answer."""
    raw = b""
    with contextlib.suppress(requests.RequestException, OSError):
        for piece in response.iter_content(8192):
            raw += piece
            if len(raw) >= _ERROR_BODY_LIMIT:
                break
    try:
        body = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, ValueError):
        body = None
    if not isinstance(body, dict):
        return None, "", []
    error = body.get("error")
    description = body.get("error_description") or body.get("message") or ""
    valid = body.get("valid")
    valid_list = [sanitize_description(v, 40) for v in valid][:50] if isinstance(valid, list) else []
    return (
        sanitize_description(error, 64) if isinstance(error, str) else None,
        sanitize_description(description),
        valid_list,
    )


def _retry_after(response: requests.Response) -> str:
    value = response.headers.get("Retry-After")
    return f"; the server asked to wait {sanitize_description(value, 40)} s" if value else ""


class _BodyInterrupted(Exception):
    """Internal: the connection broke while the body of a read was arriving."""

    def __init__(self, records: int, cause: BaseException) -> None:
        self.records = records
        self.cause = cause
        super().__init__(type(cause).__name__)


# ---------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------
class DataClient:
    """Calls the Papertrail-ai data modules with a bearer token.

    :param api_url: directory URL of the modules (``https://www.papertrail-ai.com/api``);
        ``/api_<module>.php`` is appended.
    :param default_system: accounting system sent when a call does not name one.
    :param token_provider: ``token_provider(force_refresh)`` returns a valid access token;
        called with ``True`` once after an HTTP 401.
    :param timeout: seconds to connect, and between two bytes of an answer.
    :param verify: ``requests``' TLS verification (``True`` or a CA bundle path).
    :param retry_policy: the shared retry policy (default :class:`RetryPolicy`).
    :param session_factory: builds the ``requests.Session`` objects (proxies, adapters);
        the retry adapter is mounted on whatever it returns.
    :param chunk_size: bytes read from the socket at a time when streaming.
    :param conn_id: connection id, named in errors that need a person to re-authorize.
    :param max_record_chars: largest single record accepted while streaming.
    """

    def __init__(
        self,
        *,
        api_url: str,
        default_system: str | None,
        token_provider: Callable[[bool], str],
        timeout: float = 30.0,
        verify: str | bool = True,
        retry_policy: RetryPolicy | None = None,
        session_factory: Callable[[], requests.Session] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        conn_id: str | None = None,
        max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.api_url = api_url.rstrip("/")
        self.default_system = default_system
        self.token_provider = token_provider
        self.timeout = timeout
        self.verify = verify
        self.retry_policy = retry_policy or RetryPolicy()
        self.session_factory = session_factory or requests.Session
        self.chunk_size = chunk_size
        self.conn_id = conn_id
        self.max_record_chars = max_record_chars
        self._sessions: dict[str, requests.Session] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DataClient(api_url={self.api_url!r}, default_system={self.default_system!r})"

    def url(self, module: str) -> str:
        """The URL of one module (no query string, no token)."""
        return f"{self.api_url}/api_{module}.php"

    # -- public calls -----------------------------------------------------------------------
    def query(
        self,
        module: str,
        query: str,
        *,
        system: str | None = None,
        params: Mapping[str, Any] | None = None,
        payload: Any = None,
        allow_unknown: bool = False,
        idempotency_key: str | None = None,
        max_bytes: int | None = None,
        records_path: str = "data",
        ignore_members: Sequence[str] = (),
        parse_float: Callable[[str], Any] = decimal.Decimal,
    ) -> Any:
        """Run one query and return its parsed JSON answer (``None`` for an empty write answer).

        Numbers with a fraction or exponent are parsed with ``parse_float`` (default
        ``Decimal``: ``1150.00`` stays ``Decimal("1150.00")``; ``str`` keeps the text);
        ``NaN``/``Infinity`` are refused. A 2xx answer whose body reports an error, or that
        announces more records under ``records_path`` than it carries, raises
        :class:`AnswerRefused` (see :mod:`airflow_papertrail.api.answers`).

        :param module: a module of :data:`~airflow_papertrail.api.modules.MODULES`.
        :param query: one of its queries.
        :param system: accounting system; defaults to the connection's.
        :param params: extra query-string parameters (strings, numbers, booleans).
        :param payload: the body of a write query: a dict/list (``Decimal`` values are
            written as exact numbers) or its JSON text (sent byte for byte).
        :param allow_unknown: accept a module/query not in the table (sent as a write).
        :param idempotency_key: ``Idempotency-Key`` of a write (default: a new UUID4); give
            the same key to the same logical write so a server that supports it dedupes.
        :param max_bytes: refuse a *read's* answer larger than this (read it in memory
            otherwise). A write's answer is never refused for its size: the write is done.
        :param records_path: the member holding the records (for the paging check).
        :param ignore_members: envelope members left out of the error and paging checks.
        :param parse_float: how non-integer numbers are parsed.
        :raises PapertrailConfigurationError: invalid module/query/params/payload.
        :raises PapertrailApiError: the service refused the call or answered garbage.
        :raises AnswerRefused: a 2xx answer that reports an error or is paged.
        :raises TransientApiError: unreachable / 429 / 5xx after retries (nothing changed).
        :raises WriteOutcomeUnknown: a write may have been processed; it was not retried.
        :raises WriteAnswerUnreadable: a write was done (2xx) but its answer is unreadable.
        :raises ReauthorizationRequired: the token is refused even after a refresh.
        """
        spec = validate(module, query, allow_unknown)
        body = _json_body(spec, payload)
        qparams = _query_params(spec, self._system(system), params)
        key = (idempotency_key or str(uuid.uuid4())) if spec.write else None
        attempts = 1 if spec.write else 1 + self.retry_policy.total
        for attempt in range(attempts):
            response = self._send(spec, qparams, body, key)
            status = response.status_code
            try:
                try:
                    raw = self._read_all(spec, response, WRITE_ANSWER_LIMIT if spec.write else max_bytes)
                except _BodyInterrupted as exc:
                    if spec.write:
                        raise WriteOutcomeUnknown(
                            f"Papertrail-ai accepted the write {spec.label} (HTTP {status}) but its answer "
                            f"was cut off ({exc}). It was NOT retried: it has been processed and a replay could create "
                            "a duplicate. Look the record up in the accounting system.",
                            status=status,
                            module=spec.module,
                            query=spec.query,
                        ) from None
                    if attempt + 1 >= attempts:
                        raise self._interrupted_error(spec, exc) from None
                    self._backoff(attempt, spec, exc)
                    continue
                except PapertrailApiError as exc:
                    if spec.write and exc.error == "response_too_large":
                        raise self._unreadable_write(
                            spec, status, f"it is larger than {WRITE_ANSWER_LIMIT} bytes and was not read"
                        ) from None
                    raise
                finally:
                    response.close()
                if not raw.strip():
                    if spec.write:
                        return None
                    raise PapertrailApiError(
                        f"Papertrail-ai answered {spec.label} with HTTP {status} and an empty body",
                        status=status,
                        error="invalid_response",
                        module=spec.module,
                        query=spec.query,
                    )
                try:
                    result = _loads(raw, parse_float)
                except (UnicodeDecodeError, ValueError, RecursionError, ArithmeticError) as exc:
                    if isinstance(exc, _NonFinite):
                        what = str(exc)
                    elif isinstance(exc, (RecursionError, ArithmeticError)) or "digits" in str(exc):
                        what = f"it cannot be read exactly ({type(exc).__name__}: nested too deeply or a number out of range)"
                    else:
                        what = "the body is not JSON"
                    if spec.write:
                        raise self._unreadable_write(
                            spec,
                            status,
                            f"{what}; Content-Type {sanitize_description(response.headers.get('Content-Type'), 60)!r}",
                        ) from None
                    raise PapertrailApiError(
                        f"Papertrail-ai answered {spec.label} with HTTP {status} but {what} "
                        f"(Content-Type {sanitize_description(response.headers.get('Content-Type'), 60)!r})",
                        status=status,
                        error="invalid_response",
                        module=spec.module,
                        query=spec.query,
                    ) from None
                if isinstance(result, dict):
                    records = result.get(records_path)
                    check_envelope(
                        {k: v for k, v in result.items() if k != records_path},
                        records=len(records) if isinstance(records, list) else None,
                        label=spec.label,
                        records_path=records_path,
                        write=spec.write,
                        status=status,
                        module=spec.module,
                        query=spec.query,
                        ignore=list(ignore_members),
                    )
                return result
            except (PapertrailApiError, PapertrailConfigurationError):
                raise
            except Exception as exc:  # after a 2xx a write is done: never let it look retryable
                if not spec.write:
                    raise
                raise self._unreadable_write(spec, status, f"{type(exc).__name__} while reading it") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _unreadable_write(self, spec: QuerySpec, status: int, why: str) -> WriteAnswerUnreadable:
        return WriteAnswerUnreadable(
            f"the write {spec.label} was DONE (Papertrail-ai answered HTTP {status}) but its answer is unreadable "
            f"({why}). It was NOT retried and must not be sent again: the record exists in the accounting "
            "system; look it up there.",
            status=status,
            error="unreadable_answer",
            module=spec.module,
            query=spec.query,
        )

    def iter_records(
        self,
        module: str,
        query: str,
        *,
        system: str | None = None,
        params: Mapping[str, Any] | None = None,
        allow_unknown: bool = False,
        records_path: str = "data",
        ignore_members: Sequence[str] = (),
        parse_float: Callable[[str], Any] = decimal.Decimal,
    ) -> Iterator[Any]:
        """Stream the records of a read query without holding the body in memory.

        Yields the items of the answer's ``records_path`` array (default ``data``, or of a
        top-level array); a ``records_path`` object (a report) is one record; see
        :mod:`airflow_papertrail.api.jsonstream`. Numbers with a fraction or exponent are
        parsed with ``parse_float`` (default ``Decimal``, exact). Arguments are checked at
        once; the request is sent on the first ``next()``. The envelope (error members,
        paging hints) is checked when the body ends, so an :class:`AnswerRefused` may come
        after records were yielded: treat it as "this list is not complete". A connection
        lost half-way raises :class:`TransientApiError` (records already yielded stay
        yielded: start again, or use :meth:`extract`, which does).
        """
        spec = self._read_spec(module, query, allow_unknown)
        qparams = _query_params(spec, self._system(system), params)
        return self._iter_records(spec, qparams, records_path, tuple(ignore_members), parse_float)

    def _iter_records(
        self,
        spec: QuerySpec,
        qparams: dict[str, str],
        records_path: str,
        ignore: tuple[str, ...],
        parse_float: Callable[[str], Any],
    ) -> Iterator[Any]:
        response = self._send(spec, qparams, None, None)
        stream = RecordStream(key=records_path, max_record_chars=self.max_record_chars, parse_float=parse_float)
        try:
            for chunk in self._chunks(response, stream):
                try:
                    items = stream.feed(chunk)
                except JsonStreamError as exc:
                    raise self._malformed(spec, exc, records_path) from None
                yield from items
            items = self._close_stream(spec, stream, records_path)
            self._check_stream(spec, stream, response.status_code, records_path, ignore)
            yield from items
        except _BodyInterrupted as exc:
            raise self._interrupted_error(spec, exc) from None
        finally:
            response.close()

    def extract(
        self,
        module: str,
        query: str,
        destination: Any,
        *,
        system: str | None = None,
        params: Mapping[str, Any] | None = None,
        allow_unknown: bool = False,
        records_path: str = "data",
        ignore_members: Sequence[str] = (),
        lineage_context: Any = None,
    ) -> dict[str, Any]:
        """Stream a read query's records to ``destination`` as JSON lines (one record a line).

        Each line is the record's text exactly as the service sent it (numbers, escapes and
        unicode untouched; only line breaks between tokens become spaces). The file is
        written under a temporary name and renamed when complete, so a failed extraction
        never leaves a file that looks whole; an answer whose envelope reports an error or
        a next page is refused before the rename. A connection lost half-way restarts the
        download (bounded by the retry policy); a report (``records_path`` object) becomes
        a single line.

        :param destination: a local path (``str``/``Path``), a URL string
            (``s3://...``, ``file://...``) or an ``airflow.sdk.ObjectStoragePath``
            (anything with ``open("wb")``).
        :param records_path: the top-level member holding the records (default ``data``).
        :param ignore_members: envelope members left out of the error and paging checks.
        :param lineage_context: the ``context`` Airflow's hook lineage collector gets with the
            final path (the operator passes its hook; default: the path itself).
        :returns: ``{"path": str(destination), "records": n, "bytes": b}``.
        """
        spec = self._read_spec(module, query, allow_unknown)
        qparams = _query_params(spec, self._system(system), params)
        sink = Sink(destination, lineage_context=lineage_context)
        attempts = 1 + self.retry_policy.total
        started = time.monotonic()
        ignore = tuple(ignore_members)
        for attempt in range(attempts):
            try:
                with sink.open() as fh:
                    records, size = self._write_records(spec, qparams, fh, records_path, ignore)
            except _BodyInterrupted as exc:
                if attempt + 1 >= attempts:
                    raise self._interrupted_error(spec, exc) from None
                self._backoff(attempt, spec, exc)
                continue
            sink.commit()  # renames, then reports the final path (never the temporary one) as lineage
            log.info(
                "Extracted %d records (%d bytes) of Papertrail-ai %s in %.1f s to %s",
                records,
                size,
                spec.label,
                time.monotonic() - started,
                destination,
            )
            return {"path": str(destination), "records": records, "bytes": size}
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()

    # -- request plumbing ------------------------------------------------------------------
    def _system(self, system: str | None) -> str:
        value = system or self.default_system
        if not value or not isinstance(value, str):
            raise PapertrailConfigurationError(
                "system is required: set the connection extra 'system' (e.g. xero) or pass system=..."
            )
        return value

    @staticmethod
    def _read_spec(module: str, query: str, allow_unknown: bool) -> QuerySpec:
        """Streaming is read-only by nature: an undocumented query is sent as a read here,
        unless its name says it writes (``create_*``, ``account_*``)."""
        spec = validate(module, query, allow_unknown)
        if not spec.documented and not is_write(query):
            return QuerySpec(module, query, write=False, documented=False)
        if spec.write:
            raise PapertrailConfigurationError(
                f"{spec.label} changes data; streaming and extraction are for read queries. Use query() instead."
            )
        return spec

    def _session(self, kind: str) -> requests.Session:
        with self._lock:
            session = self._sessions.get(kind)
            if session is None:
                retry: Retry = self.retry_policy.for_write() if kind == "write" else self.retry_policy.for_read()
                session = self.session_factory()
                adapter = HTTPAdapter(max_retries=retry)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
                self._sessions[kind] = session
            return session

    def _send(
        self, spec: QuerySpec, qparams: dict[str, str], body: bytes | None, idempotency_key: str | None
    ) -> requests.Response:
        """One call (with the 401 refresh-once rule); returns a 2xx answer whose body is unread."""
        response = self._attempt(spec, qparams, body, idempotency_key, self.token_provider(False))
        if response.status_code == 401:
            response.close()
            log.info("Papertrail-ai refused the access token for %s (HTTP 401); refreshing it once", spec.label)
            response = self._attempt(spec, qparams, body, idempotency_key, self.token_provider(True))
            if response.status_code == 401:
                error, description, _ = _error_details(response)
                response.close()
                raise ReauthorizationRequired(
                    self.conn_id or "(unknown connection)",
                    # module and query apart: a label such as customers/create_credit_note is long
                    # enough to look like a token to sanitize_description and would be redacted
                    f"the data API refused a freshly refreshed access token for query {spec.query!r} "
                    f"of module {spec.module!r}"
                    + (f" ({error}: {description})" if description else f" ({error})" if error else ""),
                    error=error or "invalid_token",
                    status=401,
                )
        if 200 <= response.status_code < 300:
            return response
        try:
            raise self._status_error(spec, response, qparams["system"])
        finally:
            response.close()

    def _attempt(
        self, spec: QuerySpec, qparams: dict[str, str], body: bytes | None, idempotency_key: str | None, token: str
    ) -> requests.Response:
        url = self.url(spec.module)
        headers: dict[str, str] = {}
        if spec.write:
            headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
            if body is not None:
                headers["Content-Type"] = "application/json"
        session = self._session("write" if spec.write else "read")
        started = time.monotonic()
        try:
            response = session.request(
                "POST" if spec.write else "GET",
                url,
                params=qparams,
                data=body,
                headers=headers,
                auth=_BearerAuth(token),
                timeout=self.timeout,
                verify=self.verify,
                allow_redirects=False,
                stream=True,
            )
        except requests.exceptions.SSLError as exc:
            raise PapertrailApiError(
                f"TLS verification of {url} failed ({type(exc).__name__}); if the server uses a private CA, "
                "set ca_bundle in the connection extra (verification is never switched off)",
                module=spec.module,
                query=spec.query,
            ) from None
        except requests.exceptions.RequestException as exc:
            what = type(exc).__name__
            if spec.write and not _never_sent(exc):
                raise WriteOutcomeUnknown(
                    f"the write {spec.label} (system {qparams['system']!r}) was sent to Papertrail-ai but no answer "
                    f"arrived ({what}). It was NOT retried, to avoid creating a duplicate (e.g. a second invoice). "
                    "Check in the accounting system whether the record exists before trying again.",
                    module=spec.module,
                    query=spec.query,
                ) from None
            sent = " (the write was not sent; trying again is safe)" if spec.write else ""
            raise TransientApiError(
                f"could not reach Papertrail-ai {url} for {spec.label} after retries ({what}){sent}; "
                "check the network/proxy and the api_url, then retry",
                module=spec.module,
                query=spec.query,
            ) from None
        log.debug(
            "Papertrail-ai %s %s query=%s -> HTTP %s in %.2f s",
            "POST" if spec.write else "GET",
            url,
            spec.query,
            response.status_code,
            time.monotonic() - started,
        )
        return response

    def _status_error(self, spec: QuerySpec, response: requests.Response, system: str) -> PapertrailApiError:
        status = response.status_code
        error, description, valid = _error_details(response)
        detail = f" {error}" if error else ""
        detail += f": {description}" if description else ""
        where = f"Papertrail-ai {spec.label} (system {system!r}) answered HTTP {status}{detail}"
        common: dict[str, Any] = {"status": status, "error": error, "module": spec.module, "query": spec.query}
        if spec.write and status >= 500:
            return WriteOutcomeUnknown(
                f"{where}. The write was NOT retried: the server may have processed it, and a replay could create "
                "a duplicate (e.g. a second invoice). Check in the accounting system whether the record exists "
                "before trying again.",
                **common,
            )
        if status == 429 or status >= 500:
            tried = "" if spec.write else " after retries"
            safe = " The write was not processed; retrying later is safe." if spec.write else ""
            return TransientApiError(
                f"{where}{tried}{_retry_after(response)}.{safe} Retry later.",
                **common,
            )
        hints = {
            400: "The service refused the request: check the query, params and system.",
            403: "The grant does not allow this module/query: re-run the papertrail_authorize DAG with the needed scope.",
            404: f"No such module at {self.api_url}: check the connection's api_url/host.",
            405: "The service refused the HTTP method: if the query is not documented, it may be a read; "
            "query() sends undocumented queries as writes (POST), extract()/iter_records() "
            "(PapertrailExtractOperator) as reads (GET).",
            413: "The payload is too large for the service.",
            415: "The service refused the payload's content type.",
        }
        hint = hints.get(status, "The call was refused.")
        if valid:
            hint += f" Valid values: {', '.join(valid)}."
        return PapertrailApiError(f"{where}. {hint}", **common)

    # -- bodies ------------------------------------------------------------------------------
    def _chunks(self, response: requests.Response, stream: RecordStream | None = None) -> Iterator[bytes]:
        try:
            yield from response.iter_content(self.chunk_size)
        except requests.exceptions.RequestException as exc:  # broken chunking, connection, bad gzip
            raise _BodyInterrupted(stream.records if stream else 0, exc) from None

    def _read_all(self, spec: QuerySpec, response: requests.Response, max_bytes: int | None) -> bytes:
        parts: list[bytes] = []
        size = 0
        for chunk in self._chunks(response):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise PapertrailApiError(
                    f"the answer of Papertrail-ai {spec.label} is larger than {max_bytes} bytes; "
                    "stream it with iter_records()/extract() (PapertrailExtractOperator) instead",
                    status=response.status_code,
                    error="response_too_large",
                    module=spec.module,
                    query=spec.query,
                )
            parts.append(chunk)
        return b"".join(parts)

    def _close_stream(self, spec: QuerySpec, stream: RecordStream, records_path: str) -> list[Any]:
        try:
            return stream.close()
        except JsonStreamError as exc:
            raise self._malformed(spec, exc, records_path) from None

    def _check_stream(
        self, spec: QuerySpec, stream: RecordStream, status: int, records_path: str, ignore: tuple[str, ...]
    ) -> None:
        """The envelope of a streamed answer: error members, paging hints (see api/answers.py)."""
        if stream.top_array:
            return

        def check(records: int | None) -> None:
            check_envelope(
                stream.envelope,
                records=records,
                label=spec.label,
                records_path=records_path,
                status=status,
                module=spec.module,
                query=spec.query,
                ignore=list(ignore),
            )

        if not stream.key_seen and is_list(spec.query):
            check(None)  # an error body first: its message says more than "no data member"
            # A list query's answer without its records member is an envelope (or an error),
            # not one record: never write it as a record and call the list complete.
            members = ", ".join(sanitize_description(repr(m), 40) for m in list(stream.envelope)[:8]) or "none"
            raise AnswerRefused(
                f"the answer of Papertrail-ai {spec.label} has no {records_path!r} member (its members: {members}); "
                "a list query's records must be there. Nothing was written. If the records are under another "
                "member, set records_path to it.",
                error="records_not_found",
                status=status,
                module=spec.module,
                query=spec.query,
            )
        check(stream.records if stream.key_seen and stream.key_array else None)

    def _malformed(self, spec: QuerySpec, exc: JsonStreamError, records_path: str = "data") -> PapertrailApiError:
        if isinstance(exc, RecordsNotFound):
            members = ", ".join(sanitize_description(repr(m), 40) for m in exc.members[:5])
            return AnswerRefused(
                f"the answer of Papertrail-ai {spec.label} has no {records_path!r} member but holds arrays in "
                f"{members}; the provider does not guess which one holds the records. Set records_path to the "
                f"member that does (e.g. records_path={sanitize_description(repr(exc.members[0]), 40)}). "
                "Nothing was written.",
                error="records_not_found",
                module=spec.module,
                query=spec.query,
            )
        return PapertrailApiError(
            f"the answer of Papertrail-ai {spec.label} is not the expected JSON: {exc}",
            error="invalid_response",
            module=spec.module,
            query=spec.query,
        )

    def _write_records(
        self, spec: QuerySpec, qparams: dict[str, str], fh: BinaryIO, records_path: str, ignore: tuple[str, ...]
    ) -> tuple[int, int]:
        response = self._send(spec, qparams, None, None)
        stream = RecordStream(key=records_path, max_record_chars=self.max_record_chars, raw=True)
        size = 0
        try:
            for chunk in self._chunks(response, stream):
                try:
                    data, _count = stream.feed_lines(chunk)
                except JsonStreamError as exc:
                    raise self._malformed(spec, exc, records_path) from None
                if data:
                    fh.write(data)
                    size += len(data)
            try:
                data, _count = stream.close_lines()
            except JsonStreamError as exc:
                raise self._malformed(spec, exc, records_path) from None
            self._check_stream(spec, stream, response.status_code, records_path, ignore)
            if data:
                fh.write(data)
                size += len(data)
        finally:
            response.close()
        return stream.records, size

    def _interrupted_error(self, spec: QuerySpec, exc: _BodyInterrupted) -> TransientApiError:
        return TransientApiError(
            f"the connection broke while the answer of Papertrail-ai {spec.label} was arriving "
            f"({type(exc.cause).__name__}, after {exc.records} records); retry later",
            module=spec.module,
            query=spec.query,
        )

    def _backoff(self, attempt: int, spec: QuerySpec, exc: _BodyInterrupted) -> None:
        policy = self.retry_policy
        delay = min(policy.backoff_max, policy.backoff_factor * (2**attempt))
        log.warning(
            "The answer of Papertrail-ai %s broke off (%s after %d records); downloading it again in %.1f s",
            spec.label,
            type(exc.cause).__name__,
            exc.records,
            delay,
        )
        time.sleep(delay)


__all__ = [
    "DataClient",
    "PapertrailApiError",
    "TransientApiError",
    "WriteOutcomeUnknown",
]
