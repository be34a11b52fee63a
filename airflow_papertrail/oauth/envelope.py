"""Encrypted envelopes for grants at rest (Fernet / MultiFernet, no Airflow imports).

An envelope is a small versioned JSON document::

    {"v": 1, "kind": "grant", "conn_id": "papertrail_default", "ciphertext": "gAAAA..."}

The plaintext inside the Fernet token repeats ``conn_id`` (and ``kind``) so an envelope
copied into another connection's Variable fails to open: the outer ``conn_id`` is only a
label for people, the inner one is what is checked.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from airflow_papertrail.exceptions import EncryptionKeyMissing, TokenDecryptionError, TokenKeyMismatch

ENVELOPE_VERSION = 1


def parse_keys(raw: str | None) -> list[str]:
    """Split ``[papertrail] token_encryption_keys`` (comma or whitespace separated)."""
    if not raw:
        return []
    return [k.strip() for k in raw.replace("\n", ",").replace(" ", ",").split(",") if k.strip()]


class TokenCipher:
    """MultiFernet over the configured keys: the first encrypts, all decrypt."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise EncryptionKeyMissing(
                "no token encryption key is configured, and Papertrail-ai tokens are never stored in plaintext. "
                "Generate one with `python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'` "
                "and set [papertrail] token_encryption_keys (env AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS) "
                "on every Airflow component."
            )
        fernets = []
        for index, key in enumerate(keys):
            try:
                fernets.append(Fernet(key.encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                raise EncryptionKeyMissing(
                    f"[papertrail] token_encryption_keys entry #{index + 1} is not a valid Fernet key "
                    "(32 url-safe base64-encoded bytes); generate one with Fernet.generate_key()"
                ) from None
        self._fernet = MultiFernet(fernets)
        self._primary = fernets[0]
        self.key_count = len(fernets)

    @staticmethod
    def generate_key() -> str:
        return Fernet.generate_key().decode("ascii")

    def seal(self, kind: str, conn_id: str, payload: dict[str, Any]) -> str:
        """Encrypt ``payload`` bound to ``(kind, conn_id)`` and return the envelope text."""
        inner = json.dumps({"kind": kind, "conn_id": conn_id, "payload": payload}, separators=(",", ":"))
        ciphertext = self._fernet.encrypt(inner.encode("utf-8")).decode("ascii")
        return json.dumps(
            {"v": ENVELOPE_VERSION, "kind": kind, "conn_id": conn_id, "ciphertext": ciphertext},
            separators=(",", ":"),
        )

    def open(self, kind: str, conn_id: str, envelope: str, *, where: str = "") -> dict[str, Any]:
        """Decrypt an envelope and check it belongs to ``(kind, conn_id)``."""
        label = where or f"the stored Papertrail-ai {kind} of connection {conn_id!r}"
        try:
            outer = json.loads(envelope)
        except (TypeError, ValueError):
            raise TokenDecryptionError(
                f"{label} is not an encrypted envelope (corrupted or written by something else); it was left "
                "untouched. Delete it and re-run the papertrail_authorize DAG if it cannot be restored."
            ) from None
        if not isinstance(outer, dict) or outer.get("v") != ENVELOPE_VERSION or "ciphertext" not in outer:
            raise TokenDecryptionError(
                f"{label} has an unknown envelope format (version {outer.get('v') if isinstance(outer, dict) else None!r}); "
                "it was left untouched. Upgrade airflow-provider-papertrail or re-run the papertrail_authorize DAG."
            )
        try:
            inner = json.loads(self._fernet.decrypt(str(outer["ciphertext"]).encode("ascii")))
        except (InvalidToken, UnicodeEncodeError, ValueError):
            raise TokenKeyMismatch(
                f"{label} cannot be decrypted with any key in [papertrail] token_encryption_keys (wrong or rotated-out "
                "key, or corrupted value); it was left untouched. Add the key it was written with to the list, "
                "or re-run the papertrail_authorize DAG."
            ) from None
        if not isinstance(inner, dict) or inner.get("conn_id") != conn_id or inner.get("kind") != kind:
            raise TokenDecryptionError(
                f"{label} holds an envelope that belongs to connection {inner.get('conn_id') if isinstance(inner, dict) else None!r} "
                "(copied between Variables?); refusing to use it. It was left untouched; re-run the "
                "papertrail_authorize DAG for this connection."
            )
        payload = inner.get("payload")
        if not isinstance(payload, dict):
            raise TokenDecryptionError(
                f"{label} decrypted to an unexpected payload; it was left untouched. "
                "Re-run the papertrail_authorize DAG to replace it."
            )
        return payload

    def is_current(self, envelope: str) -> bool:
        """Whether ``envelope`` is encrypted with the first (primary) key already."""
        try:
            self._primary.decrypt(str(json.loads(envelope)["ciphertext"]).encode("ascii"))
        except (InvalidToken, UnicodeEncodeError, ValueError, TypeError, KeyError):
            return False
        return True

    def same_content(self, kind: str, conn_id: str, first: str, second: str) -> bool:
        """Whether two envelopes hold the same payload (one a re-encryption of the other, e.g.
        by ``rotate-keys`` between a write and its read-back)."""
        try:
            return self.open(kind, conn_id, first) == self.open(kind, conn_id, second)
        except TokenDecryptionError:
            return False

    def rotate(self, envelope: str) -> str:
        """Re-encrypt an envelope under the first (primary) key, without looking at its content."""
        outer = json.loads(envelope)
        outer["ciphertext"] = self._fernet.rotate(str(outer["ciphertext"]).encode("ascii")).decode("ascii")
        return json.dumps(outer, separators=(",", ":"))


class TicketError(Exception):
    """A coordinator ticket is forged, expired, or for another purpose."""


class StaleTicket(TicketError):
    """A genuine ticket (our keys made it) that is older than the receiver accepts."""


def seal_ticket(cipher: TokenCipher, purpose: str, payload: dict[str, Any]) -> str:
    """A short-lived authenticated message between our own components (worker <-> api-server).

    Only holders of ``[papertrail] token_encryption_keys`` can make or read one; Fernet's
    timestamp bounds its age on the receiving side.
    """
    body = json.dumps({"purpose": purpose, "payload": payload}, separators=(",", ":"))
    return cipher._fernet.encrypt(body.encode("utf-8")).decode("ascii")


def open_ticket(cipher: TokenCipher, purpose: str, ticket: str, *, ttl: int = 60) -> dict[str, Any]:
    """The payload of ``ticket``; :class:`StaleTicket` when it is genuine but older than ``ttl`` s."""
    try:
        raw = ticket.encode("ascii")
        body = json.loads(cipher._fernet.decrypt(raw, ttl=ttl))
    except (InvalidToken, UnicodeEncodeError, ValueError, TypeError):
        try:
            cipher._fernet.decrypt(ticket.encode("ascii"))  # genuine, only too old?
        except (InvalidToken, UnicodeEncodeError, ValueError, TypeError, AttributeError):
            raise TicketError("invalid ticket") from None
        raise StaleTicket(f"ticket older than {ttl} s") from None
    if not isinstance(body, dict) or body.get("purpose") != purpose or not isinstance(body.get("payload"), dict):
        raise TicketError("ticket for another purpose")
    return body["payload"]
