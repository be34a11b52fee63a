"""Encrypted grant custody in Airflow Variables.

One Variable per connection, named ``papertrail_grant__<conn_id>``; its value is an
envelope from :mod:`airflow_papertrail.oauth.envelope` whose ciphertext holds the tokens,
their absolute expiry, a generation counter and the connection id. Keys come from
``[papertrail] token_encryption_keys`` (comma-separated Fernet keys; the first encrypts,
all decrypt) and never live next to the ciphertext.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from airflow_papertrail.exceptions import TokenStoreError, TokenWriteVerificationError
from airflow_papertrail.oauth.envelope import TokenCipher, parse_keys
from airflow_papertrail.oauth.tokens import Token

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

CONFIG_SECTION = "papertrail"
KEYS_OPTION = "token_encryption_keys"
GRANT_KIND = "grant"
GRANT_VARIABLE_PREFIX = "papertrail_grant__"


def grant_variable_key(conn_id: str) -> str:
    """Name of the Variable that holds the encrypted grant of ``conn_id``."""
    return f"{GRANT_VARIABLE_PREFIX}{conn_id}"


def _conf_get(option: str) -> str | None:
    from airflow.sdk import conf

    value = conf.get(CONFIG_SECTION, option, fallback=None)
    return str(value) if value is not None else None


def load_cipher() -> TokenCipher:
    """A cipher over ``[papertrail] token_encryption_keys``; raises a clear error without keys."""
    return TokenCipher(parse_keys(_conf_get(KEYS_OPTION)))


class VariableBackend(Protocol):
    """Raw string access to Airflow Variables (Task SDK in tasks, ORM in the api-server)."""

    def get(self, key: str) -> str | None: ...

    def set(self, key: str, value: str, description: str | None = None) -> None: ...

    def delete(self, key: str) -> None: ...


class SdkVariables:
    """Variables through the Task SDK (tasks and triggers)."""

    def get(self, key: str) -> str | None:
        from airflow.sdk import Variable

        value = Variable.get(key, default=None)
        return None if value is None else str(value)

    def set(self, key: str, value: str, description: str | None = None) -> None:
        from airflow.sdk import Variable

        Variable.set(key, value, description=description)

    def delete(self, key: str) -> None:
        from airflow.sdk import Variable

        Variable.delete(key)


@dataclass(frozen=True, repr=False)
class StoredGrant:
    """A decrypted grant with its custody metadata."""

    conn_id: str
    token: Token
    generation: int
    updated_at: float
    #: Refreshes in a row that may have reached the server but whose answer was lost (a
    #: timeout, a 5xx, an unreadable 2xx). One is survivable: the access token is used until
    #: it expires, then the same refresh token is presented once more; at two the grant needs
    #: consent again (token-custody.md, "A lost refresh answer").
    unknown_refresh_outcomes: int = 0
    #: When the last of those answers was lost (epoch s): the token is presented again only
    #: after a quiet period, in case the server is still processing the lost request.
    unknown_at: float | None = None
    #: Set once the server refused the refresh token (``invalid_grant``): the OAuth error and
    #: its safe description. The access token is still used until it expires; nothing is
    #: presented again.
    reauthorization_error: str | None = None
    reauthorization_reason: str | None = None
    #: ``OAuthClientConfig.binding()`` at consent: client ID, token URL and data-API origin the
    #: grant was issued for (None for grants stored before 0.1.0 bound them).
    issued_for: dict[str, str] | None = None
    #: While the api-server coordinator presents the refresh token: ``{"id", "until"}``. Taken
    #: and committed before the token request, so no DB transaction waits on the network.
    refresh_lease: dict[str, Any] | None = None

    @property
    def refresh_outcome_unknown(self) -> bool:
        """Whether the last refresh's answer was lost (the refresh token may be rotated)."""
        return self.unknown_refresh_outcomes > 0

    def __repr__(self) -> str:
        return f"StoredGrant(conn_id={self.conn_id!r}, generation={self.generation}, token={self.token!r})"

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "token": self.token.to_dict(),
            "generation": self.generation,
            "updated_at": self.updated_at,
            "unknown_refresh_outcomes": self.unknown_refresh_outcomes,
            # Read by releases before 0.1.0's lost-answer policy: they refuse such a grant (safe).
            "refresh_outcome_unknown": self.refresh_outcome_unknown,
        }
        if self.unknown_at is not None:
            payload["unknown_at"] = self.unknown_at
        if self.issued_for is not None:
            payload["issued_for"] = dict(self.issued_for)
        if self.refresh_lease is not None:
            payload["refresh_lease"] = dict(self.refresh_lease)
        if self.reauthorization_error is not None:
            payload["reauthorization_error"] = self.reauthorization_error
            payload["reauthorization_reason"] = self.reauthorization_reason
        return payload


