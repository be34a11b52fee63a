"""The data operators in real Airflow runs (``dag.test()``, metadata DB, encrypted grant in a
Variable) against the emulator: the example extract DAG and the query operator."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, remember_secrets
from tests.integration.conftest import REPO, airflow_env, run

pytestmark = pytest.mark.integration

RUNNER = str(REPO / "tests" / "integration" / "dags" / "run_dag.py")
EXTRACT_DAG = str(REPO / "dags" / "papertrail_extract.py")
DATA_DAG = str(REPO / "tests" / "integration" / "dags" / "papertrail_data_it.py")
REPORTS = {"trial_balance", "income_statement", "balance_sheet", "cash_flow"}


def _connect(emulator, monkeypatch, conn_id: str) -> dict[str, str]:
    """Store a real grant for ``conn_id`` (encrypted Variable) and return the subprocess env."""
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", key)
    remember_secrets(key)
    config = OAuthClientConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        scope="accounting.read accounting.write",
        system="xero",
        base_url=emulator.base_url,
    )
    code = emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, scope=config.scope, system="xero")
    token = OAuthClient(config).exchange_code(code)
    remember_secrets(code, token.access_token, token.refresh_token)
    VariableTokenStore(conn_id, cipher=TokenCipher([key]), backend=OrmVariables()).save(token)
    conn = {
        "conn_type": "papertrail",
        "login": CLIENT_ID,
        "password": CLIENT_SECRET,
        "host": emulator.base_url,
        "extra": {"redirect_uri": REDIRECT_URI, "system": "xero", "scope": config.scope},
    }
    return airflow_env(
        **{f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(conn), "AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": key}
    )


def _example_dag_module():
    spec = importlib.util.spec_from_file_location("papertrail_extract_example", EXTRACT_DAG)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_secret(emulator, *texts: str) -> None:
    secrets = emulator.issued_secrets | {CLIENT_SECRET}
    for text in texts:
        leaked = [s for s in secrets if s in text]
        assert not leaked, "a token, code or secret reached the output"


#: Runs the example DAG under dag.test() with a chosen logical date and run id (a scheduled
#: run's id, a manual one), which run_dag.py cannot: dag.test() names every run manual__<date>.
_RUN_EXAMPLE = r"""
import importlib.util, json, os, sys
from unittest import mock

import pendulum

