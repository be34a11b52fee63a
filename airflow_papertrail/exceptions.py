"""Every error this provider raises.

One module, one base class. Messages say what happened *and what to do next*; they never
contain a token, code, PKCE verifier or client secret (only OAuth error codes, server
descriptions that were sanitised, HTTP statuses and connection ids).
"""

from __future__ import annotations

import re

from airflow_papertrail.links import connect_page_url

# Server-supplied descriptions are shown to users; keep them short and strip anything that
# looks like a long opaque value (a token echoed back by a misbehaving server).
_OPAQUE = re.compile(r"[A-Za-z0-9_\-\.~+/=]{24,}")


def sanitize_description(text: object, limit: int = 300) -> str:
    """Return a server-supplied text safe to put in a log line or exception message."""
    if text is None:
        return ""
    value = _OPAQUE.sub("[redacted]", str(text))
    value = "".join(ch if ch.isprintable() else " " for ch in value)
    return value[:limit]


class PapertrailError(Exception):
    """Base class of every error raised by airflow-provider-papertrail."""


class PapertrailConfigurationError(PapertrailError, ValueError):
    """The connection or the ``[papertrail]`` configuration is invalid; fix it and retry."""


class OAuthError(PapertrailError):
    """The authorization server answered with an OAuth 2 error (RFC 6749 section 5.2).

    :param error: the OAuth ``error`` code, e.g. ``invalid_grant``.
    :param description: the server's ``error_description`` (sanitised).
    :param status: the HTTP status of the response, when there was one.
    """

    hint = "Check the connection settings and the Papertrail-ai app registration."

    def __init__(
        self,
        error: str,
        description: str | None = None,
        status: int | None = None,
        *,
        conn_id: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.error = sanitize_description(error, 64) or "unknown_error"
        self.description = sanitize_description(description)
        self.status = status
        self.conn_id = conn_id
        if hint is not None:
            self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" for connection {self.conn_id!r}" if self.conn_id else ""
        status = f" (HTTP {self.status})" if self.status is not None else ""
        desc = f": {self.description}" if self.description else ""
        return f"Papertrail-ai OAuth error {self.error!r}{status}{where}{desc}. {self.hint}"


class InvalidClientError(OAuthError):
    """The token endpoint rejected the client credentials (``invalid_client`` / HTTP 401)."""

    hint = (
        "The client ID or client secret is wrong, or the client authentication method "
        "(client_secret_post / client_secret_basic) does not match the app registration: "
        "fix the login/password/client_auth_method of the connection."
    )


class InvalidGrantError(OAuthError):
    """The code or refresh token is invalid, expired, already used or revoked. Final: never retried."""

    hint = (
        "The authorization code or refresh token is no longer valid (expired, already used "
        "or revoked). Re-run the papertrail_authorize DAG to obtain a new grant."
    )


class ReauthorizationRequired(InvalidGrantError):
    """The stored grant is dead; a person has to consent again."""

    def __init__(self, conn_id: str, reason: str = "", *, error: str = "invalid_grant", status: int | None = None):
        super().__init__(
            error,
            reason,
            status,
            conn_id=conn_id,
            hint=(
                f"The Papertrail-ai grant of connection {conn_id!r} can no longer be used. "
                f"Reconnect it on the Connect page ({connect_page_url(conn_id)}), or trigger the "
                f"papertrail_authorize DAG with conn_id={conn_id!r}, and approve access again."
            ),
        )
        self.connect_url = connect_page_url(conn_id)


class TransientOAuthError(PapertrailError):
    """The server could not be reached or answered 429/5xx after all retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class RefreshOutcomeUnknown(TransientOAuthError):
    """A refresh request may have reached the server but its response was lost.

    With rotating refresh tokens the server may already have replaced the token we hold;
    replaying it could revoke the whole grant, so it is never retried blindly. Re-read
    the token store (another process may have stored the result) before trying again.
    """


class TokenStoreError(PapertrailError):
    """The encrypted token store could not be read or written."""


class EncryptionKeyMissing(TokenStoreError, PapertrailConfigurationError):
    """No ``[papertrail] token_encryption_keys`` configured; tokens are never stored in plaintext."""


class TokenDecryptionError(TokenStoreError):
    """The stored envelope cannot be decrypted (wrong key, corrupted, or foreign)."""


class TokenKeyMismatch(TokenDecryptionError):
    """No configured key opens the envelope (wrong or rotated-out key, or a corrupted ciphertext)."""


class TokenWriteVerificationError(TokenStoreError):
    """A token was written but reading it back gave something else (apache/airflow#68537)."""


class PapertrailApiError(PapertrailError):
    """A data-module call failed: the service refused it, or its answer was unusable.

    :param message: what happened and what to do next (never a token).
    :param status: the HTTP status, when an answer arrived.
    :param error: the service's error code (``invalid_query``, ...) when it sent one.
    :param module: the module called.
    :param query: the query called.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        module: str | None = None,
        query: str | None = None,
    ) -> None:
        self.status = status
        self.error = error
        self.module = module
        self.query = query
        super().__init__(message)


class TransientApiError(PapertrailApiError):
    """The service could not be reached, or answered 429/5xx, after every allowed retry.

    Nothing was changed by the call (reads, or writes that certainly never left): trying
    again later is safe.
    """


class WriteOutcomeUnknown(PapertrailApiError):
    """A write may have reached the server, but its answer was lost or was an error.

    It was deliberately **not** retried: replaying it could create a duplicate (a second
    invoice, a second payment). Check the accounting system for the record before trying
    again.
    """


class WriteAnswerUnreadable(PapertrailApiError):
    """A write was **done** (the service answered 2xx) but its answer could not be read.

    Never retried and never resent: the record exists in the accounting system. Look it up
    there (the answer would have carried its id).
    """


class AnswerRefused(PapertrailApiError):
    """An answer that cannot be taken as a complete success, although its HTTP status says so.

    ``error`` tells which: ``error_envelope`` (the body reports an error), ``paged_answer``
    (it announces more records than it carried), ``records_not_found`` (no ``data`` member,
    but arrays elsewhere: set ``records_path``). Nothing was written to the destination.
    """


class GrantsNeedReauthorization(PapertrailError):
    """The grant health task found dead grants (or could not check some): raised after notifying.

    :param message: which connections, why, and the Connect page link.
    :param conn_ids: the connections whose grant needs re-authorization.
    :param failed_conn_ids: the connections that could not be checked.
    """

    def __init__(self, message: str, *, conn_ids: list[str], failed_conn_ids: list[str] | None = None) -> None:
        self.conn_ids = list(conn_ids)
        self.failed_conn_ids = list(failed_conn_ids or [])
        self.connect_url = connect_page_url()
        super().__init__(message)
