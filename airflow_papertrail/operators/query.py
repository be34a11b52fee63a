"""Operators that read and write Papertrail-ai data (re-exported from ``operators.papertrail``).

Both are thin: the HTTP calls, retries, token handling and streaming live in
:class:`airflow_papertrail.api.client.DataClient`, reached through
:attr:`PapertrailHook.data_client <airflow_papertrail.hooks.papertrail.PapertrailHook.data_client>`.
Constructors do no I/O; the hook is created in ``execute``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_papertrail.exceptions import ReauthorizationRequired

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow.sdk import Context

DEFAULT_MAX_XCOM_BYTES = 1 << 20
# A stable namespace for idempotency keys derived from a task instance.
_IDEMPOTENCY_NAMESPACE = uuid.UUID("0b6f5f59-3c1e-4c55-9a53-6a1f0e0c2f11")


def _is_template(*values: Any) -> bool:
    return any(isinstance(v, str) and ("{{" in v or "{%" in v) for v in values)


def _check_now(module: Any, query: Any, allow_unknown: bool) -> None:
    """Validate a literal module/query while the DAG is parsed (templated ones at run time)."""
    if isinstance(module, str) and isinstance(query, str) and not _is_template(module, query):
        from airflow_papertrail.api.modules import validate

        validate(module, query, allow_unknown)


def _query_params(value: Any) -> dict[str, Any] | None:
    """A mapping as it is, or a JSON object's text (what a template such as
    ``"{{ params.query_params | tojson }}"`` renders): numbers keep their text ("1150.00")."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "None", "null")):
        return None
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value, parse_float=str, parse_int=str, parse_constant=_not_a_number)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    from airflow_papertrail.exceptions import sanitize_description

    raise _fail(
        f"query_params must be a mapping or the text of a JSON object, got {type(value).__name__} "
        f"{sanitize_description(value, 80)!r}. In a template, render it as JSON: "
        'query_params="{{ params.query_params | tojson }}" (render_template_as_native_obj is not needed: '
        'it would turn "200" into 200 and "1150.00" into 1150.0)'
    )


def _payload(value: Any) -> Any:
    """A dict/list as it is; a string must be JSON text and is sent byte for byte."""
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "None", "null"):
            return None
        return text
    return value


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _xcom_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str).encode("utf-8"))


