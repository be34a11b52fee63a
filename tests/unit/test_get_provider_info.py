from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import airflow
import jsonschema

from airflow_papertrail.get_provider_info import get_provider_info
from airflow_papertrail.hooks.papertrail import EXTRA_FIELDS, PapertrailHook


def test_provider_info_validates_against_airflows_schema():
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_package_name_matches_the_installed_distribution():
    # A mismatch makes Airflow 3.3 stop discovering every later provider.
    assert metadata.distribution("airflow-provider-papertrail").metadata["Name"] == get_provider_info()["package-name"]
    eps = metadata.entry_points(group="apache_airflow_provider")
    assert any(ep.value == "airflow_papertrail.get_provider_info:get_provider_info" for ep in eps)


def test_connection_type_declares_the_form():
    (conn,) = get_provider_info()["connection-types"]
    assert conn["connection-type"] == PapertrailHook.conn_type == "papertrail"
    assert conn["hook-name"] == PapertrailHook.hook_name == "Papertrail-ai"
    assert conn["hook-class-name"] == f"{PapertrailHook.__module__}.{PapertrailHook.__name__}"
    behaviour = conn["ui-field-behaviour"]
    assert behaviour["relabeling"] == {"login": "Client ID", "password": "Client Secret", "host": "Base URL"}
    assert set(behaviour["hidden-fields"]) == {"schema", "port"}
    assert behaviour["placeholders"]["host"] == "https://www.papertrail-ai.com"
    fields = conn["conn-fields"]
    # one list of extras: the form and the hook's parser must not drift apart
    assert set(fields) == set(EXTRA_FIELDS)
    for name, field in fields.items():
        assert field["label"] and field["description"], name
        assert "null" in field["schema"]["type"], name


def test_config_section_is_declared_and_sensitive():
    option = get_provider_info()["config"]["papertrail"]["options"]["token_encryption_keys"]
    assert option["sensitive"] is True and option["default"] is None


def test_providers_manager_discovers_us():
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    assert "airflow-provider-papertrail" in ProvidersManager().providers
    hook = ProvidersManagerTaskRuntime().hooks["papertrail"]
    assert hook.hook_class_name == "airflow_papertrail.hooks.papertrail.PapertrailHook"


def test_connection_fields_page_documents_every_field():
    """docs/connection-fields.md has a row for every field of the form, with the form's label."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "connection-fields.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| ")}
    conn_fields = get_provider_info()["connection-types"][0]["conn-fields"]
    assert set(conn_fields) == set(EXTRA_FIELDS)
    for key, field in conn_fields.items():
        assert field["label"] in rows, f"docs/connection-fields.md has no row labelled {field['label']!r}"
        assert f"extra `{key}`" in rows[field["label"]], f"row {field['label']!r} does not name extra {key!r}"
