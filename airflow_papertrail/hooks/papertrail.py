"""PapertrailHook: the connection, the OAuth client and the encrypted grant of one connection."""

from __future__ import annotations

import importlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from airflow_papertrail.exceptions import PapertrailConfigurationError, PapertrailError
from airflow_papertrail.oauth.client import OAuthClient
from airflow_papertrail.oauth.config import (
    CLIENT_AUTH_METHODS,
    DEFAULT_BASE_URL,
    DEFAULT_LEEWAY,
    DEFAULT_TIMEOUT,
    OAuthClientConfig,
    system_warnings,
)
from airflow_papertrail.token_store import VariableTokenStore

if TYPE_CHECKING:
    from airflow.sdk import Connection

    from airflow_papertrail.api.client import DataClient
    from airflow_papertrail.health import GrantHealth
    from airflow_papertrail.token_store import StoredGrant

CONN_TYPE = "papertrail"

log = logging.getLogger(__name__)

#: Extra fields of the connection form (also declared in ``get_provider_info``).
EXTRA_FIELDS = (
    "redirect_uri",
    "scope",
    "system",
    "authorize_url",
    "token_url",
    "api_url",
    "client_auth_method",
    "use_pkce",
    "issuer",
    "ca_bundle",
    "timeout",
    "leeway",
)


def mask(value: str | None) -> None:
    """Register a sensitive value with Airflow's secrets masker (task and supervisor)."""
    if not value:
        return
    from airflow.sdk.log import mask_secret

    mask_secret(value)


#: At most this many values are kept in the api-server's maskers on our behalf. Every refresh
#: registers new tokens, and each addition recompiles one regex that the maskers run over
#: every log line: without a bound a long-lived api-server grows both for ever. Values are
#: evicted least recently registered first; a live token is registered again whenever it is
#: read (every coordinator request decrypts the grant), so eviction only ever drops values
#: that are no longer in use (rotated refresh tokens, expired access tokens, spent codes).
MAX_API_SERVER_MASKS = 512
_api_server_masks: OrderedDict[str, bool] = OrderedDict()  # value -> whether we added its pattern
_api_server_masks_lock = threading.Lock()


def mask_in_api_server(value: str | None) -> None:
    """Register a sensitive value with the maskers of the api-server process, bounded.

    Airflow's own api-server code (the access log's query-string redaction, the audit log)
    redacts with airflow-core's masker, a separate instance from the Task SDK's that
    :func:`mask` fills; register with both. Airflow 3.3 does not filter the api-server's
    log output through either masker, so the plugin still never logs a secret itself.
    """
    if not value:
        return
    maskers = _api_server_maskers()
    with _api_server_masks_lock:
        if value in _api_server_masks:
            _api_server_masks.move_to_end(value)
            return
        pattern = re.escape(value)
        ours = not any(pattern in getattr(m, "patterns", ()) for m in maskers)
        mask(value)
        try:
            from airflow._shared.secrets_masker import mask_secret as core_mask_secret
        except ImportError:  # pragma: no cover - an Airflow without the shared core masker
            pass
        else:
            core_mask_secret(value)
        _api_server_masks[value] = ours
        while len(_api_server_masks) > MAX_API_SERVER_MASKS:
            old, added_by_us = _api_server_masks.popitem(last=False)
            if added_by_us:  # never remove what someone else registered
                _unmask(maskers, re.escape(old))


def _api_server_maskers() -> list[Any]:
    found = []
    for module in (
        "airflow.sdk._shared.secrets_masker.secrets_masker",
        "airflow._shared.secrets_masker.secrets_masker",
    ):
        try:
            getter = importlib.import_module(module)._secrets_masker
            found.append(getter())
        except Exception as exc:  # pragma: no cover - another Airflow layout: nothing to bound
            log.debug(
                "No secrets masker at %s (%s): masks registered there are not bounded", module, type(exc).__name__
            )
    return found


def _unmask(maskers: list[Any], pattern: str) -> None:
    for masker in maskers:
        patterns = getattr(masker, "patterns", None)
        if not isinstance(patterns, set) or pattern not in patterns:
            continue
        patterns.discard(pattern)
        masker.replacer = re.compile("|".join(patterns)) if patterns else None


