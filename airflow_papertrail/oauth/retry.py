"""The one retry policy shared by every HTTP call path (token endpoint and data API).

Built on urllib3's :class:`~urllib3.util.retry.Retry` (no hand-written loops):

* connection errors (the request never left): always retried, bounded;
* 429 and 503: retried, honouring ``Retry-After`` up to ``max_retry_after`` seconds (a
  longer wait is not slept through: the call fails fast and says when to come back);
* 500, 502, 504 and lost responses (read errors/timeouts): retried only where a replay is
  harmless: the code exchange and read queries, never a refresh (the server, or a gateway's
  upstream, may already have rotated the token: the caller's lost-answer policy decides,
  see refresh.py) nor a write (no duplicate invoices);
* a refresh is re-sent automatically only after a connection error or a 429, the two
  answers that prove the server did not process it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

if TYPE_CHECKING:
    from typing_extensions import Self
    from urllib3.response import BaseHTTPResponse

RETRY_AFTER_STATUSES = frozenset({429, 503})
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Answers to a refresh that prove the server did not process it. Any 5xx may come after
#: the rotation (a crash after the commit, a gateway whose upstream processed it): those are
#: "outcome unknown" and never re-sent by urllib3.
REFRESH_RETRY_STATUSES = frozenset({429})


class CappedRetry(Retry):
    """A Retry that refuses to sleep longer than ``max_retry_after`` for one ``Retry-After``."""

    max_retry_after: float = 60.0

    def new(self, **kw: Any) -> Self:
        new = super().new(**kw)
        new.max_retry_after = self.max_retry_after
        return new

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> Self:
        if response is not None:
            retry_after = self.get_retry_after(response)
            if retry_after is not None and retry_after > self.max_retry_after:
                # With raise_on_status=False urllib3 hands the 429/503 back to the caller,
                # which reports the wait the server asked for.
                raise MaxRetryError(_pool, url or "", reason=None)
        return super().increment(method, url, response, error, _pool, _stacktrace)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    :param total: maximum number of retries of one call (connection + status + read).
    :param backoff_factor: first backoff in seconds, doubled each retry.
    :param backoff_max: upper bound of one backoff sleep.
    :param max_retry_after: longest ``Retry-After`` that is honoured by sleeping.
    """

    total: int = 4
    backoff_factor: float = 0.5
    backoff_max: float = 30.0
    backoff_jitter: float = 0.25
    max_retry_after: float = 60.0

    def _retry(self, *, statuses: frozenset[int], read: int | bool) -> CappedRetry:
        retry = CappedRetry(
            total=self.total,
            connect=self.total,
            read=read,
            status=self.total,
            other=0,
            redirect=0,
            allowed_methods=frozenset({"GET", "POST", "HEAD"}),
            status_forcelist=statuses,
            backoff_factor=self.backoff_factor,
            backoff_max=self.backoff_max,
            backoff_jitter=self.backoff_jitter,
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
        )
        retry.max_retry_after = self.max_retry_after
        return retry

    def for_code_exchange(self) -> CappedRetry:
        """A code is worthless once its response is lost, so replaying it costs nothing."""
        return self._retry(statuses=TRANSIENT_STATUSES, read=self.total)

    def for_read(self) -> CappedRetry:
        """Idempotent data reads."""
        return self._retry(statuses=TRANSIENT_STATUSES, read=self.total)

    def for_refresh(self) -> CappedRetry:
        """Only what certainly did not rotate the token: connection errors and 429."""
        return self._retry(statuses=REFRESH_RETRY_STATUSES, read=0)

    def for_write(self) -> CappedRetry:
        """Writes are retried only when the request certainly never reached the server."""
        retry = self._retry(statuses=frozenset(), read=0)
        return retry.new(status=0, allowed_methods=frozenset({"GET", "HEAD"}))

    def for_probe(self) -> CappedRetry:
        """``test_connection`` answers fast: one connection retry, no waiting on 429."""
        return RetryPolicy(total=1, backoff_factor=0.1, max_retry_after=0).for_code_exchange()
