"""The example DAGs ship inside the package (issue 12) and stay identical to the repository's dags/."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_papertrail.example_dags import EXAMPLE_DAGS, example_dag_paths
from airflow_papertrail.example_dags.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def test_package_copies_equal_the_repository_dags():
    in_repo = sorted(p.name for p in (REPO / "dags").glob("*.py"))
    assert in_repo == sorted(EXAMPLE_DAGS), "dags/ and airflow_papertrail/example_dags/ list different DAGs"
    for shipped in example_dag_paths():
        assert shipped.read_bytes() == (REPO / "dags" / shipped.name).read_bytes(), (
            f"{shipped.name} differs: copy dags/{shipped.name} over airflow_papertrail/example_dags/{shipped.name}"
        )


def test_copy_command(tmp_path, capsys):
    dest = tmp_path / "dags"
    assert main([str(dest)]) == 0  # creates the folder
    assert sorted(p.name for p in dest.iterdir()) == sorted(EXAMPLE_DAGS)
    assert str(dest / "papertrail_authorize.py") in capsys.readouterr().out


def test_copy_command_never_overwrites_without_force(tmp_path, capsys):
    mine = tmp_path / "papertrail_query.py"
    mine.write_text("# my edited copy\n")
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "papertrail_query.py already in" in err and "--force" in err
    assert mine.read_text() == "# my edited copy\n"  # nothing lost
    assert not (tmp_path / "papertrail_authorize.py").exists()  # nothing half-copied either
    assert main([str(tmp_path), "--force"]) == 0
    assert mine.read_bytes() == (REPO / "dags" / "papertrail_query.py").read_bytes()


def test_copy_command_refuses_a_file_as_destination(tmp_path):
    target = tmp_path / "not-a-folder"
    target.write_text("x")
    with pytest.raises(SystemExit):
        main([str(target)])
