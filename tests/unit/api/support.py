"""Helpers shared by the data-access tests: a real access token from the emulator and a
DataClient with a fast retry policy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import requests

from airflow_papertrail.api.client import DataClient
from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig, RetryPolicy
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, remember_secrets

if TYPE_CHECKING:
    from airflow_papertrail.testing.emulator import PapertrailEmulator

#: Same shape as the production policy, with millisecond backoffs.
FAST = RetryPolicy(total=3, backoff_factor=0.01, backoff_max=0.05, backoff_jitter=0, max_retry_after=2)


def oauth_client(emu: PapertrailEmulator) -> OAuthClient:
    config = OAuthClientConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        scope="accounting.read accounting.write",
        system="xero",
        base_url=emu.base_url,
        timeout=5,
    )
    return OAuthClient(config, retry_policy=FAST)


class TokenSource:
    """A token provider like the hook's: exchanges a real code once, refreshes when forced."""

    def __init__(self, emu: PapertrailEmulator) -> None:
        self.oauth = oauth_client(emu)
        code = emu.issue_code(
            client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, scope="accounting.read accounting.write", system="xero"
        )
        self.token = self.oauth.exchange_code(code)
        remember_secrets(code, self.token.access_token, self.token.refresh_token)
        self.calls: list[bool] = []

    def __call__(self, force_refresh: bool) -> str:
        self.calls.append(force_refresh)
        if force_refresh:
            assert self.token.refresh_token
            self.token = self.oauth.refresh(self.token.refresh_token, previous=self.token)
            remember_secrets(self.token.access_token, self.token.refresh_token)
        return self.token.access_token


class Recorder:
    """A session factory whose sessions record every request that went out."""

    def __init__(self) -> None:
        self.requests: list[requests.PreparedRequest] = []

    def __call__(self) -> requests.Session:
        session = requests.Session()

        def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
            self.requests.append(response.request)

        session.hooks["response"].append(record)
        return session


def data_client(
    emu: PapertrailEmulator, provider: Any, *, policy: RetryPolicy = FAST, timeout: float = 5, **kwargs: Any
) -> DataClient:
    return DataClient(
        api_url=emu.base_url + "/api",
        default_system="xero",
        token_provider=provider,
        timeout=timeout,
        retry_policy=policy,
        **kwargs,
    )
