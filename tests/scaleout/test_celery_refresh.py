"""One refresh per expired grant across Celery workers that share nothing (issue 11, first proof).

The topology (``topology.py``): PostgreSQL, Redis, 2 api-servers behind nginx, scheduler,
dag-processor, triggerer, 3 Celery workers each in its own mount and UTS namespace (private
``/tmp``). 4 connections, one client organisation each, every access token already expired;
16 mapped tasks per connection all want a token at once. The emulator rotates refresh tokens and
revokes a grant whose rotated refresh token is presented again.

The negative control runs the same DAG with ``refresh_coordinator = local`` inside the tasks (the
per-machine ``flock`` in ``/tmp``): across these workers it does not serialize, and the emulator
sees a refresh token presented twice. That is what proves the topology really separates the
workers, and that the api-server coordinator is what carries the guarantee.
"""

from __future__ import annotations

import time

import pytest

from tests.scaleout.common import (
    CONNECTIONS,
    DAG_ID,
    EXTRACT_DAG_ID,
    TASK_ID,
    TASKS_PER_CONNECTION,
    TIMINGS,
    store_expired_grants,
    stored_grants,
)
from tests.scaleout.topology import topology_config
from tests.waiting import wait_until

# pytest-timeout's 300 s counts the session fixture's start (80 to 210 s on a loaded 2-core
# machine) against the first test; every wait inside has its own deadline.
pytestmark = pytest.mark.timeout(1800)


def test_64_tasks_on_3_workers_one_refresh_per_grant(topology, emulator):
    topo = topology
    seeded = store_expired_grants(topo, emulator)
    before = emulator.stats.snapshot()
    started = time.monotonic()
    run_id = topo.trigger(DAG_ID)
    state = topo.wait_for_run(DAG_ID, run_id, timeout=900)
    TIMINGS["64 tasks, 4 expired grants: run (s)"] = round(time.monotonic() - started, 1)
    tis = [ti for ti in topo.task_instances(DAG_ID, run_id) if ti["task_id"] == TASK_ID]
    failed = {f"{ti['map_index']}": (ti["state"], ti.get("hostname")) for ti in tis if ti["state"] != "success"}
    assert state == "success", (failed, topology_config(topo), topo.log_tail(names=["scheduler", *topo.worker_names]))
    assert len(tis) == len(CONNECTIONS) * TASKS_PER_CONNECTION and not failed

    # Exactly one refresh per grant: 4 refreshes in all, and every grant moved one generation on.
    after = emulator.stats.snapshot()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["refresh_grants"] == len(CONNECTIONS), delta
    assert delta["grants_revoked"] == 0 and delta["invalid_grant_errors"] == 0, delta
    stored = stored_grants(topo)
    for conn_id in CONNECTIONS:
        assert stored[conn_id]["generation"] == seeded[conn_id]["generation"] + 1, (conn_id, stored[conn_id])
        assert stored[conn_id]["unknown_refresh_outcomes"] == 0
        assert stored[conn_id]["refresh_token"] != seeded[conn_id]["refresh_token"]
        assert emulator.grant_is_active(stored[conn_id]["refresh_token"]), conn_id  # not revoked

    # The tasks really ran on several "hosts", each with a /tmp of its own.
    hostnames = {ti.get("hostname") for ti in tis}
    assert hostnames <= set(topo.worker_names), hostnames
    assert len(hostnames) >= 2, hostnames
    results = [topo.xcom(DAG_ID, run_id, TASK_ID, map_index=ti["map_index"]) for ti in tis]
    by_host: dict[str, int] = {}
    for ti, result in zip(tis, results):
        assert result["hostname"] == ti["hostname"], (ti, result)
        assert result["generation"] == seeded[result["conn_id"]]["generation"] + 1, result
        by_host[result["hostname"]] = by_host.get(result["hostname"], 0) + 1
        # every marker this task saw in /tmp was left by a task on its own worker
        assert set(result["tmp_markers"].values()) == {result["hostname"]}, result
    TIMINGS["tasks per worker"] = dict(sorted(by_host.items()))

    # Serialized by the api-server coordinator through the proxy, which spread the load.
    logs = topo.all_logs()
    assert "refreshing on this machine" not in logs
    assert topo.upstreams_used("/papertrail/token"), "no coordinator request went through the proxy"
    execution = topo.upstreams_used("/execution/")
    assert len(execution) == topo.api_server_count, execution
    TIMINGS["coordinator requests per replica"] = topo.upstreams_used("/papertrail/token")
    leaked = [s[:6] for s in emulator.issued_secrets if s in logs]
    assert not leaked, leaked