def _retry_useless(exc: Exception) -> bool:
    """A refusal an Airflow retry would only repeat: a 4xx other than 401/429, or a 2xx answer
    that is paged or has its records elsewhere (see docs/data-access.md, Retries)."""
    from airflow_papertrail.exceptions import AnswerRefused, TransientApiError

    if isinstance(exc, TransientApiError):
        return False
    if isinstance(exc, AnswerRefused) and exc.error in ("paged_answer", "records_not_found"):
        return True
    status = getattr(exc, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (401, 429)


def _fail(message: str) -> Exception:
    """An error Airflow must not retry (the same call would fail or do harm again)."""
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


class ReauthorizationFailure(ReauthorizationRequired, AirflowFailException):
    """The distinct re-authorization error of the data operators, failed without retry
    (retrying cannot revive a grant).

    A :class:`~airflow_papertrail.exceptions.ReauthorizationRequired` that is also Airflow's
    ``AirflowFailException``: an ``on_failure_callback`` tells a dead grant from any other
    failure with ``isinstance(context["exception"], ReauthorizationRequired)`` and reads its
    ``connect_url``; the message names the Connect page. Defined here, not in exceptions.py,
    which imports nothing from Airflow.
    """

    @classmethod
    def of(cls, exc: ReauthorizationRequired) -> ReauthorizationFailure:
        if exc.status == 401 and exc.conn_id:
            _record_refused_token(exc)
        return cls(str(exc.conn_id or ""), exc.description, error=exc.error, status=exc.status)


def _record_refused_token(exc: ReauthorizationRequired) -> None:
    """The data API refused a freshly refreshed token (a 401 twice): the refresh itself worked,
    so nothing recorded the dead grant yet. Record it in the health (advisory, never raises),
    so the Connect page and the keep-alive see it; the next successful refresh and use clear it."""
    try:
        from airflow_papertrail.health import REAUTHORIZATION_REQUIRED
        from airflow_papertrail.hooks.papertrail import PapertrailHook

        PapertrailHook(str(exc.conn_id)).token_store.record_failure(
            REAUTHORIZATION_REQUIRED, exc.error, exc.description
        )
    except Exception as err:  # health never hides the task's own error
        log.warning("Could not record the refused token of %r in its health: %s", exc.conn_id, type(err).__name__)


class PapertrailQueryOperator(BaseOperator):
    """Run one Papertrail-ai query and push its JSON answer to XCom.

    For reads that fit in XCom (a report, one invoice, company details) and for writes
    (``create_*``, ``account_*``). For long lists use :class:`PapertrailExtractOperator`,
    which streams to storage.

    A write is sent once with an ``Idempotency-Key`` derived from the task instance and the
    payload (the same on every try of this task instance). If it may have reached the server
    but no clear answer came back, or the service answered 2xx with an unreadable body, the
    task fails **without retry**: replaying it could create a duplicate; check the
    accounting system first. A write's answer is never refused for its size (the write is
    done): an answer over ``max_xcom_bytes`` goes to XCom truncated, as
    ``{"papertrail_truncated": true, "bytes": n, "head": "<first characters>"}``.

    Numbers in the XCom answer: integers are ``int``; numbers with a fraction or an exponent
    are the **text** the service sent (``"1150.00"``, ``"12345678901234567.89"``), because
    Airflow's XCom stores ``Decimal`` as a float. ``Decimal(value)`` gets the exact amount.

    :param module: data module, e.g. ``reports`` (templated).
    :param query: query of that module, e.g. ``trial_balance`` (templated).
    :param system: accounting system; defaults to the connection's extra ``system`` (templated).
    :param query_params: extra query-string parameters, strings/numbers/booleans, as a
        mapping or the text of a JSON object, e.g. ``"{{ params.query_params | tojson }}"``
        (templated). (Named ``query_params`` because ``params`` is Airflow's own task argument.)
    :param payload: the body of a write query, a dict/list or its JSON text; JSON text is
        sent byte for byte, so ``"{{ params.invoice | tojson }}"`` keeps ``"1150.00"`` (templated).
    :param allow_unknown: allow a module/query this provider does not know; it is sent as
        a write (POST, never replayed).
    :param papertrail_conn_id: the ``papertrail`` connection (templated).
    :param max_xcom_bytes: refuse a read's answer whose JSON is larger than this (default
        1 MiB); truncate a write's.
    :param records_path: the member of the answer holding the records (paging check).
    :param ignore_members: envelope members that mean something else for this query (a
        ``total`` that is an amount): left out of the error and paging checks.
    """

    template_fields: Sequence[str] = ("module", "query", "system", "query_params", "payload", "papertrail_conn_id")
    template_fields_renderers = {"query_params": "json", "payload": "json"}
    ui_color = "#e8f1ff"

    def __init__(
        self,
        *,
        module: str,
        query: str,
        system: str | None = None,
        query_params: Mapping[str, Any] | str | None = None,
        payload: Any = None,
        allow_unknown: bool = False,
        papertrail_conn_id: str = "papertrail_default",
        max_xcom_bytes: int = DEFAULT_MAX_XCOM_BYTES,
        records_path: str = "data",
        ignore_members: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_xcom_bytes < 1:
            raise ValueError("max_xcom_bytes must be positive")
        _check_now(module, query, allow_unknown)
        self.module = module
        self.query = query
        self.system = system
        self.query_params = query_params
        self.payload = payload
        self.allow_unknown = allow_unknown
        self.papertrail_conn_id = papertrail_conn_id
        self.max_xcom_bytes = max_xcom_bytes
        self.records_path = records_path
        self.ignore_members = list(ignore_members)

    def _idempotency_key(self, context: Context) -> str:
        ti = context.get("ti")
        payload = json.dumps(self.payload, sort_keys=True, separators=(",", ":"), default=str)
        parts = [
            getattr(ti, "dag_id", self.dag_id),
            getattr(ti, "task_id", self.task_id),
            str(getattr(ti, "run_id", "")),
            str(getattr(ti, "map_index", -1)),
            self.module,
            self.query,
            str(self.system),
            payload,
        ]
        return str(uuid.uuid5(_IDEMPOTENCY_NAMESPACE, "\x1f".join(map(str, parts))))

    def execute(self, context: Context) -> Any:
        from airflow_papertrail.api.client import PapertrailApiError, TransientApiError, WriteOutcomeUnknown
        from airflow_papertrail.api.modules import validate
        from airflow_papertrail.exceptions import PapertrailConfigurationError
        from airflow_papertrail.hooks.papertrail import PapertrailHook

        spec = None
        try:
            spec = validate(self.module, self.query, self.allow_unknown)
            params = _query_params(self.query_params)
            payload = _payload(self.payload)
            client = PapertrailHook(self.papertrail_conn_id).data_client
            self.log.info(
                "Papertrail-ai %s %s (system %s) through connection %r",
                "write" if spec.write else "read",
                spec.label,
                self.system or client.default_system,
                self.papertrail_conn_id,
            )
            result = client.query(
                self.module,
                self.query,
                system=self.system,
                params=params,
                payload=payload,
                allow_unknown=self.allow_unknown,
                idempotency_key=self._idempotency_key(context) if spec.write else None,
                # A pretty-printed answer is larger than its compact XCom form; the exact
                # check is below, this only stops a huge list from filling the worker's memory.
                # (A write's answer is never refused: the client reads it whatever its size.)
                max_bytes=8 * self.max_xcom_bytes,
                records_path=self.records_path,
                ignore_members=self.ignore_members,
                parse_float=str,  # exact in XCom, which would store a Decimal as a float
            )
        except ReauthorizationRequired as exc:
            raise ReauthorizationFailure.of(exc) from exc
        except (WriteOutcomeUnknown, PapertrailConfigurationError) as exc:
            raise _fail(str(exc)) from exc
        except PapertrailApiError as exc:
            if exc.error == "response_too_large":
                raise _fail(self._too_large(f"more than {8 * self.max_xcom_bytes} bytes")) from exc
            if (spec is not None and spec.write and not isinstance(exc, TransientApiError)) or _retry_useless(exc):
                raise _fail(str(exc)) from exc
            raise
        except Exception as exc:
            # Whatever else goes wrong once a write may have been sent, an Airflow retry must
            # not send it again (token and configuration problems never got that far).
            from airflow_papertrail.exceptions import PapertrailError

            if spec is not None and spec.write and not isinstance(exc, (PapertrailError, TransientApiError)):
                raise _fail(
                    f"the write {self.module}/{self.query} failed with {type(exc).__name__} after it may have been "
                    "sent. It was NOT retried: look the record up in the accounting system before running it again."
                ) from exc
            raise
        size = _xcom_size(result)
        if size > self.max_xcom_bytes:
            if spec.write:
                return self._truncated(result, size)
            raise _fail(self._too_large(f"{size} bytes of JSON"))
        return result

    def _truncated(self, result: Any, size: int) -> dict[str, Any]:
        text = json.dumps(result, separators=(",", ":"), default=str)
        head = text[: max(0, self.max_xcom_bytes - 200) // 4]  # <= 4 bytes per character in UTF-8
        self.log.warning(
            "The write %s/%s is done; its answer (%d bytes of JSON) is over max_xcom_bytes=%d, so XCom gets only "
            "its first %d characters (papertrail_truncated=true). The write was not retried.",
            self.module,
            self.query,
            size,
            self.max_xcom_bytes,
            len(head),
        )
        return {"papertrail_truncated": True, "bytes": size, "head": head}

    def _too_large(self, what: str) -> str:
        return (
            f"the answer of Papertrail-ai {self.module}/{self.query} is {what}, over max_xcom_bytes="
            f"{self.max_xcom_bytes}: XCom lives in the metadata database. Stream it to storage with "
            "PapertrailExtractOperator (one JSON line per record) and pass the path on, or raise max_xcom_bytes."
        )


class PapertrailExtractOperator(BaseOperator):
    """Stream the records of a Papertrail-ai read query to a JSON-lines file.

    Memory stays bounded by one record and one network chunk, whatever the size of the
    list. Each line is a record's text exactly as the service sent it (amounts, escapes and
    unicode untouched). The file is written under a temporary name and renamed when
    complete; an answer whose body reports an error or a next page is refused and nothing
    is written. Only a summary goes to XCom: ``{"path": ..., "records": n, "bytes": b}``.
    A report or other single object becomes one line. Hook lineage (and so OpenLineage,
    when its provider is installed) names the final path.

    :param module: data module, e.g. ``gl`` (templated).
    :param query: read query of that module, e.g. ``list_gl_transaction`` (templated).
    :param destination: local path, URL (``s3://...``, ``file://...``) or
        ``ObjectStoragePath`` (templated when a string); parent directories of a local
        path are created.
    :param system: accounting system; defaults to the connection's extra ``system`` (templated).
    :param query_params: extra query-string parameters, strings/numbers/booleans, as a
        mapping or the text of a JSON object (``"{{ params.query_params | tojson }}"``) (templated).
    :param allow_unknown: allow a module/query this provider does not know (one the service
        added later); extraction sends it as a read (GET), unless its name starts with
        ``create_`` or ``account_``, which is refused.
    :param papertrail_conn_id: the ``papertrail`` connection (templated).
    :param records_path: the top-level member holding the records (default ``data``), e.g.
        ``"Invoices"`` for a body ``{"Invoices": [...]}`` (templated).
    :param ignore_members: envelope members that mean something else for this query (a
        ``total`` that is an amount): left out of the error and paging checks.
    """

    template_fields: Sequence[str] = (
        "module",
        "query",
        "destination",
        "system",
        "query_params",
        "papertrail_conn_id",
        "records_path",
    )
    template_fields_renderers = {"query_params": "json"}
    ui_color = "#e8f1ff"

    def __init__(
        self,
        *,
        module: str,
        query: str,
        destination: Any,
        system: str | None = None,
        query_params: Mapping[str, Any] | str | None = None,
        allow_unknown: bool = False,
        papertrail_conn_id: str = "papertrail_default",
        records_path: str = "data",
        ignore_members: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_now(module, query, allow_unknown)
        self.module = module
        self.query = query
        self.destination = destination
        self.system = system
        self.query_params = query_params
        self.allow_unknown = allow_unknown
        self.papertrail_conn_id = papertrail_conn_id
        self.records_path = records_path
        self.ignore_members = list(ignore_members)

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_papertrail.exceptions import PapertrailApiError, PapertrailConfigurationError
        from airflow_papertrail.hooks.papertrail import PapertrailHook

        try:
            params = _query_params(self.query_params)
            hook = PapertrailHook(self.papertrail_conn_id)
            client = hook.data_client
            self.log.info(
                "Extracting Papertrail-ai %s/%s (system %s) to %s",
                self.module,
                self.query,
                self.system or client.default_system,
                self.destination,
            )
            result = client.extract(
                self.module,
                self.query,
                self.destination,
                system=self.system,
                params=params,
                allow_unknown=self.allow_unknown,
                records_path=self.records_path or "data",
                ignore_members=self.ignore_members,
                lineage_context=hook,
            )
        except ReauthorizationRequired as exc:
            raise ReauthorizationFailure.of(exc) from exc
        except PapertrailConfigurationError as exc:
            raise _fail(str(exc)) from exc
        except PapertrailApiError as exc:
            if _retry_useless(exc):
                raise _fail(str(exc)) from exc
            raise
        self.log.info("Wrote %d records (%d bytes) to %s", result["records"], result["bytes"], result["path"])
        return result


__all__ = ["DEFAULT_MAX_XCOM_BYTES", "PapertrailExtractOperator", "PapertrailQueryOperator"]
