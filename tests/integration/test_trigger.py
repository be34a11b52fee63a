"""PapertrailAuthorizationTrigger: plain-value serialization and every event it can emit,
run against the real metadata DB (Variables through the ORM) and the emulator."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace

import pytest

from airflow_papertrail.authorization import AuthorizationStore, PendingAuthorization, pending_variable_key
from airflow_papertrail.hooks.papertrail import PapertrailHook
from airflow_papertrail.oauth import code_challenge_s256
from airflow_papertrail.token_store import OrmVariables
from airflow_papertrail.triggers.papertrail import PapertrailAuthorizationTrigger
from tests.conftest import CLIENT_ID, REDIRECT_URI, emulator_connection

pytestmark = pytest.mark.integration


def test_serialize_round_trip_is_plain_json():
    trigger = PapertrailAuthorizationTrigger("pt", "abc123", deadline=1_700_000_000.5, poll_interval=0.5)
    path, kwargs = trigger.serialize()
    assert path == "airflow_papertrail.triggers.papertrail.PapertrailAuthorizationTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs  # plain values only
    again = PapertrailAuthorizationTrigger(**kwargs)
    assert again.serialize() == (path, kwargs)
    assert kwargs["deadline"] == 1_700_000_000.5  # absolute, not a duration


@pytest.fixture
def flow(airflow_db, emulator, monkeypatch, fernet_key):
    monkeypatch.setenv("AIRFLOW_CONN_PT_TRIGGER", emulator_connection(emulator.base_url))
    store = AuthorizationStore(backend=OrmVariables())
    hook = PapertrailHook("pt_trigger")

    def new_pending(**changes) -> PendingAuthorization:
        request = hook.oauth_client.authorization_request(ttl=600)
        pending = replace(PendingAuthorization.from_request(request, conn_id="pt_trigger"), **changes)
        store.save(pending)
        return pending

    return emulator, store, new_pending


def _code(emulator, pending) -> str:
    return emulator.issue_code(
        client_id=CLIENT_ID,
        redirect_uri=REDIRECT_URI,
        system="xero",
        code_challenge=code_challenge_s256(pending.code_verifier),
        code_challenge_method="S256",
    )


def _run(trigger) -> dict:
    async def first_event():
        async for event in trigger.run():
            return event.payload
        return None

    return asyncio.run(asyncio.wait_for(first_event(), timeout=30))


def test_captured_code_is_exchanged_in_the_trigger(flow):
    emulator, store, new_pending = flow
    pending = new_pending()
    code = _code(emulator, pending)
    store.save(pending.with_code(code, time.time()))
    event = _run(PapertrailAuthorizationTrigger("pt_trigger", pending.authorization_id, deadline=time.time() + 30))
    assert event["status"] == "success" and event["generation"] >= 1
    assert all(secret not in json.dumps(event) for secret in emulator.issued_secrets)
    left = store.load(pending.authorization_id)  # only the grant's summary is left, for a re-run
    assert (left.status, left.code, left.code_verifier) == ("redeemed", None, None)
    raw = OrmVariables().get(pending_variable_key(pending.authorization_id))
    assert code not in raw and pending.code_verifier not in raw
    assert emulator.stats["authorization_code_grants"] == 1


def test_a_trigger_run_again_after_its_redemption_reports_the_success(flow):
    """A triggerer restart inside the hold window runs the trigger again: the grant is stored, say so."""
    from airflow_papertrail.sensors.papertrail import PapertrailAuthorizationSensor

    emulator, store, new_pending = flow
    pending = new_pending()
    store.save(pending.with_code(_code(emulator, pending), time.time()))
    first = _run(PapertrailAuthorizationTrigger("pt_trigger", pending.authorization_id, deadline=time.time() + 30))
    again = _run(PapertrailAuthorizationTrigger("pt_trigger", pending.authorization_id, deadline=time.time() + 30))
    assert first["status"] == "success"
    assert again == first  # was "failed ... no longer exists" although the grant was stored
    third = _run(PapertrailAuthorizationTrigger("pt_trigger", pending.authorization_id, deadline=time.time() + 30))
    assert third == first  # a second restart too: the record stays until the sensor resumes
    assert emulator.stats["authorization_code_grants"] == 1  # never exchanged twice
    sensor = PapertrailAuthorizationSensor(
        task_id="wait", authorization_id=pending.authorization_id, papertrail_conn_id="pt_trigger"
    )
    assert sensor.execute_complete({}, event=again)["status"] == "success"
    assert OrmVariables().get(pending_variable_key(pending.authorization_id)) is None  # resumed: record deleted


def test_a_late_callback_after_the_code_was_taken_changes_nothing(flow):
    from fastapi.testclient import TestClient

    from airflow_papertrail.plugins.callback_app import create_app

    emulator, store, new_pending = flow
    pending = new_pending()
    store.save(pending.with_code(_code(emulator, pending), time.time()))
    _run(PapertrailAuthorizationTrigger("pt_trigger", pending.authorization_id, deadline=time.time() + 30))
    response = TestClient(create_app()).get(f"/callback?code=late-{'x' * 20}&state={pending.state}")
    assert response.status_code == 409
    assert store.load(pending.authorization_id).status == "redeemed"


def test_code_arriving_while_waiting(flow):
    emulator, store, new_pending = flow
    pending = new_pending()
    code = _code(emulator, pending)
    trigger = PapertrailAuthorizationTrigger(
        "pt_trigger", pending.authorization_id, deadline=time.time() + 30, poll_interval=0.05
    )

    async def scenario():
        async def deliver():
            await asyncio.sleep(0.3)
            store.save(pending.with_code(code, time.time()))

        task = asyncio.create_task(deliver())
        async for event in trigger.run():
            await task
            return event.payload

    event = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert event["status"] == "success"


@pytest.mark.parametrize(
    ("changes", "status", "fragment"),
    [
        ({"status": "error", "error": "access_denied"}, "denied", "access was denied"),
        ({"status": "error", "error": "server_error"}, "failed", "server_error"),
        ({"expires_at": 1.0}, "expired", "expired"),
    ],
)
def test_final_outcomes_without_exchange(flow, changes, status, fragment):
    emulator, store, new_pending = flow
    pending = new_pending(**changes)
    event = _run(PapertrailAuthorizationTrigger("pt_trigger", pending.authorization_id, deadline=time.time() + 30))
    assert event["status"] == status
    assert fragment in event["message"] and "papertrail_authorize" in event["message"]
    assert emulator.stats["token_requests"] == 0
    assert OrmVariables().get(pending_variable_key(pending.authorization_id)) is None  # no entry left behind


@pytest.mark.parametrize("deferrable", [False, True], ids=["poke", "first look"])
@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"status": "error", "error": "access_denied"}, "access was denied"),
        ({"status": "error", "error": "server_error"}, "server_error"),
        ({"expires_at": 1.0}, "expired"),
    ],
)
def test_sensor_final_outcomes_leave_no_entry(flow, changes, fragment, deferrable):
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_papertrail.sensors.papertrail import PapertrailAuthorizationSensor

    emulator, _, new_pending = flow
    pending = new_pending(**changes)
    sensor = PapertrailAuthorizationSensor(
        task_id="wait",
        authorization_id=pending.authorization_id,
        papertrail_conn_id="pt_trigger",
        deferrable=deferrable,
    )
    with pytest.raises(AirflowFailException, match=fragment):
        sensor.execute({}) if deferrable else sensor.poke({})
    assert emulator.stats["token_requests"] == 0
    assert OrmVariables().get(pending_variable_key(pending.authorization_id)) is None


def test_sensor_timeout_in_poke_mode_leaves_no_entry(flow):
    from airflow.sdk.exceptions import AirflowSensorTimeout

    from airflow_papertrail.sensors.papertrail import PapertrailAuthorizationSensor

    _, _, new_pending = flow
    pending = new_pending()
    sensor = PapertrailAuthorizationSensor(
        task_id="wait",
        authorization_id=pending.authorization_id,
        papertrail_conn_id="pt_trigger",
        deferrable=False,
        poke_interval=0.05,
        timeout=0.3,
    )
    with pytest.raises(AirflowSensorTimeout):
        sensor.execute({})
    assert OrmVariables().get(pending_variable_key(pending.authorization_id)) is None


def test_timeout_and_missing_entry(flow):
    _, _, new_pending = flow
    pending = new_pending()
    event = _run(
        PapertrailAuthorizationTrigger(
            "pt_trigger", pending.authorization_id, deadline=time.time() + 0.3, poll_interval=0.05
        )
    )
    assert event["status"] == "timeout"
    assert OrmVariables().get(pending_variable_key(pending.authorization_id)) is None  # abandoned: deleted
    event = _run(PapertrailAuthorizationTrigger("pt_trigger", "0" * 40, deadline=time.time() + 5))
    assert event["status"] == "failed" and "no longer exists" in event["message"]


def test_refused_code_is_a_final_failure(flow):
    emulator, store, new_pending = flow
    pending = new_pending()
    store.save(pending.with_code("not-a-real-code-" + "q" * 20, time.time()))
    event = _run(PapertrailAuthorizationTrigger("pt_trigger", pending.authorization_id, deadline=time.time() + 30))
    assert event["status"] == "failed" and "refused" in event["message"]
    assert store.load(pending.authorization_id) is None  # never tried twice


@pytest.mark.parametrize("waiter", ["trigger", "poke"])
def test_exchange_uses_the_redirect_uri_saved_at_authorize_time(flow, monkeypatch, waiter):
    from airflow_papertrail.operators.papertrail import PapertrailAuthorizeOperator
    from airflow_papertrail.sensors.papertrail import PapertrailAuthorizationSensor

    emulator, store, _ = flow
    issued = PapertrailAuthorizeOperator(task_id="authorize", papertrail_conn_id="pt_trigger").execute({})
    pending = store.load(issued["authorization_id"])
    assert pending.redirect_uri == REDIRECT_URI
    code = _code(emulator, pending)  # consent given for REDIRECT_URI
    # Someone edits the connection's redirect_uri after the authorize task ran.
    conn = json.loads(os.environ["AIRFLOW_CONN_PT_TRIGGER"])
    conn["extra"]["redirect_uri"] = "https://airflow.example.com/papertrail/callback"
    monkeypatch.setenv("AIRFLOW_CONN_PT_TRIGGER", json.dumps(conn))
    assert PapertrailHook("pt_trigger").config.redirect_uri != REDIRECT_URI
    store.save(pending.with_code(code, time.time()))
    if waiter == "trigger":
        event = _run(PapertrailAuthorizationTrigger("pt_trigger", pending.authorization_id, deadline=time.time() + 30))
    else:
        sensor = PapertrailAuthorizationSensor(
            task_id="wait", authorization_id=pending.authorization_id, papertrail_conn_id="pt_trigger", deferrable=False
        )
        assert sensor.poke({}) is True
        event = sensor._result
    # the emulator refuses a token request whose redirect_uri differs from the authorization request's
    assert event["status"] == "success", event["message"]
    assert emulator.stats["authorization_code_grants"] == 1


@pytest.mark.parametrize("waiter", ["trigger", "poke", "first look"])
def test_entry_of_another_connection_is_never_redeemed(flow, waiter):
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_papertrail.sensors.papertrail import PapertrailAuthorizationSensor

    emulator, store, new_pending = flow
    pending = new_pending(conn_id="pt_other")
    store.save(pending.with_code(_code(emulator, pending), time.time()))
    try:
        if waiter == "trigger":
            event = _run(
                PapertrailAuthorizationTrigger("pt_trigger", pending.authorization_id, deadline=time.time() + 30)
            )
            assert event["status"] == "failed"
            message = event["message"]
        else:
            sensor = PapertrailAuthorizationSensor(
                task_id="wait",
                authorization_id=pending.authorization_id,
                papertrail_conn_id="pt_trigger",
                deferrable=waiter == "first look",
            )
            with pytest.raises(AirflowFailException) as err:
                sensor.execute({}) if sensor.deferrable else sensor.poke({})
            message = str(err.value)
        assert "belongs to connection 'pt_other', not 'pt_trigger'" in message
        assert emulator.stats["token_requests"] == 0  # never redeemed with pt_trigger's client
        left = store.load(pending.authorization_id)
        assert left is not None and left.code  # the other connection's entry is left as it was
    finally:
        store.delete(pending.authorization_id)


def test_resumption_waits_for_not_before_but_the_grant_is_stored_at_once(flow):
    from airflow_papertrail.token_store import VariableTokenStore

    emulator, store, new_pending = flow
    pending = new_pending()
    store.save(pending.with_code(_code(emulator, pending), time.time()))
    start = time.time()
    event = _run(
        PapertrailAuthorizationTrigger(
            "pt_trigger", pending.authorization_id, deadline=start + 30, not_before=start + 1.5
        )
    )
    fired = time.time()
    assert event["status"] == "success"
    assert fired - start >= 1.5
    stored = VariableTokenStore("pt_trigger", backend=OrmVariables()).load()
    assert stored.updated_at < start + 1.0  # stored immediately, not after the hold
