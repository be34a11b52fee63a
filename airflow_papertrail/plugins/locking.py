"""Exclusive read-modify-write of one Variable row in the metadata DB (api-server side)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterator


class LockedEntry(Protocol):
    raw: str | None

    def write(self, value: str) -> None: ...


class EntryAccess(Protocol):
    """``locked(key)`` yields the row's current value and a writer; commits on normal exit."""

    def locked(self, key: str) -> contextlib.AbstractContextManager[LockedEntry]: ...


class _OrmEntry:
    def __init__(self, row: object | None) -> None:
        self._row = row
        self.raw: str | None = None if row is None else row.val  # type: ignore[attr-defined]

    def write(self, value: str) -> None:
        assert self._row is not None
        self._row.val = value  # type: ignore[attr-defined]


class OrmEntryAccess:
    """Lock a Variable row for the length of one transaction.

    A no-op ``UPDATE`` comes first: on PostgreSQL/MySQL it takes the row lock, on SQLite
    (which ignores ``FOR UPDATE``) it takes the database write lock. Either way a second
    transaction on the same key, in any process, waits until this one commits.
    """

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[LockedEntry]:
        from airflow.models.variable import Variable
        from airflow.utils.session import create_session
        from sqlalchemy import select, update

        with create_session() as session:
            session.execute(update(Variable).where(Variable.key == key).values(is_encrypted=Variable.is_encrypted))
            row = session.scalar(select(Variable).where(Variable.key == key).with_for_update())
            yield _OrmEntry(row)
