"""The api-server's row lock (``OrmEntryAccess``) on a real PostgreSQL, not SQLite.

Every other test runs the metadata DB on SQLite, whose database-wide write lock serializes
any two writers whatever ``OrmEntryAccess`` does. Here a throw-away PostgreSQL cluster
(tests/integration/postgres.py) holds the metadata DB, so the no-op ``UPDATE`` +
``SELECT ... FOR UPDATE`` row lock is the only thing that serializes:

* same row: a second transaction waits, as PostgreSQL itself reports (``pg_blocking_pids``),
  until the first commits, and then reads what the first wrote; different rows: no wait;
* the refresh coordinator (``handle_refresh_request``, what ``POST /papertrail/token``
  runs): N requests for one expired grant, all of them queued behind the first holder of
  the lock, cause exactly one token-endpoint call at the emulator;
* the callback (``handle_callback``): a second delivery of the same state waits for the
  first and is refused (409), the first's code is kept;
* a real ``airflow api-server`` (2 worker processes) on PostgreSQL: concurrent token
  requests and concurrent callbacks through the real routes, same outcomes;
* ``rotate-keys`` (``rotation.rotate_all``) interleaved with a coordinator refresh, both
  orders: the newest generation survives, encrypted under the new key (and a control run
  without the lock shows the lost update it prevents).

The in-process scenarios run in a subprocess whose Airflow is configured for PostgreSQL
(``python -m tests.integration.test_postgres_locking <scenario>``, parameters in an
environment variable so no code or secret appears on a command line). The first holder
keeps the lock until PostgreSQL shows the others blocked on it: an Event controls the hold,
not a sleep. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.integration import postgres
from tests.waiting import wait_until

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from airflow_papertrail.oauth.envelope import TokenCipher
    from airflow_papertrail.testing.emulator import PapertrailEmulator

pytestmark = pytest.mark.integration

MODULE = "tests.integration.test_postgres_locking"
SCENARIO_ENV = "PAPERTRAIL_PG_SCENARIO"
DEADLINE = 30.0  # seconds, for every wait in this module
CONN_HELD = "pt_pg_held"  # the in-process scenarios
CONN_API = "pt_pg_api"  # the real api-server
REDIRECT_URI = "http://127.0.0.1:8080/papertrail/callback"


# ============================================================================================
# pytest side
# ============================================================================================
def _unavailable(reason: str, *, enforce: bool) -> None:
    if enforce and postgres.required():
        pytest.fail(f"{reason}. {postgres.REQUIRE_ENV} (or CI) is set, so this fails instead of skipping.")
    pytest.skip(reason)


def _postgres_bindir() -> Path:
    bindir = postgres.find_bindir()
    if bindir is None:
        _unavailable(
            "no PostgreSQL server binaries (/usr/lib/postgresql/<major>/bin/initdb, pg_ctl, pg_isready, createdb): "
            "apt-get install postgresql",
            enforce=True,
        )
        raise AssertionError("unreachable")
    missing = postgres.missing_drivers()
    if missing:
        # The locked .venv has them (uv.lock, dev group); other environments (the Airflow 3.2
        # compatibility venv) may not, and skip.
        locked_venv = Path(sys.prefix).resolve() == (Path(__file__).resolve().parents[2] / ".venv").resolve()
        _unavailable(f"{', '.join(missing)} not installed in this Python environment", enforce=locked_venv)
    return bindir


@dataclass
class PgAirflow:
    """Airflow on a throw-away PostgreSQL: the environment of its processes, the emulator it talks to."""

    cluster: postgres.Cluster
    env: dict[str, str]
    emulator: PapertrailEmulator
    cipher: TokenCipher
    migrate_seconds: float

    def scenario(self, name: str, **params: Any) -> dict[str, Any]:
        """Run one ``scenario_<name>`` below in a subprocess on this PostgreSQL; its result dict."""
        from tests.integration.conftest import run

        env = dict(self.env)
        env[SCENARIO_ENV] = json.dumps(params)
        proc = run([sys.executable, "-m", MODULE, name], env=env, timeout=300)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, f"scenario {name} printed no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return json.loads(lines[-1][len("RESULT ") :])

    def issue_code(self) -> str:
        from tests.conftest import CLIENT_ID

        return self.emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, system="xero")


@pytest.fixture(scope="module")
def pg_airflow(session_dir: Path) -> Iterator[PgAirflow]:
    """A PostgreSQL cluster of our own, ``airflow db migrate``d in a separate AIRFLOW_HOME."""
    bindir = _postgres_bindir()
    from cryptography.fernet import Fernet

    from airflow_papertrail.oauth.envelope import TokenCipher, parse_keys
    from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator
    from tests.conftest import CLIENT_ID, CLIENT_SECRET, emulator_connection, remember_secrets
    from tests.integration.conftest import BIN, airflow_env, run

    key = Fernet.generate_key().decode()
    remember_secrets(key)
    cluster = postgres.Cluster(bindir)
    emulator = PapertrailEmulator(clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])]).start()
    try:
        cluster.start()
        remember_secrets(cluster.password)
        url = cluster.create_database("airflow")
        home = session_dir / "airflow-home-postgres"
        home.mkdir(exist_ok=True)
        connections = {
            f"AIRFLOW_CONN_{conn_id.upper()}": emulator_connection(emulator.base_url)
            for conn_id in (CONN_HELD, CONN_API)
        }
        env = airflow_env(
            AIRFLOW_HOME=str(home),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=url,
            AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS=key,
            **connections,
        )
        for leftover in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC", "AIRFLOW_CONN_PT_COORD"):
            env.pop(leftover, None)
        started = time.monotonic()
        run([str(BIN / "airflow"), "db", "migrate"], env=env, timeout=600)
        yield PgAirflow(cluster, env, emulator, TokenCipher(parse_keys(key)), time.monotonic() - started)
    finally:
        emulator.stop()
        remember_secrets(*emulator.issued_secrets)
        cluster.stop()


@pytest.fixture(scope="module")
def pg_api_server(pg_airflow: PgAirflow, session_dir: Path) -> Iterator[str]:
    """A real ``airflow api-server`` with 2 worker processes on the PostgreSQL metadata DB."""
    from tests.integration.conftest import start_api_server

    port = postgres.free_port()
    env = dict(pg_airflow.env, AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True", AIRFLOW__API__PORT=str(port))
    with start_api_server(env, port, session_dir / f"api-server-postgres-{port}.log", workers=2) as base:
        yield base


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _together(n: int, call: Callable[[int], Any]) -> list[Any]:
    """``call(0..n-1)`` on n threads released at once by a barrier; every thread joined with a deadline."""
    barrier = threading.Barrier(n, timeout=DEADLINE)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = call(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 4 * DEADLINE
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a concurrent request did not finish in time"
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    return results


# -- the row lock itself ---------------------------------------------------------------------------
def test_same_row_second_transaction_waits_for_the_first_to_commit(pg_airflow):
    r = pg_airflow.scenario("same_row")
    print(f"\n[postgres] same row: {json.dumps(r)}")
    assert r["blocked_by_first"] is True  # PostgreSQL itself: the second backend waits on the first
    assert r["second_acquired_while_first_held"] is False
    assert r["second_acquired_after"] >= r["first_hold_ended"]
    # the second's wait covers all of the first's hold from the moment the second asked
    assert r["second_wait_s"] >= r["first_hold_ended"] - r["second_started"]
    assert r["second_wait_s"] >= r["time_to_see_block_s"]
    assert r["second_saw"] == "written-by-first"  # it read the committed value, not its snapshot
    assert r["final"] == "written-by-second"


def test_different_rows_do_not_block_each_other(pg_airflow):
    r = pg_airflow.scenario("different_rows")
    print(f"\n[postgres] different rows: {json.dumps(r)}")
    assert r["second_done_while_first_held"] is True
    assert r["blocked_backends_while_first_held"] == 0
    assert r["finals"] == ["written-by-first", "written-by-second"]


# -- the refresh coordinator and the callback through their handlers ------------------------------
def test_refresh_requests_queued_on_the_row_lock_cause_one_refresh(pg_airflow):
    emulator = pg_airflow.emulator
    before = emulator.stats.snapshot()
    r = pg_airflow.scenario("refresh_held", code=pg_airflow.issue_code(), n=12)
    print(f"\n[postgres] refresh, 12 requests queued on the lock: {json.dumps(r)}")
    after = emulator.stats.snapshot()
    assert r["blocked"] == 11  # all but the holder were waiting in PostgreSQL before it went on
    assert r["statuses"] == [200] * 12, r
    assert after["refresh_grants"] - before["refresh_grants"] == 1
    assert r["generations"] == [r["seen_generation"] + 1] == [r["stored_generation"]]
    assert r["all_answers_are_the_stored_token"] is True
    stored_refresh = [t for t in emulator.issued_secrets if _sha256(t) == r["stored_refresh_token_sha256"]]
    assert len(stored_refresh) == 1 and emulator.grant_is_active(stored_refresh[0])


def test_second_callback_with_the_same_state_waits_and_is_refused(pg_airflow):
    r = pg_airflow.scenario("callbacks_held", state=secrets.token_urlsafe(32))
    print(f"\n[postgres] two callbacks, one state: {json.dumps(r)}")
    assert r["blocked"] == 1
    assert r["first"] == [200, "Authorization received", True]
    assert r["second"] == [409, "Already used", False]
    assert (r["final_status"], r["final_code"]) == ("captured", "code-first")


# -- a real api-server (2 worker processes) on PostgreSQL ----------------------------------------
def test_api_server_on_postgres_refreshes_once_for_concurrent_token_requests(pg_airflow, pg_api_server):
    import requests

    from airflow_papertrail.oauth.envelope import open_ticket, seal_ticket
    from airflow_papertrail.refresh import REQUEST_PURPOSE, RESPONSE_PURPOSE

    emulator, cipher = pg_airflow.emulator, pg_airflow.cipher
    seeded = pg_airflow.scenario("seed_grant", code=pg_airflow.issue_code(), conn_id=CONN_API)
    seen = seeded["generation"]
    before = emulator.stats.snapshot()
    emulator.inject("token", delay=0.5)  # a slow refresh: the other requests pile up on the row lock

    def ask(_: int) -> tuple[int, dict[str, Any]]:
        ticket = seal_ticket(cipher, REQUEST_PURPOSE, {"conn_id": CONN_API, "seen_generation": seen, "force": False})
        response = requests.post(f"{pg_api_server}/papertrail/token", json={"ticket": ticket}, timeout=120)
        body = response.json()
        if response.status_code == 200:
            body = open_ticket(cipher, RESPONSE_PURPOSE, body["ticket"])
        return response.status_code, body

    started = time.monotonic()
    results = _together(16, ask)
    elapsed = time.monotonic() - started
    after = emulator.stats.snapshot()
    print(f"\n[postgres] api-server, 16 concurrent token requests: {elapsed:.2f} s, statuses {[s for s, _ in results]}")
    assert all(status == 200 for status, _ in results), results
    assert after["refresh_grants"] - before["refresh_grants"] == 1
    assert {body["generation"] for _, body in results} == {seen + 1}
    assert len({body["access_token"] for _, body in results}) == 1
    assert emulator.pending_faults("token") == 0


def test_api_server_on_postgres_accepts_exactly_one_of_concurrent_callbacks(pg_airflow, pg_api_server):
    import requests

    state = secrets.token_urlsafe(32)
    pg_airflow.scenario("seed_pending", state=state)

    def deliver(i: int) -> int:
        url = f"{pg_api_server}/papertrail/callback?state={state}&code=code-{i}"
        return requests.get(url, timeout=120, allow_redirects=False).status_code

    statuses = _together(8, deliver)
    print(f"\n[postgres] api-server, 8 concurrent callbacks with one state: {statuses}")
    assert sorted(statuses) == [200] + [409] * 7, statuses
    stored = pg_airflow.scenario("read_pending", state=state)
    assert stored == {"status": "captured", "code": f"code-{statuses.index(200)}"}


# -- rotate-keys during a refresh ------------------------------------------------------------------
def test_rotation_during_a_refresh_keeps_the_newer_generation_under_the_new_key(pg_airflow):
    """The rotation holds the grant's row (having read generation 1) while the refresh's claim
    transaction, or its final store after the token answer, waits on PostgreSQL's row lock;
    then the refresh writes generation 2 and nothing overwrites it with the older
    re-encrypted grant. The control shows what the lock prevents: a rotation that reads, lets
    the refresh commit, then writes its older copy back."""
    r = pg_airflow.scenario(
        "rotate_during_refresh",
        code=pg_airflow.issue_code(),
        code_b=pg_airflow.issue_code(),
        control_code=pg_airflow.issue_code(),
    )
    print(f"\n[postgres] rotate during refresh: {json.dumps(r)}")
    issued = {_sha256(s) for s in pg_airflow.emulator.issued_secrets}
    # the rotation re-encrypted generation 1 while the refresh's claim waited; or the refresh's
    # claim had re-encrypted it already (its store has the new key first) and its final store waited
    expected = {"rotation_first": "rotated", "refresh_first": "already current"}
    for order, outcome in expected.items():
        run = r[order]
        assert run["refresh_blocked_by_rotation"] is True, order  # PostgreSQL itself: the refresh waited
        assert run["rotation"] == {"outcome": outcome, "generation": 1}, order
        assert run["final_generation"] == 2 == run["refresh_result_generation"] == run["health_generation"], order
        assert run["final_is_current"] is True, order  # the newest generation, under the new key
        assert run["final_refresh_token_sha256"] in issued, order
    # without the lock (the control): the older copy wins, which is what the test above rules out
    assert r["unlocked_control_final_generation"] == 1


# ============================================================================================
# subprocess side: Airflow configured for PostgreSQL (AIRFLOW__DATABASE__SQL_ALCHEMY_CONN)
# ============================================================================================
class _HoldFirst:
    """``OrmEntryAccess`` whose first holder keeps the row lock until ``release`` is set."""

    def __init__(self) -> None:
        from airflow_papertrail.plugins.locking import OrmEntryAccess

        self.inner = OrmEntryAccess()
        self.held = threading.Event()
        self.release = threading.Event()
        self.holder_pid = 0
        self.first_acquired = 0.0
        self.first_hold_ended = 0.0
        self._first = threading.Lock()

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[Any]:
        with self.inner.locked(key) as entry:
            if self._first.acquire(blocking=False):
                self.first_acquired = time.monotonic()
                self.holder_pid = _backend_pid()
                self.held.set()
                if not self.release.wait(DEADLINE):
                    raise RuntimeError("the first holder was never released")
                self.first_hold_ended = time.monotonic()  # the commit comes after this
            yield entry


def _backend_pid() -> int:
    """This thread's PostgreSQL backend: ``create_session`` uses the thread's scoped session."""
    from airflow import settings
    from sqlalchemy import text

    assert settings.Session is not None
    return int(settings.Session().execute(text("SELECT pg_backend_pid()")).scalar_one())


def _blocked(holder_pid: int) -> tuple[int, bool]:
    """(backends of this database waiting for a lock, whether one of them waits for ``holder_pid``)."""
    from airflow import settings
    from sqlalchemy import text

    assert settings.engine is not None
    # autocommit: pg_stat_activity is a snapshot per transaction
    with settings.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        row = conn.execute(
            text(
                "SELECT count(*), coalesce(bool_or(:holder = ANY(pg_blocking_pids(pid))), false) "
                "FROM pg_stat_activity WHERE datname = current_database() AND cardinality(pg_blocking_pids(pid)) > 0"
            ),
            {"holder": holder_pid},
        ).one()
    return int(row[0]), bool(row[1])


def _wait_blocked(holder_pid: int, waiters: list[_Worker]) -> tuple[float, bool]:
    """Until every one of ``waiters`` is a backend waiting on a lock (one directly on ``holder_pid``).

    A waiter that finishes while the first still holds the lock got past it: fail at once.
    """
    started = time.monotonic()
    last = (0, False)

    def all_blocked() -> bool:
        nonlocal last
        last = _blocked(holder_pid)
        finished = sum(not w.thread.is_alive() for w in waiters)
        if finished:
            raise AssertionError(
                f"{finished} of {len(waiters)} transactions on the locked row finished while the first still held "
                "it: OrmEntryAccess does not serialize on this database"
            )
        return last[0] >= len(waiters) and last[1]

    wait_until(
        all_blocked,
        timeout=DEADLINE,
        interval=0.01,
        message=lambda: f"{last[0]} of {len(waiters)} backends blocked (by holder: {last[1]})",
    )
    return time.monotonic() - started, last[1]


class _Worker:
    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.value = fn(*args)
        except BaseException as exc:
            self.error = exc


def _join(*workers: _Worker) -> list[Any]:
    deadline = time.monotonic() + DEADLINE
    for worker in workers:
        worker.thread.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(w.thread.is_alive() for w in workers)
    if stuck:
        raise AssertionError(f"{stuck} of {len(workers)} threads still running after {DEADLINE:.0f} s")
    for worker in workers:
        if worker.error is not None:
            raise worker.error
    return [w.value for w in workers]


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(DEADLINE):
        raise AssertionError(f"{what} did not happen within {DEADLINE:.0f} s")


def scenario_same_row() -> dict[str, Any]:
    from airflow.models.variable import Variable

    key = "papertrail_pg_same_row"
    Variable.set(key, "initial")
    access = _HoldFirst()
    second_acquired = threading.Event()
    stamps: dict[str, Any] = {}

    def first() -> None:
        with access.locked(key) as entry:
            entry.write("written-by-first")

    def second() -> None:
        stamps["started"] = time.monotonic()
        with access.locked(key) as entry:
            stamps["acquired"] = time.monotonic()
            second_acquired.set()
            stamps["saw"] = entry.raw
            entry.write("written-by-second")

    worker_a = _Worker(first)
    try:
        _wait(access.held, "the first lock")
        worker_b = _Worker(second)
        seen_after, by_holder = _wait_blocked(access.holder_pid, [worker_b])
        acquired_while_held = second_acquired.is_set()
    finally:
        access.release.set()
    _join(worker_a, worker_b)
    t0 = access.first_acquired
    return {
        "blocked_by_first": by_holder,
        "second_acquired_while_first_held": acquired_while_held,
        "first_hold_s": round(access.first_hold_ended - t0, 4),
        "second_wait_s": round(stamps["acquired"] - stamps["started"], 4),
        "time_to_see_block_s": round(seen_after, 4),
        # relative to the first acquisition
        "second_started": round(stamps["started"] - t0, 4),
        "first_hold_ended": round(access.first_hold_ended - t0, 4),
        "second_acquired_after": round(stamps["acquired"] - t0, 4),
        "second_saw": stamps["saw"],
        "final": Variable.get(key),
    }


def scenario_different_rows() -> dict[str, Any]:
    from airflow.models.variable import Variable

    from airflow_papertrail.plugins.locking import OrmEntryAccess

    keys = ("papertrail_pg_row_one", "papertrail_pg_row_two")
    for key in keys:
        Variable.set(key, "initial")
    access = _HoldFirst()
    stamps: dict[str, float] = {}

    def first() -> None:
        with access.locked(keys[0]) as entry:
            entry.write("written-by-first")

    def second() -> None:
        stamps["started"] = time.monotonic()
        with OrmEntryAccess().locked(keys[1]) as entry:
            stamps["acquired"] = time.monotonic()
            entry.write("written-by-second")
        stamps["committed"] = time.monotonic()

    worker_a = _Worker(first)
    try:
        _wait(access.held, "the first lock")
        worker_b = _Worker(second)
        try:
            _join(worker_b)  # while the first still holds its row
        except AssertionError:
            raise AssertionError(
                "a transaction on another Variable row waited for the first's lock: the lock is wider than the row"
            ) from None
        done_while_held = not access.release.is_set() and worker_a.thread.is_alive()
        blocked, _ = _blocked(access.holder_pid)
    finally:
        access.release.set()
    _join(worker_a)
    return {
        "second_done_while_first_held": done_while_held,
        "blocked_backends_while_first_held": blocked,
        "second_lock_s": round(stamps["acquired"] - stamps["started"], 4),
        "second_commit_s": round(stamps["committed"] - stamps["started"], 4),
        "first_hold_s": round(access.first_hold_ended - access.first_acquired, 4),
        "finals": [Variable.get(key) for key in keys],
    }


def _client_config() -> Any:
    from airflow.models.connection import Connection

    from airflow_papertrail.hooks.papertrail import config_from_connection

    return config_from_connection(Connection.get_connection_from_secrets(CONN_HELD))


def _seed_grant(code: str, conn_id: str) -> tuple[Any, Any]:
    """Exchange ``code`` at the emulator and store the grant, already expired, for ``conn_id``."""
    from airflow_papertrail.oauth import OAuthClient
    from airflow_papertrail.token_store import OrmVariables, VariableTokenStore

    token = OAuthClient(_client_config()).exchange_code(code)
    store = VariableTokenStore(conn_id, backend=OrmVariables())
    return store, store.save(token.with_expiry(time.time() - 10))


def scenario_seed_grant(code: str, conn_id: str) -> dict[str, Any]:
    _, stored = _seed_grant(code, conn_id)
    return {"generation": stored.generation}


def scenario_refresh_held(code: str, n: int) -> dict[str, Any]:
    from airflow_papertrail.oauth.envelope import open_ticket, seal_ticket
    from airflow_papertrail.refresh import REQUEST_PURPOSE, RESPONSE_PURPOSE, handle_refresh_request
    from airflow_papertrail.token_store import load_cipher

    store, stored = _seed_grant(code, CONN_HELD)
    cipher = load_cipher()
    access = _HoldFirst()

    def ask() -> tuple[int, dict[str, Any]]:
        request = {"conn_id": CONN_HELD, "seen_generation": stored.generation, "force": False}
        status, body = handle_refresh_request(seal_ticket(cipher, REQUEST_PURPOSE, request), entries=access)
        if status == 200:
            body = open_ticket(cipher, RESPONSE_PURPOSE, body["ticket"])
        return status, body

    holder = _Worker(ask)
    try:
        _wait(access.held, "the first lock")
        others = [_Worker(ask) for _ in range(n - 1)]
        seen_after, _ = _wait_blocked(access.holder_pid, others)
        blocked, _ = _blocked(access.holder_pid)
    finally:
        access.release.set()
    released = time.monotonic()
    results = _join(holder, *others)
    all_done = time.monotonic() - released
    current = store.load()
    assert current is not None
    return {
        "blocked": blocked,
        "time_to_see_all_blocked_s": round(seen_after, 4),
        "all_done_after_release_s": round(all_done, 4),
        "statuses": [status for status, _ in results],
        "generations": sorted({body.get("generation") for _, body in results}),
        "seen_generation": stored.generation,
        "stored_generation": current.generation,
        "all_answers_are_the_stored_token": all(
            body.get("access_token") == current.token.access_token for _, body in results
        ),
        # a digest, not the token: the test finds it among the emulator's issued secrets
        "stored_refresh_token_sha256": hashlib.sha256((current.token.refresh_token or "").encode()).hexdigest(),
    }


def _pending_store() -> Any:
    from airflow_papertrail.authorization import AuthorizationStore
    from airflow_papertrail.token_store import OrmVariables

    return AuthorizationStore(backend=OrmVariables())


def scenario_seed_pending(state: str) -> dict[str, Any]:
    from airflow_papertrail.authorization import PendingAuthorization, authorization_id_for

    now = time.time()
    _pending_store().save(
        PendingAuthorization(
            authorization_id=authorization_id_for(state),
            conn_id=CONN_API,
            state=state,
            redirect_uri=REDIRECT_URI,
            created_at=now,
            expires_at=now + 600,
        )
    )
    return {}


def scenario_read_pending(state: str) -> dict[str, Any]:
    from airflow_papertrail.authorization import authorization_id_for

    pending = _pending_store().load(authorization_id_for(state))
    return {"status": pending.status, "code": pending.code} if pending else {}


def scenario_callbacks_held(state: str) -> dict[str, Any]:
    from airflow_papertrail.authorization import authorization_id_for
    from airflow_papertrail.plugins.callback_app import handle_callback

    scenario_seed_pending(state)
    store = _pending_store()
    access = _HoldFirst()

    def deliver(code: str) -> list[Any]:
        status, title, _, ok = handle_callback(f"state={state}&code={code}".encode(), entries=access, store=store)
        return [status, title, ok]

    first = _Worker(deliver, "code-first")
    try:
        _wait(access.held, "the first lock")
        second = _Worker(deliver, "code-second")
        _wait_blocked(access.holder_pid, [second])
        blocked, _ = _blocked(access.holder_pid)
    finally:
        access.release.set()
    results = _join(first, second)
    final = store.load(authorization_id_for(state))
    return {
        "blocked": blocked,
        "first": results[0],
        "second": results[1],
        "final_status": final.status if final else None,
        "final_code": final.code if final else None,
    }


def scenario_rotate_during_refresh(code: str, code_b: str, control_code: str) -> dict[str, Any]:
    from airflow.models.variable import Variable
    from cryptography.fernet import Fernet

    from airflow_papertrail.health import read_health
    from airflow_papertrail.oauth import OAuthClient
    from airflow_papertrail.oauth.envelope import TokenCipher, parse_keys
    from airflow_papertrail.plugins.locking import OrmEntryAccess
    from airflow_papertrail.refresh import coordinated_refresh
    from airflow_papertrail.rotation import rotate_all
    from airflow_papertrail.token_store import OrmVariables, VariableTokenStore, grant_variable_key

    old_key = parse_keys(os.environ["AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS"])[0]
    new_key = Fernet.generate_key().decode()
    both = TokenCipher([new_key, old_key])  # step 2 of the procedure: the new key first everywhere
    config = _client_config()

    class GatedClient:
        """The token request starts only when told: the rotation takes the row lock first."""

        def __init__(self) -> None:
            self.inner = OAuthClient(config)
            self.config = config
            self.started = threading.Event()
            self.go = threading.Event()

        def refresh(self, *args: Any, **kwargs: Any) -> Any:
            self.started.set()
            if not self.go.wait(DEADLINE):
                raise RuntimeError("the refresh was never let go")
            return self.inner.refresh(*args, **kwargs)

    def refresh_in_thread(conn_id: str, client: GatedClient) -> _Worker:
        store = VariableTokenStore(conn_id, cipher=both, backend=OrmVariables())
        return _Worker(
            lambda: coordinated_refresh(
                conn_id,
                seen_generation=1,
                force=False,
                entries=OrmEntryAccess(),
                store=store,
                client_factory=lambda: client,
                config=config,
            )
        )

    def interleave(conn_id: str, code: str, *, rotation_first: bool) -> dict[str, Any]:
        """rotation_first: the rotation holds the row before the refresh's claim transaction;
        else the refresh claimed and its answer arrives while the rotation holds the row."""
        _seed_grant(code, conn_id)  # generation 1, expired, under the old key
        client = GatedClient()
        access = _HoldFirst()
        rotation: _Worker | None = None
        if rotation_first:
            rotation = _Worker(lambda: rotate_all(cipher=both, entries=access, conn_id=conn_id))
            _wait(access.held, "the rotation's row lock")
            client.go.set()
        refresh = refresh_in_thread(conn_id, client)
        try:
            if not rotation_first:
                _wait(client.started, "the refresh claim")  # claim committed; the token request waits
                rotation = _Worker(lambda: rotate_all(cipher=both, entries=access, conn_id=conn_id))
                _wait(access.held, "the rotation's row lock")
                client.go.set()  # the answer arrives; the refresh's store must wait for the row
            _wait_blocked(access.holder_pid, [refresh])
            _, by_rotation = _blocked(access.holder_pid)
        finally:
            access.release.set()
            client.go.set()
        assert rotation is not None
        rotated, refreshed = _join(rotation, refresh)
        raw = Variable.get(grant_variable_key(conn_id))
        final = TokenCipher([new_key]).open("grant", conn_id, raw)  # the new key alone opens it
        grant_rotation = next(r for r in rotated if r.kind == "grant")
        return {
            "refresh_blocked_by_rotation": by_rotation,
            "rotation": {"outcome": grant_rotation.outcome, "generation": grant_rotation.generation},
            "refresh_result_generation": refreshed.generation,
            "final_generation": final["generation"],
            "final_is_current": both.is_current(raw),
            "health_generation": read_health(conn_id, backend=OrmVariables()).generation,
            "final_refresh_token_sha256": hashlib.sha256(str(final["token"]["refresh_token"]).encode()).hexdigest(),
        }

    results: dict[str, Any] = {
        "rotation_first": interleave("pt_pg_rotate_a", code, rotation_first=True),
        "refresh_first": interleave("pt_pg_rotate_b", code_b, rotation_first=False),
    }

    # 2. the control: read before the refresh commits, write the older copy after (no lock)
    control = "pt_pg_rotate_control"
    _seed_grant(control_code, control)
    key = grant_variable_key(control)
    stale = Variable.get(key)
    client2 = GatedClient()
    client2.go.set()
    _join(refresh_in_thread(control, client2))
    Variable.set(key, both.rotate(stale))
    control_final = both.open("grant", control, Variable.get(key))

    results["unlocked_control_final_generation"] = control_final["generation"]
    return results


def _main(argv: list[str]) -> int:
    scenario = globals().get(f"scenario_{argv[1]}") if len(argv) == 2 else None
    if scenario is None:
        print(f"usage: python -m {MODULE} <scenario>", file=sys.stderr)
        return 2
    url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if not url.startswith("postgresql"):
        print("these scenarios need AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql...", file=sys.stderr)
        return 2
    try:
        result = scenario(**json.loads(os.environ.get(SCENARIO_ENV) or "{}"))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # at once: a thread still inside a transaction must not race interpreter shutdown
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
