"""Where a person fixes a grant: the Connect page on Airflow's api-server.

The Connect page (``/papertrail/connections`` on the api-server, also linked from Airflow's
navigation) lists every Papertrail-ai connection with its grant health and a Connect /
Reconnect button. It is the link every re-authorization message and alert carries, and the
URL a user registers as QuickBooks' "Reconnect URL".

``[papertrail] connect_page_url`` overrides it (e.g. the address people reach through a
proxy); otherwise it is ``[api] base_url`` + ``/papertrail/connections``. Without either,
the path alone is returned (still useful in a log next to the Airflow address people know).
"""

from __future__ import annotations

from urllib.parse import quote

CONNECT_PATH = "/papertrail/connections"


def connect_page_url(conn_id: str | None = None) -> str:
    """The Connect page, optionally pointing at one connection's row (``#conn-<conn_id>``)."""
    base = _configured()
    if conn_id:
        return f"{base}#conn-{quote(conn_id, safe='')}"
    return base


def _configured() -> str:
    try:
        from airflow.configuration import conf
    except Exception:  # outside Airflow (a bare unit test): the path is still meaningful
        return CONNECT_PATH
    explicit = conf.get("papertrail", "connect_page_url", fallback=None)
    if explicit:
        return str(explicit).rstrip("/")
    base_url = conf.get("api", "base_url", fallback=None)
    if base_url:
        return str(base_url).rstrip("/") + CONNECT_PATH
    return CONNECT_PATH
