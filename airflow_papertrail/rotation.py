"""Re-encrypt every stored grant and pending authorization under the first configured key.

What ``airflow papertrail rotate-keys`` (and ``papertrail rotate-keys``) runs. It needs the
metadata DB (the api-server's or scheduler's host, not a Task SDK worker): each Variable is
re-encrypted inside the same row lock the refresh coordinator takes
(:class:`~airflow_papertrail.plugins.locking.OrmEntryAccess`: a no-op ``UPDATE`` + ``SELECT
... FOR UPDATE``), reading the value under the lock and writing it back in the same
transaction. A refresh that stores a newer generation meanwhile either commits before (the
rotation then reads and re-encrypts the newer grant) or waits for the rotation's commit and
writes after it: an older re-encrypted grant never overwrites a newer one. Re-encryption
keeps the content byte for byte (a refresh claim in progress stays valid), so a writer that
reads its value back finds the same grant (``TokenCipher.same_content``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from airflow_papertrail.authorization import PENDING_KIND, PENDING_VARIABLE_PREFIX
from airflow_papertrail.exceptions import PapertrailError
from airflow_papertrail.token_store import GRANT_KIND, GRANT_VARIABLE_PREFIX

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_papertrail.oauth.envelope import TokenCipher
    from airflow_papertrail.plugins.locking import EntryAccess
    from airflow_papertrail.token_store import VariableBackend

log = logging.getLogger(__name__)

ROTATED = "rotated"
WOULD_ROTATE = "would rotate"
CURRENT = "already current"
UNDECRYPTABLE = "undecryptable"
GONE = "gone"


@dataclass(frozen=True)
class RotationResult:
    """What ``rotate-keys`` did with one Variable; ``error`` is our own message (no secret)."""

    variable: str
    kind: str
    conn_id: str | None
    outcome: str
    generation: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stored_variable_keys(prefix: str) -> list[str]:
    """Keys of the metadata DB's Variables that start with ``prefix`` (sorted)."""
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        keys = session.scalars(select(Variable.key).where(Variable.key.startswith(prefix, autoescape=True))).all()
    return sorted(str(k) for k in keys if str(k).startswith(prefix))


def _rotate_one(
    key: str,
    kind: str,
    bound_to: str,
    *,
    cipher: TokenCipher,
    entries: EntryAccess,
    dry_run: bool,
    only_conn: str | None = None,
) -> tuple[RotationResult | None, str | None]:
    """Rotate one Variable under its row lock; also returns the value it holds afterwards.
    (None, None): an authorization of another connection than ``only_conn``, left alone."""
    label = "grant" if kind == GRANT_KIND else "authorization"
    with entries.locked(key) as entry:
        raw = entry.raw
        if not raw:
            return RotationResult(key, label, None, GONE), None
        try:
            payload = cipher.open(kind, bound_to, raw, where=f"Variable {key!r}")
        except PapertrailError as exc:
            return RotationResult(
                key, label, bound_to if kind == GRANT_KIND else None, UNDECRYPTABLE, error=str(exc)
            ), None
        conn_id = bound_to if kind == GRANT_KIND else str(payload.get("conn_id") or "") or None
        generation = payload.get("generation") if kind == GRANT_KIND else None
        if only_conn is not None and conn_id != only_conn:
            return None, None
        if cipher.is_current(raw):
            return RotationResult(key, label, conn_id, CURRENT, generation), raw
        if dry_run:
            return RotationResult(key, label, conn_id, WOULD_ROTATE, generation), raw
        rotated = cipher.rotate(raw)
        entry.write(rotated)
    return RotationResult(key, label, conn_id, ROTATED, generation), rotated


def rotate_all(
    *,
    cipher: TokenCipher | None = None,
    entries: EntryAccess | None = None,
    conn_id: str | None = None,
    dry_run: bool = False,
    backend: VariableBackend | None = None,
    list_keys: Callable[[str], list[str]] = stored_variable_keys,
) -> list[RotationResult]:
    """Re-encrypt every grant (or ``conn_id``'s) and every pending authorization (or those of
    ``conn_id``) with the first key of ``[papertrail] token_encryption_keys``.

    A Variable no configured key opens is reported (``undecryptable``, with the reason) and
    left untouched. A grant with no recorded health gets it recorded (``health.py``).
    ``entries``, ``backend`` and ``list_keys`` default to the metadata DB (row lock, ORM
    Variables, a key-prefix query).
    """
    from airflow_papertrail.health import NOT_RECORDED, read_health
    from airflow_papertrail.plugins.locking import OrmEntryAccess
    from airflow_papertrail.token_store import OrmVariables, VariableTokenStore, load_cipher

    cipher = cipher or load_cipher()
    entries = entries or OrmEntryAccess()
    results: list[RotationResult] = []
    grant_keys = list_keys(GRANT_VARIABLE_PREFIX)
    if conn_id is not None:
        grant_keys = [k for k in grant_keys if k == f"{GRANT_VARIABLE_PREFIX}{conn_id}"]
    backend = backend or OrmVariables()
    for key in grant_keys:
        grant_conn = key[len(GRANT_VARIABLE_PREFIX) :]
        result, value = _rotate_one(key, GRANT_KIND, grant_conn, cipher=cipher, entries=entries, dry_run=dry_run)
        assert result is not None
        results.append(result)
        if value is not None and not dry_run and read_health(grant_conn, backend=backend).state == NOT_RECORDED:
            store = VariableTokenStore(grant_conn, cipher=cipher, backend=backend)
            store.record_health(store.decode(value))  # outside the lock: health is a Variable of its own
    for key in list_keys(PENDING_VARIABLE_PREFIX):
        authorization_id = key[len(PENDING_VARIABLE_PREFIX) :]
        result, _ = _rotate_one(
            key, PENDING_KIND, authorization_id, cipher=cipher, entries=entries, dry_run=dry_run, only_conn=conn_id
        )
        if result is not None:  # an undecryptable one is reported even with conn_id: whose it is is unknown
            results.append(result)
    for result in results:
        log.debug("rotate-keys: %s %s", result.variable, result.outcome)
    return results
