"""Keep-alive and alerts (``keepalive.py``): idle grants refreshed through the real refresh path,
notifiers called once per change, one bad connection never stopping the others.

Real OAuth against the emulator on 127.0.0.1 in its idle-expiry, absolute-expiry and revoke
modes; one injected clock drives the emulator, the OAuth client, the token store and the
keep-alive, so days pass without sleeping. Variables are an in-memory backend (the same
``VariableBackend`` the Task SDK and ORM ones implement)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from airflow.sdk.exceptions import AirflowFailException
from cryptography.fernet import Fernet

from airflow_papertrail import keepalive
from airflow_papertrail.exceptions import ReauthorizationRequired
from airflow_papertrail.health import REAUTHORIZATION_REQUIRED, VALID, read_health
from airflow_papertrail.hooks.papertrail import PapertrailHook
from airflow_papertrail.keepalive import (
    CONTEXT_KEYS,
    DAY,
    DEAD,
    EXPIRING,
    OK,
    alert_variable_key,
    check_grants,
)
from airflow_papertrail.links import connect_page_url
from airflow_papertrail.oauth import OAuthClient, RetryPolicy
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.token_store import VariableTokenStore
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, remember_secrets
from tests.unit.test_token_store import MemoryVariables

FAST = RetryPolicy(total=2, backoff_factor=0.01, backoff_max=0.05, backoff_jitter=0, max_retry_after=1)
SCOPE = "accounting.read accounting.write"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, days: float) -> None:
        self.now += days * DAY


class Recorder:
    """A notifier that records the context it was called with (BaseNotifier's call shape)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, context: dict) -> None:
        self.calls.append(dict(context))

    def about(self, conn_id: str) -> list[dict]:
        return [c for c in self.calls if c["papertrail_conn_id"] == conn_id]


class World:
    """The emulator, shared Variables, and connections to the emulator on one clock."""

    def __init__(self, emulator, clock: Clock, monkeypatch) -> None:
        self.emulator, self.clock, self.monkeypatch = emulator, clock, monkeypatch
        self.backend = MemoryVariables()
        self.cipher = TokenCipher([Fernet.generate_key().decode()])
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR", "local")  # no api-server here

    def define(self, conn_id: str) -> None:
        conn = {
            "conn_type": "papertrail",
            "login": CLIENT_ID,
            "password": CLIENT_SECRET,
            "host": self.emulator.base_url,
            "extra": {"redirect_uri": REDIRECT_URI, "system": "xero", "scope": SCOPE, "timeout": "5"},
        }
        self.monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))

    def store(self, conn_id: str) -> VariableTokenStore:
        return VariableTokenStore(conn_id, cipher=self.cipher, backend=self.backend, clock=self.clock)

    def hook(self, conn_id: str) -> PapertrailHook:
        hook = PapertrailHook(papertrail_conn_id=conn_id)
        hook.token_store = self.store(conn_id)
        hook.oauth_client = OAuthClient(hook.config, retry_policy=FAST, clock=self.clock)
        return hook

    def connect(self, conn_id: str) -> str:
        """A real consent for ``conn_id``; returns its refresh token."""
        self.define(conn_id)
        code = self.emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, scope=SCOPE, system="xero")
        token = self.hook(conn_id).oauth_client.exchange_code(code)
        remember_secrets(code, token.access_token, token.refresh_token)
        self.store(conn_id).save(token)
        assert token.refresh_token
        return token.refresh_token

    def refresh_token(self, conn_id: str) -> str:
        grant = self.store(conn_id).load()
        assert grant is not None and grant.token.refresh_token
        return grant.token.refresh_token

    def check(self, conn_ids, notifiers=(), **kwargs):
        return check_grants(
            conn_ids,
            notifiers=notifiers,
            context={"ti": "the task instance", "run_id": "scheduled__x"},
            clock=self.clock,
            backend=self.backend,
            hook_factory=self.hook,
            **kwargs,
        )


def _emulator(clock: Clock, **kwargs):
    from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator

    return PapertrailEmulator(clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])], clock=clock, **kwargs)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_world(clock, monkeypatch):
    started = []

    def make(**emulator_options) -> World:
        emu = _emulator(clock, **emulator_options).start()
        started.append(emu)
        return World(emu, clock, monkeypatch)

    yield make
    for emu in started:
        emu.stop()
        remember_secrets(*emu.issued_secrets)


