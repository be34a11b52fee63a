"""Client configuration for one Papertrail-ai connection, and its validation."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from airflow_papertrail.exceptions import PapertrailConfigurationError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://www.papertrail-ai.com"
AUTHORIZE_PATH = "/api/authorize.php"
TOKEN_PATH = "/api/token.php"
API_PATH = "/api"

#: Accounting systems named in the Papertrail-ai README. Others are accepted with a warning
#: (later README versions mention Wave and Syspro).
KNOWN_SYSTEMS: tuple[str, ...] = ("freeagent", "freshbooks", "quickbooks", "sage_sa", "sage_uk", "xero", "zoho")

CLIENT_AUTH_METHODS: tuple[str, ...] = ("client_secret_post", "client_secret_basic")

DEFAULT_TIMEOUT = 30.0
DEFAULT_LEEWAY = 120.0


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` names this machine (plain HTTP is tolerated only there, RFC 8252 7.3)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(name: str, url: str, *, allow_query: bool = True) -> list[str]:
    """Return the problems of an absolute URL that must be https (or http on loopback)."""
    problems: list[str] = []
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return [f"{name} {url!r} is not a valid URL"]
    if parts.scheme not in ("http", "https") or not host:
        return [f"{name} must be an absolute http(s) URL, got {url!r}"]
    if parts.scheme == "http" and not is_loopback_host(host):
        problems.append(
            f"{name} {url!r} uses plain http; Papertrail-ai requires https "
            "(http is accepted only for loopback addresses such as 127.0.0.1 during local development)"
        )
    if parts.fragment:
        problems.append(f"{name} must not contain a fragment ('#...'), got {url!r}")
    if not allow_query and parts.query:
        problems.append(f"{name} must not contain a query string, got {url!r}")
    return problems


@dataclass(frozen=True, repr=False)
class OAuthClientConfig:
    """Everything the OAuth core needs to talk to Papertrail-ai for one connection.

    The ``repr`` never shows the client secret.
    """

    client_id: str
    client_secret: str
    redirect_uri: str | None = None
    scope: str = ""
    system: str | None = None
    base_url: str = DEFAULT_BASE_URL
    authorize_url: str | None = None
    token_url: str | None = None
    api_url: str | None = None
    client_auth_method: str = "client_secret_post"
    use_pkce: bool = True
    issuer: str | None = None
    ca_bundle: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    leeway: float = DEFAULT_LEEWAY
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __repr__(self) -> str:
        return (
            f"OAuthClientConfig(client_id={self.client_id!r}, redirect_uri={self.redirect_uri!r}, "
            f"system={self.system!r}, token_url={self.effective_token_url!r}, client_secret='***')"
        )

    @property
    def effective_authorize_url(self) -> str:
        return self.authorize_url or self.base_url.rstrip("/") + AUTHORIZE_PATH

    @property
    def effective_token_url(self) -> str:
        return self.token_url or self.base_url.rstrip("/") + TOKEN_PATH

    @property
    def effective_api_url(self) -> str:
        """Directory URL of the data modules; ``api_<module>.php`` is appended to it."""
        return (self.api_url or self.base_url.rstrip("/") + API_PATH).rstrip("/")

    def binding(self) -> dict[str, str]:
        """What a grant is issued for: the client and the hosts that see its secrets.

        Stored with every grant: if the connection's endpoints are edited after consent, the
        refresh token, the client secret and the bearer token are never sent to the new ones.
        """
        api = urlsplit(self.effective_api_url)
        return {
            "client_id": self.client_id,
            "token_url": self.effective_token_url,
            "api_origin": f"{api.scheme}://{api.netloc}".lower(),
        }

    @property
    def verify(self) -> str | bool:
        """What ``requests`` gets as ``verify``: TLS is always verified, optionally with a CA bundle."""
        return self.ca_bundle or True

    def problems(self, *, need_redirect_uri: bool = True) -> list[str]:
        """Every configuration problem, as sentences that say how to fix them."""
        problems: list[str] = []
        if not self.client_id:
            problems.append("the client ID is missing: put the app's client ID in the connection's Login field")
        if not self.client_secret:
            problems.append(
                "the client secret is missing: put the app's client secret in the connection's Password field"
            )
        if self.client_auth_method not in CLIENT_AUTH_METHODS:
            problems.append(
                f"client_auth_method {self.client_auth_method!r} is not supported; "
                f"use one of {', '.join(CLIENT_AUTH_METHODS)}"
            )
        if need_redirect_uri and not self.redirect_uri:
            problems.append(
                "redirect_uri is missing: set it in the connection's extra to the exact URI registered "
                "with Papertrail-ai (e.g. https://airflow.example.com/papertrail/callback)"
            )
        elif self.redirect_uri:
            problems.extend(check_url("redirect_uri", self.redirect_uri))
            path = urlsplit(self.redirect_uri).path
            if path.endswith("/papertrail/callback/"):
                problems.append(
                    f"redirect_uri {self.redirect_uri!r} ends with a slash, but the callback route is "
                    f"{path.rstrip('/')!r}: register and set the URI without the trailing slash (the route never "
                    "redirects, since the redirect would carry the authorization code)"
                )
        if need_redirect_uri and not self.system:
            problems.append(
                "system is missing: set the connection extra 'system' to the accounting system to connect "
                f"({', '.join(KNOWN_SYSTEMS)})"
            )
        for name, url in (
            ("base URL (host)", self.base_url),
            ("authorize_url", self.effective_authorize_url),
            ("token_url", self.effective_token_url),
            ("api_url", self.effective_api_url),
        ):
            problems.extend(check_url(name, url))
        if self.issuer:
            problems.extend(check_url("issuer", self.issuer))
        if not (0 < self.timeout <= 600):
            problems.append(f"timeout must be between 0 and 600 seconds, got {self.timeout!r}")
        if not (0 <= self.leeway <= 3600):
            problems.append(f"leeway must be between 0 and 3600 seconds, got {self.leeway!r}")
        return problems

    def validate(self, *, need_redirect_uri: bool = True, conn_id: str | None = None) -> OAuthClientConfig:
        """Raise :class:`PapertrailConfigurationError` listing every problem; return self when valid."""
        problems = self.problems(need_redirect_uri=need_redirect_uri)
        if problems:
            where = f"Papertrail-ai connection {conn_id!r}" if conn_id else "Papertrail-ai configuration"
            raise PapertrailConfigurationError(f"{where} is invalid: " + "; ".join(problems) + ".")
        return self


def system_warnings(system: str | None) -> tuple[str, ...]:
    """Warnings (not errors) for an accounting system we do not know yet."""
    if system and system not in KNOWN_SYSTEMS:
        return (
            f"system {system!r} is not one of the documented systems ({', '.join(KNOWN_SYSTEMS)}); "
            "it is passed through as given",
        )
    return ()
