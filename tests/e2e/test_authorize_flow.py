"""End to end with real parts: api-server + scheduler + dag-processor + triggerer on
127.0.0.1, the emulator over HTTPS, the example DAG triggered through the REST API,
headless Chromium clicking Allow/Deny on the consent page, the redirect landing on our
plugin, the deferred sensor completing the exchange in the triggerer."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.fernet import Fernet

from airflow_papertrail.authorization import PENDING_KIND, authorization_id_for, pending_variable_key
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator
from tests.conftest import remember_secrets
from tests.e2e.harness import REPO, open_and_click, urllib3_quiet, wait_until

DAG_ID = "papertrail_authorize"
CONN_ID = "papertrail_e2e"
CLIENT_ID = "e2e-client"
CLIENT_SECRET = "e2e-secret-" + "Q7w" * 8
KEY = Fernet.generate_key().decode()
remember_secrets(CLIENT_SECRET, KEY)


@pytest.fixture(scope="module")
def emulator():
    emu = PapertrailEmulator(tls=True).start()
    try:
        yield emu
    finally:
        emu.stop()
        remember_secrets(*emu.issued_secrets)


@pytest.fixture(scope="module")
def stack(airflow_stack_factory, emulator):
    stack = airflow_stack_factory(REPO / "dags", extra_env={"AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": KEY})
    redirect_uri = f"{stack.base_url}/papertrail/callback"
    emulator.add_client(EmulatorClient(CLIENT_ID, CLIENT_SECRET, [redirect_uri]))
    stack.create_connection(
        {
            "connection_id": CONN_ID,
            "conn_type": "papertrail",
            "login": CLIENT_ID,
            "password": CLIENT_SECRET,
            "host": emulator.base_url,
            "extra": json.dumps(
                {
                    "redirect_uri": redirect_uri,
                    "system": "xero",
                    "scope": "accounting.read",
                    "issuer": emulator.base_url,
                    "ca_bundle": emulator.ca_cert_path,
                }
            ),
        }
    )
    stack.wait_for_dag(DAG_ID, timeout=120)
    stack.unpause(DAG_ID)
    return stack


def _grant(stack) -> dict | None:
    raw = stack.variable(f"papertrail_grant__{CONN_ID}")
    if raw is None:
        return None
    return TokenCipher([KEY]).open("grant", CONN_ID, raw)


def _authorization_id(url: str) -> str:
    """Id of the pending authorization (names its Variable), from the state in the consent URL."""
    return authorization_id_for(parse_qs(urlsplit(url).query)["state"][0])


def _start(stack) -> tuple[str, str]:
    run_id = stack.trigger(DAG_ID, conf={"conn_id": CONN_ID})
    stack.wait_for_task_state(DAG_ID, run_id, "authorize", {"success"}, timeout=120)
    url = stack.xcom(DAG_ID, run_id, "authorize")["consent_url"]
    # The PKCE verifier the authorize task created: the log canary must look for it too.
    authorization_id = _authorization_id(url)
    raw = stack.variable(pending_variable_key(authorization_id))
    assert raw is not None, f"no pending authorization {authorization_id}"
    pending = TokenCipher([KEY]).open(PENDING_KIND, authorization_id, raw)
    assert pending["code_verifier"]
    remember_secrets(pending["code_verifier"])
    stack.wait_for_task_state(DAG_ID, run_id, "wait_for_consent", {"deferred"}, timeout=120)
    return run_id, url


def _no_secrets(text: str, emulator) -> None:
    leaked = [s[:6] for s in emulator.issued_secrets | {CLIENT_SECRET} if s in text]
    assert not leaked, f"secret values leaked: {leaked}"


def test_allow_then_replay(stack, emulator, browser, tmp_path):
    run_id, url = _start(stack)
    assert url.startswith(emulator.authorize_url) and CLIENT_SECRET not in url

    clicked = time.monotonic()
    result = open_and_click(
        browser,
        url,
        "#allow",
        wait_for_url_prefix=f"{stack.base_url}/papertrail/callback",
        ignore_https_errors=True,
        screenshot_dir=tmp_path,
    )
    assert "Authorization received" in result.text, result.text
    callback_done = time.monotonic()
    stored = wait_until(lambda: _grant(stack), timeout=30, interval=0.05, message="grant never stored")
    now = time.monotonic()
    latency, callback_latency = now - clicked, now - callback_done
    assert stack.wait_for_run(DAG_ID, run_id, timeout=120) == "success"
    states = stack.task_states(DAG_ID, run_id)
    assert states == {"authorize": "success", "wait_for_consent": "success", "report_grant": "success"}
    assert "deferred" in stack.seen_states(DAG_ID, run_id, "wait_for_consent")  # the wait held no worker slot

    token = stored["token"]
    assert token["access_token"] in emulator.issued_secrets
    assert emulator.grant_is_active(token["refresh_token"])
    assert emulator.stats["authorization_code_grants"] == 1
    raw = stack.variable(f"papertrail_grant__{CONN_ID}")
    _no_secrets(raw, emulator)
    assert stack.variable(pending_variable_key(_authorization_id(url))) is None  # redeemed: entry deleted

    report = stack.xcom(DAG_ID, run_id, "report_grant")
    assert report["generation"] == stored["generation"] and report["scope"] == "accounting.read"

    logs = "".join(stack.task_log(DAG_ID, run_id, t) for t in states)
    assert "Open this link and approve access" in logs
    _no_secrets(logs, emulator)
    _no_secrets(stack.all_logs(), emulator)  # api-server access log, scheduler, triggerer, task logs

    # the same callback again (a reload, or an attacker replaying it): refused, nothing changes
    with urllib3_quiet():  # urllib3 logs full URLs at DEBUG; this one carries the (spent) code
        replay = requests.get(result.final_url, timeout=10)
    assert replay.status_code in (400, 409) and "Authorization received" not in replay.text
    assert _grant(stack)["generation"] == stored["generation"]

    # The api-server's access log has a line for each delivery (the browser's and the replay),
    # with the scrubbed query in place of the code and state.
    callback = parse_qs(urlsplit(result.final_url).query)
    code, state = callback["code"][0], callback["state"][0]
    assert state == parse_qs(urlsplit(url).query)["state"][0]

    def access_lines() -> list[str] | None:
        lines = [
            line
            for line in stack.logs().splitlines()
            if line.startswith("api-server") and "request finished" in line and "/papertrail/callback" in line
        ]
        return lines if len(lines) >= 2 else None

    lines = wait_until(access_lines, timeout=15, message="no access-log line for both callback deliveries")
    for line in lines:
        assert "papertrail-callback-query=redacted" in line, "the callback's query was not scrubbed"
        assert code not in line and state not in line, "the access log recorded the callback's code or state"
    print(f"click-to-stored latency: {latency:.2f} s; callback-to-stored: {callback_latency:.2f} s")


def test_deny_fails_fast_with_the_reason(stack, emulator, browser, tmp_path):
    before = _grant(stack)
    run_id, url = _start(stack)
    result = open_and_click(
        browser,
        url,
        "#deny",
        wait_for_url_prefix=f"{stack.base_url}/papertrail/callback",
        ignore_https_errors=True,
        screenshot_dir=tmp_path,
    )
    assert "Access not granted" in result.text
    assert stack.wait_for_run(DAG_ID, run_id, timeout=120) == "failed"
    assert stack.task_states(DAG_ID, run_id)["wait_for_consent"] == "failed"
    log = stack.task_log(DAG_ID, run_id, "wait_for_consent")
    assert "access was denied" in log
    assert _grant(stack) == before  # the existing grant is untouched
    assert stack.variable(pending_variable_key(_authorization_id(url))) is None  # the denied entry is deleted


def test_callback_refuses_forged_state_on_the_real_api_server(stack):
    response = requests.get(f"{stack.base_url}/papertrail/callback?code=abc&state={'A' * 43}", timeout=10)
    assert response.status_code == 400
    assert "Unknown authorization" in response.text  # our page, not the UI's catch-all 200
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    plugins = stack.plugins()
    assert any(p.get("name") == "papertrail" for p in plugins)
