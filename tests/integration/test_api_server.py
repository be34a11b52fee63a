"""A real `airflow api-server` on loopback shows our connection form (REST metadata, and the
real React form driven by headless Chromium); `airflow providers list` lists us."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket

import pytest
import requests

from airflow_papertrail.hooks.papertrail import EXTRA_FIELDS, config_from_connection
from tests.conftest import remember_secrets
from tests.integration.conftest import BIN, REPO, airflow_env, run, start_api_server

DOCS_IMG = REPO / "docs" / "img"
SCREENSHOTS = ("connection-form-standard.png", "connection-form-extra.png")

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_server(airflow_db, session_dir):
    port = _free_port()
    env = airflow_env(AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True", AIRFLOW__API__PORT=str(port))
    with start_api_server(env, port, session_dir / f"api-server-{port}.log") as base:
        yield base


def test_hook_meta_lists_papertrail_fields(api_server):
    response = requests.get(f"{api_server}/ui/connections/hook_meta", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")  # not the UI page
    metas = {m["connection_type"]: m for m in response.json()}
    meta = metas["papertrail"]
    assert meta["hook_name"] == "Papertrail-ai"
    behaviour = meta["standard_fields"]
    assert behaviour["login"]["title"] == "Client ID"
    assert behaviour["password"]["title"] == "Client Secret"
    assert behaviour["host"]["title"] == "Base URL"
    assert behaviour["host"]["placeholder"] == "https://www.papertrail-ai.com"
    assert behaviour["port"]["hidden"] is True and behaviour["url_schema"]["hidden"] is True
    extra = meta["extra_fields"]
    # every extra the hook reads is a real form field, with its label
    assert set(extra) == set(EXTRA_FIELDS)
    assert extra["redirect_uri"]["schema"]["title"] == "Redirect URI"
    assert extra["client_auth_method"]["schema"]["enum"] == ["client_secret_post", "client_secret_basic"]
    assert extra["client_auth_method"]["value"] == "client_secret_post"
    assert extra["use_pkce"]["value"] is True


def test_providers_list_shows_the_provider(airflow_db):
    proc = run([str(BIN / "airflow"), "providers", "list", "-o", "json"], timeout=120)
    assert "airflow-provider-papertrail" in proc.stdout


def _chromium_or_skip() -> None:
    from tests.e2e.harness import CHROMIUM

    missing = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright Python package")
    if missing:
        reason = "the connection-form test needs " + " and ".join(missing)
        if os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}:
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)


def test_connection_form_in_the_real_ui(api_server, tmp_path):
    """A person adds a Papertrail-ai connection in Airflow's own form (headless Chromium): our
    fields are there with their labels, and what the form saves is a connection the hook accepts.

    It also takes the screenshots in docs/connection-fields.md: run with
    ``PAPERTRAIL_UPDATE_SCREENSHOTS=1`` to refresh docs/img/ from the real UI."""
    _chromium_or_skip()
    from airflow.models.connection import Connection

    from tests.e2e.harness import headless_chromium

    conn_id = "papertrail_from_the_form"
    remember_secrets("form-secret-value")  # the log canary checks it never reaches a log
    shots = tmp_path / "shots"
    shots.mkdir()
    with headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 2400})
        page.set_default_timeout(30_000)
        page.goto(f"{api_server}/connections", wait_until="networkidle")
        page.get_by_role("button", name="Add Connection").click()
        dialog = page.get_by_role("dialog")
        dialog.locator("input[name=connection_id]").fill(conn_id)
        dialog.get_by_role("combobox").fill("Papertrail")
        page.keyboard.press("Enter")
        # standard fields, relabelled by get_ui_field_behaviour (port/schema hidden)
        dialog.get_by_label("Client ID").fill("my-client-id")
        dialog.get_by_label("Client Secret").fill("form-secret-value")
        dialog.get_by_label("Base URL").fill("https://www.papertrail-ai.com")
        standard = dialog.inner_text()
        assert "Port" not in standard and "Schema" not in standard
        dialog.screenshot(path=str(shots / SCREENSHOTS[0]))
        # extra fields: every key the hook reads has an input named element_<key>
        dialog.get_by_text("Extra Fields", exact=True).click()
        dialog.get_by_text("Redirect URI").wait_for()
        rendered = set(re.findall(r'(?:id|name)="element_([a-z_]+)"', dialog.inner_html()))
        assert rendered == set(EXTRA_FIELDS)
        extra_text = dialog.inner_text()
        for label in ("Redirect URI", "Scope", "Accounting system", "Use PKCE (S256)", "Token URL override"):
            assert label in extra_text
        dialog.locator("[name=element_redirect_uri]").fill("https://airflow.example.com/papertrail/callback")
        dialog.locator("[name=element_scope]").fill("accounting.read")
        dialog.locator("[name=element_system]").fill("xero")
        dialog.screenshot(path=str(shots / SCREENSHOTS[1]))
        dialog.get_by_role("button", name="Save").click()
        dialog.wait_for(state="detached")

    for name in SCREENSHOTS:  # a real rendering, not a blank page
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (shots / name).stat().st_size > 20_000
    if os.environ.get("PAPERTRAIL_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(exist_ok=True)
        for name in SCREENSHOTS:
            shutil.copyfile(shots / name, DOCS_IMG / name)
    for name in SCREENSHOTS:
        assert (DOCS_IMG / name).is_file(), (
            f"docs/img/{name} missing: run this test with PAPERTRAIL_UPDATE_SCREENSHOTS=1"
        )

    conn = Connection.get_connection_from_secrets(conn_id)  # what the form wrote to the metadata DB
    assert conn.conn_type == "papertrail"
    assert conn.password == "form-secret-value"
    config = config_from_connection(conn).validate(conn_id=conn_id)
    assert config.client_id == "my-client-id"
    assert config.redirect_uri == "https://airflow.example.com/papertrail/callback"
    assert config.system == "xero" and config.use_pkce is True
    assert config.effective_token_url == "https://www.papertrail-ai.com/api/token.php"  # empty overrides fall back
