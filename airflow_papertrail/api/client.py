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
import json
import logging
import os
import threading
import time
import uuid
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from airflow_papertrail.api.jsonstream import DEFAULT_MAX_RECORD_CHARS, JsonStreamError, RecordStream
from airflow_papertrail.api.modules import QuerySpec, is_write, validate
from airflow_papertrail.exceptions import (
    PapertrailApiError,
    PapertrailConfigurationError,
    ReauthorizationRequired,
    TransientApiError,
    WriteOutcomeUnknown,
    sanitize_description,
)
from airflow_papertrail.oauth.client import USER_AGENT, _never_sent
from airflow_papertrail.oauth.retry import RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from typing import BinaryIO

    from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 16
# Error answers are read only this far (an HTML error page can be large).
_ERROR_BODY_LIMIT = 64 * 1024
_RESERVED_PARAMS = frozenset({"system", "query", "access_token"})
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _lines_encoder() -> Callable[[list[Any]], str]:
    """``items -> "<json>\\n<json>\\n"``, compact, identical to ``json.dumps(item, separators=(",", ":"))``.

    Uses the C encoder directly when it is there: ``JSONEncoder.encode`` builds a new one
    per call, which was half the cost of an extraction. Falls back to ``encode`` otherwise.
    """

    def plain(items: list[Any]) -> str:
        return "".join(_ENCODER.encode(item) + "\n" for item in items)

    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has it
        return plain

    def unsupported(value: Any) -> Any:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    try:
        encoder = make(None, unsupported, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
        sample = {"a": [1, 2.5, None, True, "é\n"], "b": {}}
        if "".join(encoder(sample, 0)) != _ENCODER.encode(sample):
            return plain  # pragma: no cover - a future signature change
    except Exception:  # pragma: no cover
        return plain

    def fast(items: list[Any]) -> str:
        return "\n".join(map("".join, map(encoder, items, repeat(0)))) + "\n"

    return fast


_encode_lines = _lines_encoder()


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
        elif isinstance(value, (str, int, float)):
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
    if not isinstance(payload, (dict, list)):
        raise PapertrailConfigurationError(
            f"the payload of {spec.label} must be a JSON object (dict) or array (list), got {type(payload).__name__}"
        )
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")
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


class _Sink:
    """Where :meth:`DataClient.extract` writes: a temporary name first, renamed when complete."""

    def __init__(self, destination: Any) -> None:
        self.destination = destination
        self.local: Path | None = None
        self.remote: Any = None
        if isinstance(destination, (str, os.PathLike)) and "://" not in os.fspath(destination):
            self.local = Path(os.fspath(destination))
        else:
            target = destination
            if isinstance(destination, str):
                from airflow.sdk import ObjectStoragePath

                target = ObjectStoragePath(destination)
            if getattr(target, "protocol", None) in ("file", "local") and hasattr(target, "path"):
                self.local = Path(str(target.path))
            elif callable(getattr(target, "open", None)):
                self.remote = target
            else:
                raise PapertrailConfigurationError(
                    "destination must be a local path or an ObjectStoragePath (anything with open('wb')), "
                    f"got {type(destination).__name__}"
                )
        suffix = f".{uuid.uuid4().hex[:12]}.part"
        if self.local is not None:
            self.temp: Any = self.local.with_name(f".{self.local.name}{suffix}")
        elif callable(getattr(self.remote, "with_name", None)) and callable(getattr(self.remote, "rename", None)):
            self.temp = self.remote.with_name(f".{self.remote.name}{suffix}")
        else:
            self.temp = None  # written in place: the store must publish objects only on close

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        if self.local is not None:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            target: Any = self.temp
        else:
            target = self.temp if self.temp is not None else self.remote
        fh = target.open("wb")
        try:
            yield fh
            if self.local is not None:
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(Exception):
                fh.close()
            self.discard()
            raise
        finally:
            fh.close()

    def commit(self) -> None:
        if self.local is not None:
            os.replace(self.temp, self.local)
        elif self.temp is not None:
            self.temp.rename(self.remote)

    def discard(self) -> None:
        # Without a temporary name the partial object was written in place: remove it
        # rather than leave something that looks like a complete extract.
        victim = self.temp if self.temp is not None else self.remote
        if victim is not None:
            with contextlib.suppress(Exception):
                victim.unlink()


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
    ) -> Any:
        """Run one query and return its parsed JSON answer (``None`` for an empty write answer).

        :param module: a module of :data:`~airflow_papertrail.api.modules.MODULES`.
        :param query: one of its queries.
        :param system: accounting system; defaults to the connection's.
        :param params: extra query-string parameters (strings, numbers, booleans).
        :param payload: JSON object/array sent as the body of a write query.
        :param allow_unknown: accept a module/query not in the table (sent as a write).
        :param idempotency_key: ``Idempotency-Key`` of a write (default: a new UUID4); give
            the same key to the same logical write so a server that supports it dedupes.
        :param max_bytes: refuse an answer larger than this (read it in memory otherwise).
        :raises PapertrailConfigurationError: invalid module/query/params/payload.
        :raises PapertrailApiError: the service refused the call or answered garbage.
        :raises TransientApiError: unreachable / 429 / 5xx after retries (nothing changed).
        :raises WriteOutcomeUnknown: a write may have been processed; it was not retried.
        :raises ReauthorizationRequired: the token is refused even after a refresh.
        """
        spec = validate(module, query, allow_unknown)
        body = _json_body(spec, payload)
        qparams = _query_params(spec, self._system(system), params)
        key = (idempotency_key or str(uuid.uuid4())) if spec.write else None
        attempts = 1 if spec.write else 1 + self.retry_policy.total
        for attempt in range(attempts):
            response = self._send(spec, qparams, body, key)
            try:
                raw = self._read_all(spec, response, max_bytes)
            except _BodyInterrupted as exc:
                if spec.write:
                    raise WriteOutcomeUnknown(
                        f"Papertrail-ai accepted the write {spec.label} (HTTP {response.status_code}) but its answer "
                        f"was cut off ({exc}). It was NOT retried: it has been processed and a replay could create "
                        "a duplicate. Look the record up in the accounting system.",
                        status=response.status_code,
                        module=spec.module,
                        query=spec.query,
                    ) from None
                if attempt + 1 >= attempts:
                    raise self._interrupted_error(spec, exc) from None
                self._backoff(attempt, spec, exc)
                continue
            finally:
                response.close()
            if not raw.strip():
                if spec.write:
                    return None
                raise PapertrailApiError(
                    f"Papertrail-ai answered {spec.label} with HTTP {response.status_code} and an empty body",
                    status=response.status_code,
                    error="invalid_response",
                    module=spec.module,
                    query=spec.query,
                )
            try:
                return json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                raise PapertrailApiError(
                    f"Papertrail-ai answered {spec.label} with HTTP {response.status_code} but the body is not JSON "
                    f"(Content-Type {sanitize_description(response.headers.get('Content-Type'), 60)!r})",
                    status=response.status_code,
                    error="invalid_response",
                    module=spec.module,
                    query=spec.query,
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def iter_records(
        self,
        module: str,
        query: str,
        *,
        system: str | None = None,
        params: Mapping[str, Any] | None = None,
        allow_unknown: bool = False,
    ) -> Iterator[Any]:
        """Stream the records of a read query without holding the body in memory.

        Yields the items of the answer's ``data`` array (or of a top-level array); a
        ``data`` object (a report) is one record; see :mod:`airflow_papertrail.api.jsonstream`.
        Arguments are checked at once; the request is sent on the first ``next()``. A
        connection lost half-way raises :class:`TransientApiError` (records already
        yielded stay yielded: start again, or use :meth:`extract`, which does).
        """
        spec = self._read_spec(module, query, allow_unknown)
        qparams = _query_params(spec, self._system(system), params)
        return self._iter_records(spec, qparams)

    def _iter_records(self, spec: QuerySpec, qparams: dict[str, str]) -> Iterator[Any]:
        response = self._send(spec, qparams, None, None)
        stream = RecordStream(max_record_chars=self.max_record_chars)
        try:
            for chunk in self._chunks(response, stream):
                try:
                    items = stream.feed(chunk)
                except JsonStreamError as exc:
                    raise self._malformed(spec, exc) from None
                yield from items
            yield from self._close_stream(spec, stream)
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
    ) -> dict[str, Any]:
        """Stream a read query's records to ``destination`` as JSON lines (one record a line).

        The file is written under a temporary name and renamed when complete, so a failed
        extraction never leaves a file that looks whole. A connection lost half-way
        restarts the download (bounded by the retry policy); a report (``data`` object)
        becomes a single line.

        :param destination: a local path (``str``/``Path``), a URL string
            (``s3://...``, ``file://...``) or an ``airflow.sdk.ObjectStoragePath``
            (anything with ``open("wb")``).
        :returns: ``{"path": str(destination), "records": n, "bytes": b}``.
        """
        spec = self._read_spec(module, query, allow_unknown)
        qparams = _query_params(spec, self._system(system), params)
        sink = _Sink(destination)
        attempts = 1 + self.retry_policy.total
        started = time.monotonic()
        for attempt in range(attempts):
            try:
                with sink.open() as fh:
                    records, size = self._write_records(spec, qparams, fh)
            except _BodyInterrupted as exc:
                if attempt + 1 >= attempts:
                    raise self._interrupted_error(spec, exc) from None
                self._backoff(attempt, spec, exc)
                continue
            sink.commit()
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
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
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

    def _close_stream(self, spec: QuerySpec, stream: RecordStream) -> list[Any]:
        try:
            return stream.close()
        except JsonStreamError as exc:
            raise self._malformed(spec, exc) from None

    def _malformed(self, spec: QuerySpec, exc: JsonStreamError) -> PapertrailApiError:
        return PapertrailApiError(
            f"the answer of Papertrail-ai {spec.label} is not the expected JSON: {exc}",
            error="invalid_response",
            module=spec.module,
            query=spec.query,
        )

    def _write_records(self, spec: QuerySpec, qparams: dict[str, str], fh: BinaryIO) -> tuple[int, int]:
        response = self._send(spec, qparams, None, None)
        stream = RecordStream(max_record_chars=self.max_record_chars)
        records = size = 0
        try:
            for chunk in self._chunks(response, stream):
                try:
                    items = stream.feed(chunk)
                except JsonStreamError as exc:
                    raise self._malformed(spec, exc) from None
                if items:
                    data = _encode_lines(items).encode("utf-8")
                    fh.write(data)
                    records += len(items)
                    size += len(data)
            items = self._close_stream(spec, stream)
            if items:
                data = _encode_lines(items).encode("utf-8")
                fh.write(data)
                records += len(items)
                size += len(data)
        finally:
            response.close()
        return records, size

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