class VariableTokenStore:
    """Reads and writes the encrypted grant of one connection.

    :param conn_id: the Papertrail-ai connection the grant belongs to.
    :param cipher: defaults to the configured keys (resolved lazily, on first use).
    :param backend: defaults to :func:`default_backend`.
    :param on_secret: called with every token value read from the store (``mask_secret``).
    """

    def __init__(
        self,
        conn_id: str,
        *,
        cipher: TokenCipher | None = None,
        backend: VariableBackend | None = None,
        clock: Callable[[], float] = time.time,
        on_secret: Callable[[str], None] | None = None,
    ) -> None:
        self.conn_id = conn_id
        self._cipher = cipher
        self.backend: VariableBackend = backend or default_backend()
        self.clock = clock
        self._on_secret = on_secret

    @property
    def key(self) -> str:
        return grant_variable_key(self.conn_id)

    @property
    def cipher(self) -> TokenCipher:
        if self._cipher is None:
            self._cipher = load_cipher()
        return self._cipher

    def load(self) -> StoredGrant | None:
        """The stored grant, or None when there is none. Undecryptable values raise and stay untouched."""
        raw = self.backend.get(self.key)
        if raw is None or raw == "":
            return None
        return self.decode(raw)

    def decode(self, raw: str) -> StoredGrant:
        """Decrypt an envelope read by other means (e.g. under a row lock)."""
        payload = self.cipher.open(GRANT_KIND, self.conn_id, raw, where=f"Variable {self.key!r}")
        try:
            grant = StoredGrant(
                conn_id=self.conn_id,
                token=Token.from_dict(payload["token"]),
                generation=int(payload["generation"]),
                updated_at=float(payload["updated_at"]),
                unknown_refresh_outcomes=int(
                    payload.get("unknown_refresh_outcomes", 1 if payload.get("refresh_outcome_unknown") else 0)
                ),
                unknown_at=float(payload["unknown_at"]) if payload.get("unknown_at") is not None else None,
                reauthorization_error=payload.get("reauthorization_error"),
                reauthorization_reason=payload.get("reauthorization_reason"),
                issued_for=_binding_or_none(payload.get("issued_for")),
                refresh_lease=payload.get("refresh_lease") if isinstance(payload.get("refresh_lease"), dict) else None,
            )
        except (KeyError, TypeError, ValueError):
            raise TokenStoreError(
                f"Variable {self.key!r} decrypted but its content is incomplete; it was left untouched. "
                f"Re-run the papertrail_authorize DAG for connection {self.conn_id!r}."
            ) from None
        if self._on_secret:
            for value in grant.token.secrets:
                self._on_secret(value)
        return grant

    def encode(self, grant: StoredGrant) -> str:
        return self.cipher.seal(GRANT_KIND, self.conn_id, grant.to_payload())

    def next_grant(
        self, token: Token, based_on: StoredGrant | None, *, issued_for: dict[str, str] | None = None
    ) -> StoredGrant:
        """The grant after ``based_on``: a refresh keeps its binding, a consent passes a new one."""
        return StoredGrant(
            conn_id=self.conn_id,
            token=token,
            generation=(based_on.generation + 1) if based_on else 1,
            updated_at=self.clock(),
            issued_for=issued_for if issued_for is not None else (based_on.issued_for if based_on else None),
        )

    def save(
        self, token: Token, *, based_on: StoredGrant | None = None, issued_for: dict[str, str] | None = None
    ) -> StoredGrant:
        """Encrypt and store ``token``, then read it back and fail loudly if it differs.

        The generation is ``based_on.generation + 1`` (1 for a first grant), so every
        reader can tell a newer grant from an older one.
        """
        grant = self.next_grant(token, based_on, issued_for=issued_for)
        envelope = self.encode(grant)
        self._write_verified(envelope)
        self.record_health(grant, authorized=True)
        log.info(
            "Stored the encrypted Papertrail-ai grant of connection %r in Variable %r (generation %d, access token expires at %s).",
            self.conn_id,
            self.key,
            grant.generation,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.expires_at)),
        )
        return grant

    def write(self, grant: StoredGrant) -> None:
        """Store ``grant`` as it is (a refresh's next grant, or custody metadata changed), verified."""
        self._write_verified(self.encode(grant))
        self.record_health(grant)

    def record_health(self, grant: StoredGrant, *, authorized: bool = False) -> None:
        """Record the plain health of a grant that was just stored (``health.py``); never raises."""
        from airflow_papertrail.health import record_grant

        record_grant(self.backend, grant, authorized=authorized, now=self.clock())

    def record_failure(self, state: str, code: str | None, description: object) -> None:
        """Record a refresh that failed without storing anything; never raises."""
        from airflow_papertrail.health import record_failure

        record_failure(self.backend, self.conn_id, state=state, code=code, description=description, now=self.clock())

    def _write_verified(self, envelope: str) -> None:
        description = (
            f"Encrypted Papertrail-ai OAuth grant of connection {self.conn_id!r}. "
            "Managed by airflow-provider-papertrail: do not edit."
        )
        try:
            self.backend.set(self.key, envelope, description)
        except Exception as exc:
            raise TokenWriteVerificationError(
                f"could not write Variable {self.key!r} for connection {self.conn_id!r} ({type(exc).__name__}); "
                "nothing was stored. Check the task or api-server log for the Variable API error, then retry."
            ) from None
        try:
            stored = self.backend.get(self.key)
        except Exception as exc:
            stored = None
            reason = type(exc).__name__
        else:
            reason = "a different value was read back"
        if (
            stored is not None
            and stored != envelope
            and self.cipher.same_content(GRANT_KIND, self.conn_id, stored, envelope)
        ):
            return  # re-encrypted under the first key in between (rotate-keys): the same grant
        if stored != envelope:
            # Airflow 3's Task SDK can log an API error from Variable.set and carry on
            # (apache/airflow#68537); never continue on an unconfirmed write.
            raise TokenWriteVerificationError(
                f"the encrypted grant of connection {self.conn_id!r} was written to Variable {self.key!r} but "
                f"{reason} (the write was lost, or a secrets backend shadows that Variable). The new grant "
                "was not confirmed; check the api-server logs and the secrets backend, then retry."
            )

    def delete(self) -> None:
        self.backend.delete(self.key)

    def rotate_keys(self) -> bool:
        """Re-encrypt the stored grant under the first key. Returns False when there is none."""
        raw = self.backend.get(self.key)
        if not raw:
            return False
        self.cipher.open(GRANT_KIND, self.conn_id, raw, where=f"Variable {self.key!r}")  # refuse foreign values
        self._write_verified(self.cipher.rotate(raw))
        return True


def _binding_or_none(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): str(v) for k, v in value.items()}


class OrmVariables:
    """Variables through the metadata DB (api-server process, CLI, tests with a DB).

    Values are additionally Fernet-encrypted by Airflow's ``[core] fernet_key`` there.
    """

    def get(self, key: str) -> str | None:
        from airflow.models.variable import Variable

        value = Variable.get(key, default_var=None)
        return None if value is None else str(value)

    def set(self, key: str, value: str, description: str | None = None) -> None:
        from airflow.models.variable import Variable

        Variable.set(key, value, description=description)

    def delete(self, key: str) -> None:
        from airflow.models.variable import Variable

        Variable.delete(key)


def in_task_runtime() -> bool:
    """Whether this process talks to Airflow through a supervisor (task, triggerer, dag processor)."""
    try:
        from airflow.sdk.execution_time import task_runner
    except ImportError:  # pragma: no cover
        return False
    return getattr(task_runner, "SUPERVISOR_COMMS", None) is not None


def default_backend() -> VariableBackend:
    """Task SDK Variables inside tasks and triggers; the metadata DB elsewhere (api-server)."""
    return SdkVariables() if in_task_runtime() else OrmVariables()
