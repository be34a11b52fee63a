"""The documented two-phase key rotation (docs/grant-lifecycle.md), walked through with
components that hold different key lists at every step of a rolling restart.

Components: a worker (the authorize task writes a pending authorization, tasks read the grant
and ask the api-server for refreshes with tickets), the api-server (callback, refresh
coordinator), the triggerer (redeems the code, stores the grant) and the CLI (``rotate-keys``).
They share one Variable store (in memory, with a row-lock stand-in); tokens come from the
emulator over real HTTP. At each step every component does its part and nothing fails; a
control shows the step the procedure exists for (a new key put first before everyone has it)."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail.authorization import AuthorizationStore, PendingAuthorization, authorization_id_for, redeem
from airflow_papertrail.exceptions import TokenKeyMismatch
from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig
from airflow_papertrail.oauth.envelope import TicketError, TokenCipher, open_ticket, seal_ticket
from airflow_papertrail.refresh import REQUEST_PURPOSE, RESPONSE_PURPOSE, coordinated_refresh
from airflow_papertrail.rotation import CURRENT, ROTATED, rotate_all
from airflow_papertrail.token_store import VariableTokenStore
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, remember_secrets
from tests.unit.test_token_store import MemoryVariables

CONN = "pt_rotation"


class _Entry:
    def __init__(self, raw):
        self.raw = raw
        self.written = None

    def write(self, value):
        self.written = value


class MemoryEntries:
    """``EntryAccess`` over the in-memory Variables: one lock, the write lands on exit."""

    def __init__(self, backend: MemoryVariables) -> None:
        self.backend = backend
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def locked(self, key):
        with self._lock:
            entry = _Entry(self.backend.values.get(key))
            yield entry
            if entry.written is not None:
                self.backend.values[key] = entry.written


class Deployment:
    def __init__(self, emulator, old: str, new: str) -> None:
        self.emulator = emulator
        self.keys = {"old": old, "new": new}
        self.backend = MemoryVariables()
        self.entries = MemoryEntries(self.backend)
        self.config = OAuthClientConfig(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            redirect_uri=REDIRECT_URI,
            system="xero",
            base_url=emulator.base_url,
            timeout=5,
        )
        self.leftover: str | None = None  # a pending authorization nobody redeems: rotated, read at every step

    def cipher(self, names: str) -> TokenCipher:
        return TokenCipher([self.keys[n] for n in names.split(",")])

    def grants(self, names: str) -> VariableTokenStore:
        return VariableTokenStore(CONN, cipher=self.cipher(names), backend=self.backend)

    def authorizations(self, names: str) -> AuthorizationStore:
        return AuthorizationStore(cipher=self.cipher(names), backend=self.backend)

    def authorize(self, worker: str, api_server: str, triggerer: str) -> None:
        """Authorize task (worker) -> callback (api-server) -> redemption (triggerer)."""
        state = secrets.token_urlsafe(32)
        now = time.time()
        pending = PendingAuthorization(
            authorization_id=authorization_id_for(state),
            conn_id=CONN,
            state=state,
            redirect_uri=REDIRECT_URI,
            created_at=now,
            expires_at=now + 600,
        )
        self.authorizations(worker).save(pending)
        at_callback = self.authorizations(api_server).load(pending.authorization_id)
        code = self.emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, system="xero")
        self.authorizations(api_server).save(at_callback.with_code(code, time.time()))
        captured = self.authorizations(triggerer).load(pending.authorization_id)
        outcome = redeem(
            captured,
            client=OAuthClient(self.config),
            authorizations=self.authorizations(triggerer),
            grants=self.grants(triggerer),
        )
        assert outcome.status == "success", outcome.message
        if self.leftover is None:
            self.leftover = self._pending_nobody_redeems(worker)

    def _pending_nobody_redeems(self, worker: str) -> str:
        state = secrets.token_urlsafe(32)
        now = time.time()
        pending = PendingAuthorization(
            authorization_id=authorization_id_for(state),
            conn_id=CONN,
            state=state,
            redirect_uri=REDIRECT_URI,
            created_at=now,
            expires_at=now + 3600,
        )
        self.authorizations(worker).save(pending)
        return pending.authorization_id

    def refresh(self, worker: str, api_server: str) -> int:
        """A task's 401 -> ticket -> the api-server's coordinator refreshes -> answer ticket -> the task."""
        seen = self.grants(worker).load()
        nonce = secrets.token_urlsafe(8)
        ticket = seal_ticket(
            self.cipher(worker), REQUEST_PURPOSE, {"conn_id": CONN, "seen_generation": seen.generation, "nonce": nonce}
        )
        request = open_ticket(self.cipher(api_server), REQUEST_PURPOSE, ticket)
        grant = coordinated_refresh(
            CONN,
            seen_generation=request["seen_generation"],
            force=True,
            entries=self.entries,
            store=self.grants(api_server),
            client_factory=lambda: OAuthClient(self.config),
            config=self.config,
        )
        answer = seal_ticket(
            self.cipher(api_server),
            RESPONSE_PURPOSE,
            {"conn_id": CONN, "nonce": nonce, "generation": grant.generation, "access_token": grant.token.access_token},
        )
        opened = open_ticket(self.cipher(worker), RESPONSE_PURPOSE, answer)
        assert opened["nonce"] == nonce and opened["generation"] == seen.generation + 1
        assert self.grants(worker).load().generation == opened["generation"]
        return int(opened["generation"])

    def step(self, *, worker: str, api_server: str, triggerer: str) -> None:
        """Everything each component does, with the key lists it holds right now."""
        self.authorize(worker, api_server, triggerer)
        self.refresh(worker, api_server)
        for names in (worker, api_server, triggerer):
            assert self.grants(names).load() is not None
            assert self.authorizations(names).load(self.leftover) is not None

    def rotate(self, cli: str) -> dict[str, str]:
        results = rotate_all(
            cipher=self.cipher(cli),
            entries=self.entries,
            backend=self.backend,
            list_keys=lambda prefix: sorted(k for k in self.backend.values if k.startswith(prefix)),
        )
        return {r.variable: r.outcome for r in results}


@pytest.fixture
def deployment(emulator):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    remember_secrets(old, new)
    return Deployment(emulator, old, new)


def test_two_phase_rotation_with_components_on_different_key_lists(deployment):
    d = deployment
    d.step(worker="old", api_server="old", triggerer="old")

    # phase 1: add the new key LAST, one component after the other (writes still use the old key)
    d.step(worker="old,new", api_server="old", triggerer="old")
    d.step(worker="old,new", api_server="old,new", triggerer="old")
    d.step(worker="old,new", api_server="old,new", triggerer="old,new")

    # phase 2: promote it to FIRST, one component after the other (everyone can read both)
    d.step(worker="new,old", api_server="old,new", triggerer="old,new")
    d.step(worker="new,old", api_server="new,old", triggerer="old,new")
    d.step(worker="new,old", api_server="new,old", triggerer="new,old")

    # phase 3: re-encrypt what is stored, while the deployment keeps working
    outcomes = d.rotate("new,old")
    assert outcomes and set(outcomes.values()) <= {ROTATED, CURRENT}
    assert ROTATED in outcomes.values()  # the leftover pending authorization was still under the old key
    only_new = d.cipher("new")
    assert all(only_new.is_current(d.backend.values[key]) for key in outcomes)
    assert set(d.rotate("new,old").values()) == {CURRENT}
    d.step(worker="new,old", api_server="new,old", triggerer="new,old")

    # phase 4: remove the old key, one component after the other
    d.step(worker="new", api_server="new,old", triggerer="new,old")
    d.step(worker="new", api_server="new", triggerer="new,old")
    d.step(worker="new", api_server="new", triggerer="new")
    assert d.authorizations("new").load(d.leftover) is not None
    assert d.grants("new").load().generation >= 10


def test_control_a_new_key_first_before_everyone_has_it_breaks_the_others(deployment):
    d = deployment
    d.step(worker="old", api_server="old", triggerer="old")
    with pytest.raises(TicketError):  # the api-server cannot open the worker's ticket
        d.refresh(worker="new,old", api_server="old")
    d.authorizations("new,old").save(d.authorizations("old").load(d.leftover))  # re-written by a new-first worker
    with pytest.raises(TokenKeyMismatch):  # the api-server's callback cannot open it
        d.authorizations("old").load(d.leftover)


def test_removing_the_old_key_before_rotate_keys_strands_what_was_not_rewritten(deployment):
    d = deployment
    d.step(worker="old", api_server="old", triggerer="old")
    d.step(worker="new,old", api_server="new,old", triggerer="new,old")  # the grant was rewritten; the leftover was not
    with pytest.raises(TokenKeyMismatch):
        d.authorizations("new").load(d.leftover)
    d.rotate("new,old")
    assert d.authorizations("new").load(d.leftover) is not None


def test_a_rotation_between_a_write_and_its_read_back_is_not_a_lost_write(deployment):
    """``rotate-keys`` may re-encrypt a grant between a writer's ``Variable.set`` and its read-back:
    the same grant under another key is accepted; a different grant still fails loudly."""
    from airflow_papertrail.exceptions import TokenWriteVerificationError
    from airflow_papertrail.oauth import Token

    d = deployment
    token = Token.from_response({"access_token": "at-" + "x" * 20, "refresh_token": "rt-" + "y" * 20}, now=time.time())
    rotating_cli = d.cipher("new,old")

    class RotatedInBetween(MemoryVariables):
        def set(self, key, value, description=None):
            super().set(key, rotating_cli.rotate(value) if key.startswith("papertrail_grant__") else value)

    store = VariableTokenStore(CONN, cipher=d.cipher("old,new"), backend=RotatedInBetween())
    assert store.save(token).generation == 1
    assert d.cipher("new").open("grant", CONN, store.backend.values[store.key])["generation"] == 1

    class OverwrittenInBetween(MemoryVariables):
        def set(self, key, value, description=None):
            if not key.startswith("papertrail_grant__"):
                return super().set(key, value, description)
            other = VariableTokenStore(CONN, cipher=d.cipher("old"), backend=MemoryVariables())
            someone_elses = Token.from_response({"access_token": "at-" + "z" * 20}, now=time.time())
            return super().set(key, other.encode(other.next_grant(someone_elses, None)))

    with pytest.raises(TokenWriteVerificationError):
        VariableTokenStore(CONN, cipher=d.cipher("old"), backend=OverwrittenInBetween()).save(token)
