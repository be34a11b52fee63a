"""The per-machine refresh lock (issue 9 item 6)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from airflow_papertrail.refresh import _machine_lock


@pytest.mark.parametrize("conn_id", ["acme/pt", "../../etc/x", "client org é", "a" * 300])
def test_any_conn_id_gets_a_lock_file_in_the_temp_folder(conn_id):
    before = set(Path(tempfile.gettempdir()).glob("airflow-papertrail-refresh-*.lock"))
    with _machine_lock(conn_id):  # raised FileNotFoundError / OSError for these names
        pass
    made = set(Path(tempfile.gettempdir()).glob("airflow-papertrail-refresh-*.lock")) - before
    for path in made:
        assert path.parent == Path(tempfile.gettempdir()) and len(path.name) < 80
