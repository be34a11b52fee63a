"""Real Airflow for integration tests: a migrated metadata DB (SQLite) in the session's
AIRFLOW_HOME, and helpers to run Airflow commands and DAGs in subprocesses."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import append_captured
from tests.waiting import wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

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


@contextlib.contextmanager
def start_api_server(env: dict[str, str], port: int, log_path: Path, *, workers: int = 1) -> Iterator[str]:
    """A real ``airflow api-server`` on 127.0.0.1:``port``; yields its base URL once healthy.

    Fails with the end of its log if it exits or is not healthy within 180 s; stops it and
    hands its log to the log canary afterwards.
    """
    import requests

    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"api-server exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        return requests.get(f"{base}/api/v2/monitor/health", timeout=2).status_code == 200

    try:
        wait_until(
            healthy,
            timeout=180,
            interval=0.5,
            ignore=(requests.RequestException,),
            message=lambda: f"api-server not healthy:\n{log_path.read_text()[-4000:]}",
        )
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        append_captured(log_path.read_text())
