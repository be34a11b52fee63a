"""The Connect page on a real api-server, scheduler, dag-processor and triggerer (one stack).

Who may do what (anonymous, expired token, a user without connection access, a viewer who
may read but not edit, forged CSRF and Origin) over HTTP, then the whole story in headless
Chromium: log in through Airflow's login form, open the page from the navigation, Connect,
Allow, back to the page, ``valid``; revoke the grant at the emulator, run a task that uses
it, ``reauthorization_required`` with the reason; Reconnect; ``valid`` again.
"""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests

from airflow_papertrail.authorization import PENDING_KIND, authorization_id_for, pending_variable_key
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.plugins.connect import csrf_token
from airflow_papertrail.testing.emulator import PapertrailEmulator
from tests.conftest import remember_secrets
from tests.e2e.connect_flow import (
    AUTHORIZE_DAG,
    CLIENT_SECRET,
    OTHER_CONN_ID,
    QUERY_DAG,
    ConnectBrowser,
    dags_folder,
    start_connect_stack,
    user_token,
)
from tests.e2e.harness import wait_until

PAGE = "/papertrail/connections"


@pytest.fixture(scope="module")
def emulator():
    emu = PapertrailEmulator(tls=True).start()
    try:
        yield emu
    finally:
        emu.stop()
        remember_secrets(*emu.issued_secrets)


@pytest.fixture(scope="module")
def cs(airflow_stack_factory, emulator, tmp_path_factory):
    return start_connect_stack(airflow_stack_factory, emulator, dags_folder(tmp_path_factory.mktemp("connect-dags")))


@pytest.fixture(scope="module")
def tokens(cs):
    return {
        "admin": cs.stack.token(),
        "viewer": user_token(cs.stack, "viewer", cs.passwords["viewer"]),
        "user": user_token(cs.stack, "user", cs.passwords["user"]),
    }


def _url(cs, path=PAGE):
    return f"{cs.stack.base_url}{path}"


def _action(cs, conn_id=None):
    return _url(cs, f"{PAGE}/{conn_id or cs.conn_id}/connect")


