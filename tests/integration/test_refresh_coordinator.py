"""The api-server refresh coordinator against the real metadata DB and the emulator:
one refresh per generation under concurrency, tickets, lost answers never replayed."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from airflow_papertrail.exceptions import PapertrailConfigurationError, TransientOAuthError
from airflow_papertrail.hooks.papertrail import PapertrailHook
from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig
from airflow_papertrail.oauth.envelope import open_ticket, seal_ticket
from airflow_papertrail.plugins.callback_app import create_app
from airflow_papertrail.refresh import REQUEST_PURPOSE, RESPONSE_PURPOSE, get_valid_token
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore, load_cipher
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, emulator_connection
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
CONN = "pt_coord"


@pytest.fixture
def grant(airflow_db, emulator, monkeypatch, fernet_key):
    """An expired grant stored for CONN, and a client that posts tickets to the real route."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", emulator_connection(emulator.base_url))
    config = OAuthClientConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        system="xero",
        base_url=emulator.base_url,
    )
    token = OAuthClient(config).exchange_code(
        emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, system="xero")
    )
    store = VariableTokenStore(CONN, backend=OrmVariables())
    stored = store.save(token.with_expiry(time.time() - 10))
    client = TestClient(create_app())
    cipher = load_cipher()

    def ask(seen: int, force: bool = False, conn_id: str = CONN):
        ticket = seal_ticket(cipher, REQUEST_PURPOSE, {"conn_id": conn_id, "seen_generation": seen, "force": force})
        response = client.post("/token", json={"ticket": ticket})
        body = response.json()
        if response.status_code == 200:
            body = open_ticket(cipher, RESPONSE_PURPOSE, body["ticket"])
        return response.status_code, body

    return emulator, store, stored, ask


def test_concurrent_requests_cause_exactly_one_refresh(grant):
    emulator, store, stored, ask = grant
    emulator.inject("token", delay=0.5)  # make the refresh slow so the others pile up on the lock
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: ask(stored.generation), range(16)))
    assert all(status == 200 for status, _ in results), results
    assert emulator.stats["refresh_grants"] == 1
    generations = {body["generation"] for _, body in results}
    assert generations == {stored.generation + 1}
    current = store.load()
    assert current.generation == stored.generation + 1
    assert all(body["access_token"] == current.token.access_token for _, body in results)
    assert emulator.grant_is_active(current.token.refresh_token)


def test_valid_token_is_returned_without_refresh_and_force_refreshes_once(grant):
    emulator, store, stored, ask = grant
    status, first = ask(stored.generation)
    assert status == 200
    status, again = ask(first["generation"])  # still valid: no refresh
    assert (status, again["generation"], emulator.stats["refresh_grants"]) == (200, first["generation"], 1)
    status, forced = ask(first["generation"], force=True)  # after a 401
    assert (status, forced["generation"], emulator.stats["refresh_grants"]) == (200, first["generation"] + 1, 2)
    status, stale_force = ask(first["generation"], force=True)  # someone already forced it
    assert (stale_force["generation"], emulator.stats["refresh_grants"]) == (forced["generation"], 2)


def test_429_on_the_token_endpoint_is_retried_by_the_coordinator(grant):
    emulator, store, stored, ask = grant
    emulator.inject("token", status=429, retry_after=0, times=2)
    status, body = ask(stored.generation)
    assert status == 200
    assert emulator.stats["refresh_grants"] == 1
    assert emulator.grant_is_active(store.load().token.refresh_token)


def test_lost_answer_is_a_retryable_error_and_presented_once_more(grant, monkeypatch):
    """The full policy is in test_refresh_policy.py; here: what the route answers."""
    from airflow_papertrail import refresh

    monkeypatch.setattr(refresh, "RETRY_QUIET_SECONDS", 0.0)
    emulator, store, stored, ask = grant
    emulator.inject("token", drop_after_processing=True)
    status, body = ask(stored.generation)
    assert status == 503 and body["error"] == "unavailable"  # the worker raises a retryable error
    assert "The grant is kept: retry the task" in body["message"]
    assert store.load().unknown_refresh_outcomes == 1
    status, body = ask(stored.generation)  # the server rotated: presenting the old token is refused
    assert status == 409 and body["error"] == "reauthorization_required"
    assert emulator.stats["token_requests"] == 3  # exchange, the lost refresh, one more try


