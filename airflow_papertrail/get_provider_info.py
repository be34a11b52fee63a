"""Provider metadata: the single source of Airflow's connection form, config and registry.

Airflow 3.3 builds the connection form only from this dict (``conn-fields`` and
``ui-field-behaviour``); the hook's widget methods are ignored there, so they are not
defined at all. ``tests/unit/test_get_provider_info.py`` validates it against Airflow's
own ``provider_info.schema.json``.
"""

from __future__ import annotations

from typing import Any

from airflow_papertrail import __version__

SYSTEMS = ["freeagent", "freshbooks", "quickbooks", "sage_sa", "sage_uk", "xero", "zoho"]


def _field(label: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"label": label, "description": description, "schema": schema}


CONN_FIELDS: dict[str, dict[str, Any]] = {
    "redirect_uri": _field(
        "Redirect URI",
        "Exactly the URI registered with Papertrail-ai, e.g. https://airflow.example.com/papertrail/callback. "
        "https is required (http only for 127.0.0.1/localhost). Never derived from request headers.",
        {"type": ["string", "null"]},
    ),
    "scope": _field(
        "Scope",
        "Space-separated scope values requested at consent.",
        {"type": ["string", "null"]},
    ),
    "system": _field(
        "Accounting system",
        "One of " + ", ".join(SYSTEMS) + " (other values are passed through with a warning).",
        {"type": ["string", "null"], "examples": SYSTEMS},
    ),
    "client_auth_method": _field(
        "Client authentication",
        "client_secret_post (secret in the POST body, as Papertrail-ai documents) or client_secret_basic.",
        {
            "type": ["string", "null"],
            "enum": ["client_secret_post", "client_secret_basic"],
            "default": "client_secret_post",
        },
    ),
    "use_pkce": _field(
        "Use PKCE (S256)",
        "Send a PKCE S256 challenge with every authorization request.",
        {"type": ["boolean", "null"], "default": True},
    ),
    "authorize_url": _field(
        "Authorization URL override",
        "Default: <base URL>/api/authorize.php",
        {"type": ["string", "null"]},
    ),
    "token_url": _field(
        "Token URL override",
        "Default: <base URL>/api/token.php",
        {"type": ["string", "null"]},
    ),
    "api_url": _field(
        "Data API URL override",
        "Directory of the api_<module>.php files. Default: <base URL>/api",
        {"type": ["string", "null"]},
    ),
    "issuer": _field(
        "Expected issuer (iss)",
        "If set, an iss parameter on the OAuth callback must equal this value (RFC 9207).",
        {"type": ["string", "null"]},
    ),
    "ca_bundle": _field(
        "CA bundle path",
        "PEM file of extra trusted CAs (TLS is always verified).",
        {"type": ["string", "null"]},
    ),
    "leeway": _field(
        "Refresh leeway (seconds)",
        "Refresh the access token this long before it expires.",
        {"type": ["number", "null"], "default": 120},
    ),
    "timeout": _field(
        "HTTP timeout (seconds)",
        "Connect and read timeout of every request.",
        {"type": ["number", "null"], "default": 30},
    ),
}

UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["schema", "port"],
    "relabeling": {"login": "Client ID", "password": "Client Secret", "host": "Base URL"},
    "placeholders": {
        "login": "client ID from the Papertrail-ai app registration",
        "password": "client secret (stored encrypted by Airflow, never shown)",
        "host": "https://www.papertrail-ai.com",
        "redirect_uri": "https://airflow.example.com/papertrail/callback",
        "scope": "e.g. accounting.read accounting.write",
        "system": "xero",
    },
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-papertrail",
        "name": "Papertrail-ai",
        "description": "`Papertrail-ai <https://www.papertrail-ai.com>`__ accounting API (Xero, QuickBooks, Sage, "
        "Zoho, FreshBooks, FreeAgent) over OAuth 2 authorization code, with encrypted token custody.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Papertrail-ai",
                "external-doc-url": "https://www.papertrail-ai.com",
                "tags": ["service"],
            }
        ],
        "hooks": [{"integration-name": "Papertrail-ai", "python-modules": ["airflow_papertrail.hooks.papertrail"]}],
        "operators": [
            {
                "integration-name": "Papertrail-ai",
                "python-modules": [
                    "airflow_papertrail.operators.papertrail",
                    "airflow_papertrail.operators.grant_health",
                ],
            }
        ],
        "sensors": [{"integration-name": "Papertrail-ai", "python-modules": ["airflow_papertrail.sensors.papertrail"]}],
        "triggers": [
            {"integration-name": "Papertrail-ai", "python-modules": ["airflow_papertrail.triggers.papertrail"]}
        ],
        # `airflow papertrail grants|rotate-keys` (Airflow 3.2+ load provider CLI commands from here)
        "cli": ["airflow_papertrail.cli.get_cli_commands"],
        "plugins": [{"name": "papertrail", "plugin-class": "airflow_papertrail.plugins.papertrail.PapertrailPlugin"}],
        "connection-types": [
            {
                "connection-type": "papertrail",
                "hook-class-name": "airflow_papertrail.hooks.papertrail.PapertrailHook",
                "hook-name": "Papertrail-ai",
                "conn-fields": CONN_FIELDS,
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
            }
        ],
        "config": {
            "papertrail": {
                "description": "airflow-provider-papertrail: custody of OAuth grants.",
                "options": {
                    "token_encryption_keys": {
                        "description": "Comma-separated Fernet keys that encrypt Papertrail-ai grants stored in "
                        "Variables. The first key encrypts, all keys decrypt (put a new key first to rotate, "
                        "remove the old one once every grant was re-encrypted). Must be identical on every "
                        "Airflow component. Without a key nothing is stored.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "<Fernet.generate_key()>,<older key>",
                        "default": None,
                        "sensitive": True,
                    },
                    "refresh_coordinator": {
                        "description": "Who serializes token refreshes: 'auto' (the api-server plugin; one "
                        "refresh at a time per machine only when no coordinator can exist: the connection is "
                        "refused, or the api-server has no such route, as under dag.test(); and only where "
                        "every task runs on this machine: [core] executor LocalExecutor, a loopback "
                        "coordinator URL, not a KubernetesExecutor pod), 'api-server' "
                        "(required; workers fail rather than refresh alone) or 'local' (per machine only: "
                        "single-machine setups).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "api-server",
                        "default": "auto",
                    },
                    "connect_page_url": {
                        "description": "Address of the Connect page (grant health, Connect/Reconnect buttons) that "
                        "re-authorization errors and grant alerts link to, and that is registered as QuickBooks' "
                        "Reconnect URL. Default: [api] base_url + /papertrail/connections.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "https://airflow.example.com/papertrail/connections",
                        "default": None,
                    },
                    "coordinator_url": {
                        "description": "URL of the api-server's refresh route. Default: derived from [core] "
                        "execution_api_server_url (http://host:8080/execution/ -> http://host:8080/papertrail/token).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "http://airflow-apiserver:8080/papertrail/token",
                        "default": None,
                    },
                },
            }
        },
    }