def _only(report, conn_id):
    (check,) = [c for c in report.checks if c.conn_id == conn_id]
    return check


def test_idle_grant_is_refreshed_before_it_would_expire(make_world, clock):
    """Sage-like 31-day idle expiry: the kept grant lives 40 days on weekly keep-alive
    refreshes; the same kind of grant left alone is refused at its first refresh."""
    world = make_world(refresh_token_idle_ttl=int(31 * DAY))
    start = clock.now
    world.connect("pt_kept")
    world.connect("pt_neglected")
    recorder = Recorder()

    clock.advance(3)
    report = world.check(["pt_kept"], [recorder])
    assert world.emulator.stats["refresh_grants"] == 0  # 3 days idle: nothing to do
    assert _only(report, "pt_kept").attention == OK and not _only(report, "pt_kept").refreshed

    for day in (8, 16, 24, 32, 40):
        clock.now = start + day * DAY
        report = world.check(["pt_kept"], [recorder])
        assert _only(report, "pt_kept").refreshed
        health = read_health("pt_kept", backend=world.backend, clock=clock)
        assert health.state == VALID and health.last_refresh_at == clock.now
    assert world.emulator.stats["refresh_grants"] == 5  # one per idle week, no more
    # A task using the access token meanwhile does not count as activity: only refreshes renew.
    assert recorder.calls == []

    report = world.check(["pt_neglected"], [recorder])  # 40 days idle: the server refuses it
    neglected = _only(report, "pt_neglected")
    assert neglected.attention == DEAD and neglected.reason_code == "invalid_grant"
    assert "unused" in neglected.reason
    assert world.emulator.stats["refresh_tokens_expired"] == 1
    assert [c["papertrail_conn_id"] for c in recorder.calls] == ["pt_neglected"]


def test_revoked_grant_is_notified_once_and_again_after_reconnect_and_a_later_death(make_world, clock):
    world = make_world()
    world.connect("pt_books")
    recorder = Recorder()
    assert world.emulator.revoke_grant(world.refresh_token("pt_books"))

    clock.advance(8)  # idle: the keep-alive presents the refresh token and the server refuses it
    first = world.check(["pt_books"], [recorder])
    check = _only(first, "pt_books")
    assert check.attention == DEAD and check.notified and check.changed
    assert check.reason == "invalid_grant: the grant has been revoked"
    (call,) = recorder.calls
    assert set(CONTEXT_KEYS) <= set(call)
    assert call["papertrail_conn_id"] == "pt_books"
    assert call["papertrail_grant_state"] == REAUTHORIZATION_REQUIRED
    assert call["papertrail_attention"] == DEAD
    assert call["papertrail_reason"] == "invalid_grant: the grant has been revoked"
    assert call["papertrail_reason_code"] == "invalid_grant"
    assert call["papertrail_connect_url"] == connect_page_url("pt_books")
    assert call["papertrail_previous_attention"] == OK
    assert call["ti"] == "the task instance"  # the task context is passed on
    message = first.failure_message()
    assert message and "'pt_books'" in message and connect_page_url() in message
    memory = json.loads(world.backend.get(alert_variable_key("pt_books")))
    assert memory["notified"]["attention"] == DEAD

    clock.advance(1)
    again = world.check(["pt_books"], [recorder])
    assert _only(again, "pt_books").attention == DEAD  # still dead, still fails the task...
    assert not _only(again, "pt_books").notified and len(recorder.calls) == 1  # ...but no second alert
    assert world.emulator.stats["refresh_grants"] == 0  # a dead grant is not presented again

    clock.advance(1)
    world.connect("pt_books")  # reconnected on the Connect page
    back = world.check(["pt_books"], [recorder])
    assert _only(back, "pt_books").attention == OK and _only(back, "pt_books").changed
    assert len(recorder.calls) == 1  # recovery resets the memory, it does not alert
    assert back.failure_message() is None

    assert world.emulator.revoke_client_grants(CLIENT_ID) == 1  # the app was disconnected
    clock.advance(8)
    later = world.check(["pt_books"], [recorder])
    assert _only(later, "pt_books").attention == DEAD
    assert len(recorder.about("pt_books")) == 2  # a new death of a new grant: notified again


