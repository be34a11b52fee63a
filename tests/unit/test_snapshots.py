"""snapshots: path-safe run folders, manifests written last and atomically, the latest complete snapshot."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import jinja2
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from airflow_papertrail import __version__
from airflow_papertrail.snapshots import (
    MANIFEST_NAME,
    interval_templates,
    is_complete,
    latest_complete_snapshot,
    path_safe,
    read_manifest,
    remove_stale_manifest,
    snapshot_folder,
    write_manifest,
)

MARCH = datetime(2024, 3, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("run_id", "safe"),
    [
        ("scheduled__2024-03-01T00:00:00+00:00", "scheduled__2024-03-01T00_00_00_00_00"),
        ("manual__2024-06-10T09:15:02.123456+00:00", "manual__2024-06-10T09_15_02.123456_00_00"),
        ("backfill/march é", "backfill_march__"),
        ("..", "__"),
        ("", "_"),
        ("plain-id_1.2", "plain-id_1.2"),
    ],
)
def test_path_safe(run_id, safe):
    assert path_safe(run_id) == safe


def test_snapshot_folder():
    assert snapshot_folder("s3://conn@bucket/pt/", MARCH, "scheduled__2024-03-01T00:00:00+00:00") == (
        "s3://conn@bucket/pt/2024-03-01/scheduled__2024-03-01T00_00_00_00_00"
    )
    assert snapshot_folder("/data", "2024-03-01", "r") == "/data/2024-03-01/r"


def _files(folder, contents: dict[str, bytes]) -> list[dict]:
    out = []
    for name, body in contents.items():
        (folder / name).write_bytes(body)
        module, query = name.removesuffix(".jsonl").split("__")
        out.append(
            {
                "path": str(folder / name),
                "records": body.count(b"\n"),
                "bytes": len(body),
                "module": module,
                "query": query,
            }
        )
    return out


def _write(folder, files, run_id="r1"):
    return write_manifest(
        folder,
        files,
        query_params={"min_amount": "1150.00"},
        conn_id="papertrail_default",
        dag_id="papertrail_extract",
        run_id=run_id,
        logical_date=MARCH,
        data_interval=(MARCH, datetime(2024, 3, 2, tzinfo=timezone.utc)),
    )


def test_write_and_read_a_manifest(tmp_path):
    folder = tmp_path / "2024-03-01" / "r1"
    folder.mkdir(parents=True)
    files = _files(folder, {"gl__list_gl_accounts.jsonl": b'{"a":1}\n{"a":2}\n', "reports__cash_flow.jsonl": b"{}\n"})
    written = _write(folder, files)
    assert sorted(p.name for p in folder.iterdir()) == [
        MANIFEST_NAME,
        "gl__list_gl_accounts.jsonl",
        "reports__cash_flow.jsonl",
    ]
    manifest = read_manifest(folder)
    assert manifest == written == json.loads((folder / MANIFEST_NAME).read_text())
    gl = manifest["files"][0]
    assert (gl["name"], gl["module"], gl["query"], gl["records"], gl["bytes"]) == (
        "gl__list_gl_accounts.jsonl",
        "gl",
        "list_gl_accounts",
        2,
        16,
    )
    assert gl["written_at"].endswith("+00:00")
    assert manifest["query_params"] == {"min_amount": "1150.00"}
    assert manifest["data_interval"] == {"start": "2024-03-01T00:00:00+00:00", "end": "2024-03-02T00:00:00+00:00"}
    assert (manifest["logical_date"], manifest["run_id"], manifest["dag_id"], manifest["conn_id"]) == (
        "2024-03-01T00:00:00+00:00",
        "r1",
        "papertrail_extract",
        "papertrail_default",
    )
    assert manifest["provider_version"] == __version__ and manifest["manifest_written_at"]
    assert is_complete(folder)


def test_no_manifest_when_a_file_is_missing_or_short(tmp_path):
    files = _files(tmp_path, {"bank__bank_list.jsonl": b"{}\n"})
    files[0]["bytes"] = 99
    with pytest.raises(ValueError, match="3 bytes, the extraction reported 99"):
        _write(tmp_path, files)
    with pytest.raises(ValueError, match="missing"):
        _write(tmp_path, [{"path": str(tmp_path / "gone.jsonl"), "records": 1, "bytes": 3}])
    assert read_manifest(tmp_path) is None and not (tmp_path / MANIFEST_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bank__bank_list.jsonl"]  # no temporary left either


def test_remove_stale_manifest(tmp_path):
    assert remove_stale_manifest(tmp_path) is False
    _write(tmp_path, _files(tmp_path, {"bank__bank_list.jsonl": b"{}\n"}))
    assert remove_stale_manifest(tmp_path) is True
    assert read_manifest(tmp_path) is None and (tmp_path / "bank__bank_list.jsonl").exists()


def test_latest_complete_snapshot_skips_incomplete_and_damaged_runs(tmp_path):
    assert latest_complete_snapshot(tmp_path / "nothing-yet") is None
    march = tmp_path / "2024-03-01"
    for run in ("manual__a", "scheduled__b", "scheduled__c", "failed__d"):
        (march / run).mkdir(parents=True)
    _write(march / "manual__a", _files(march / "manual__a", {"bank__bank_list.jsonl": b"{}\n"}), "manual__a")
    _write(march / "scheduled__b", _files(march / "scheduled__b", {"bank__bank_list.jsonl": b"{}\n"}), "scheduled__b")
    _write(march / "scheduled__c", _files(march / "scheduled__c", {"bank__bank_list.jsonl": b"{}\n"}), "scheduled__c")
    _files(march / "failed__d", {"bank__bank_list.jsonl": b"{}\n"})  # no manifest: failed half-way
    (march / "scheduled__c" / "bank__bank_list.jsonl").write_bytes(b"{}\n{}\n")  # changed after the manifest
    (tmp_path / "not-a-date").mkdir()
    assert latest_complete_snapshot(tmp_path) == march / "scheduled__b"  # newest complete manifest; a Path for a Path
    assert latest_complete_snapshot(str(tmp_path), date="2024-03-01") == str(march / "scheduled__b")
    assert latest_complete_snapshot(tmp_path, date=datetime(2024, 3, 2)) is None
    assert not is_complete(march / "scheduled__c") and not is_complete(march / "failed__d")

    april = tmp_path / "2024-04-01" / "r"
    april.mkdir(parents=True)
    _write(april, _files(april, {"bank__bank_list.jsonl": b"{}\n"}))
    assert latest_complete_snapshot(tmp_path) == april  # a later day wins
    (april / "bank__bank_list.jsonl").unlink()
    assert latest_complete_snapshot(tmp_path) == march / "scheduled__b"


def test_object_storage_snapshots():
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.io import store as airflow_store

    fs = MemoryFileSystem()
    fs.store.clear()
    airflow_store._STORE_CACHE.pop("memory", None)
    airflow_store.attach("memory", fs=fs)
    try:
        base = "memory://books/pt"
        done = snapshot_folder(base, MARCH, "scheduled__2024-03-01T00:00:00+00:00")
        half = snapshot_folder(base, MARCH, "manual__2024-03-01T10:00:00+00:00")
        for folder in (done, half):
            fs.pipe(ObjectStoragePath(folder + "/bank__bank_list.jsonl").path, b"{}\n{}\n")
        files = [
            {"path": done + "/bank__bank_list.jsonl", "records": 2, "bytes": 6, "module": "bank", "query": "bank_list"}
        ]
        _write(done, files)
        assert fs.exists("/books/pt/2024-03-01/scheduled__2024-03-01T00_00_00_00_00/_MANIFEST.json")
        assert not [k for k in fs.store if k.endswith(".part")]
        assert latest_complete_snapshot(base) == done
        assert read_manifest(done)["files"][0]["bytes"] == 6
        assert latest_complete_snapshot(ObjectStoragePath(base)) == ObjectStoragePath(done)
        assert remove_stale_manifest(done) is True
        assert latest_complete_snapshot(base) is None
    finally:
        airflow_store._STORE_CACHE.pop("memory", None)
        fs.store.clear()


def _render(template: str, **context) -> str:
    env = jinja2.Environment()
    env.filters["interval_templates"] = interval_templates
    return env.from_string(template).render(**context)


def test_interval_templates_render_dates_and_nothing_else():
    context = {
        "params": {"query_params": {"from_date": "{{ data_interval_start | ds }}", "min_amount": "1150.00", "n": 200}},
        "data_interval_start": MARCH,
        "secret": "s3cr3t",
    }
    out = _render("{{ params.query_params | interval_templates | tojson }}", **context)
    assert json.loads(out) == {"from_date": "2024-03-01", "min_amount": "1150.00", "n": 200}
    with pytest.raises(jinja2.UndefinedError):  # only the run's dates are in scope, not the task's context
        _render("{{ {'x': '{{ secret }}'} | interval_templates }}", **context)
    with pytest.raises(jinja2.UndefinedError):
        _render("{{ {'x': '{{ conn.papertrail_default.password }}'} | interval_templates }}", conn={})
