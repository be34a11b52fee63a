"""Pending authorizations: what the authorize task issued and the callback captured.

One encrypted Variable per pending authorization, ``papertrail_auth__<authorization_id>``
where ``authorization_id`` is a hash of the state (the callback finds the entry from the
state it receives without listing Variables, and the Variable name does not reveal the
state). The envelope is bound to the authorization id and holds the state, PKCE verifier,
redirect URI, expiry, the run that asked, and once the browser came back, the captured
code (or the OAuth error).

Life cycle: ``pending`` -> ``captured`` | ``error`` (callback) -> ``redeeming`` (the sensor
or trigger took the code, which leaves the entry, for its one exchange) -> ``redeemed``
(grant stored; only its summary stays, so a trigger run again after a triggerer restart
reports the success) -> deleted when the sensor finishes. A failed exchange, and a wait
that ends otherwise (denied, OAuth error, expired, timed out), delete the entry, if it was
issued for the waiter's connection. Only a ``pending`` entry accepts a callback, so a
replayed callback changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from airflow_papertrail.exceptions import (
    InvalidGrantError,
    OAuthError,
    PapertrailError,
    TokenDecryptionError,
    TransientOAuthError,
    sanitize_description,
)
from airflow_papertrail.oauth.authorize import states_match
from airflow_papertrail.token_store import (
    StoredGrant,
    VariableBackend,
    VariableTokenStore,
    default_backend,
    load_cipher,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_papertrail.oauth.authorize import AuthorizationRequest
    from airflow_papertrail.oauth.client import OAuthClient
    from airflow_papertrail.oauth.envelope import TokenCipher
    from airflow_papertrail.oauth.tokens import Token

log = logging.getLogger(__name__)

PENDING_KIND = "authorization"
PENDING_VARIABLE_PREFIX = "papertrail_auth__"

PENDING = "pending"
CAPTURED = "captured"
ERROR = "error"
#: The code was taken for its one exchange (and removed from the entry).
REDEEMING = "redeeming"
#: The grant is stored; the entry keeps only its summary (no secret), so that a trigger run
#: again after a triggerer restart reports the success instead of "no longer exists".
REDEEMED = "redeemed"


def authorization_id_for(state: str) -> str:
    """Public identifier of an authorization: a hash of its state (reveals nothing of it)."""
    return hashlib.sha256(state.encode("utf-8")).hexdigest()[:40]


def pending_variable_key(authorization_id: str) -> str:
    return f"{PENDING_VARIABLE_PREFIX}{authorization_id}"


@dataclass(frozen=True, repr=False)
class PendingAuthorization:
    """One authorization request waiting for (or holding) its callback."""

    authorization_id: str
    conn_id: str
    state: str
    redirect_uri: str
    created_at: float
    expires_at: float
    code_verifier: str | None = None
    expected_issuer: str | None = None
    scope: str = ""
    system: str | None = None
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    status: str = PENDING
    code: str | None = None
    error: str | None = None
    error_description: str | None = None
    captured_at: float | None = None
    #: For ``redeemed``: the grant's summary (generation, expires_at, scope, message), no secret.
    result: dict[str, Any] | None = None
    #: Who issued it: None for the authorize task, ``"connect"`` for the Connect page (whose
    #: callback page then links back to it).
    origin: str | None = None
    #: The consent URL (no secret: state and PKCE challenge), so that the authorize task can
    #: adopt an authorization the Connect page issued and hand out the same link.
    consent_url: str | None = None

    def __repr__(self) -> str:
        return (
            f"PendingAuthorization(authorization_id={self.authorization_id!r}, conn_id={self.conn_id!r}, "
            f"status={self.status!r}, expires_at={self.expires_at!r})"
        )

    @classmethod
    def from_request(
        cls,
        request: AuthorizationRequest,
        *,
        conn_id: str,
        expected_issuer: str | None = None,
        dag_id: str | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
        origin: str | None = None,
    ) -> PendingAuthorization:
        return cls(
            authorization_id=authorization_id_for(request.state),
            conn_id=conn_id,
            state=request.state,
            redirect_uri=request.redirect_uri,
            created_at=request.created_at,
            expires_at=request.expires_at,
            code_verifier=request.code_verifier,
            expected_issuer=expected_issuer,
            scope=request.scope,
            system=request.system,
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
            origin=origin,
            consent_url=request.url,
        )

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at

    def with_code(self, code: str, now: float) -> PendingAuthorization:
        return replace(self, status=CAPTURED, code=code, captured_at=now)

    def with_error(self, error: str, description: str | None, now: float) -> PendingAuthorization:
        return replace(
            self,
            status=ERROR,
            error=sanitize_description(error, 64) or "unknown_error",
            error_description=sanitize_description(description) or None,
            captured_at=now,
        )

    def redeeming(self) -> PendingAuthorization:
        """Taken for its one exchange: the code and the verifier leave the stored entry."""
        return replace(self, status=REDEEMING, code=None, code_verifier=None)

    def redeemed(self, outcome: Outcome) -> PendingAuthorization:
        return replace(
            self,
            status=REDEEMED,
            code=None,
            code_verifier=None,
            result={
                "message": outcome.message,
                "generation": outcome.generation,
                "expires_at": outcome.expires_at,
                "scope": outcome.scope,
            },
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(v for v in (self.code, self.code_verifier) if v)

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> PendingAuthorization:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in payload.items() if k in known})


class AuthorizationStore:
    """Encrypted pending authorizations in Variables (Task SDK in tasks/triggers, DB elsewhere)."""

    def __init__(
        self,
        *,
        cipher: TokenCipher | None = None,
        backend: VariableBackend | None = None,
        on_secret: Callable[[str], None] | None = None,
    ) -> None:
        self._cipher = cipher
        self.backend: VariableBackend = backend or default_backend()
        self._on_secret = on_secret

    @property
    def cipher(self) -> TokenCipher:
        if self._cipher is None:
            self._cipher = load_cipher()
        return self._cipher

    def protect(self, *values: str | None) -> None:
        """Hand sensitive values (a code that just arrived) to the masking callback."""
        if self._on_secret:
            for value in values:
                if value:
                    self._on_secret(value)

    def encode(self, pending: PendingAuthorization) -> str:
        return self.cipher.seal(PENDING_KIND, pending.authorization_id, pending.to_payload())

    def decode(self, authorization_id: str, raw: str) -> PendingAuthorization:
        payload = self.cipher.open(
            PENDING_KIND, authorization_id, raw, where=f"Variable {pending_variable_key(authorization_id)!r}"
        )
        try:
            pending = PendingAuthorization.from_payload(payload)
        except TypeError:
            raise TokenDecryptionError(
                f"Variable {pending_variable_key(authorization_id)!r} holds an incomplete authorization; it was "
                "left untouched. Re-run the papertrail_authorize DAG to start a new authorization."
            ) from None
        self.protect(*pending.secrets)
        return pending

    def save(self, pending: PendingAuthorization) -> None:
        key = pending_variable_key(pending.authorization_id)
        envelope = self.encode(pending)
        self.backend.set(
            key,
            envelope,
            f"Pending Papertrail-ai authorization for connection {pending.conn_id!r} "
            "(managed by airflow-provider-papertrail; deleted when redeemed or when the wait ends).",
        )
        stored = self.backend.get(key)
        if stored != envelope and not (
            stored is not None
            and self.cipher.same_content(PENDING_KIND, pending.authorization_id, stored, envelope)  # rotate-keys
        ):
            raise PapertrailError(
                f"the pending authorization for connection {pending.conn_id!r} could not be stored in Variable "
                f"{key!r} (the write was not confirmed); check the api-server logs and retry"
            )

    def load(self, authorization_id: str) -> PendingAuthorization | None:
        raw = self.backend.get(pending_variable_key(authorization_id))
        if not raw:
            return None
        return self.decode(authorization_id, raw)

    def delete(self, authorization_id: str) -> None:
        self.backend.delete(pending_variable_key(authorization_id))


def check_state(pending: PendingAuthorization, state: str) -> bool:
    """Constant-time check that ``state`` is the one this authorization issued."""
    return states_match(pending.state, state)


@dataclass(frozen=True)
class Outcome:
    """What a wait on an authorization ended with; plain values only (trigger events)."""

    status: str  # "success" | "denied" | "expired" | "failed" | "waiting"
    message: str
    conn_id: str
    generation: int | None = None
    expires_at: float | None = None
    scope: str | None = None

    def to_event(self) -> dict[str, Any]:
        return asdict(self)


def summarize_grant(conn_id: str, grant: StoredGrant) -> Outcome:
    expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(grant.token.expires_at))
    return Outcome(
        status="success",
        message=(
            f"Papertrail-ai grant of connection {conn_id!r} stored encrypted (generation {grant.generation}); "
            f"access token valid until {expires}, scope {grant.token.scope or '(as requested)'!r}."
        ),
        conn_id=conn_id,
        generation=grant.generation,
        expires_at=grant.token.expires_at,
        scope=grant.token.scope,
    )


def examine(pending: PendingAuthorization | None, *, conn_id: str, now: float) -> Outcome | None:
    """Decide from a pending entry alone whether the wait is over (None: redeem the code / keep waiting).

    ``conn_id`` is the connection the waiter (sensor or trigger) is for: an entry issued for
    another connection is a final failure, and its code is never redeemed with this
    connection's client.
    """
    if pending is None:
        return Outcome(
            "failed",
            f"the pending Papertrail-ai authorization for connection {conn_id!r} no longer exists (already "
            "redeemed, or deleted). Re-run the papertrail_authorize DAG.",
            conn_id,
        )
    if pending.conn_id != conn_id:
        return Outcome(
            "failed",
            f"authorization {pending.authorization_id[:12]} belongs to connection {pending.conn_id!r}, "
            f"not {conn_id!r}: give PapertrailAuthorizeOperator and PapertrailAuthorizationSensor "
            "the same papertrail_conn_id",
            conn_id,
        )
    if pending.status == ERROR:
        denied = pending.error == "access_denied"
        what = (
            "access was denied at the consent page"
            if denied
            else f"the authorization server answered {pending.error!r}"
        )
        desc = f" ({pending.error_description})" if pending.error_description else ""
        return Outcome(
            "denied" if denied else "failed",
            f"Papertrail-ai authorization for connection {conn_id!r} failed: {what}{desc}. "
            "Re-run the papertrail_authorize DAG and approve access to try again.",
            conn_id,
        )
    if pending.status == CAPTURED:
        return None
    if pending.status == REDEEMED:
        result = pending.result or {}
        return Outcome(
            "success",
            str(result.get("message") or f"Papertrail-ai grant of connection {conn_id!r} stored encrypted."),
            conn_id,
            generation=result.get("generation"),
            expires_at=result.get("expires_at"),
            scope=result.get("scope"),
        )
    if pending.status == REDEEMING:
        return Outcome(
            "failed",
            f"the exchange of the authorization code of connection {conn_id!r} was interrupted (a triggerer or "
            "worker restart in the middle of it); codes are single use, so re-run the papertrail_authorize DAG.",
            conn_id,
        )
    if pending.is_expired(now):
        return Outcome(
            "expired",
            f"nobody approved the Papertrail-ai authorization for connection {conn_id!r} before it expired. "
            "Re-run the papertrail_authorize DAG and open the new consent link.",
            conn_id,
        )
    return Outcome("waiting", "waiting for consent", conn_id)


def discard(
    pending: PendingAuthorization | None,
    *,
    conn_id: str,
    authorizations: AuthorizationStore,
    keep_redeemed: bool = False,
) -> None:
    """Delete the pending entry of a wait that ended without redeeming a code.

    Called when the sensor or trigger reaches a final outcome (denied, OAuth error, expired,
    timed out): nobody will redeem the entry any more, and a late click on the consent link
    then finds nothing. Only an entry issued for ``conn_id`` is deleted: another
    connection's entry is never touched. A failed delete is logged, not raised, so the
    outcome's own reason still reaches the task.
    """
    if pending is None or pending.conn_id != conn_id:
        return
    if keep_redeemed and pending.status == REDEEMED:
        return  # the trigger's record for a re-run; the resumed sensor deletes it
    try:
        authorizations.delete(pending.authorization_id)
    except Exception as exc:
        log.warning(
            "Could not delete the pending Papertrail-ai authorization %s of connection %r (%s); it stays unusable "
            "after its expiry and may be deleted by hand.",
            pending.authorization_id[:12],
            conn_id,
            type(exc).__name__,
        )


def failure_outcome(conn_id: str, exc: Exception) -> Outcome:
    """Map an exchange failure to a final outcome (a code is never retried after this)."""
    if isinstance(exc, InvalidGrantError):
        return Outcome("failed", f"the authorization code was refused ({exc.error}): {exc.hint}", conn_id)
    return Outcome(
        "failed",
        f"the authorization code could not be exchanged: {exc} Codes live minutes and are single use: "
        "re-run the papertrail_authorize DAG.",
        conn_id,
    )


def store_grant(conn_id: str, token: Token, grants: VariableTokenStore, *, issued_for: dict[str, str]) -> Outcome:
    """Store a freshly obtained grant as the connection's newest generation, bound to
    ``issued_for`` (``OAuthClientConfig.binding()`` of the client that obtained it)."""
    try:
        previous = grants.load()
    except PapertrailError as exc:
        # The person just approved access again: the new grant replaces an unreadable one.
        log.warning("Replacing the unreadable stored grant of connection %r: %s", conn_id, exc)
        previous = None
    return summarize_grant(conn_id, grants.save(token, based_on=previous, issued_for=issued_for))


def redeem(
    pending: PendingAuthorization,
    *,
    client: OAuthClient,
    authorizations: AuthorizationStore,
    grants: VariableTokenStore,
) -> Outcome:
    """Exchange the captured code once, store the grant encrypted, delete the pending entry.

    The entry is deleted *before* the exchange: a code is single use, so whatever happens
    next no other waiter may try it again.
    """
    assert pending.code is not None
    begin_redemption(pending, authorizations)
    try:
        token = client.exchange_code(
            pending.code, code_verifier=pending.code_verifier, redirect_uri=pending.redirect_uri
        )
    except (OAuthError, TransientOAuthError) as exc:
        discard(pending, conn_id=pending.conn_id, authorizations=authorizations)
        return failure_outcome(pending.conn_id, exc)
    outcome = store_grant(pending.conn_id, token, grants, issued_for=client.config.binding())
    finish_redemption(pending, outcome, authorizations)
    return outcome


def begin_redemption(pending: PendingAuthorization, authorizations: AuthorizationStore) -> None:
    """Take the code for its one exchange, *before* the exchange: whatever happens next, no
    other waiter finds it (a late or replayed callback finds the entry no longer ``pending``)."""
    authorizations.save(pending.redeeming())


def finish_redemption(pending: PendingAuthorization, outcome: Outcome, authorizations: AuthorizationStore) -> None:
    """Leave the grant's summary where the code was, for a trigger run again after a restart."""
    try:
        authorizations.save(pending.redeemed(outcome))
    except Exception as exc:  # the grant is stored: that is what counts
        log.warning(
            "Could not record authorization %s of connection %r as redeemed (%s); the grant is stored.",
            pending.authorization_id[:12],
            pending.conn_id,
            type(exc).__name__,
        )
