"""The papertrail_extract_many example DAG in one real ``dag.test()`` run (metadata DB, encrypted
grants in Variables, the emulator): three client organisations, one of them with its grant
revoked at the emulator. The two others get every file and a manifest in their own folders; the
dead one's tasks fail with the re-authorization error, without retries and without touching the
others; exactly one token call per organisation.

One run only (a ``dag.test()`` of 43 task instances is most of this module's time); the
``conn_ids`` checks are tests/unit/test_extraction.py's."""

from __future__ import annotations

import json
import time

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail.extraction import CONN_IDS_VARIABLE, EXTRACTS, extract_name
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore
from tests.conftest import remember_secrets
from tests.integration.conftest import REPO
from tests.integration.test_data_operators import SCHEDULED, _check_complete_run, _no_secret, _run_example
from tests.integration.test_grant_health_dag import _connect_all

pytestmark = pytest.mark.integration

MANY_DAG = str(REPO / "dags" / "papertrail_extract_many.py")
DAG_ID = "papertrail_extract_many"
NORTH, DEAD, SOUTH = "pt_many_north_it", "pt_many_dead_it", "pt_many_south_it"
#: The dead organisation in the middle: the map indexes on both sides of it must be untouched.
CONN_IDS = [NORTH, DEAD, SOUTH]
RUN_FOLDER = ("2024-03-01", "nightly__2024-03-01T00_00_00_00_00")
PER_ORGANISATION = {"organisation.clear_manifest", "organisation.write_manifest"} | {
    f"organisation.{extract_name(m, q)}" for m, q in EXTRACTS
}


