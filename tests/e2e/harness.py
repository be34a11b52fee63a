"""End-to-end harness: real Airflow 3 processes on 127.0.0.1, its REST API, and headless Chromium.

* :class:`AirflowStack` runs ``airflow db migrate`` and then the four components (``api-server``,
  ``scheduler``, ``dag-processor``, ``triggerer``; LocalExecutor, SQLite) in one process group, in
  a fresh ``AIRFLOW_HOME``, on free ports. Every line they print goes, prefixed with the component
  name, to ``stack.log_path``. ``stop()`` ends the whole group (SIGTERM, then SIGKILL) and hands
  the logs to the session's log canary.
* :class:`AirflowApi` (base class of the stack) calls ``/api/v2`` as the admin user of
  SimpleAuthManager with a JWT from ``POST /auth/token``.
* :func:`headless_chromium` / :func:`open_and_click` drive Debian's ``/usr/bin/chromium`` with
  Playwright.

Why not ``airflow standalone``: it relays its children's output through a pipe that dies with it
(SIGTERM kills the parent at once, so the components' shutdown output is lost), it keeps running
when a component crashes (a start-up error only shows up as a time-out), and it prints a freshly
generated admin password. Running the same four commands ourselves fixes all three.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import requests

from tests.conftest import append_captured, remember_secrets
from tests.waiting import WaitTimeout, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from playwright.sync_api import Browser

T = TypeVar("T")

#: The venv's bin/ (``airflow`` lives here); it must be on the components' PATH.
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
COMPONENTS: tuple[str, ...] = ("api-server", "scheduler", "dag-processor", "triggerer")
HEALTH_KEYS: tuple[str, ...] = ("metadatabase", "scheduler", "triggerer", "dag_processor")
FINISHED_TI_STATES = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})
FINISHED_RUN_STATES = frozenset({"success", "failed"})
ADMIN_USER = "admin"


class HarnessError(AssertionError):
    """Something in the end-to-end set-up did not happen as expected (AssertionError: pytest shows it plainly)."""


class ApiError(HarnessError):
    """The REST API answered with an unexpected status."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


# --------------------------------------------------------------------------------------------------
# small helpers


_HANDED_OUT: set[int] = set()
#: ``first-last``: the ports :func:`free_port` picks from (set by dev.py per suite; default: from
#: 15000 up to the kernel's ephemeral range).
PORTS_ENV = "PAPERTRAIL_TEST_PORTS"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago, below the kernel's ephemeral range.

    A port the kernel hands out for outgoing connections (``bind(0)`` picks from that range too)
    can be taken by any client's socket between this call and the server's bind: a topology with a
    dozen processes making connections hit that ("address already in use"). Ports below the range
    are only ever taken by a server that asks for them."""
    low, _ = _ephemeral_range()
    first, last = 15000, low - 1
    block = os.environ.get(PORTS_ENV, "")  # dev.py gives each suite running side by side its own block
    if block:
        first, last = (int(x) for x in block.split("-", 1))
    rng = random.SystemRandom()
    for _ in range(200):  # bounded
        port = rng.randint(first, last) if last - first > 100 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        _HANDED_OUT.add(port)
        return port
    raise HarnessError("no free TCP port found on 127.0.0.1")


@contextlib.contextmanager
def urllib3_quiet() -> Iterator[None]:
    """Silence urllib3's DEBUG request lines for the block: they carry the full URL, so a request to
    an OAuth callback URL (``?code=...&state=...``) would put the code into the captured log."""
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)


def redact_url(url: str, keep: Iterable[str] = ("error", "error_description")) -> str:
    """``url`` with every query value replaced by ``***`` except the parameters in ``keep``."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    keep = set(keep)
    pairs = [(k, v if k in keep else "***") for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(pairs, safe="*")))


def redact_urls_in(text: str) -> str:
    """Every http(s) URL in ``text`` passed through :func:`redact_url`."""
    return re.sub(r"https?://[^\s\"'<>]+", lambda m: redact_url(m.group(0)), text)


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, session) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[2]), int(fields[3])