def _as_bool(name: str, value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise PapertrailConfigurationError(f"connection extra {name!r} must be true or false, got {value!r}")


def _as_float(name: str, value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PapertrailConfigurationError(
            f"connection extra {name!r} must be a number of seconds, got {value!r}"
        ) from None


def config_from_connection(conn: Connection) -> OAuthClientConfig:
    """Map an Airflow connection to the OAuth core's configuration (not yet validated).

    login = client ID, password = client secret, host = base URL; everything else from
    ``extra`` (plain names, or the ``extra__papertrail__`` prefixed form older UIs wrote).
    """
    extra = _extras(conn)

    def opt(name: str) -> Any:
        value = extra.get(name, extra.get(f"extra__{CONN_TYPE}__{name}"))
        return value.strip() if isinstance(value, str) else value

    host = (conn.host or "").strip()
    if host and "://" not in host:
        host = "https://" + host
    if host and conn.port:
        host = f"{host.rstrip('/')}:{conn.port}"
    system = opt("system") or None
    return OAuthClientConfig(
        client_id=(conn.login or "").strip(),
        client_secret=conn.password or "",
        redirect_uri=opt("redirect_uri") or None,
        scope=" ".join(str(opt("scope") or "").replace(",", " ").split()),
        system=system,
        base_url=host.rstrip("/") or DEFAULT_BASE_URL,
        authorize_url=opt("authorize_url") or None,
        token_url=opt("token_url") or None,
        api_url=opt("api_url") or None,
        client_auth_method=opt("client_auth_method") or "client_secret_post",
        use_pkce=_as_bool("use_pkce", opt("use_pkce"), True),
        issuer=opt("issuer") or None,
        ca_bundle=opt("ca_bundle") or None,
        timeout=_as_float("timeout", opt("timeout"), DEFAULT_TIMEOUT),
        leeway=_as_float("leeway", opt("leeway"), DEFAULT_LEEWAY),
        warnings=system_warnings(system),
    )


def _extras(conn: Connection) -> dict[str, Any]:
    raw = conn.extra
    if not raw:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        raise PapertrailConfigurationError(
            f"the extra of connection {conn.conn_id!r} is not valid JSON; fix it in the connection form"
        ) from None
    if not isinstance(value, dict):
        raise PapertrailConfigurationError(
            f"the extra of connection {conn.conn_id!r} must be a JSON object such as "
            '{"redirect_uri": "...", "system": "xero"}; fix it in the connection form'
        )
    return value


class PapertrailHook(BaseHook):
    """Interact with Papertrail-ai through an OAuth 2 authorization-code grant.

    Creating the hook does no I/O: the connection is read on first use.

    :param papertrail_conn_id: the ``papertrail`` connection to use.
    """

    conn_name_attr = "papertrail_conn_id"
    default_conn_name = "papertrail_default"
    conn_type = CONN_TYPE
    hook_name = "Papertrail-ai"

    def __init__(self, papertrail_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.papertrail_conn_id = papertrail_conn_id
        #: Generation of the grant whose access token this hook handed out last: after a 401,
        #: only that token is refreshed (a newer grant someone else stored is used as it is).
        self.issued_generation: int | None = None

    @cached_property
    def connection(self) -> Connection:
        conn = self.get_connection(self.papertrail_conn_id)
        mask(conn.password)
        return conn

    @cached_property
    def config(self) -> OAuthClientConfig:
        """The validated client configuration of the connection."""
        config = config_from_connection(self.connection)
        for warning in config.warnings:
            self.log.warning("Papertrail-ai connection %r: %s", self.papertrail_conn_id, warning)
        return config.validate(need_redirect_uri=False, conn_id=self.papertrail_conn_id)

    def get_conn(self) -> OAuthClient:
        """The OAuth client of this connection (masks every secret it sees)."""
        return self.oauth_client

    @cached_property
    def oauth_client(self) -> OAuthClient:
        return OAuthClient(self.config, on_secret=mask)

    @cached_property
    def token_store(self) -> VariableTokenStore:
        return VariableTokenStore(self.papertrail_conn_id, on_secret=mask)

    def get_stored_grant(self) -> StoredGrant | None:
        return self.token_store.load()

    # -- data access ---------------------------------------------------------------------
    def get_access_token(self, *, force_refresh: bool = False) -> str:
        """A valid access token for this connection, refreshed when it expires within the leeway.

        :param force_refresh: refresh even if the stored token looks valid (after a 401).
        :raises ReauthorizationRequired: no grant is stored, or it can no longer be refreshed.
        """
        from airflow_papertrail.health import record_use
        from airflow_papertrail.refresh import get_valid_token

        refused = self.issued_generation if force_refresh else None
        token = get_valid_token(self, force_refresh=force_refresh, refused_generation=refused)
        record_use(self.token_store.backend, self.papertrail_conn_id)  # at most one write an hour
        return token.access_token

    def grant_health(self) -> GrantHealth:
        """The health of this connection's grant (plain Variable ``papertrail_health__<conn_id>``).

        Reads that one Variable (and, when it is missing, whether a grant is stored); decrypts
        nothing, refreshes nothing, needs no encryption key. See docs/grant-lifecycle.md.
        """
        from airflow_papertrail.health import read_health

        return read_health(self.papertrail_conn_id, backend=self.token_store.backend)

    @cached_property
    def data_client(self) -> DataClient:
        """Client of the data modules (``api_<module>.php``) with this connection's token."""
        from airflow_papertrail.api.client import DataClient

        config = self.config
        return DataClient(
            api_url=config.effective_api_url,
            default_system=config.system,
            token_provider=lambda force: self.get_access_token(force_refresh=force),
            timeout=config.timeout,
            verify=config.verify,
            conn_id=self.papertrail_conn_id,
        )

    def query(
        self,
        module: str,
        query: str,
        *,
        system: str | None = None,
        params: dict[str, Any] | None = None,
        payload: Any = None,
        allow_unknown: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run one documented query (see ``airflow_papertrail.api.modules.MODULES``) and return the JSON body.

        Numbers with a fraction come back as ``Decimal`` (exact); other keyword arguments
        (``records_path``, ``ignore_members``, ``parse_float``, ``max_bytes``,
        ``idempotency_key``) go to :meth:`DataClient.query`.
        """
        return self.data_client.query(
            module, query, system=system, params=params, payload=payload, allow_unknown=allow_unknown, **kwargs
        )

    def test_connection(self) -> tuple[bool, str]:
        """Check the configuration and the client credentials without spending anything.

        Reaches the token endpoint with a made-up code (``invalid_grant`` = credentials
        accepted, ``invalid_client``/401 = rejected) and reports the stored grant's state.
        Never raises, never uses a stored code or refresh token.
        """
        ok, message = self._test_connection()
        (log.info if ok else log.warning)("Papertrail-ai connection %r: %s", self.papertrail_conn_id, message)
        if ok and _run_by_connections_test_cli():
            # ``airflow connections test`` prints only "Connection success!" on success and silences
            # every log unless --verbose: print the credential check and the grant state ourselves.
            print(f"Papertrail-ai connection {self.papertrail_conn_id!r}: {message}", flush=True)
        return ok, message

    def _test_connection(self) -> tuple[bool, str]:
        try:
            config = config_from_connection(self.connection)
            problems = config.problems(need_redirect_uri=True)
        except Exception as exc:
            return (
                False,
                f"Connection {self.papertrail_conn_id!r} cannot be read: {_safe(exc)}{_outside_task_hint(exc)}",
            )
        if problems:
            return False, "Configuration problems: " + "; ".join(problems) + "."
        try:
            probe = OAuthClient(config, on_secret=mask).probe()
        except Exception as exc:
            return False, f"Token endpoint check failed: {_safe(exc)}"
        grant = self._describe_grant()
        notes = " ".join(config.warnings)
        message = f"{probe.message}. {grant}" + (f" Note: {notes}." if notes else "")
        return probe.ok, message

    def _describe_grant(self) -> str:
        try:
            stored = self.token_store.load()
        except Exception as exc:
            return f"Stored grant: unreadable ({_safe(exc)})."
        if stored is None:
            return "Stored grant: none yet (run the papertrail_authorize DAG)."
        expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stored.token.expires_at))
        if stored.token.is_expired(time.time()):
            if stored.token.refresh_token:
                return f"Stored grant: access token expired at {expires}; it will be refreshed on next use."
            return f"Stored grant: expired at {expires} and has no refresh token; re-run the papertrail_authorize DAG."
        return f"Stored grant: valid until {expires} (generation {stored.generation})."


def _safe(exc: BaseException) -> str:
    # Our own errors never carry secrets, and Airflow's "not found" names only the conn_id;
    # for anything else show only the type.
    if isinstance(exc, PapertrailError):
        return str(exc)
    if _is_not_found(exc):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def _is_not_found(exc: BaseException) -> bool:
    from airflow.exceptions import AirflowNotFoundException

    return isinstance(exc, AirflowNotFoundException)


def _run_by_connections_test_cli() -> bool:
    """True in ``airflow connections test <conn_id>`` (which shows a test's message only on failure)."""
    import sys

    return Path(sys.argv[0]).name == "airflow" and sys.argv[1:3] == ["connections", "test"]


def _outside_task_hint(exc: BaseException) -> str:
    """Why a connection that exists is "not found" in a plain Python shell (Airflow 3's Task SDK)."""
    import os

    if not _is_not_found(exc) or os.environ.get("_AIRFLOW_PROCESS_CONTEXT") == "server":
        return ""
    return (
        ". Outside a running task, Airflow 3 reads connections only from AIRFLOW_CONN_* environment variables "
        "and secrets backends, not from the metadata database: test it with `airflow connections test "
        "<conn_id>` (needs [core] test_connection = Enabled) or the Test button in the UI, or inside a task"
    )


__all__ = ["CLIENT_AUTH_METHODS", "PapertrailHook", "config_from_connection"]