def test_revoked_grant_asks_for_reauthorization(grant):
    emulator, store, stored, ask = grant
    emulator.revoke_grant(stored.token.refresh_token)
    status, body = ask(stored.generation)
    assert status == 409 and "papertrail_authorize" in body["message"]


@pytest.mark.parametrize("ticket", ["", "garbage", "gAAAAABn" + "x" * 80, 123])
def test_forged_tickets_are_refused(grant, ticket):
    emulator, *_ = grant
    client = TestClient(create_app())
    response = client.post("/token", json={"ticket": ticket})
    assert response.status_code == 401
    assert emulator.stats["refresh_grants"] == 0


def test_ticket_for_another_purpose_is_refused(grant):
    emulator, _, stored, _ = grant
    ticket = seal_ticket(load_cipher(), RESPONSE_PURPOSE, {"conn_id": CONN, "seen_generation": stored.generation})
    response = TestClient(create_app()).post("/token", json={"ticket": ticket})
    assert response.status_code == 401
    assert emulator.stats["refresh_grants"] == 0


@pytest.mark.parametrize(
    ("keys", "fragment"), [(None, "no token encryption key is configured"), ("not-a-key", "not a valid Fernet key")]
)
def test_api_server_without_a_usable_key_says_so(grant, monkeypatch, keys, fragment):
    emulator, _, stored, ask = grant  # the ticket is sealed with the worker's (valid) key
    if keys is None:
        monkeypatch.delenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS")
    else:
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", keys)
    status, body = ask(stored.generation)
    assert (status, body["error"]) == (503, "server_misconfigured")  # not invalid_ticket: no key mismatch to blame
    assert fragment in body["message"] and "token_encryption_keys" in body["message"]
    assert emulator.stats["refresh_grants"] == 0


def test_connection_the_api_server_cannot_use_is_named(grant, monkeypatch):
    emulator, _, stored, ask = grant
    monkeypatch.setenv("AIRFLOW_CONN_PT_COORD_BAD", json.dumps({"conn_type": "papertrail", "password": "x" * 12}))
    status, body = ask(stored.generation, conn_id="pt_coord_bad")
    assert (status, body["error"]) == (503, "server_misconfigured")
    assert "Papertrail-ai connection 'pt_coord_bad' is invalid" in body["message"]
    assert "the client ID is missing" in body["message"]
    status, body = ask(stored.generation, conn_id="pt_coord_nowhere")
    assert (status, body["error"]) == (503, "server_misconfigured")
    assert "connection 'pt_coord_nowhere' is not defined on the api-server" in body["message"]
    assert emulator.stats["refresh_grants"] == 0


