"""Faults in the middle of a refresh on the scale-out topology (issue 11).

Each test takes one connection of its own, stores its grant with the access token expired, holds
the refresh at the emulator's token endpoint (an injected delay) and, while the api-server's
refresh is in flight and tasks on every worker wait for it, breaks one thing:

* a Celery worker is SIGKILLed with everything under it (a host losing power);
* an api-server replica is SIGKILLed while it serves waiting coordinator requests and Execution
  API calls (the replica holding the refresh claim finishes the refresh);
* the proxy's read timeout on ``/papertrail/token`` is cut below the token endpoint's delay
  (nginx answers 504 while the api-server is still presenting the refresh token).

Every time: the run succeeds, the tasks that failed succeed on a retry, the grant moves exactly one
generation on, and the emulator (rotating refresh tokens, reuse revokes the grant) counts exactly
one refresh, no reuse and no revocation: no refresh token was presented twice.

They run proxy timeout, worker kill, api-server kill, after every other scale-out test
(``conftest.py`` puts this module last): a killed component is not restarted (CI budget: a worker takes about 30 s to start, an
api-server about 40 s), so the api-server test runs with the 2 workers left; a test that needs the
whole topology restarts what was killed first.

Killing the replica that holds the refresh claim is the one fault not run here: its claim then
lasts its full lifetime (``refresh.lease_seconds``: 570 s at the defaults) before another
replica may take it over (``tests/integration/test_refresh_coordinator.py`` proves the takeover
with an injected clock); see docs/scaling-out.md.
"""

from __future__ import annotations

import contextlib
import time

import psutil
import pytest

from tests.scaleout.common import CONNECTIONS, DAG_ID, TASK_ID, TIMINGS, store_expired_grants, stored_grants
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(1800)
TASKS = 6  # = 3 workers x 2 slots: every worker runs tasks waiting for the same refresh
TOKEN_DELAY = 8.0


def _delta(emulator, before: dict[str, int]) -> dict[str, int]:
    after = emulator.stats.snapshot()
    return {k: after[k] - before.get(k, 0) for k in after}


def _held_refresh(topo, emulator) -> str | None:
    """The api-server replica whose token request the emulator is holding right now (matched by
    the request's source port), or None: a held request from anything else does not count."""
    for port in emulator.held_requests("token"):
        holder = topo.api_server_owning(port)
        if holder is not None:
            return holder
    return None


def _run_logs(topo, run_id: str) -> str:
    """This run's task logs (on every worker still on disk), not the whole session's."""
    return "\n".join(p.read_text(errors="replace") for p in topo.worker_log_files() if f"run_id={run_id}" in str(p))


def _use_token_tis(topo, run_id: str) -> list[dict]:
    return [ti for ti in topo.task_instances(DAG_ID, run_id) if ti["task_id"] == TASK_ID]


def _assert_one_refresh(topo, emulator, conn_id: str, seeded: dict, before: dict[str, int]) -> dict[str, int]:
    delta = _delta(emulator, before)
    assert delta["refresh_grants"] == 1, delta  # one refresh for the whole run, whatever broke
    assert delta["token_requests"] == 1, delta  # and one token request: nothing was presented twice
    assert delta["grants_revoked"] == 0 and delta["invalid_grant_errors"] == 0, delta  # no reuse
    stored = stored_grants(topo)[conn_id]
    assert stored["generation"] == seeded[conn_id]["generation"] + 1, stored
    assert stored["unknown_refresh_outcomes"] == 0, stored
    assert emulator.grant_is_active(stored["refresh_token"])
    return delta


def _run_and_check(topo, emulator, conn_id: str, seeded: dict, run_id: str, what: str) -> list[dict]:
    state = topo.wait_for_run(DAG_ID, run_id, timeout=600)
    tis = _use_token_tis(topo, run_id)
    summary = {ti["map_index"]: (ti["state"], ti["try_number"], ti.get("hostname")) for ti in tis}
    assert state == "success", (summary, topo.log_tail(names=["scheduler", *topo.worker_names]))
    assert len(tis) == TASKS and all(ti["state"] == "success" for ti in tis), summary
    for ti in tis:
        result = topo.xcom(DAG_ID, run_id, TASK_ID, map_index=ti["map_index"])
        assert result["generation"] == seeded[conn_id]["generation"] + 1, result
    TIMINGS[f"{what}: tries per task"] = sorted(ti["try_number"] for ti in tis)
    return tis


def _inbound_requests(topo, name: str, port: int) -> int:
    """Requests a replica is serving right now (nginx opens one upstream connection per request)."""
    count = 0
    for proc in topo.process_tree(name):
        with contextlib.suppress(psutil.NoSuchProcess):
            count += sum(
                1
                for c in proc.net_connections(kind="tcp")
                if c.laddr and c.laddr.port == port and c.raddr and c.status == psutil.CONN_ESTABLISHED
            )
    return count


