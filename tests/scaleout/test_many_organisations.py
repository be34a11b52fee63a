"""The shipped ``papertrail_extract_many`` DAG on the scale-out topology (issue 11).

Two client organisations, one connection each, both access tokens expired; the second
organisation has withdrawn its consent (its grant is revoked at the emulator). ``base_path`` is a
directory every worker sees at the same path (``ScaleoutTopology.shared_dir``, as a shared mount
would be): the fix for the finding of ``test_the_example_extract_dag_needs_a_shared_base_path``.

The live organisation gets every file and its manifest, written by tasks spread over the workers;
the dead one fails only its own tasks, with the re-authorization error, on the first try, and
gets no manifest.
"""

from __future__ import annotations

import json

import pytest

from tests.scaleout.common import CONNECTIONS, EXTRACT_MANY_DAG_ID, TIMINGS, store_expired_grants, stored_grants

pytestmark = pytest.mark.timeout(1800)
EXTRACTS_PER_ORGANISATION = 12


def test_one_dead_grant_fails_only_its_own_organisation_across_workers(topology, emulator):
    topo = topology
    live, dead = CONNECTIONS[2], CONNECTIONS[3]
    seeded = store_expired_grants(topo, emulator, [live, dead])
    assert emulator.revoke_grant(seeded[dead]["refresh_token"])  # the organisation withdrew its consent
    base = topo.shared_dir / "extract-many"
    before = emulator.stats.snapshot()
    run_id = topo.trigger(EXTRACT_MANY_DAG_ID, conf={"conn_ids": [live, dead], "base_path": str(base)})
    state = topo.wait_for_run(EXTRACT_MANY_DAG_ID, run_id, timeout=900)
    tis = topo.task_instances(EXTRACT_MANY_DAG_ID, run_id)
    by_org: dict[int, dict[str, dict]] = {}
    for ti in tis:
        if ti["map_index"] >= 0:
            by_org.setdefault(ti["map_index"], {})[ti["task_id"].rsplit(".", 1)[-1]] = ti
    summary = {i: {t: ti["state"] for t, ti in tasks.items()} for i, tasks in by_org.items()}
    assert state == "failed", summary  # an organisation failed: the run says so
    live_tasks, dead_tasks = by_org[0], by_org[1]  # mapped in the order of conn_ids

    # The live organisation: every task succeeded, on several workers, and its snapshot is complete.
    assert all(ti["state"] == "success" for ti in live_tasks.values()), summary
    extracts = {t: ti for t, ti in live_tasks.items() if "__" in t}
    assert len(extracts) == EXTRACTS_PER_ORGANISATION, sorted(live_tasks)
    writers = {ti["hostname"] for ti in extracts.values()}
    TIMINGS["extract_many: live organisation's extracts per worker"] = {
        h: sum(ti["hostname"] == h for ti in extracts.values()) for h in sorted(writers)
    }
    assert len(writers) >= 2, writers  # so the manifest really needed the shared base_path
    manifests = list((base / live).rglob("_MANIFEST.json"))
    assert len(manifests) == 1, manifests
    manifest = json.loads(manifests[0].read_text())
    assert manifest["conn_id"] == live
    assert len(manifest["files"]) == EXTRACTS_PER_ORGANISATION, manifest["files"]
    for entry in manifest["files"]:
        assert (manifests[0].parent / entry["name"]).stat().st_size == int(entry["bytes"]), entry

    # The dead one: its extracts failed on the first try with the re-authorization error, no
    # manifest, nothing of it in the live organisation's folder.
    failed = {t: ti for t, ti in dead_tasks.items() if "__" in t}
    assert len(failed) == EXTRACTS_PER_ORGANISATION and all(ti["state"] == "failed" for ti in failed.values()), summary
    assert all(ti["try_number"] == 1 for ti in failed.values()), summary  # not retried (retries=2)
    assert dead_tasks["write_manifest"]["state"] == "upstream_failed", summary
    assert not list((base / dead).rglob("_MANIFEST.json"))
    logs = "\n".join(
        p.read_text(errors="replace")
        for p in topo.worker_log_files()
        if f"run_id={run_id}" in str(p) and "map_index=1" in str(p) and "__" in str(p)
    )
    assert "ReauthorizationFailure" in logs and "can no longer be used" in logs, logs[-2000:]

    delta = {k: v - before.get(k, 0) for k, v in emulator.stats.snapshot().items()}
    assert delta["refresh_grants"] == 1, delta  # the live grant, once
    assert delta["grants_revoked"] == 0, delta  # nothing revoked by reuse
    assert delta["invalid_grant_errors"] == 1, delta  # the dead grant presented once, then never again
    assert stored_grants(topo)[live]["generation"] == seeded[live]["generation"] + 1
    all_logs = topo.all_logs()
    leaked = [s[:6] for s in emulator.issued_secrets if s in all_logs]
    assert not leaked, leaked