def _task_instances(run_id: str) -> dict[tuple[str, int], tuple[str, int]]:
    """(task_id, map_index) -> (state, try_number) of one run, from the metadata DB."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskInstance).filter(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id)
        return {(ti.task_id, ti.map_index): (str(ti.state), ti.try_number) for ti in rows}


def _xcom_values(run_id: str) -> dict[tuple[str, int, str], object]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == DAG_ID, XComModel.run_id == run_id)
        return {(x.task_id, x.map_index, x.key): x.value for x in rows}


def test_one_dead_grant_fails_only_its_own_organisation(airflow_db, emulator, monkeypatch, tmp_path):
    from airflow_papertrail.snapshots import MANIFEST_NAME, latest_complete_snapshot, organisation_base_path

    key = Fernet.generate_key().decode()
    remember_secrets(key)
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", key)
    env = _connect_all(emulator, key, CONN_IDS, idle_days={})
    backend = OrmVariables()
    dead = VariableTokenStore(DEAD, cipher=TokenCipher([key]), backend=backend).load()
    assert dead is not None and dead.token.refresh_token
    assert emulator.revoke_grant(dead.token.refresh_token)  # the organisation withdrew its consent
    # Every stored access token still looks valid here but the service has expired them all: each
    # organisation's first call gets a 401 and refreshes once (the dead one is refused once).
    assert emulator.expire_access_tokens() == len(CONN_IDS)
    before = emulator.stats.snapshot()
    base = tmp_path / "books"
    # No conn_ids in the run's conf: the Variable is the list, as for the scheduled runs.
    backend.set(CONN_IDS_VARIABLE, json.dumps(CONN_IDS))
    started = time.monotonic()
    try:
        proc = _run_example(
            env, {"base_path": str(base), "query_params": {"count": 3}}, succeed=False, dag_file=MANY_DAG
        )
    finally:
        backend.delete(CONN_IDS_VARIABLE)
    print(f"dag.test() of {DAG_ID}: {time.monotonic() - started:.1f} s")
    out = proc.stdout + proc.stderr
    after = emulator.stats.snapshot()

    # Files: every file and a manifest in each live organisation's own folder, nothing for the dead one.
    assert {NORTH, SOUTH} <= {p.name for p in base.iterdir()} <= set(CONN_IDS)
    for conn_id in (NORTH, SOUTH):
        org_base = organisation_base_path(base, conn_id)
        folder = base / conn_id / RUN_FOLDER[0] / RUN_FOLDER[1]
        manifest = _check_complete_run(folder, EXTRACTS, 3, dag_id=DAG_ID)
        assert (manifest["conn_id"], manifest["run_id"]) == (conn_id, SCHEDULED)
        assert manifest["query_params"] == {"count": 3}
        assert str(latest_complete_snapshot(org_base)) == str(folder)
    dead_folder = base / DEAD / RUN_FOLDER[0] / RUN_FOLDER[1]
    assert not (dead_folder / MANIFEST_NAME).exists()
    assert not dead_folder.exists() or not list(dead_folder.iterdir())  # the refusal came before any file
    assert latest_complete_snapshot(organisation_base_path(base, DEAD)) is None

    # Task instances: map index i is CONN_IDS[i]; the dead organisation's extracts failed on their
    # first try (the re-authorization error is not retried), its manifest never ran; the others succeeded.
    tis = _task_instances(SCHEDULED)
    assert tis.pop(("organisations", -1)) == ("success", 1)
    assert {task_id for task_id, _ in tis} == PER_ORGANISATION
    assert {index for _, index in tis} == {0, 1, 2}
    for (task_id, index), (state, tries) in sorted(tis.items()):
        if CONN_IDS[index] != DEAD or task_id == "organisation.clear_manifest":
            assert (state, tries) == ("success", 1), (task_id, CONN_IDS[index], state)
        elif task_id == "organisation.write_manifest":
            assert state == "upstream_failed", (task_id, state)
        else:
            assert (state, tries) == ("failed", 1), (task_id, state, tries)
    xcoms = _xcom_values(SCHEDULED)
    assert xcoms[("organisations", -1, "return_value")] == CONN_IDS

    # The logs: the provider's re-authorization error, for the dead connection only.
    assert "ReauthorizationFailure" in out
    assert f"The Papertrail-ai grant of connection {DEAD!r} can no longer be used" in out
    for conn_id in (NORTH, SOUTH):
        assert f"grant of connection {conn_id!r} can no longer be used" not in out

    # Token calls: exactly one per organisation, two refreshes and the dead grant's one refusal
    # (its 11 other extracts saw the recorded refusal and asked nothing).
    calls = {k: after[k] - before[k] for k in ("token_requests", "refresh_grants", "invalid_grant_errors")}
    assert calls == {"token_requests": 3, "refresh_grants": 2, "invalid_grant_errors": 1}, calls
    assert after["api_requests"] - before["api_requests"] == 2 * (len(EXTRACTS) + 1) + len(EXTRACTS)

    # No token anywhere: the output, the files, the XComs.
    files = [p.read_text() for p in base.rglob("*") if p.is_file()]
    _no_secret(emulator, proc.stdout, proc.stderr, json.dumps(list(xcoms.values()), default=str), *files)


def test_example_dag_maps_one_task_group_per_organisation():
    import importlib.util

    spec = importlib.util.spec_from_file_location("papertrail_extract_many_example", MANY_DAG)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.papertrail_extract_many()
    assert dag.dag_id == DAG_ID and dag.catchup is False and dag.max_active_runs == 1
    assert dag.max_active_tasks == 16
    assert {t.task_id for t in dag.tasks} == PER_ORGANISATION | {"organisations"}
    assert dag.params["conn_ids"] is None  # the Variable is read by the task, never while parsing
    group = dag.task_group_dict["organisation"]
    assert type(group).__name__ == "MappedTaskGroup"
    extracts = {f"organisation.{extract_name(m, q)}" for m, q in EXTRACTS}
    for task_id in extracts:
        task = dag.get_task(task_id)
        assert task.upstream_task_ids == {"organisation.clear_manifest", "organisations"}
        assert task.retries == 2 and task.pool == "default_pool"
    assert dag.get_task("organisation.write_manifest").upstream_task_ids == extracts | {
        "organisation.clear_manifest",
        "organisations",
    }
    # the scheduler prefers an organisation's later tasks (its extracts, its manifest) over other
    # organisations' first ones: manifests appear while the run goes on, not all at its end
    assert {t.weight_rule for t in dag.tasks} == {"upstream"}