path, conf, logical_date, run_id, factory = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.dirname(os.path.abspath(path))
spec = importlib.util.spec_from_file_location("dag_under_test", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from airflow.models.dagrun import DagRun

with mock.patch.object(DagRun, "generate_run_id", return_value=run_id):
    run = getattr(module, factory)().test(run_conf=conf, logical_date=pendulum.parse(logical_date))
print(f"DAGRUN_STATE={run.state}")
sys.exit(0 if str(run.state).endswith("success") else 1)
"""
MARCH = "2024-03-01T00:00:00+00:00"
# dag.test() creates manual runs, which may not take the reserved scheduled__ prefix: a run id
# as a scheduled run or an external trigger has one (a timestamp with ":" and "+").
SCHEDULED = f"nightly__{MARCH}"
MANUAL = "manual__2024-06-10T09:15:02.123456+00:00"


def _run_example(env, conf, *, run_id=SCHEDULED, logical_date=MARCH, succeed=True, dag_file=EXTRACT_DAG):
    factory = Path(dag_file).stem  # each example DAG file's DAG function is named after the file
    proc = run(
        [sys.executable, "-c", _RUN_EXAMPLE, dag_file, json.dumps(conf), logical_date, run_id, factory],
        env=env,
        timeout=600,
        check=succeed,
    )
    assert ("DAGRUN_STATE=success" in proc.stdout) is succeed, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _check_complete_run(folder: Path, extracts, count: int, *, dag_id: str = "papertrail_extract") -> dict:
    """Every extract file, nothing else but the manifest, and a manifest that vouches for them."""
    from airflow_papertrail.snapshots import MANIFEST_NAME, is_complete, read_manifest

    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted([MANIFEST_NAME] + [f"{m}__{q}.jsonl" for m, q in extracts])  # no temporary leftovers
    manifest = read_manifest(folder)
    assert manifest is not None and is_complete(folder, manifest)
    assert [(f["module"], f["query"]) for f in manifest["files"]] == sorted(
        extracts, key=lambda mq: f"{mq[0]}__{mq[1]}"
    )
    for entry in manifest["files"]:
        path = folder / entry["name"]
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert entry["records"] == len(records) and entry["bytes"] == path.stat().st_size
        assert entry["path"] == str(path) and entry["written_at"]
        if entry["query"] in REPORTS:
            assert len(records) == 1 and records[0]["currency"] == "GBP"
        else:
            assert len(records) == count and len({r["id"] for r in records}) == count
    assert manifest["manifest_written_at"] >= max(f["written_at"] for f in manifest["files"])  # written last
    assert manifest["dag_id"] == dag_id and manifest["provider_version"]
    return manifest


def test_extract_dag_writes_every_file(airflow_db, emulator, monkeypatch, tmp_path):
    from airflow_papertrail.snapshots import latest_complete_snapshot

    extracts = _example_dag_module().EXTRACTS  # the DAG's own list: one file per entry
    env = _connect(emulator, monkeypatch, "pt_extract_it")
    base = tmp_path / "books"
    conf = {"conn_id": "pt_extract_it", "base_path": str(base), "query_params": {"count": 40}}
    proc = _run_example(env, conf)

    (day,) = base.iterdir()  # {base_path}/{date}/{run id}/
    assert day.name == "2024-03-01"
    (folder,) = day.iterdir()
    assert folder.name == "nightly__2024-03-01T00_00_00_00_00"  # ":" and "+" replaced
    manifest = _check_complete_run(folder, extracts, 40)
    assert (manifest["run_id"], manifest["logical_date"], manifest["conn_id"]) == (SCHEDULED, MARCH, "pt_extract_it")
    assert manifest["query_params"] == {"count": 40}
    assert manifest["data_interval"]["end"] and manifest["data_interval"]["start"]
    assert latest_complete_snapshot(base) == folder
    assert emulator.stats["api_requests"] == len(extracts)
    assert emulator.stats["records_streamed"] == 40 * sum(q not in REPORTS for _, q in extracts)
    texts = [proc.stdout, proc.stderr] + [p.read_text() for p in folder.iterdir()]
    _no_secret(emulator, *texts)


def test_two_runs_of_one_logical_date_land_in_two_folders(airflow_db, emulator, monkeypatch, tmp_path):
    """A manual run and the scheduled run of the same date (or a backfill months later) never share files."""
    from airflow_papertrail.snapshots import latest_complete_snapshot, read_manifest

    extracts = _example_dag_module().EXTRACTS
    env = _connect(emulator, monkeypatch, "pt_extract_twice")
    base = tmp_path / "books"
    conf = {"conn_id": "pt_extract_twice", "base_path": str(base), "query_params": {"count": 5}}
    _run_example(env, conf, run_id=SCHEDULED)
    first = read_manifest(base / "2024-03-01" / "nightly__2024-03-01T00_00_00_00_00")
    _run_example(env, {**conf, "query_params": {"count": 7}}, run_id=MANUAL)

    folders = sorted(p.name for p in (base / "2024-03-01").iterdir())
    assert folders == ["manual__2024-06-10T09_15_02.123456_00_00", "nightly__2024-03-01T00_00_00_00_00"]
    scheduled = _check_complete_run(base / "2024-03-01" / folders[1], extracts, 5)
    manual = _check_complete_run(base / "2024-03-01" / folders[0], extracts, 7)
    assert scheduled == first  # the second run did not touch the first one's files or manifest
    assert (scheduled["run_id"], manual["run_id"]) == (SCHEDULED, MANUAL)
    assert latest_complete_snapshot(base) == base / "2024-03-01" / folders[0]  # the manifest written last


def test_a_run_with_a_failed_extract_leaves_no_manifest(airflow_db, emulator, monkeypatch, tmp_path):
    from airflow_papertrail.snapshots import MANIFEST_NAME, latest_complete_snapshot

    extracts = _example_dag_module().EXTRACTS
    env = _connect(emulator, monkeypatch, "pt_extract_fail")
    base = tmp_path / "books"
    conf = {"conn_id": "pt_extract_fail", "base_path": str(base), "query_params": {"count": 3}}
    _run_example(env, conf, run_id=SCHEDULED)
    complete = base / "2024-03-01" / "nightly__2024-03-01T00_00_00_00_00"

    # The next day's run: one extract is refused twice (401, refreshed, 401 again), which
    # fails that task without retry; the other extracts succeed.
    emulator.inject("api", status=401, times=2)
    _run_example(
        env,
        conf,
        run_id="nightly__2024-03-02T00:00:00+00:00",
        logical_date="2024-03-02T00:00:00+00:00",
        succeed=False,
    )
    failed = base / "2024-03-02" / "nightly__2024-03-02T00_00_00_00_00"
    names = {p.name for p in failed.iterdir()}
    assert MANIFEST_NAME not in names
    assert len(names) == len(extracts) - 1 and not [n for n in names if n.endswith(".part")]
    assert latest_complete_snapshot(base) == complete
    assert latest_complete_snapshot(base, date="2024-03-02") is None


def test_the_data_interval_templated_into_query_params_arrives_as_text(airflow_db, emulator, monkeypatch, tmp_path):
    """Dates from the data interval, and numbers exactly as written ("1150.00", not 1150.0)."""
    from airflow_papertrail.snapshots import read_manifest

    env = _connect(emulator, monkeypatch, "pt_extract_interval")
    base = tmp_path / "books"
    query_params = {
        "from_date": "{{ data_interval_start | ds }}",
        "to_date": "{{ data_interval_end | ds }}",
        "min_amount": "1150.00",
        "count": "2",
    }
    conf = {"conn_id": "pt_extract_interval", "base_path": str(base), "query_params": query_params}
    _run_example(env, conf)
    manifest = read_manifest(base / "2024-03-01" / "nightly__2024-03-01T00_00_00_00_00")
    interval = manifest["data_interval"]
    expected = {
        "from_date": interval["start"][:10],
        "to_date": interval["end"][:10],
        "min_amount": "1150.00",
        "count": "2",
    }
    # dag.test() infers a manual run's interval (for @daily at midnight: [logical date, logical date])
    assert interval["start"].startswith("2024-0") and expected["from_date"] <= expected["to_date"] == "2024-03-01"
    assert manifest["query_params"] == expected
    sent = emulator.api_params
    assert len(sent) == len(_example_dag_module().EXTRACTS)
    for params in sent:
        assert {name: params.get(name) for name in expected} == expected


def test_query_operator_read_write_and_one_refresh_after_401(airflow_db, emulator, monkeypatch):
    env = _connect(emulator, monkeypatch, "pt_query_it")
    # The stored token looks valid for an hour but the service has expired it: the first
    # call gets a 401, the hook refreshes once, every later call uses the refreshed grant.
    emulator.expire_access_tokens()
    conf = {"conn_id": "pt_query_it", "customer": "Widgets & Co"}
    proc = run([sys.executable, RUNNER, DATA_DAG, "papertrail_data_it", json.dumps(conf)], env=env, timeout=600)
    assert "DAGRUN_STATE=success" in proc.stdout
    assert "COMPANY=Emulated Trading Ltd (xero)" in proc.stdout
    (write,) = emulator.writes
    assert write["payload"] == {"name": "Widgets & Co", "currency": "GBP"}
    assert f"CREATED={write['id']}" in proc.stdout
    assert write["idempotency_key"]
    assert emulator.stats["refresh_grants"] == 1
    assert emulator.stats["invalid_token_errors"] == 1
    _no_secret(emulator, proc.stdout, proc.stderr)


def test_example_dag_parses_with_one_task_per_query():
    example = _example_dag_module()
    dag = example.papertrail_extract()
    assert dag.dag_id == "papertrail_extract" and dag.catchup is False
    extracts = {f"{m}__{q}" for m, q in example.EXTRACTS}
    assert {t.task_id for t in dag.tasks} == extracts | {"clear_manifest", "write_manifest"}
    for task_id in extracts:  # all in parallel, after the stale manifest is gone
        assert dag.get_task(task_id).upstream_task_ids == {"clear_manifest"}
    # the run folder from clear_manifest's XCom, then every file
    assert dag.get_task("write_manifest").upstream_task_ids == extracts | {"clear_manifest"}
    assert not dag.render_template_as_native_obj  # query_params travel as JSON text
    assert "snapshot_tasks(" in Path(EXTRACT_DAG).read_text()  # the tasks papertrail_extract_many maps too
