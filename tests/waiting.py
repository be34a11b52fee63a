"""Waiting on a condition with a deadline: the only way tests wait for something to be ready.

Every wait in the suite goes through :func:`wait_until`, so no test sleeps "long enough" and
every wait ends with a message that says what never happened.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """:func:`wait_until` ran out of time (AssertionError: pytest shows it plainly)."""


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.2,
    message: str | Callable[[], str] = "",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` every ``interval`` s until it returns something truthy; return that.

    Raises :class:`WaitTimeout` with ``message`` (a string, or a callable evaluated at the time-out
    so it can describe the current state) after ``timeout`` s. Exceptions of the types in
    ``ignore`` count as "not yet" (the last one is chained to the time-out); others propagate,
    so a predicate can stop the wait early by raising (a process that died, say).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"timed out after {timeout:.1f} s: {text or predicate!r}") from last_error
        time.sleep(interval)  # the poll interval: the deadline above is what bounds the wait