def test_a_reconnect_and_death_between_two_runs_is_still_a_new_alert(make_world, clock):
    world = make_world()
    world.connect("pt_fast")
    recorder = Recorder()
    world.emulator.revoke_grant(world.refresh_token("pt_fast"))
    clock.advance(8)
    world.check(["pt_fast"], [recorder])
    clock.advance(1)
    world.connect("pt_fast")  # reconnected, and revoked again before the next run
    world.emulator.revoke_grant(world.refresh_token("pt_fast"))
    clock.advance(8)
    world.check(["pt_fast"], [recorder])
    assert len(recorder.calls) == 2  # the memory names the consent, not only the state


def test_warning_horizon_before_a_stated_expiry(make_world, clock):
    """A stated 30-day refresh-token lifetime, checked without refreshing: ok, then expiring
    (once), then dead (once) when the expiry passes."""
    world = make_world(refresh_token_ttl=int(30 * DAY), refresh_token_member="x_refresh_token_expires_in")
    world.connect("pt_qb")
    expires = read_health("pt_qb", backend=world.backend).refresh_expires_at
    assert expires is not None
    recorder = Recorder()

    clock.advance(10)
    assert _only(world.check(["pt_qb"], [recorder], refresh_idle=False), "pt_qb").attention == OK
    clock.advance(7)  # 13 days left, inside the 14-day horizon
    report = world.check(["pt_qb"], [recorder], refresh_idle=False)
    assert _only(report, "pt_qb").attention == EXPIRING
    assert report.failure_message() is None  # a warning does not fail the task
    (call,) = recorder.calls
    assert call["papertrail_attention"] == EXPIRING
    assert call["papertrail_reason_code"] == "refresh_token_expiring"
    assert call["papertrail_grant_state"] == VALID
    assert call["papertrail_refresh_expires_at"] == datetime.fromtimestamp(expires, tz=timezone.utc)
    assert "reconnect before then" in call["papertrail_reason"]
    clock.advance(1)
    world.check(["pt_qb"], [recorder], refresh_idle=False)
    assert len(recorder.calls) == 1
    clock.advance(13)  # past the expiry
    report = world.check(["pt_qb"], [recorder], refresh_idle=False)
    assert _only(report, "pt_qb").reason_code == "refresh_token_expired"
    assert [c["papertrail_attention"] for c in recorder.calls] == [EXPIRING, DEAD]
    assert recorder.calls[1]["papertrail_previous_attention"] == EXPIRING
    assert world.emulator.stats["refresh_grants"] == 0


def test_a_grant_about_to_expire_is_refreshed_and_a_rolling_expiry_needs_no_warning(make_world, clock):
    world = make_world(refresh_token_ttl=int(30 * DAY))
    world.connect("pt_roll")
    recorder = Recorder()
    clock.advance(17)  # expiring soon, though idle less than... 17 days: refreshed anyway
    report = world.check(["pt_roll"], [recorder], idle_refresh_after=60 * DAY)
    check = _only(report, "pt_roll")
    assert check.refreshed and check.attention == OK
    assert check.refresh_expires_at == pytest.approx(clock.now + 30 * DAY)
    assert recorder.calls == [] and world.emulator.stats["refresh_grants"] == 1


