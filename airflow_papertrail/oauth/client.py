"""Token endpoint client: code exchange, refresh and a credential probe."""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from airflow_papertrail.exceptions import (
    InvalidClientError,
    InvalidGrantError,
    OAuthError,
    RefreshOutcomeUnknown,
    TransientOAuthError,
    sanitize_description,
)
from airflow_papertrail.oauth.authorize import (
    DEFAULT_AUTHORIZATION_TTL,
    AuthorizationRequest,
    build_authorization_request,
)
from airflow_papertrail.oauth.retry import RetryPolicy
from airflow_papertrail.oauth.tokens import Token

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from urllib3.util.retry import Retry

    from airflow_papertrail.oauth.config import OAuthClientConfig

log = logging.getLogger(__name__)

USER_AGENT = "airflow-provider-papertrail"


def _never_sent(exc: BaseException) -> bool:
    """Whether a requests exception proves the request never reached the server."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (NewConnectionError, ConnectTimeoutError)):
            return True
        reason = getattr(cur, "reason", None)
        if isinstance(reason, BaseException):
            cur = reason
            continue
        args = getattr(cur, "args", ())
        nxt = next((a for a in args if isinstance(a, BaseException)), None)
        cur = nxt or cur.__cause__ or cur.__context__
    return False


class _HeaderAuth(AuthBase):
    """Sets the client authentication headers (or none): the presence of an auth object stops
    requests from replacing them with ``~/.netrc`` credentials."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.pop("Authorization", None)
        request.headers.update(self.headers)
        return request


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :meth:`OAuthClient.probe`: whether the token endpoint accepted the client."""

    ok: bool
    message: str
    status: int | None = None
    error: str | None = None


class OAuthClient:
    """Talks to the Papertrail-ai token endpoint for one client configuration.

    :param config: the validated client configuration.
    :param retry_policy: the shared retry policy.
    :param clock: returns epoch seconds; injectable for tests.
    :param on_secret: called with every sensitive value as soon as it exists (the hook
        passes Airflow's ``mask_secret``), so nothing secret can be logged afterwards.
    """

    def __init__(
        self,
        config: OAuthClientConfig,
        *,
        retry_policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        on_secret: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.retry_policy = retry_policy or RetryPolicy()
        self.clock = clock
        self._on_secret = on_secret
        self._sessions: dict[str, requests.Session] = {}
        self._lock = threading.Lock()
        self.protect(config.client_secret)

    # -- secrets -----------------------------------------------------------------------
    def protect(self, *values: str | None) -> None:
        """Hand sensitive values to the masker before anything could print them."""
        if self._on_secret is None:
            return
        for value in values:
            if value:
                self._on_secret(value)

    # -- authorization request -----------------------------------------------------------
    def authorization_request(
        self, *, ttl: float = DEFAULT_AUTHORIZATION_TTL, extra_params: Mapping[str, str] | None = None
    ) -> AuthorizationRequest:
        request = build_authorization_request(self.config, now=self.clock(), ttl=ttl, extra_params=extra_params)
        # The verifier is secret. The state is not: it travels in the consent URL that a
        # person must be given (and that is logged); it only has to be unguessable and
        # single use, which the callback enforces.
        self.protect(request.code_verifier)
        return request

    # -- token endpoint ------------------------------------------------------------------
    def exchange_code(self, code: str, *, code_verifier: str | None = None, redirect_uri: str | None = None) -> Token:
        """Redeem an authorization code once (RFC 6749 4.1.3).

        :param redirect_uri: the ``redirect_uri`` of the authorization request that produced
            ``code`` (RFC 6749 4.1.3 requires the identical value). Pass the one saved with the
            pending authorization, so that editing the connection in between changes nothing;
            defaults to the configuration's.
        """
        self.protect(code, code_verifier)
        token = self.exchange_code_unmasked(code, code_verifier=code_verifier, redirect_uri=redirect_uri)
        self.protect(*token.secrets)
        return token

    def exchange_code_unmasked(
        self, code: str, *, code_verifier: str | None = None, redirect_uri: str | None = None
    ) -> Token:
        """:meth:`exchange_code` without calling ``on_secret``, for threads that must not touch the
        masker's channel (the triggerer); the caller masks ``code``, verifier and tokens itself."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri or self.config.redirect_uri or "",
        }
        if code_verifier:
            form["code_verifier"] = code_verifier
        self.config.validate(need_redirect_uri=not redirect_uri)
        status, payload = self._post(form, "exchange", self.retry_policy.for_code_exchange())
        return Token.from_response(payload, now=self.clock(), requested_scope=self.config.scope, status=status)

    def refresh(self, refresh_token: str, *, previous: Token | None = None) -> Token:
        """Use a refresh token once (RFC 6749 6).

        Never replayed after the request may have reached the server: a lost response
        raises :class:`RefreshOutcomeUnknown` and the caller must re-read its token store.
        """
        self.protect(refresh_token)
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        status, payload = self._post(form, "refresh", self.retry_policy.for_refresh(), refresh=True)
        try:
            token = Token.from_response(payload, now=self.clock(), previous=previous, status=status)
        except OAuthError as exc:
            # A 2xx we cannot use may still have rotated the refresh token at the server.
            raise RefreshOutcomeUnknown(
                f"the token endpoint answered HTTP {status} to a refresh but the answer is unusable ({exc.description}); "
                "the refresh token may or may not have been rotated, so it is not replayed automatically"
            ) from None
        self.protect(*token.secrets)
        return token

    def probe(self) -> ProbeResult:
        """Check the client credentials without spending any code or token.

        Sends an authorization-code request with a made-up code: a server that knows the
        client answers ``invalid_grant``; one that does not answers ``invalid_client``/401.
        """
        fake_code = "papertrail-connection-test-" + secrets.token_urlsafe(16)
        form = {"grant_type": "authorization_code", "code": fake_code, "redirect_uri": self.config.redirect_uri or ""}
        url = self.config.effective_token_url
        try:
            status, _payload = self._post(form, "probe", self.retry_policy.for_probe())
        except InvalidGrantError as exc:
            return ProbeResult(
                True, f"credentials accepted by {url} (a test code was refused as expected)", exc.status, exc.error
            )
        except InvalidClientError as exc:
            return ProbeResult(
                False, f"client rejected by {url}: {exc.description or exc.error}. {exc.hint}", exc.status, exc.error
            )
        except OAuthError as exc:
            if exc.error in ("invalid_request", "unauthorized_client"):
                return ProbeResult(
                    False, f"{url} answered {exc.error!r}: {exc.description}. {exc.hint}", exc.status, exc.error
                )
            return ProbeResult(False, f"unexpected answer from {url}: {exc}", exc.status, exc.error)
        except TransientOAuthError as exc:
            return ProbeResult(False, f"could not reach the token endpoint: {exc}", exc.status)
        return ProbeResult(
            False,
            f"{url} accepted a made-up authorization code (HTTP {status}); is this really the token endpoint?",
            status,
        )

    # -- transport -----------------------------------------------------------------------
    def _session(self, kind: str, retry: Retry) -> requests.Session:
        with self._lock:
            session = self._sessions.get(kind)
            if session is None:
                session = requests.Session()
                adapter = HTTPAdapter(max_retries=retry)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
                session.trust_env = True
                self._sessions[kind] = session
            return session

    def _client_auth(self, form: dict[str, str]) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.config.client_auth_method == "client_secret_basic":
            # RFC 6749 2.3.1: form-urlencode id and secret before base64.
            raw = f"{quote(self.config.client_id, safe='')}:{quote(self.config.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(raw.encode("utf-8")).decode("ascii")
        else:
            form["client_id"] = self.config.client_id
            form["client_secret"] = self.config.client_secret
        return headers

    def _post(self, form: dict[str, str], kind: str, retry: Retry, *, refresh: bool = False) -> tuple[int, Any]:
        form = dict(form)
        headers = self._client_auth(form)
        url = self.config.effective_token_url
        session = self._session(kind, retry)
        try:
            response = session.post(
                url,
                data=form,
                # Given as an auth object, never as a plain header: with trust_env, requests would
                # otherwise apply ~/.netrc credentials for the token host on top of ours.
                auth=_HeaderAuth(headers),
                timeout=self.config.timeout,
                verify=self.config.verify,
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as exc:
            raise TransientOAuthError(
                f"TLS verification of {url} failed ({type(exc).__name__}); if the server uses a private CA, "
                "set ca_bundle in the connection extra (verification is never switched off)"
            ) from None
        except requests.exceptions.RequestException as exc:
            what = type(exc).__name__
            if refresh and not _never_sent(exc):
                raise RefreshOutcomeUnknown(
                    f"the refresh request to {url} may have reached the server but no answer arrived ({what}); "
                    "it is not replayed automatically because the server may already have rotated the refresh token"
                ) from None
            raise TransientOAuthError(
                f"could not reach the Papertrail-ai token endpoint {url} after retries ({what}); "
                "check the network/proxy and the token_url, then retry"
            ) from None
        return self._interpret(response, refresh=refresh)

    def _interpret(self, response: requests.Response, *, refresh: bool) -> tuple[int, Any]:
        status = response.status_code
        try:
            payload: Any = response.json()
        except ValueError:
            payload = None
        if 200 <= status < 300:
            if payload is None:
                if refresh:
                    raise RefreshOutcomeUnknown(
                        f"the token endpoint answered HTTP {status} to a refresh, but not with JSON; the refresh token "
                        "may or may not have been rotated, so it is not replayed automatically"
                    )
                raise OAuthError("invalid_response", "the token endpoint did not answer JSON", status)
            return status, payload
        error = payload.get("error") if isinstance(payload, dict) else None
        description = payload.get("error_description") if isinstance(payload, dict) else None
        if status == 429 or status >= 500:
            retry_after = response.headers.get("Retry-After")
            hint = f"; the server asked to wait {sanitize_description(retry_after, 40)} s" if retry_after else ""
            if refresh and status >= 500:
                raise RefreshOutcomeUnknown(
                    f"the token endpoint answered HTTP {status} to a refresh; the refresh token may or may not "
                    "have been rotated, so it is not replayed automatically"
                )
            raise TransientOAuthError(
                f"the Papertrail-ai token endpoint is unavailable (HTTP {status}) after retries{hint}; retry later",
                status,
            )
        if error == "invalid_client" or (status == 401 and error in (None, "unauthorized")):
            raise InvalidClientError(error or "invalid_client", description, status)
        if error == "invalid_grant":
            raise InvalidGrantError(error, description, status)
        if error:
            raise OAuthError(str(error), description, status)
        raise OAuthError(
            "invalid_response",
            f"unexpected HTTP {status} without an OAuth error (is token_url the token endpoint?)",
            status,
        )

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()
