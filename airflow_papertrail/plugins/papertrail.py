"""Airflow plugin: mounts the OAuth callback app on the api-server at ``/papertrail``.

Registered twice on purpose: in ``get_provider_info()["plugins"]`` (provider metadata) and
as an ``airflow.plugins`` entry point, because Airflow 3.3 only loads provider-listed
plugins with ``[core] lazy_discover_providers = False``; the entry point makes
``pip install`` enough.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_papertrail.plugins.callback_app import create_app


class PapertrailPlugin(AirflowPlugin):
    """Papertrail-ai OAuth callback (``GET /papertrail/callback``)."""

    name = "papertrail"
    fastapi_apps = [
        {"app": create_app(), "url_prefix": "/papertrail", "name": "Papertrail-ai OAuth callback"},
    ]