def _all_pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    found = []
    for pid in _all_pids():
        stat = proc_stat(pid)
        if stat and stat[1] == pgid and stat[0] != "Z":
            found.append(pid)
    return found


def pids_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has ``name=value`` (catches processes that left the group)."""
    needle = f"{name}={value}".encode()
    found = []
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        stat = proc_stat(pid)
        if stat and stat[0] != "Z" and needle in environ.split(b"\0"):
            found.append(pid)
    return found


# --------------------------------------------------------------------------------------------------
# REST API client


class AirflowApi:
    """A small client for Airflow 3's public REST API (``/api/v2``) as a SimpleAuthManager user.

    Authentication: ``POST /auth/token`` with ``{"username", "password"}`` (JSON) answers
    ``201 {"access_token": <JWT>}``; every call sends ``Authorization: Bearer <JWT>``. A 401
    fetches a new token once. With ``password=None`` (``[core] simple_auth_manager_all_admins``)
    the token comes from ``GET /auth/token`` without credentials.

    Every task-instance state seen by any call is recorded; :meth:`seen_states` returns the
    sequence, so a test can prove a task went through ``deferred`` on its way to ``success``.
    """

    def __init__(self, base_url: str, *, username: str = ADMIN_USER, password: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password = password
        self.http = requests.Session()
        self.http.trust_env = False  # never route 127.0.0.1 through a proxy from the environment
        self._token: str | None = None
        self._seen: dict[tuple[str, str, str, int], list[str | None]] = {}

    # -- plumbing ----------------------------------------------------------------------------------

    def token(self, *, refresh: bool = False) -> str:
        if self._token is None or refresh:
            url = f"{self.base_url}/auth/token"
            if self.password is None:
                response = self.http.get(url, timeout=30)
            else:
                response = self.http.post(url, json={"username": self.username, "password": self.password}, timeout=30)
            if response.status_code != 201:
                raise ApiError(response.request.method or "POST", url, response.status_code, response.text)
            self._token = str(response.json()["access_token"])
            remember_secrets(self._token)
        return self._token

    def request(
        self,
        method: str,
        path: str,
        *,
        expected: Iterable[int] = (200,),
        timeout: float = 30,
        **kwargs: Any,
    ) -> requests.Response:
        """Call ``path`` (relative to the base URL) with a bearer token; raise :class:`ApiError`
        unless the status is in ``expected``."""
        url = f"{self.base_url}{path}"
        headers = dict(kwargs.pop("headers", None) or {})
        for attempt in (1, 2):
            headers["Authorization"] = f"Bearer {self.token(refresh=attempt == 2)}"
            response = self.http.request(method, url, headers=headers, timeout=timeout, **kwargs)
            if response.status_code != 401:
                break
        if response.status_code not in set(expected):
            raise ApiError(method, url, response.status_code, response.text)
        return response

    def get_json(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None).json()

    @staticmethod
    def _q(value: str) -> str:
        return quote(value, safe="")

    def _run_path(self, dag_id: str, run_id: str) -> str:
        return f"/api/v2/dags/{self._q(dag_id)}/dagRuns/{self._q(run_id)}"

    def _ti_path(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
        path = f"{self._run_path(dag_id, run_id)}/taskInstances/{self._q(task_id)}"
        return path if map_index < 0 else f"{path}/{map_index}"

    def _observe(self, dag_id: str, run_id: str, ti: Mapping[str, Any]) -> None:
        key = (dag_id, run_id, str(ti["task_id"]), int(ti.get("map_index", -1)))
        seen = self._seen.setdefault(key, [])
        state = ti.get("state")
        if not seen or seen[-1] != state:
            seen.append(state)

    # -- health, DAGs, runs ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /api/v2/monitor/health`` (no authentication needed)."""
        response = self.http.get(f"{self.base_url}/api/v2/monitor/health", timeout=5)
        response.raise_for_status()
        return dict(response.json())

    def is_healthy(self) -> bool:
        health = self.health()
        return all((health.get(key) or {}).get("status") == "healthy" for key in HEALTH_KEYS)

    def import_errors(self) -> list[dict[str, Any]]:
        return list(self.get_json("/api/v2/importErrors", limit=100)["import_errors"])

    def plugins(self) -> list[dict[str, Any]]:
        """``GET /api/v2/plugins``: the plugins the api-server loaded."""
        return list(self.get_json("/api/v2/plugins", limit=100)["plugins"])

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        response = self.request("GET", f"/api/v2/dags/{self._q(dag_id)}", expected=(200, 404))
        return None if response.status_code == 404 else dict(response.json())

    def wait_for_dag(self, dag_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the DAG is parsed and visible through the API; return its JSON.

        Fails at once if an import error is recorded for a file named after the DAG."""

        def visible() -> dict[str, Any] | None:
            found = self.dag(dag_id)
            if found is not None:
                return found
            for error in self.import_errors():
                if Path(str(error.get("filename", ""))).stem == dag_id:
                    raise HarnessError(f"DAG file for {dag_id} failed to import:\n{error.get('stack_trace')}")
            return None

        return wait_until(
            visible,
            timeout,
            interval=0.5,
            message=lambda: f"DAG {dag_id!r} not visible; import errors: {self.import_errors()}",
        )

    def unpause(self, dag_id: str) -> None:
        body = self.request("PATCH", f"/api/v2/dags/{self._q(dag_id)}", json={"is_paused": False}).json()
        if body.get("is_paused") is not False:
            raise HarnessError(f"DAG {dag_id} still paused: {body}")

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, *, run_id: str | None = None) -> str:
        """Create a manual DAG run (``logical_date`` null, as the UI does); return its run_id."""
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id is not None:
            body["dag_run_id"] = run_id
        response = self.request("POST", f"/api/v2/dags/{self._q(dag_id)}/dagRuns", json=body)
        return str(response.json()["dag_run_id"])

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return dict(self.get_json(self._run_path(dag_id, run_id)))

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 120.0) -> str:
        """Wait until the run is ``success`` or ``failed``; return that state (the caller asserts).

        Task states are polled too, so :meth:`seen_states` records every transition."""
        state: dict[str, str] = {}

        def finished() -> bool:
            self.task_states(dag_id, run_id)
            state["run"] = str(self.dag_run(dag_id, run_id)["state"])
            return state["run"] in FINISHED_RUN_STATES

        wait_until(
            finished,
            timeout,
            message=lambda: (
                f"run {dag_id}/{run_id} is {state.get('run')} (DAG paused: {(self.dag(dag_id) or {}).get('is_paused')}); "
                f"tasks: {self.task_states(dag_id, run_id)}"
            ),
        )
        return state["run"]

    # -- task instances ----------------------------------------------------------------------------

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = self.get_json(f"{self._run_path(dag_id, run_id)}/taskInstances", limit=100, offset=len(items))
            items.extend(page["task_instances"])
            if not page["task_instances"] or len(items) >= page["total_entries"]:
                break
        for ti in items:
            self._observe(dag_id, run_id, ti)
        return items

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """task_id -> state (mapped tasks: ``task_id[map_index]``)."""
        states: dict[str, str | None] = {}
        for ti in self.task_instances(dag_id, run_id):
            index = ti.get("map_index", -1)
            states[ti["task_id"] if index < 0 else f"{ti['task_id']}[{index}]"] = ti.get("state")
        return states

    def task_instance(self, dag_id: str, run_id: str, task_id: str, *, map_index: int = -1) -> dict[str, Any]:
        """The raw task-instance JSON (state, start_date, end_date, try_number, ...)."""
        ti = dict(self.get_json(self._ti_path(dag_id, run_id, task_id, map_index)))
        self._observe(dag_id, run_id, ti)
        return ti

    def seen_states(self, dag_id: str, run_id: str, task_id: str, *, map_index: int = -1) -> list[str | None]:
        """The distinct states this client observed for the task, in order (e.g. running, deferred, ...)."""
        return list(self._seen.get((dag_id, run_id, task_id, map_index), []))

    def wait_for_task_state(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        states: set[str] | frozenset[str],
        timeout: float = 60.0,
        *,
        map_index: int = -1,
        interval: float = 0.2,
    ) -> str:
        """Wait until the task is in one of ``states``; return it. Fails at once if the task
        finishes in a state that is not wanted."""

        def reached() -> str | None:
            state = self.task_instance(dag_id, run_id, task_id, map_index=map_index).get("state")
            if state in states:
                return str(state)
            if state in FINISHED_TI_STATES:
                raise HarnessError(
                    f"{dag_id}/{run_id}/{task_id} finished as {state}, wanted {sorted(states)}; "
                    f"seen {self.seen_states(dag_id, run_id, task_id, map_index=map_index)}"
                )
            return None

        return wait_until(
            reached,
            timeout,
            interval=interval,
            message=lambda: (
                f"{dag_id}/{run_id}/{task_id} not in {sorted(states)}; "
                f"seen {self.seen_states(dag_id, run_id, task_id, map_index=map_index)}"
            ),
        )

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", *, map_index: int = -1) -> Any:
        """The XCom value as stored (JSON); 404 raises :class:`ApiError`."""
        path = f"{self._run_path(dag_id, run_id)}/taskInstances/{self._q(task_id)}/xcomEntries/{self._q(key)}"
        return self.get_json(path, map_index=map_index)["value"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, *, map_index: int = -1) -> str:
        """The full task log through the API, one line per log event (``timestamp level event key=value``)."""
        path = f"{self._ti_path(dag_id, run_id, task_id)}/logs/{try_number}"
        lines: list[str] = []
        params: dict[str, Any] = {"full_content": "true", "map_index": map_index}
        for _ in range(100):  # continuation pages; a finished task needs one
            body = self.request("GET", path, params=params, headers={"Accept": "application/json"}).json()
            lines.extend(_render_log_entry(entry) for entry in body.get("content") or [])
            token = body.get("continuation_token")
            if not token:
                break
            params = {"full_content": "true", "map_index": map_index, "token": token}
        return "\n".join(lines)

    # -- variables and connections -----------------------------------------------------------------

    def variable(self, key: str) -> str | None:
        """A Variable's value through ``GET /api/v2/variables/{key}`` (None if missing).

        Airflow REDACTS the value to ``***`` when the key looks sensitive (contains ``token``,
        ``secret``, ``password``, ``api_key``, ...; and sensitive keys inside a JSON dict value):
        use :meth:`AirflowStack.variable_unredacted` for the stored value."""
        response = self.request("GET", f"/api/v2/variables/{self._q(key)}", expected=(200, 404))
        if response.status_code == 404:
            return None
        value = response.json().get("value")
        return None if value is None else str(value)

    def set_variable(self, key: str, value: str, *, description: str | None = None) -> None:
        body = {"key": key, "value": value, "description": description}
        if self.variable(key) is None:
            self.request("POST", "/api/v2/variables", json=body, expected=(201,))
        else:
            self.request("PATCH", f"/api/v2/variables/{self._q(key)}", json=body)

    def create_connection(self, connection: Mapping[str, Any]) -> None:
        """``POST /api/v2/connections`` (``connection_id``, ``conn_type``, ``login``, ``password``,
        ``host``, ``extra`` as a JSON string, ...)."""
        self.request("POST", "/api/v2/connections", json=dict(connection), expected=(201,))

    def create_papertrail_connection(
        self, conn_id: str, *, client_id: str, client_secret: str, host: str, **extra: Any
    ) -> None:
        """A ``papertrail`` connection to ``host`` (an emulator) with ``extra`` (redirect_uri, system, ...)."""
        self.create_connection(
            {
                "connection_id": conn_id,
                "conn_type": "papertrail",
                "login": client_id,
                "password": client_secret,
                "host": host,
                "extra": json.dumps(extra),
            }
        )


def emulator_grant(emulator: Any, *, client_id: str, client_secret: str, redirect_uri: str) -> tuple[Any, Any]:
    """``(OAuthClientConfig, Token)``: a real code exchange at ``emulator`` for that client (system xero)."""
    from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig

    config = OAuthClientConfig(
        client_id=client_id,
        client_secret=client_secret,
        redirect_uri=redirect_uri,
        system="xero",
        base_url=emulator.base_url,
    )
    code = emulator.issue_code(client_id=client_id, redirect_uri=redirect_uri, system="xero")
    return config, OAuthClient(config).exchange_code(code)


def _render_log_entry(entry: Any) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    rest = {k: v for k, v in entry.items() if k not in {"timestamp", "event", "level"}}
    parts = [str(entry.get("timestamp") or ""), str(entry.get("level") or ""), str(entry.get("event", ""))]
    parts.extend(f"{k}={v}" for k, v in rest.items())
    return " ".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------------
# Airflow processes


def _join_group(pgid: int | None) -> dict[str, Any]:
    """Popen kwargs: a new process group (``pgid`` None) or join ``pgid`` (one group per stack)."""
    target = 0 if pgid is None else pgid
    if sys.version_info >= (3, 11):
        return {"process_group": target}
    return {"preexec_fn": lambda: os.setpgid(0, target)}  # Python 3.10


_LIVE_STACKS: set[AirflowStack] = set()


@atexit.register
def _kill_leftover_stacks() -> None:  # pytest killed mid-test: do not leave Airflow running
    for stack in list(_LIVE_STACKS):
        stack.stop(timeout=5)


class AirflowStack(AirflowApi):
    """A real Airflow (api-server, scheduler, dag-processor, triggerer) in its own AIRFLOW_HOME.

    ``with AirflowStack(dags) as stack:`` starts it and waits until ``/api/v2/monitor/health``
    reports metadatabase, scheduler, triggerer and dag_processor healthy; leaving the block stops
    it. The parent's ``AIRFLOW*``/``PYTEST_*`` variables are NOT inherited (the test session sets
    its own AIRFLOW_HOME): pass what the components need in ``extra_env``.
    """

    def __init__(
        self,
        dags_folder: Path | str,
        *,
        home: Path | str | None = None,
        extra_env: Mapping[str, str] | None = None,
        start_timeout: float = 120.0,
        all_admins: bool = False,
        parallelism: int = 4,
        bin_dir: Path | str = BIN,
    ) -> None:
        #: The bin/ of the virtualenv whose ``airflow`` runs the stack (default: this test's venv;
        #: tests/e2e/test_user_install.py passes a fresh venv with the provider from its wheel).
        self.bin_dir = Path(bin_dir)
        self.home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="airflow-e2e-"))
        self.dags_folder = Path(dags_folder).resolve()
        self.port = free_port()
        self.start_timeout = start_timeout
        self.log_path = self.home / "stack.log"
        self.timings: dict[str, float] = {}
        password = None if all_admins else "pw-" + secrets.token_urlsafe(18)
        super().__init__(f"http://127.0.0.1:{self.port}", password=password)
        self.env = self._build_env(extra_env or {}, parallelism=parallelism, all_admins=all_admins)
        remember_secrets(
            password,
            self.env["AIRFLOW__CORE__FERNET_KEY"],
            self.env["AIRFLOW__API_AUTH__JWT_SECRET"],
            self.env["AIRFLOW__API__SECRET_KEY"],
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pgid: int | None = None
        self._readers: list[threading.Thread] = []
        self._log: IO[str] | None = None
        self._log_lock = threading.Lock()
        self._stopped = False

    # -- environment -------------------------------------------------------------------------------

    def _build_env(self, extra: Mapping[str, str], *, parallelism: int, all_admins: bool) -> dict[str, str]:
        from cryptography.fernet import Fernet

        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW", "PYTEST_"))}
        home = str(self.home)
        env.update(
            PATH=f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
            NO_COLOR="1",
            AIRFLOW_HOME=home,
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_FOLDER=str(self.dags_folder),
            AIRFLOW__CORE__PLUGINS_FOLDER=str(self.home / "plugins"),
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM=str(parallelism),
            AIRFLOW__CORE__FERNET_KEY=Fernet.generate_key().decode(),
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{ADMIN_USER}:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=str(all_admins),
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(self.home / "simple_auth_manager_passwords.json"),
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.base_url}/execution/",
            # ?timeout=60: SQLite's busy timeout (pysqlite's default is 5 s). Scheduler, triggerer,
            # dag-processor and api-server all write; on a loaded 2-core CI machine a write waited
            # longer than 5 s and the api-server answered a PATCH with HTTP 500 "Database error".
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{self.home / 'airflow.db'}?timeout=60",
            AIRFLOW__API__HOST="127.0.0.1",
            AIRFLOW__API__PORT=str(self.port),
            AIRFLOW__API__BASE_URL=self.base_url,
            AIRFLOW__API__WORKERS="1",
            AIRFLOW__API__SECRET_KEY=secrets.token_urlsafe(32),
            AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(64),  # HS512: >= 64 bytes or a warning per token
            AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(self.home / "logs"),
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
            AIRFLOW__LOGGING__COLORED_CONSOLE_LOG="False",
            AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST="127.0.0.1",
            AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT=str(free_port()),
            # CPU an idle stack burns (measured on this 2-core machine, dags/ as the folder): with a
            # 0.2 s scheduler idle sleep and every DAG file re-parsed each 5 s, 0.49 cores; with
            # Airflow's default 1 s idle sleep and unchanged files re-parsed once a minute, about
            # 0.1. New and changed files are still parsed at each folder listing
            # (REFRESH_INTERVAL), and a parse that failed (e.g. timed out on a loaded machine) is
            # retried within a minute, inside every wait_for_dag deadline.
            AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME="1",
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="2",
            AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="60",
            AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL="1",
            AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES="1",
            AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH=str(self.home / "dag_bundles"),
            # The task supervisor sometimes notices its task's exit only when select() times out,
            # after min_heartbeat_interval (default 5 s). Until then the executor has not reported the
            # try finished, and a trigger firing in that window hits apache/airflow#67287/#72716 (the
            # resumed TI is failed for a "state mismatch"). 1 s narrows that window and speeds runs.
            AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL="1",
        )
        env.update(extra)
        return env

    # -- logging -----------------------------------------------------------------------------------

    def _write_log(self, text: str) -> None:
        with self._log_lock:
            if self._log is not None:
                self._log.write(text)
                self._log.flush()

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        prefix = f"{name:13} | "
        for raw in iter(stream.readline, b""):
            self._write_log(prefix + raw.decode("utf-8", "replace").rstrip("\r\n") + "\n")
        stream.close()

    def logs(self) -> str:
        """Everything the components printed so far (prefixed ``component | ``)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_files(self) -> list[Path]:
        """Log files Airflow wrote under ``$AIRFLOW_HOME/logs`` (task logs, dag-processor logs)."""
        folder = self.home / "logs"
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []

    def all_logs(self) -> str:
        """:meth:`logs` plus every file under ``$AIRFLOW_HOME/logs``: what a leak check should scan."""
        parts = [self.logs()]
        for path in self.log_files():
            parts.append(f"===== {path.relative_to(self.home)}\n{path.read_text(encoding='utf-8', errors='replace')}")
        return "\n".join(parts)

    def log_tail(self, chars: int = 6000) -> str:
        return self.logs()[-chars:]

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> AirflowStack:
        if self.procs:
            raise HarnessError("stack already started")
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "plugins").mkdir(exist_ok=True)
        if self.password is not None:
            # Pre-seeded: SimpleAuthManager then neither generates nor prints a password.
            pw_file = Path(self.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
            pw_file.write_text(json.dumps({ADMIN_USER: self.password}) + "\n")
            pw_file.chmod(0o600)
        self._log = self.log_path.open("a", encoding="utf-8")
        _LIVE_STACKS.add(self)
        started = time.monotonic()
        try:
            self._write_log(f"harness       | AIRFLOW_HOME={self.home} base_url={self.base_url}\n")
            migrate = subprocess.run(
                [str(self.bin_dir / "airflow"), "db", "migrate"],
                env=self.env,
                cwd=self.home,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=self.start_timeout,
                check=False,
            )
            self._write_log(
                "".join(f"db-migrate    | {line}\n" for line in migrate.stdout.decode("utf-8", "replace").splitlines())
            )
            if migrate.returncode != 0:
                raise HarnessError(f"airflow db migrate exited {migrate.returncode}:\n{self.log_tail()}")
            self.timings["db_migrate_s"] = time.monotonic() - started
            for name in COMPONENTS:
                proc = subprocess.Popen(
                    [str(self.bin_dir / "airflow"), name],
                    env=self.env,
                    cwd=self.home,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    **_join_group(self.pgid),
                )
                if self.pgid is None:
                    self.pgid = proc.pid
                self.procs[name] = proc
                assert proc.stdout is not None
                reader = threading.Thread(target=self._pump, args=(name, proc.stdout), daemon=True)
                reader.start()
                self._readers.append(reader)
            wait_until(
                self._healthy_or_crashed,
                self.start_timeout - (time.monotonic() - started),
                interval=0.25,
                message=lambda: f"Airflow not healthy at {self.base_url}:\n{self.log_tail()}",
                ignore=(requests.RequestException,),
            )
            self.timings["start_to_healthy_s"] = time.monotonic() - started
            # The Execution API sub-app builds itself on its first request (~4 s): pay that here,
            # not inside the first task's start-up.
            self.http.get(f"{self.base_url}/execution/health", timeout=60).raise_for_status()
            self.timings["start_to_ready_s"] = time.monotonic() - started
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy_or_crashed(self) -> bool:
        self.check_running()
        return self.is_healthy()

    def check_running(self) -> None:
        """Raise if a component has exited (with the end of the log)."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise HarnessError(f"airflow {name} exited with {proc.returncode}:\n{self.log_tail()}")

    def pids(self) -> list[int]:
        """Every live process of this stack: its process group, plus anything with its AIRFLOW_HOME."""
        found = set(pids_with_env("AIRFLOW_HOME", str(self.home)))
        if self.pgid is not None:
            found.update(group_pids(self.pgid))
        return sorted(found)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after ``timeout`` s, reap, and hand
        the logs (stdout and log files) to the session's log canary. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        _LIVE_STACKS.discard(self)
        started = time.monotonic()
        if self.pgid is not None:
            self._signal_group(signal.SIGTERM)
            try:
                wait_until(lambda: not self.pids(), timeout, interval=0.1)
            except WaitTimeout:
                self._write_log(f"harness       | still running after {timeout} s: {self.pids()}; SIGKILL\n")
                self._signal_group(signal.SIGKILL)
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                wait_until(lambda: not self.pids(), 10, interval=0.1, message="processes survived SIGKILL")
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for reader in self._readers:
            reader.join(timeout=5)
        self.timings["stop_s"] = time.monotonic() - started
        self._write_log(f"harness       | stopped in {self.timings['stop_s']:.1f} s\n")
        with self._log_lock:
            if self._log is not None:
                self._log.close()
                self._log = None
        append_captured(self.all_logs())

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.pgid is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def __enter__(self) -> AirflowStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- CLI ---------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120.0, log_stdout: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``airflow <args>`` against this stack (its env and home). stderr always goes to the
        stack log; stdout too unless ``log_stdout=False`` (for commands that print a secret)."""
        proc = subprocess.run(
            [str(self.bin_dir / "airflow"), *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        shown = proc.stdout if log_stdout else "(stdout not logged)"
        self._write_log(f"cli           | $ airflow {' '.join(args)} -> {proc.returncode}\n{shown}\n{proc.stderr}\n")
        if proc.returncode != 0:
            raise HarnessError(f"airflow {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return proc

    def variable_unredacted(self, key: str) -> str | None:
        """The stored (decrypted) value of a Variable, read with ``airflow variables get`` (None if missing)."""
        try:
            proc = self.cli("variables", "get", key, log_stdout=False)
        except HarnessError as exc:
            if "does not exist" in str(exc):
                return None
            raise
        return proc.stdout.rstrip("\n")


# --------------------------------------------------------------------------------------------------
# headless Chromium


@contextlib.contextmanager
def headless_chromium(
    *, executable: Path | str = CHROMIUM, extra_args: Iterable[str] = (), launch_timeout: float = 60.0
) -> Iterator[Browser]:
    """A Playwright ``Browser`` from Debian's Chromium (no browser download), fresh temp profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(executable),
            headless=True,
            args=[*CHROMIUM_ARGS, *extra_args],
            timeout=launch_timeout * 1000,
        )
        try:
            yield browser
        finally:
            browser.close()


class ClickResult(NamedTuple):
    final_url: str
    text: str


def artifacts_dir() -> Path:
    """Where screenshots of failed browser steps go (``$E2E_ARTIFACTS_DIR`` or a temp folder)."""
    folder = Path(os.environ.get("E2E_ARTIFACTS_DIR") or Path(tempfile.gettempdir()) / "papertrail-e2e-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_and_click(
    browser: Browser,
    url: str,
    selector: str,
    *,
    wait_for_url_prefix: str,
    timeout: float = 30.0,
    screenshot_dir: Path | None = None,
    ignore_https_errors: bool = False,
) -> ClickResult:
    """Open ``url``, click ``selector``, wait until the page is at a URL starting with
    ``wait_for_url_prefix`` (following redirects), and return ``(final_url, body text)``.

    On any failure: a full-page screenshot is saved and a :class:`HarnessError` names it, with
    the current URL and the navigation trail (query values redacted: they may hold an OAuth code)
    and the start of the page text. The returned ``final_url`` is NOT redacted.
    ``ignore_https_errors`` accepts self-signed certificates (the emulator's TLS mode)."""
    if url.startswith(wait_for_url_prefix):
        raise ValueError(f"{url} already starts with {wait_for_url_prefix}: the wait would not wait")
    context = browser.new_context(ignore_https_errors=ignore_https_errors)
    page = context.new_page()
    page.set_default_timeout(timeout * 1000)
    page.set_default_navigation_timeout(timeout * 1000)
    trail: list[str] = []
    page.on(
        "response",
        lambda r: trail.append(f"{r.status} {redact_url(r.url)}") if r.request.is_navigation_request() else None,
    )
    step = "open"
    try:
        page.goto(url, wait_until="domcontentloaded")
        step = f"click {selector}"
        page.click(selector)
        step = f"wait for {wait_for_url_prefix}"
        page.wait_for_url(lambda u: u.startswith(wait_for_url_prefix), wait_until="domcontentloaded")
        return ClickResult(page.url, page.inner_text("body"))
    except Exception as exc:
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        shot = (screenshot_dir or artifacts_dir()) / f"browser-failure-{stamp}.png"
        with contextlib.suppress(Exception):
            page.screenshot(path=str(shot), full_page=True)
        text = ""
        with contextlib.suppress(Exception):
            text = page.inner_text("body", timeout=2000)[:1500]
        raise HarnessError(
            f"browser step '{step}' failed at {redact_url(page.url)}: {redact_urls_in(str(exc))}\n"
            f"screenshot: {shot}\nnavigations: {trail}\npage text: {text!r}"
        ) from exc
    finally:
        context.close()