def test_one_bad_connection_never_stops_the_others(make_world, clock, caplog):
    world = make_world()
    for conn_id in ("pt_flaky", "pt_dead", "pt_good"):
        world.connect(conn_id)
    world.connect("pt_undefined")
    world.monkeypatch.delenv("AIRFLOW_CONN_PT_UNDEFINED")  # its connection was deleted; its grant was not
    world.emulator.revoke_grant(world.refresh_token("pt_dead"))
    clock.advance(8)

    def broken(context: dict) -> None:
        raise RuntimeError("the webhook is down")

    recorder = Recorder()
    order = ["pt_undefined", "pt_flaky", "pt_dead", "pt_good"]
    # 429 on every try of pt_flaky's refresh: refused before anything was spent, so it is retried
    # (a 5xx would be a lost answer, never retried; the custody rules then take over)
    world.emulator.inject("token", status=429, times=FAST.total + 1)
    report = world.check(order, [broken, recorder])

    assert [c.conn_id for c in report.checks] == order
    undefined, flaky, dead, good = report.checks
    assert undefined.failed and "pt_undefined" in (undefined.error or "")
    assert not flaky.failed and flaky.error and not flaky.refreshed and flaky.attention == OK  # tried next run
    assert read_health("pt_flaky", backend=world.backend).state == "refresh_failing"
    assert dead.attention == DEAD and dead.notified  # the broken notifier did not stop the recorder
    assert good.refreshed and good.attention == OK
    assert [c["papertrail_conn_id"] for c in recorder.calls] == ["pt_dead"]
    message = report.failure_message()
    assert message and "'pt_dead'" in message and "'pt_undefined'" in message and "pt_good" not in message
    assert "the webhook is down" in caplog.text


def test_every_notifier_failing_means_the_next_run_tries_again(make_world, clock):
    world = make_world()
    world.connect("pt_retry")
    world.emulator.revoke_grant(world.refresh_token("pt_retry"))
    clock.advance(8)
    calls = []

    def flaky(context: dict) -> None:
        calls.append(context["papertrail_conn_id"])
        if len(calls) == 1:
            raise ConnectionError("smtp unreachable")

    assert not _only(world.check(["pt_retry"], [flaky]), "pt_retry").notified
    assert _only(world.check(["pt_retry"], [flaky]), "pt_retry").notified
    world.check(["pt_retry"], [flaky])
    assert calls == ["pt_retry", "pt_retry"]


def test_base_notifier_templates_are_rendered_per_grant(make_world, clock):
    """A real BaseNotifier renders its template fields onto itself: each grant gets its own text."""
    from airflow.sdk import BaseNotifier

    sent: list[str] = []

    class Templated(BaseNotifier):
        template_fields = ("text",)

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

        def notify(self, context) -> None:
            sent.append(self.text)

    world = make_world()
    for conn_id in ("pt_a", "pt_b"):
        world.connect(conn_id)
        world.emulator.revoke_grant(world.refresh_token(conn_id))
    clock.advance(8)
    world.check(["pt_a", "pt_b"], [Templated("{{ papertrail_conn_id }} -> {{ papertrail_connect_url }}")])
    assert sent == [f"pt_a -> {connect_page_url('pt_a')}", f"pt_b -> {connect_page_url('pt_b')}"]


def test_data_operator_on_a_dead_grant_raises_reauthorization_required_with_the_connect_link(
    make_world, clock, monkeypatch
):
    """The query operator's 401 -> one forced refresh -> invalid_grant -> the distinct error,
    whose message carries the Connect page; the keep-alive then alerts without refreshing."""
    from airflow_papertrail.operators.query import PapertrailQueryOperator

    world = make_world()
    world.connect("pt_ops")
    world.emulator.revoke_grant(world.refresh_token("pt_ops"))
    store = world.store("pt_ops")
    monkeypatch.setattr(PapertrailHook, "token_store", property(lambda self: store))
    op = PapertrailQueryOperator(task_id="q", module="company", query="co_details", papertrail_conn_id="pt_ops")
    with pytest.raises(ReauthorizationRequired) as err:
        op.execute({"ti": None})
    assert isinstance(err.value, AirflowFailException)  # the distinct error, and not retried
    assert err.value.conn_id == "pt_ops" and err.value.error == "invalid_grant"
    assert err.value.connect_url == connect_page_url("pt_ops")
    assert connect_page_url("pt_ops") in str(err.value)
    assert world.emulator.stats["invalid_token_errors"] == 1
    monkeypatch.undo()
    world.monkeypatch.setenv("AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR", "local")
    world.define("pt_ops")

    recorder = Recorder()
    report = world.check(["pt_ops"], [recorder])
    assert _only(report, "pt_ops").attention == DEAD and not _only(report, "pt_ops").refreshed
    assert len(recorder.calls) == 1


