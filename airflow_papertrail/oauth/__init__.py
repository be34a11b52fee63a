"""Framework-free OAuth 2 client core for Papertrail-ai.

Nothing in this package imports Airflow: it is unit-testable alone and the Airflow-facing
pieces (hook, token store, plugin, trigger) sit on top of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_papertrail.oauth.authorize import (
    AuthorizationRequest,
    build_authorization_request,
    code_challenge_s256,
    new_code_verifier,
    new_state,
    states_match,
)
from airflow_papertrail.oauth.config import KNOWN_SYSTEMS, OAuthClientConfig
from airflow_papertrail.oauth.retry import RetryPolicy
from airflow_papertrail.oauth.tokens import Token

if TYPE_CHECKING:
    from airflow_papertrail.oauth.client import OAuthClient, ProbeResult


def __getattr__(name: str) -> Any:
    # The HTTP client (and ``requests``) loads only when used: DAG files that import our
    # operators and sensor stay cheap to parse.
    if name in ("OAuthClient", "ProbeResult"):
        from airflow_papertrail.oauth import client

        return getattr(client, name)
    raise AttributeError(name)


__all__ = [
    "KNOWN_SYSTEMS",
    "AuthorizationRequest",
    "OAuthClient",
    "OAuthClientConfig",
    "ProbeResult",
    "RetryPolicy",
    "Token",
    "build_authorization_request",
    "code_challenge_s256",
    "new_code_verifier",
    "new_state",
    "states_match",
]
