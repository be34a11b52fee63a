"""A real `airflow api-server` on loopback shows our connection form; `airflow providers list` lists us."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
import requests

from airflow_papertrail.hooks.papertrail import EXTRA_FIELDS
from tests.conftest import append_captured
from tests.integration.conftest import BIN, airflow_env, run

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_server(airflow_db, session_dir):
    port = _free_port()
    env = airflow_env(AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True", AIRFLOW__API__PORT=str(port))
    log_path = session_dir / f"api-server-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"api-server exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"api-server not healthy within 180 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)  # poll interval of a condition wait with a deadline
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        append_captured(log_path.read_text())


def test_hook_meta_lists_papertrail_fields(api_server):
    response = requests.get(f"{api_server}/ui/connections/hook_meta", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")  # not the UI page
    metas = {m["connection_type"]: m for m in response.json()}
    meta = metas["papertrail"]
    assert meta["hook_name"] == "Papertrail-ai"
    behaviour = meta["standard_fields"]
    assert behaviour["login"]["title"] == "Client ID"
    assert behaviour["password"]["title"] == "Client Secret"
    assert behaviour["host"]["title"] == "Base URL"
    assert behaviour["host"]["placeholder"] == "https://www.papertrail-ai.com"
    assert behaviour["port"]["hidden"] is True and behaviour["url_schema"]["hidden"] is True
    extra = meta["extra_fields"]
    # every extra the hook reads is a real form field, with its label
    assert set(extra) == set(EXTRA_FIELDS)
    assert extra["redirect_uri"]["schema"]["title"] == "Redirect URI"
    assert extra["client_auth_method"]["schema"]["enum"] == ["client_secret_post", "client_secret_basic"]
    assert extra["client_auth_method"]["value"] == "client_secret_post"
    assert extra["use_pkce"]["value"] is True


def test_providers_list_shows_the_provider(airflow_db):
    proc = run([str(BIN / "airflow"), "providers", "list", "-o", "json"], timeout=120)
    assert "airflow-provider-papertrail" in proc.stdout