@pytest.fixture
def plugin_server(grant, monkeypatch):
    """The plugin app on a real HTTP server (uvicorn, loopback) that workers reach over the network."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def started() -> bool:
        assert thread.is_alive(), "uvicorn exited during start-up"
        return bool(server.started)

    wait_until(started, timeout=30, interval=0.05, message="uvicorn did not start")
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__COORDINATOR_URL", f"http://127.0.0.1:{port}/token")
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR", "api-server")
    try:
        yield grant
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_worker_names_the_api_server_misconfiguration(plugin_server, monkeypatch):
    emulator, _, stored, _ = plugin_server
    hook = PapertrailHook(CONN)
    assert hook.token_store.load().generation == stored.generation  # the worker has its key and config
    assert hook.config.client_id == CLIENT_ID
    monkeypatch.delenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS")  # ... the api-server has none
    with pytest.raises(PapertrailConfigurationError) as err:
        get_valid_token(hook)
    message = str(err.value)
    assert "the api-server cannot refresh Papertrail-ai tokens because of its own configuration" in message
    assert "no token encryption key is configured" in message and "Fix this on the api-server" in message
    assert "differ" not in message  # the keys do not differ; the api-server has none
    assert emulator.stats["refresh_grants"] == 0


class _FakeCoordinator:
    """A loopback server standing where the coordinator should be (a proxy, an old api-server...)."""

    def __init__(self, answer) -> None:
        import http.server

        outer = self
        self.requests: list[dict] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                status, content_type, payload = answer(body)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/papertrail/token"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


PROXY_PAGES = [
    pytest.param(502, "text/html", b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>", id="nginx-502"),
    pytest.param(504, "text/html", b"<html><body><h1>504 Gateway Time-out</h1></body></html>", id="nginx-504"),
    pytest.param(503, "text/html", b"<html>Service Unavailable</html>", id="lb-503"),
    pytest.param(500, "text/plain; charset=utf-8", b"Internal Server Error", id="starlette-500"),
    pytest.param(404, "text/html", b"<html>404 Not Found</html>", id="proxy-404-page"),
    pytest.param(200, "text/html", b"<html>the Airflow UI</html>", id="ui-page"),
]


@pytest.mark.parametrize(("status", "content_type", "payload"), PROXY_PAGES)
def test_an_answer_that_is_not_the_coordinators_never_falls_back_to_a_local_refresh(
    grant, monkeypatch, status, content_type, payload
):
    """Behind a proxy, a 502/504 page can mean the api-server is presenting the same refresh token right now."""
    emulator, store, stored, _ = grant
    fake = _FakeCoordinator(lambda body: (status, content_type, payload))
    try:
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__COORDINATOR_URL", fake.url)
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR", "auto")
        with pytest.raises(TransientOAuthError, match=f"HTTP {status}") as err:
            get_valid_token(PapertrailHook(CONN))
        assert "retry the task" in str(err.value)
        assert len(fake.requests) == 1
    finally:
        fake.close()
    assert emulator.stats["refresh_grants"] == 0  # no local refresh beside the coordinator's
    assert store.load().generation == stored.generation


@pytest.mark.parametrize(
    ("status", "payload"), [(404, b'{"detail":"Not Found"}'), (405, b'{"detail":"Method Not Allowed"}')]
)
def test_an_api_server_without_the_route_falls_back_in_auto_mode(grant, monkeypatch, status, payload):
    emulator, store, stored, _ = grant
    fake = _FakeCoordinator(lambda body: (status, "application/json", payload))
    try:
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__COORDINATOR_URL", fake.url)
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR", "auto")
        get_valid_token(PapertrailHook(CONN))
    finally:
        fake.close()
    assert emulator.stats["refresh_grants"] == 1  # Starlette's own "no such route": refreshed here
    assert store.load().generation == stored.generation + 1


def _refusing_url(host: str = "127.0.0.1") -> str:
    """A coordinator URL where nothing listens (a proxy or api-server restarting); ``host`` names
    127.0.0.1 (e.g. ``localhost``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://{host}:{port}/papertrail/token"


@pytest.mark.parametrize(
    ("executor", "host", "pod", "local_refresh"),
    [
        pytest.param("LocalExecutor", "127.0.0.1", "", True, id="local"),
        pytest.param("LocalExecutor", "localhost", "", True, id="local-localhost"),
        pytest.param("", "127.0.0.1", "", True, id="none-configured"),
        pytest.param("CeleryExecutor", "127.0.0.1", "", False, id="celery"),
        pytest.param("LocalExecutor,CeleryExecutor", "127.0.0.1", "", False, id="local-and-celery"),
        pytest.param("LocalExecutor;team_a=CeleryExecutor", "127.0.0.1", "", False, id="team-list"),
        pytest.param("=LocalExecutor", "127.0.0.1", "", True, id="leading-equals"),
        pytest.param(
            "airflow.providers.cncf.kubernetes.executors.kubernetes_executor.KubernetesExecutor",
            "127.0.0.1",
            "",
            False,
            id="k8s-path",
        ),
        pytest.param("edge:airflow.providers.edge3.executors.EdgeExecutor", "127.0.0.1", "", False, id="alias"),
        # the official chart's pod template says LocalExecutor; Airflow marks the pod itself
        pytest.param("LocalExecutor", "127.0.0.1", "True", False, id="k8s-pod"),
    ],
)
def test_auto_refreshes_locally_on_a_refused_coordinator_only_on_a_single_machine(
    grant, monkeypatch, executor, host, pod, local_refresh
):
    """A proxy restarting in front of the api-server refuses connections for a moment; where
    tasks may run on several machines, refreshing on this one would not be serialized with the
    others (docs/scaling-out.md, the negative control)."""
    emulator, store, stored, _ = grant
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__COORDINATOR_URL", _refusing_url(host))
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR", "auto")
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    monkeypatch.setenv("AIRFLOW_IS_K8S_EXECUTOR_POD", pod)
    if local_refresh:
        get_valid_token(PapertrailHook(CONN))
        assert emulator.stats["refresh_grants"] == 1
        assert store.load().generation == stored.generation + 1
        return
    with pytest.raises(TransientOAuthError, match="does not refresh on this machine") as err:
        get_valid_token(PapertrailHook(CONN))
    assert "refused the connection" in str(err.value) and "retry the task" in str(err.value)
    assert emulator.stats["refresh_grants"] == 0  # nothing presented from this machine
    assert store.load().generation == stored.generation


@pytest.mark.parametrize(
    ("status", "payload"), [(404, b'{"detail":"Not Found"}'), (405, b'{"detail":"Method Not Allowed"}')]
)
def test_an_api_server_without_the_route_is_a_configuration_error_under_a_distributed_executor(
    grant, monkeypatch, status, payload
):
    """No route (the provider missing on the api-server) is no reason to retry: it says what to fix."""
    emulator, store, stored, _ = grant
    fake = _FakeCoordinator(lambda body: (status, "application/json", payload))
    try:
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__COORDINATOR_URL", fake.url)
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR", "auto")
        monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
        with pytest.raises(PapertrailConfigurationError, match="has no Papertrail-ai refresh route") as err:
            get_valid_token(PapertrailHook(CONN))
        assert "CeleryExecutor may run tasks on several machines" in str(err.value)
        assert "retry the task" not in str(err.value)
    finally:
        fake.close()
    assert emulator.stats["refresh_grants"] == 0
    assert store.load().generation == stored.generation


def test_an_answer_for_another_request_is_refused(grant, monkeypatch):
    emulator, store, stored, _ = grant
    cipher = load_cipher()
    foreign = seal_ticket(
        cipher,
        RESPONSE_PURPOSE,
        {
            "conn_id": CONN,
            "nonce": "someone-elses-request",
            "generation": stored.generation,
            "access_token": "a" * 24,
            "token_type": "Bearer",
            "expires_at": time.time() + 3600,
            "obtained_at": time.time(),
            "scope": None,
        },
    )
    fake = _FakeCoordinator(lambda body: (200, "application/json", json.dumps({"ticket": foreign}).encode()))
    try:
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__COORDINATOR_URL", fake.url)
        with pytest.raises(TransientOAuthError, match="does not answer this request"):
            get_valid_token(PapertrailHook(CONN))
        request = open_ticket(cipher, REQUEST_PURPOSE, fake.requests[0]["ticket"])
        assert len(request["nonce"]) >= 22  # every request carries its own nonce
    finally:
        fake.close()


def test_the_route_echoes_the_nonce_and_a_stale_ticket_is_not_a_key_mismatch(grant):
    emulator, store, stored, _ = grant
    cipher = load_cipher()
    client = TestClient(create_app())
    ticket = seal_ticket(
        cipher, REQUEST_PURPOSE, {"conn_id": CONN, "seen_generation": stored.generation, "nonce": "n" * 22}
    )
    response = client.post("/token", json={"ticket": ticket})
    assert response.status_code == 200
    assert open_ticket(cipher, RESPONSE_PURPOSE, response.json()["ticket"])["nonce"] == "n" * 22
    old = cipher._fernet.encrypt_at_time(
        json.dumps({"purpose": REQUEST_PURPOSE, "payload": {"conn_id": CONN, "seen_generation": 1}}).encode(),
        int(time.time()) - 600,
    ).decode()
    response = client.post("/token", json={"ticket": old})
    assert (response.status_code, response.json()["error"]) == (401, "stale_ticket")


def test_no_transaction_is_held_across_the_token_request(grant):
    """Issue 9 item 4: the claim is committed before the token request; the row stays free meanwhile."""
    from airflow_papertrail.plugins.locking import OrmEntryAccess
    from airflow_papertrail.token_store import grant_variable_key

    emulator, store, stored, ask = grant
    emulator.inject("token", delay=4.0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(ask, stored.generation)
        wait_until(lambda: emulator.stats["token_requests"] >= 2, timeout=10, message="refresh never sent")
        # The token request is in flight: the claim is visible (committed), and the row lock is
        # free (before, the coordinator held it, and on SQLite the whole database, for all 4 s).
        assert store.load().refresh_lease is not None
        acquired = []

        def lock_the_row():
            with OrmEntryAccess().locked(grant_variable_key(CONN)) as entry:
                acquired.append(entry.raw is not None)

        with ThreadPoolExecutor(max_workers=1) as other:
            other.submit(lock_the_row).result(timeout=2.0)  # well inside the 4 s token request
        assert acquired == [True]
        assert not result.done()
        status, body = result.result(timeout=30)
    assert status == 200 and body["generation"] == stored.generation + 1
    assert store.load().refresh_lease is None  # released with the result
    assert emulator.stats["refresh_grants"] == 1


def test_a_claim_left_by_a_dead_coordinator_is_taken_over_once_expired(grant):
    from dataclasses import replace as dc_replace

    emulator, store, stored, ask = grant
    store.write(dc_replace(store.load(), refresh_lease={"id": "dead", "until": time.time() - 1}))
    status, body = ask(stored.generation)
    assert status == 200 and emulator.stats["refresh_grants"] == 1
    # The dead holder may have sent its request: the takeover counted it as a lost answer, and
    # the one more presentation it allows was this one.
    assert store.load().unknown_refresh_outcomes == 0  # cleared by the successful refresh


def test_a_live_claim_makes_others_wait_then_answer_busy(grant, monkeypatch):
    from dataclasses import replace as dc_replace

    from airflow_papertrail import refresh

    emulator, store, stored, ask = grant
    monkeypatch.setattr(refresh, "LEASE_WAIT_SECONDS", 1.0)
    store.write(dc_replace(store.load(), refresh_lease={"id": "busy", "until": time.time() + 60}))
    status, body = ask(stored.generation)
    assert status == 503 and "is still running" in body["message"] and "retry the task" in body["message"]
    assert emulator.stats["token_requests"] == 1  # only the exchange: the waiter never refreshed


def test_a_refresh_that_fails_before_reaching_the_server_releases_its_claim(grant):
    emulator, store, stored, ask = grant
    emulator.inject("token", status=429, retry_after=3600)  # longer than we wait: fails at once
    status, body = ask(stored.generation)
    assert status == 503 and "unavailable" in body["error"]
    assert store.load().refresh_lease is None  # released: the next request need not wait it out
    status, body = ask(stored.generation)
    assert status == 200 and emulator.stats["refresh_grants"] == 1


def test_taking_over_a_dead_claim_counts_a_lost_answer(grant):
    from dataclasses import replace as dc_replace

    emulator, store, stored, ask = grant
    once_lost = dc_replace(store.load(), unknown_refresh_outcomes=1)
    store.write(dc_replace(once_lost, refresh_lease={"id": "dead", "until": time.time() - 1}))
    status, body = ask(stored.generation)
    assert status == 409 and "refreshes in a row" in body["message"]  # the dead claim was the second loss
    assert emulator.stats["token_requests"] == 1  # only the exchange: never presented a third time


def test_a_result_that_cannot_be_stored_keeps_the_claim(grant, monkeypatch):
    """Once the token request was sent, releasing the claim would let the next request present a rotated token."""
    from airflow_papertrail.hooks.papertrail import config_from_connection
    from airflow_papertrail.plugins.locking import OrmEntryAccess
    from airflow_papertrail.refresh import coordinated_refresh

    emulator, store, stored, _ = grant
    access = OrmEntryAccess()
    calls = {"n": 0}
    real_locked = access.locked

    def failing_after_claim(key):
        calls["n"] += 1
        if calls["n"] >= 2:  # the claim commits; every write of the result fails
            raise RuntimeError("database connection lost")
        return real_locked(key)

    monkeypatch.setattr(access, "locked", failing_after_claim)
    from airflow.models.connection import Connection

    config = config_from_connection(Connection.get_connection_from_secrets(CONN)).validate(need_redirect_uri=False)
    with pytest.raises(RuntimeError):
        coordinated_refresh(
            CONN,
            seen_generation=stored.generation,
            force=False,
            entries=access,
            store=store,
            client_factory=lambda: OAuthClient(config),
            config=config,
            sleep=lambda s: None,
        )
    assert emulator.stats["refresh_grants"] == 1
    left = store.load()
    assert left.refresh_lease is not None  # kept: nobody presents the rotated token before it expires
