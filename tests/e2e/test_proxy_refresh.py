"""The refresh coordinator behind a real reverse proxy that times out (issue 9 item 2).

Debian's nginx on 127.0.0.1 proxies ``/papertrail/token`` to a real api-server with a 2 s
read timeout, and the emulator's token endpoint takes 5 s. Every worker's coordinator
request gets nginx's HTML 504 while the api-server, under its row lock, is still presenting
the refresh token. A worker that took that 504 for "no coordinator" and refreshed on its
own would present the same refresh token a second time: the emulator (rotating, reuse
detection on) would revoke the whole grant. Here the tasks fail with a retryable error,
succeed on retry, and the emulator sees exactly one refresh.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator
from airflow_papertrail.token_store import VariableTokenStore
from tests.conftest import remember_secrets
from tests.e2e.harness import emulator_grant, free_port
from tests.e2e.test_refresh_concurrency import RestVariables
from tests.integration.postgres import Cluster, find_bindir, missing_drivers, required
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CONN_ID, DAG_ID = (
    "papertrail_lb",
    "papertrail_proxy_e2e",
)  # no "proxy" in the conn_id: Airflow masks such Variable names
CLIENT_ID, CLIENT_SECRET = "proxy-client", "proxy-secret-" + "w" * 20
REDIRECT_URI = "http://127.0.0.1:9/papertrail/callback"
KEY = Fernet.generate_key().decode()
remember_secrets(CLIENT_SECRET, KEY)
PROXY_READ_TIMEOUT = 2
TOKEN_ENDPOINT_DELAY = 5.0


def _nginx_config(prefix: Path, listen: int, upstream: int) -> Path:
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream airflow {{ server 127.0.0.1:{upstream}; }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://airflow;
            proxy_read_timeout {PROXY_READ_TIMEOUT}s;
            proxy_next_upstream off;
        }}
    }}
}}
"""
    )
    return conf


def _postgres() -> Cluster:
    bindir = find_bindir()
    if bindir is None or missing_drivers():
        if required():
            pytest.fail("PostgreSQL (apt-get install -y postgresql) and its drivers are required here")
        pytest.skip("needs PostgreSQL: on SQLite the database-wide write lock would hide the race")
    return Cluster(bindir).start()


@pytest.fixture(scope="module")
def proxy(airflow_stack_factory, tmp_path_factory):
    if not Path(NGINX).exists():
        if required():
            pytest.fail("nginx is required here (apt-get install -y nginx; .ci/run installs it)")
        pytest.skip("needs nginx (apt-get install -y nginx); .ci/run installs it")
    # PostgreSQL, as in production: its row lock does not block a plain read of the grant, so a
    # worker that refreshed on its own would really read the old refresh token (SQLite's
    # database-wide lock would make it wait for the api-server's commit and hide the race).
    cluster = _postgres()
    emulator = PapertrailEmulator(clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])]).start()
    listen = free_port()
    stack = airflow_stack_factory(
        REPO / "tests" / "e2e" / "dags",
        extra_env={
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": cluster.create_database("airflow_proxy"),
            "AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": KEY,
            # The workers reach the coordinator through the proxy; auto is the default mode.
            "AIRFLOW__PAPERTRAIL__COORDINATOR_URL": f"http://127.0.0.1:{listen}/papertrail/token",
            "AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR": "auto",
        },
        parallelism=8,
    )
    prefix = tmp_path_factory.mktemp("nginx")
    conf = _nginx_config(prefix, listen, stack.port)
    nginx = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:

        def proxied() -> bool:
            assert nginx.poll() is None, (prefix / "error.log").read_text()
            return requests.get(f"http://127.0.0.1:{listen}/api/v2/monitor/health", timeout=5).ok

        wait_until(proxied, 30, interval=0.1, message="nginx never proxied", ignore=(requests.RequestException,))
        stack.create_papertrail_connection(
            CONN_ID,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            host=emulator.base_url,
            redirect_uri=REDIRECT_URI,
            system="xero",
        )
        stack.wait_for_dag(DAG_ID, timeout=120)
        stack.unpause(DAG_ID)
        yield stack, emulator, prefix
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        stack.stop()
        emulator.stop()
        cluster.stop()
        remember_secrets(*emulator.issued_secrets)


def test_a_proxy_timeout_never_causes_a_second_refresh(proxy):
    stack, emulator, prefix = proxy
    config, token = emulator_grant(
        emulator, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI
    )
    store = VariableTokenStore(CONN_ID, cipher=TokenCipher([KEY]), backend=RestVariables(stack))
    emulator.expire_access_tokens()
    stored = store.save(token.with_expiry(time.time() - 60), issued_for=config.binding())
    emulator.inject("token", delay=TOKEN_ENDPOINT_DELAY)  # slower than the proxy's read timeout
    run_id = stack.trigger(DAG_ID)
    state = stack.wait_for_run(DAG_ID, run_id, timeout=300)
    tis = {ti["map_index"]: ti for ti in stack.task_instances(DAG_ID, run_id)}
    assert state == "success", {i: (ti["state"], ti["try_number"]) for i, ti in tis.items()}
    assert emulator.stats["refresh_grants"] == 1  # the api-server's only
    assert emulator.stats["grants_revoked"] == 0 and emulator.stats["invalid_grant_errors"] == 0
    grant = TokenCipher([KEY]).open("grant", CONN_ID, stack.variable(f"papertrail_grant__{CONN_ID}"))
    assert grant["generation"] == stored.generation + 1
    assert emulator.grant_is_active(grant["token"]["refresh_token"])
    # The proxy really did time out on the coordinator, and the tasks that met it were retried.
    access = (prefix / "access.log").read_text()
    assert '"POST /papertrail/token HTTP/1.1" 504' in access, access[-2000:]
    assert any(ti["try_number"] >= 2 for ti in tis.values())
    logs = stack.all_logs()
    assert "without a Papertrail-ai answer" in logs  # the worker said what happened
    assert "refreshing on this machine" not in logs  # and never refreshed beside the api-server