def test_the_example_extract_dag_needs_a_shared_base_path(topology, emulator):
    """Finding: ``papertrail_extract`` with a local ``base_path`` (its default is
    ``/tmp/papertrail_extract``) cannot complete on workers that share no filesystem: each
    extract task writes its file on its own worker, and ``write_manifest`` (on one worker) finds
    the others missing. It fails loudly and writes no manifest, so no reader takes an incomplete
    folder for a snapshot; the fix is a shared ``base_path`` (object storage, a shared mount)."""
    topo = topology
    store_expired_grants(topo, emulator)
    conn_id = CONNECTIONS[0]
    run_id = topo.trigger(EXTRACT_DAG_ID, conf={"conn_id": conn_id, "base_path": "/tmp/papertrail_extract"})

    run_state = topo.wait_for_run(EXTRACT_DAG_ID, run_id, timeout=600)
    tis = {ti["task_id"]: ti for ti in topo.task_instances(EXTRACT_DAG_ID, run_id)}
    state = tis["write_manifest"]["state"]
    extracts = {tid: ti for tid, ti in tis.items() if "__" in tid}
    assert len(extracts) == 12 and all(ti["state"] == "success" for ti in extracts.values()), {
        tid: ti["state"] for tid, ti in tis.items()
    }
    writers = {ti["hostname"] for ti in extracts.values()}
    manifest_host = tis["write_manifest"]["hostname"]
    TIMINGS["extract DAG: extract tasks per worker"] = {
        h: sum(ti["hostname"] == h for ti in extracts.values()) for h in sorted(writers)
    }
    if writers == {manifest_host}:
        pytest.skip(f"every extract task and write_manifest ran on {manifest_host}: nothing to show this time")
    assert run_state == "failed" and state == "failed", (run_state, tis["write_manifest"])
    logs = "\n".join(
        p.read_text(errors="replace") for p in topo.worker_log_files(manifest_host) if "write_manifest" in str(p)
    )
    assert "no manifest written" in logs and "is missing" in logs, logs[-3000:]


def test_the_per_machine_fallback_does_not_serialize_across_workers(topology, emulator):
    """Negative control: with the per-machine ``flock`` in ``/tmp`` instead of the coordinator,
    workers on different hosts present the same refresh token: the topology shows it."""
    topo = topology
    store_expired_grants(topo, emulator)
    before = emulator.stats.snapshot()
    coordinator_before = sum(topo.upstreams_used("/papertrail/token").values())
    # A slow token endpoint keeps the first refresh of each grant in flight while tasks of the same
    # connection start on the other workers (the race a shared /tmp lock would have hidden).
    emulator.inject("token", delay=3.0, times=len(CONNECTIONS) * topo.worker_count)
    started = time.monotonic()
    try:
        run_id = topo.trigger(DAG_ID, conf={"coordinator": "local"})

        def reuse_seen_or_finished() -> bool:
            revoked = emulator.stats["grants_revoked"] > before.get("grants_revoked", 0)
            return revoked or topo.dag_run(DAG_ID, run_id)["state"] in {"success", "failed"}

        wait_until(reuse_seen_or_finished, 900, interval=0.5, message="no reuse and the run never finished")
        # Once a grant is revoked the rest of the run proves nothing more: end it (CI budget), and
        # wait until none of its tasks is left running: a local-mode task still refreshing would
        # send token requests into the tests after this one.
        if topo.dag_run(DAG_ID, run_id)["state"] not in {"success", "failed"}:
            topo.request("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})
        topo.wait_for_run(DAG_ID, run_id, timeout=300)
        wait_until(
            lambda: (
                not topo.task_processes()
                and not [
                    ti
                    for ti in topo.task_instances(DAG_ID, run_id)
                    if ti["state"] in {"running", "queued", "scheduled", "up_for_retry", "restarting"}
                ]
            ),
            300,
            interval=0.5,
            message=lambda: f"tasks of the ended negative-control run kept running: {topo.task_processes()}",
        )
        TIMINGS["negative control run (s)"] = round(time.monotonic() - started, 1)
    finally:
        emulator.clear_faults()
    after = emulator.stats.snapshot()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    hostnames = {ti["hostname"] for ti in topo.task_instances(DAG_ID, run_id) if ti.get("hostname")}
    assert len(hostnames) >= 2, hostnames
    # A refresh token presented twice: either the reuse revoked the grant, or (no rotation seen
    # yet) more refreshes than grants. With one shared lock neither could happen.
    assert delta["grants_revoked"] >= 1 or delta["refresh_grants"] > len(CONNECTIONS), delta
    TIMINGS["negative control: emulator"] = {
        k: delta[k] for k in ("refresh_grants", "grants_revoked", "invalid_grant_errors")
    }
    # and the api-server coordinator had no part in it
    assert sum(topo.upstreams_used("/papertrail/token").values()) == coordinator_before