def test_defaults_and_arguments():
    assert keepalive.IDLE_REFRESH_AFTER == 7 * DAY < 31 * DAY  # inside Sage's ~31 idle days
    assert keepalive.WARNING_HORIZON == 14 * DAY
    with pytest.raises(ValueError, match="idle_refresh_after"):
        check_grants([], idle_refresh_after=0, backend=MemoryVariables())
    assert check_grants([], backend=MemoryVariables()).checks == []


def test_operator_is_cheap_and_declares_its_asset_alias(monkeypatch):
    from airflow.sdk import AssetAlias

    from airflow_papertrail.operators import grant_health
    from airflow_papertrail.operators.grant_health import GRANT_ASSET_ALIAS, PapertrailGrantHealthOperator

    def no_io(*args, **kwargs):
        raise AssertionError("the constructor must not read Variables or connections")

    monkeypatch.setattr(keepalive, "check_grants", no_io)
    op = PapertrailGrantHealthOperator(task_id="h", idle_refresh_after=timedelta(days=3), warning_horizon=60)
    assert (op.idle_refresh_after, op.warning_horizon) == (3 * DAY, 60.0)
    assert op.fail_on_attention is True
    assert [o.name for o in op.outlets if isinstance(o, AssetAlias)] == [GRANT_ASSET_ALIAS]
    assert PapertrailGrantHealthOperator(task_id="n", emit_asset_events=False).outlets == []
    assert "conn_ids" in op.template_fields
    assert grant_health._conn_ids("a, b c") == ["a", "b", "c"]
    assert grant_health._conn_ids("['a', 'b']") == ["a", "b"]
    assert grant_health._conn_ids("") is None and grant_health._conn_ids(None) is None
    assert grant_health.grant_asset("pt/x").uri == "papertrail://grants/pt%2Fx"


def test_operator_emits_one_asset_event_per_change_and_none_when_it_fails(make_world, clock, monkeypatch):
    """Airflow's own outlet-event accessor: an alias event per change; a failing run emits none
    (Airflow sends outlet events only with a success), and the next successful one catches up."""
    import functools

    from airflow.sdk import AssetAlias
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from airflow_papertrail import token_store
    from airflow_papertrail.exceptions import GrantsNeedReauthorization
    from airflow_papertrail.operators.grant_health import GRANT_ASSET_ALIAS, PapertrailGrantHealthOperator

    world = make_world()
    world.connect("pt_asset")
    monkeypatch.setattr(
        keepalive, "check_grants", functools.partial(check_grants, clock=clock, hook_factory=world.hook)
    )
    monkeypatch.setattr(token_store, "default_backend", lambda: world.backend)

    def execute(**kwargs):
        context = {"outlet_events": OutletEventAccessors()}
        op = PapertrailGrantHealthOperator(task_id="h", conn_ids=["pt_asset"], **kwargs)
        try:
            result = op.execute(context)
        finally:
            events = context["outlet_events"][AssetAlias(name=GRANT_ASSET_ALIAS)].asset_alias_events
        return result, events

    _, events = execute(fail_on_attention=False)
    assert events == []  # a grant that never needed attention announces nothing

    world.emulator.revoke_grant(world.refresh_token("pt_asset"))
    clock.advance(8)
    with pytest.raises(GrantsNeedReauthorization) as err:
        execute()
    assert err.value.conn_ids == ["pt_asset"] and err.value.connect_url == connect_page_url()
    assert "'pt_asset'" in str(err.value) and connect_page_url() in str(err.value)

    result, events = execute(fail_on_attention=False)
    (event,) = events
    assert event.dest_asset_key.uri == "papertrail://grants/pt_asset"
    assert event.extra["attention"] == DEAD and event.extra["state"] == REAUTHORIZATION_REQUIRED
    assert event.extra["conn_id"] == "pt_asset" and event.extra["reason_code"] == "invalid_grant"
    assert [c["attention"] for c in result["checks"]] == [DEAD]
    json.dumps(result)  # XCom-serialisable

    _, events = execute(fail_on_attention=False)
    assert events == []  # announced already

    world.connect("pt_asset")
    _, events = execute(fail_on_attention=False)
    assert [e.extra["attention"] for e in events] == [OK]  # back to ok: fix-up DAGs may run now