def _expired(cs, token: str) -> str:
    """The same claims, signed with the stack's JWT secret, but expired an hour ago."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    now = int(time.time())
    claims.update(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    expired = jwt.encode(claims, cs.stack.env["AIRFLOW__API_AUTH__JWT_SECRET"], algorithm=header["alg"], headers=header)
    remember_secrets(expired)
    return expired


def _authorize_runs(cs) -> list[dict]:
    return cs.stack.get_json(f"/api/v2/dags/{AUTHORIZE_DAG}/dagRuns", limit=100)["dag_runs"]


def _token_for(cs, user: str, conn_id: str) -> str:
    return csrf_token(cs.stack.env["AIRFLOW__API__SECRET_KEY"], user, conn_id, time.time())


def _no_secrets(text: str, emulator) -> None:
    leaked = [s[:6] for s in emulator.issued_secrets | {CLIENT_SECRET} if s in text]
    assert not leaked, f"secret values leaked: {leaked}"


def test_the_page_is_in_the_navigation(cs):
    plugin = next(p for p in cs.stack.plugins() if p["name"] == "papertrail")
    [view] = plugin["external_views"]
    expected = {
        "name": "Papertrail-ai connections",
        "href": "papertrail/connections",
        "destination": "nav",
        "category": "admin",
        "url_route": "papertrail-connections",
    }
    assert {k: view.get(k) for k in expected} == expected


def test_anonymous_browser_is_sent_to_login_and_api_calls_get_401(cs, tokens):
    http = requests.Session()
    http.trust_env = False
    page = http.get(_url(cs), headers={"Accept": "text/html"}, allow_redirects=False, timeout=30)
    assert page.status_code == 303
    location = page.headers["location"]
    assert urlsplit(location).path.endswith("/auth/login")
    assert parse_qs(urlsplit(location).query)["next"] == [_url(cs)]
    expired = _expired(cs, tokens["admin"])
    again = http.get(
        _url(cs), headers={"Accept": "text/html"}, cookies={"_token": expired}, allow_redirects=False, timeout=30
    )
    assert again.status_code == 303 and "/auth/login" in again.headers["location"]
    assert http.get(_url(cs, f"{PAGE}/status"), timeout=30).status_code == 401
    assert http.get(_url(cs), headers={"Accept": "application/json"}, timeout=30).status_code == 401
    # the action: anonymous, expired cookie, expired Bearer -> 401; a forged token -> 403
    form = {"csrf_token": _token_for(cs, "admin", cs.conn_id), "mode": "connect"}
    origin = {"Origin": cs.stack.base_url}
    assert http.post(_action(cs), data=form, headers=origin, allow_redirects=False, timeout=30).status_code == 401
    assert (
        http.post(
            _action(cs), data=form, headers=origin, cookies={"_token": expired}, allow_redirects=False, timeout=30
        ).status_code
        == 401
    )
    bearer = {**origin, "Authorization": f"Bearer {expired}"}
    assert http.post(_action(cs), data=form, headers=bearer, allow_redirects=False, timeout=30).status_code == 401
    forged = {**origin, "Authorization": f"Bearer {tokens['admin'][:-4]}AAAA"}
    assert http.post(_action(cs), data=form, headers=forged, allow_redirects=False, timeout=30).status_code == 403
    assert _authorize_runs(cs) == []


def test_a_user_without_connection_access_sees_nothing(cs, tokens):
    response = requests.get(_url(cs), cookies={"_token": tokens["user"]}, headers={"Accept": "text/html"}, timeout=30)
    assert response.status_code == 403
    assert cs.conn_id not in response.text
    status = requests.get(_url(cs, f"{PAGE}/status"), headers={"Authorization": f"Bearer {tokens['user']}"}, timeout=30)
    assert status.status_code == 403


def test_a_viewer_reads_the_page_but_cannot_connect(cs, tokens):
    response = requests.get(_url(cs), cookies={"_token": tokens["viewer"]}, headers={"Accept": "text/html"}, timeout=30)
    assert response.status_code == 200
    assert f'id="conn-{cs.conn_id}"' in response.text and f'id="conn-{OTHER_CONN_ID}"' in response.text
    assert "not_connected" in response.text
    assert "<form" not in response.text and "You may view this connection but not edit it." in response.text
    assert "frame-ancestors 'self'" in response.headers["Content-Security-Policy"]
    # even with a well-formed token of its own, the viewer may not Connect
    attempt = requests.post(
        _action(cs),
        data={"csrf_token": _token_for(cs, "viewer", cs.conn_id), "mode": "connect"},
        cookies={"_token": tokens["viewer"]},
        headers={"Origin": cs.stack.base_url},
        allow_redirects=False,
        timeout=30,
    )
    assert attempt.status_code == 403
    assert _authorize_runs(cs) == []


def test_forged_or_foreign_requests_are_refused(cs, tokens):
    cookies = {"_token": tokens["admin"]}
    page = requests.get(_url(cs), cookies=cookies, headers={"Accept": "text/html"}, timeout=30)
    row = re.search(rf'<tr id="conn-{cs.conn_id}".*?</tr>', page.text, re.S).group(0)
    token = re.search(r'name=csrf_token value="([0-9a-f]{64})"', row).group(1)
    good = {"csrf_token": token, "mode": "connect"}
    cases = {
        "no token": ({"mode": "connect"}, {"Origin": cs.stack.base_url}),
        "bad token": ({"csrf_token": "0" * 64, "mode": "connect"}, {"Origin": cs.stack.base_url}),
        "another connection's token": (
            {"csrf_token": _token_for(cs, "admin", OTHER_CONN_ID), "mode": "connect"},
            {"Origin": cs.stack.base_url},
        ),
        "foreign origin": (good, {"Origin": "https://attacker.example"}),
        "null origin": (good, {"Origin": "null"}),
        "no origin nor referer": (good, {}),
        "foreign referer": (good, {"Referer": "https://attacker.example/page"}),
    }
    for name, (form, headers) in cases.items():
        response = requests.post(
            _action(cs), data=form, cookies=cookies, headers=headers, allow_redirects=False, timeout=30
        )
        assert response.status_code == 403, (name, response.status_code, response.text[:300])
    as_get = requests.get(_action(cs), cookies=cookies, params=good, allow_redirects=False, timeout=30)
    assert as_get.status_code == 405
    assert _authorize_runs(cs) == []


def test_a_paused_dag_is_reported_and_nothing_is_issued(cs, tokens):
    cs.stack.request("PATCH", f"/api/v2/dags/{AUTHORIZE_DAG}", json={"is_paused": True})
    try:
        response = requests.post(
            _action(cs),
            data={"csrf_token": _token_for(cs, "admin", cs.conn_id), "mode": "connect"},
            cookies={"_token": tokens["admin"]},
            headers={"Origin": cs.stack.base_url, "Accept": "text/html"},
            allow_redirects=False,
            timeout=30,
        )
        assert response.status_code == 409
        assert "papertrail_authorize DAG is paused; nothing was started" in response.text
    finally:
        cs.stack.unpause(AUTHORIZE_DAG)
    assert _authorize_runs(cs) == []


def _one_authorize_run_after(cs, known: set[str]) -> dict:
    def new_run():
        runs = [r for r in _authorize_runs(cs) if r["dag_run_id"] not in known]
        return runs[0] if runs else None

    return wait_until(new_run, 30, message="the Connect page triggered no papertrail_authorize run")


def _check_run(cs, run: dict, consent_url: str) -> None:
    """The run adopted the very authorization the browser consented to, and redeemed it."""
    run_id = run["dag_run_id"]
    assert run["conf"]["conn_id"] == cs.conn_id and run["conf"]["notify"] is False
    assert cs.stack.wait_for_run(AUTHORIZE_DAG, run_id, timeout=120) == "success"
    xcom = cs.stack.xcom(AUTHORIZE_DAG, run_id, "authorize")
    state = parse_qs(urlsplit(consent_url).query)["state"][0]
    assert xcom["authorization_id"] == run["conf"]["authorization_id"] == authorization_id_for(state)
    # Connect mode: the link (it carries the state) is in neither XCom nor the task log.
    assert xcom["consent_url"] is None
    assert state not in cs.stack.task_log(AUTHORIZE_DAG, run_id, "authorize")
    assert cs.stack.variable(pending_variable_key(xcom["authorization_id"])) is None  # redeemed and gone


def test_connect_revoke_reconnect_in_a_browser(cs, emulator, browser):
    b = ConnectBrowser(browser, cs)
    try:
        b.login()
        frame = b.open_from_navigation()
        assert frame.locator(f"#conn-{cs.conn_id} .state").text_content() == "not_connected"
        assert frame.locator(f"#conn-{cs.conn_id} button.connect").text_content() == "Connect"
        b.screenshot("list")

        known = {r["dag_run_id"] for r in _authorize_runs(cs)}
        consent_url = b.click_connect(frame)
        assert CLIENT_SECRET not in consent_url and "code_challenge=" in consent_url
        b.screenshot("consent")
        # The verifier the api-server issued: the log canary must look for it too.
        state = parse_qs(urlsplit(consent_url).query)["state"][0]
        raw = cs.stack.variable(pending_variable_key(authorization_id_for(state)))
        assert raw is not None, "the Connect page issued no pending authorization"
        pending = TokenCipher([cs.key]).open(PENDING_KIND, authorization_id_for(state), raw)
        assert pending["origin"] == "connect" and pending["dag_id"] == AUTHORIZE_DAG
        remember_secrets(pending["code_verifier"])

        b.click_allow()
        assert "Authorization received" in b.page.inner_text("body")
        b.back_to_page()
        b.wait_for_state("valid")
        b.screenshot("valid")
        run = _one_authorize_run_after(cs, known)
        _check_run(cs, run, consent_url)
        first = cs.grant()
        assert emulator.grant_is_active(first["token"]["refresh_token"])

        # the grant dies at the emulator; the next task that uses it finds out
        assert emulator.revoke_grant(first["token"]["refresh_token"])
        query_run = cs.stack.trigger(QUERY_DAG, conf={"conn_id": cs.conn_id})
        assert cs.stack.wait_for_run(QUERY_DAG, query_run, timeout=120) == "failed"
        b.wait_for_state("reauthorization_required")
        error = b.page.locator(f"#conn-{cs.conn_id} .last-error").inner_text()
        assert "invalid_grant" in error, error
        assert cs.health()["state"] == "reauthorization_required"
        b.screenshot("reauthorization-required")

        reconnect = b.page.locator(f"#conn-{cs.conn_id} button.connect")
        assert reconnect.text_content() == "Reconnect"
        known = {r["dag_run_id"] for r in _authorize_runs(cs)}
        consent_url = b.click_connect(b.page)
        state = parse_qs(urlsplit(consent_url).query)["state"][0]
        raw = cs.stack.variable(pending_variable_key(authorization_id_for(state)))
        remember_secrets(TokenCipher([cs.key]).open(PENDING_KIND, authorization_id_for(state), raw)["code_verifier"])
        b.click_allow()
        b.back_to_page()
        b.wait_for_state("valid")
        assert b.page.locator(f"#conn-{cs.conn_id} .last-error").inner_text() == "—"
        _check_run(cs, _one_authorize_run_after(cs, known), consent_url)
        second = cs.grant()
        assert second["generation"] > first["generation"]
        assert emulator.grant_is_active(second["token"]["refresh_token"])
        assert emulator.stats["authorization_code_grants"] == 2  # one exchange per consent, by the DAG
        # the other connection was never touched
        assert b.page.locator(f"#conn-{OTHER_CONN_ID} .state").text_content() == "not_connected"
    finally:
        b.close()
    _no_secrets(cs.stack.all_logs(), emulator)


def test_get_a_link_to_send(cs, tokens):
    """The link is shown, not followed; the run adopts it with notify on (its notifiers send it)."""
    known = {r["dag_run_id"] for r in _authorize_runs(cs)}
    page = requests.get(_url(cs), cookies={"_token": tokens["admin"]}, headers={"Accept": "text/html"}, timeout=30)
    row = re.search(rf'<tr id="conn-{OTHER_CONN_ID}".*?</tr>', page.text, re.S).group(0)
    token = re.search(r'name=csrf_token value="([0-9a-f]{64})"', row).group(1)
    response = requests.post(
        _action(cs, OTHER_CONN_ID),
        data={"csrf_token": token, "mode": "link"},
        cookies={"_token": tokens["admin"]},
        headers={"Origin": cs.stack.base_url},
        allow_redirects=False,
        timeout=30,
    )
    assert response.status_code == 200, response.text[:500]
    link = re.search(r'id=consent-link readonly value="([^"]+)"', response.text).group(1).replace("&amp;", "&")
    assert link.startswith(cs.emulator.authorize_url) and CLIENT_SECRET not in link
    run = _one_authorize_run_after(cs, known)
    assert run["conf"]["conn_id"] == OTHER_CONN_ID and run["conf"]["notify"] is True
    run_id = run["dag_run_id"]
    try:
        cs.stack.wait_for_task_state(AUTHORIZE_DAG, run_id, "authorize", {"success"}, timeout=120)
        assert cs.stack.xcom(AUTHORIZE_DAG, run_id, "authorize")["consent_url"] == link
        state = parse_qs(urlsplit(link).query)["state"][0]
        raw = cs.stack.variable(pending_variable_key(authorization_id_for(state)))
        remember_secrets(TokenCipher([cs.key]).open(PENDING_KIND, authorization_id_for(state), raw)["code_verifier"])
    finally:  # nobody will consent: end the run so it does not hold the DAG's only run slot
        cs.stack.request(
            "PATCH", f"/api/v2/dags/{AUTHORIZE_DAG}/dagRuns/{run_id}", json={"state": "failed"}, expected=(200,)
        )
