"""Real Airflow for integration tests: a migrated metadata DB (SQLite) in the session's
AIRFLOW_HOME, and helpers to run Airflow commands and DAGs in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import append_captured

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def airflow_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run(
    cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command, keep its output for the log canary, fail with its output on error."""
    proc = subprocess.run(cmd, env=env or airflow_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    append_captured(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """`airflow db migrate` once per session; returns AIRFLOW_HOME."""
    home = Path(os.environ["AIRFLOW_HOME"])
    run([str(BIN / "airflow"), "db", "migrate"], timeout=600)
    assert (home / "airflow.db").exists()
    return home