def test_a_proxy_timeout_on_the_coordinator_causes_no_second_refresh(topology, emulator):
    """nginx gives up on ``/papertrail/token`` after 2 s; the token endpoint takes 5 s. The tasks,
    with the default ``refresh_coordinator = auto``, get nginx's HTML 504, fail with a retryable
    error (never refresh on their own), and find the api-server's refresh stored on retry,
    whichever replica their retry reaches."""
    topo, conn_id = topology, CONNECTIONS[2]
    seeded = store_expired_grants(topo, emulator, [conn_id])
    before = emulator.stats.snapshot()
    topo.reload_proxy(coordinator_read_timeout=2)
    log_start = len(topo.proxy_requests())
    emulator.inject("token", delay=5.0)
    started = time.monotonic()
    try:
        # refresh_coordinator = auto (the default) in the tasks: a 504 page is not "no coordinator"
        conf = {"conn_ids": [conn_id], "tasks_per_connection": TASKS, "coordinator": "auto"}
        run_id = topo.trigger(DAG_ID, conf=conf)
        tis = _run_and_check(topo, emulator, conn_id, seeded, run_id, "proxy timeout")
        TIMINGS["proxy timeout: run (s)"] = round(time.monotonic() - started, 1)
    finally:
        emulator.clear_faults()
        topo.reload_proxy()
    _assert_one_refresh(topo, emulator, conn_id, seeded, before)
    coordinator = [r for r in topo.proxy_requests()[log_start:] if r["path"] == "/papertrail/token"]
    timed_out = [r for r in coordinator if r["status"] == "504"]
    assert timed_out, coordinator  # the proxy really cut the coordinator requests short
    assert any(ti["try_number"] >= 2 for ti in tis)  # and the tasks that met it were retried
    TIMINGS["proxy timeout: coordinator requests 504 / all"] = f"{len(timed_out)} / {len(coordinator)}"
    TIMINGS["proxy timeout: coordinator requests per replica"] = {
        u: sum(r["upstream"] == u for r in coordinator) for u in sorted({r["upstream"] for r in coordinator})
    }
    logs = _run_logs(topo, run_id)
    assert "without a Papertrail-ai answer" in logs  # the worker said what happened
    assert "refreshing on this machine" not in logs


@pytest.mark.degraded_ok
def test_a_worker_killed_mid_refresh_loses_nothing(topology, emulator):
    topo, conn_id = topology, CONNECTIONS[0]
    seeded = store_expired_grants(topo, emulator, [conn_id])
    before = emulator.stats.snapshot()
    emulator.inject("token", delay=TOKEN_DELAY)
    started = time.monotonic()
    run_id = topo.trigger(DAG_ID, conf={"conn_ids": [conn_id], "tasks_per_connection": TASKS})
    try:

        def worker_waiting_for_the_refresh() -> tuple[str, list[int]] | None:
            if _held_refresh(topo, emulator) is None:
                return None
            running: dict[str, list[int]] = {}
            for ti in _use_token_tis(topo, run_id):
                if ti["state"] == "running" and ti.get("hostname") in topo.worker_names:
                    running.setdefault(ti["hostname"], []).append(ti["map_index"])
            return max(running.items(), key=lambda item: len(item[1])) if running else None

        victim, on_victim = wait_until(
            worker_waiting_for_the_refresh,
            120,
            interval=0.1,
            message=lambda: f"no task waited for the held refresh: {emulator.stats.snapshot()}",
        )
        holder = _held_refresh(topo, emulator)
        assert holder is not None  # still mid-refresh when the worker dies
        topo.kill(victim)
        assert _held_refresh(topo, emulator) == holder  # and still after: the kill hit mid-refresh
        TIMINGS["worker kill: killed, with tasks"] = {victim: on_victim}

        tis = _run_and_check(topo, emulator, conn_id, seeded, run_id, "worker kill")
        TIMINGS["worker kill: run (s)"] = round(time.monotonic() - started, 1)
        by_index = {ti["map_index"]: ti for ti in tis}
        for index in on_victim:  # failed by the scheduler (no heartbeat), then retried elsewhere
            assert by_index[index]["try_number"] >= 2, by_index[index]
            assert by_index[index]["hostname"] != victim, by_index[index]
        _assert_one_refresh(topo, emulator, conn_id, seeded, before)
        assert "refreshing on this machine" not in _run_logs(topo, run_id)
    finally:
        emulator.clear_faults()


@pytest.mark.degraded_ok
def test_an_api_server_replica_killed_mid_refresh_loses_nothing(topology, emulator):
    topo, conn_id = topology, CONNECTIONS[1]
    seeded = store_expired_grants(topo, emulator, [conn_id])
    before = emulator.stats.snapshot()
    log_start = len(topo.proxy_requests())
    emulator.inject("token", delay=TOKEN_DELAY)
    started = time.monotonic()
    run_id = topo.trigger(DAG_ID, conf={"conn_ids": [conn_id], "tasks_per_connection": TASKS})
    try:
        # The replica whose token request the emulator holds has the refresh claim; the other one
        # serves requests waiting for that claim (and Execution API calls): that one dies.
        holder = wait_until(
            lambda: _held_refresh(topo, emulator),
            120,
            interval=0.1,
            message=lambda: f"no api-server's refresh was held at the emulator: {emulator.stats.snapshot()}",
        )
        victim = next(f"api-server-{n}" for n in range(1, topo.api_server_count + 1) if f"api-server-{n}" != holder)
        port = topo.api_ports[int(victim.rsplit("-", 1)[1]) - 1]
        serving = wait_until(
            lambda: _inbound_requests(topo, victim, port),
            TOKEN_DELAY,
            interval=0.05,
            message=f"{victim} served no request while the refresh was held",
        )
        assert _held_refresh(topo, emulator) == holder
        topo.kill(victim)
        assert _held_refresh(topo, emulator) == holder  # the holder's refresh goes on
        TIMINGS["api-server kill: killed, serving requests"] = {victim: serving, "claim holder": holder}

        _run_and_check(topo, emulator, conn_id, seeded, run_id, "api-server kill")
        TIMINGS["api-server kill: run (s)"] = round(time.monotonic() - started, 1)
        _assert_one_refresh(topo, emulator, conn_id, seeded, before)
        broken = [r for r in topo.proxy_requests()[log_start:] if r["status"] in {"502", "504"}]
        TIMINGS["api-server kill: requests the proxy answered 502/504"] = len(broken)
        assert "refreshing on this machine" not in _run_logs(topo, run_id)
    finally:
        emulator.clear_faults()
