"""Airflow plugin: mounts the OAuth callback app on the api-server at ``/papertrail``, and
links its Connect page (``/papertrail/connections``) from the UI's Admin menu.

Registered twice on purpose: in ``get_provider_info()["plugins"]`` (provider metadata) and
as an ``airflow.plugins`` entry point, because Airflow 3.3 only loads provider-listed
plugins with ``[core] lazy_discover_providers = False``; the entry point makes
``pip install`` enough.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_papertrail.plugins.callback_app import create_app

#: The Connect page in the UI's navigation (Admin menu, next to Connections). The UI shows it
#: in an iframe at /plugin/papertrail-connections; ``href`` is relative to the UI's base URL
#: (no leading slash, plugins.rst), so it also works under an [api] base_url with a path.
CONNECT_VIEW = {
    "name": "Papertrail-ai connections",
    "href": "papertrail/connections",
    "destination": "nav",
    "category": "admin",
    "url_route": "papertrail-connections",
}


class PapertrailPlugin(AirflowPlugin):
    """Papertrail-ai OAuth callback (``GET /papertrail/callback``) and Connect page."""

    name = "papertrail"
    fastapi_apps = [
        {"app": create_app(), "url_prefix": "/papertrail", "name": "Papertrail-ai OAuth callback"},
    ]
    external_views = [CONNECT_VIEW]
