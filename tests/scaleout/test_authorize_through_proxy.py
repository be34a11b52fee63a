"""Authorization through the proxy, with 2 api-server replicas (issue 11).

The connection's redirect URI is the proxy's ``/papertrail/callback``. The shipped
``papertrail_authorize`` DAG runs on the Celery workers and defers; the person's consent at the
emulator sends the browser (here ``requests``) back through the proxy to whichever replica nginx
picks; the triggerer redeems the code. The grant is stored once, and the same callback replayed
straight to the other replica (after the redemption) is refused with nothing changed.
"""

from __future__ import annotations

import html
import re
import secrets
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from airflow_papertrail.authorization import authorization_id_for, pending_variable_key
from airflow_papertrail.testing.emulator import EmulatorClient
from airflow_papertrail.token_store import grant_variable_key
from tests.conftest import remember_secrets
from tests.e2e.harness import urllib3_quiet
from tests.scaleout.common import AUTHORIZE_DAG_ID, TIMINGS
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(1800)
CONN_ID = "papertrail_scaleout_consent"
CLIENT_ID, CLIENT_SECRET = "consent-client", "consent-secret-" + secrets.token_hex(12)
remember_secrets(CLIENT_SECRET)


def _consent(consent_url: str) -> str:
    """Open the consent page and click Allow (the form's fields, posted as a browser would);
    return the callback URL the emulator redirects to."""
    page = requests.get(consent_url, timeout=10)
    assert page.status_code == 200, page.text[:500]
    fields = {
        html.unescape(name): html.unescape(value)
        for name, value in re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', page.text)
    }
    answer = requests.post(
        urlsplit(consent_url)._replace(query="").geturl(),
        data={**fields, "decision": "allow"},
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code in (302, 303), answer.text[:500]
    return answer.headers["Location"]


def test_consent_through_the_proxy_stores_the_grant_once_and_the_other_replica_refuses_a_replay(topology, emulator):
    topo = topology
    callback = f"{topo.base_url}/papertrail/callback"
    emulator.add_client(EmulatorClient(CLIENT_ID, CLIENT_SECRET, [callback]))
    topo.create_papertrail_connection(
        CONN_ID,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        host=emulator.base_url,
        redirect_uri=callback,
        system="xero",
    )
    before = emulator.stats.snapshot()
    run_id = topo.trigger(AUTHORIZE_DAG_ID, conf={"conn_id": CONN_ID})
    topo.wait_for_task_state(AUTHORIZE_DAG_ID, run_id, "authorize", {"success"}, timeout=300)
    consent_url = topo.xcom(AUTHORIZE_DAG_ID, run_id, "authorize")["consent_url"]
    authorization_id = authorization_id_for(parse_qs(urlsplit(consent_url).query)["state"][0])
    topo.wait_for_task_state(AUTHORIZE_DAG_ID, run_id, "wait_for_consent", {"deferred"}, timeout=300)

    redirect = _consent(consent_url)
    assert redirect.startswith(callback + "?"), redirect.split("?")[0]
    log_start = len(topo.proxy_requests())
    with urllib3_quiet():  # urllib3 logs full URLs at DEBUG; this one carries the code
        first = requests.get(redirect, timeout=30)
    assert first.status_code == 200 and "Authorization received" in first.text, first.text[:500]
    # nginx writes its access-log line once the answer is sent: possibly after we read it
    served = wait_until(
        lambda: [r for r in topo.proxy_requests()[log_start:] if r["path"] == "/papertrail/callback"],
        10,
        interval=0.05,
        message="nginx never logged the callback",
    )
    assert len(served) == 1, served
    first_replica = served[0]["upstream"]

    assert topo.wait_for_run(AUTHORIZE_DAG_ID, run_id, timeout=300) == "success"
    states = topo.task_states(AUTHORIZE_DAG_ID, run_id)
    assert set(states.values()) == {"success"}, states
    assert "deferred" in topo.seen_states(AUTHORIZE_DAG_ID, run_id, "wait_for_consent")  # redeemed by the triggerer
    delta = {k: v - before.get(k, 0) for k, v in emulator.stats.snapshot().items()}
    assert delta["authorization_code_grants"] == 1, delta  # exchanged once
    assert delta["consents_allowed"] == 1, delta
    stored = topo.variable(grant_variable_key(CONN_ID))
    assert stored is not None
    assert topo.variable(pending_variable_key(authorization_id)) is None  # redeemed: entry deleted

    # The same callback straight to the other replica (a reload that lands elsewhere, or a replay).
    other = next(f"127.0.0.1:{p}" for p in topo.api_ports if f"127.0.0.1:{p}" != first_replica)
    replay_url = f"http://{other}" + redirect[len(topo.base_url) :]
    with urllib3_quiet():
        replay = requests.get(replay_url, timeout=30)
    assert replay.status_code in (400, 409) and "Authorization received" not in replay.text, replay.status_code
    assert topo.variable(grant_variable_key(CONN_ID)) == stored  # nothing changed
    after = emulator.stats.snapshot()
    assert after["authorization_code_grants"] == before.get("authorization_code_grants", 0) + 1
    TIMINGS["consent: callback served by / replay refused by"] = f"{first_replica} / {other} ({replay.status_code})"
    leaked = [s[:6] for s in {*emulator.issued_secrets, CLIENT_SECRET} if s in topo.all_logs()]
    assert not leaked, leaked
