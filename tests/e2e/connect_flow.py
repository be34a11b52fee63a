"""Set-up and browser steps of the Connect page, shared by its E2E test and its benchmark.

* :func:`start_connect_stack`: a stack whose api-server uses
  :class:`tests.e2e.auth_managers.ConnectionReaderAuthManager` with users admin, viewer
  (may read connections) and user (may not), the ``papertrail_authorize`` and
  ``papertrail_query`` example DAGs, and a ``papertrail`` connection to the emulator.
* :class:`ConnectBrowser`: log in through Airflow's login form, open the page from the
  navigation, click Connect / Allow / Back, wait for a state.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet

from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.testing.emulator import EmulatorClient
from tests.conftest import remember_secrets
from tests.e2e.auth_managers import PASSWORDS_ENV
from tests.e2e.harness import REPO, AirflowStack, artifacts_dir

if TYPE_CHECKING:
    from pathlib import Path

    from playwright.sync_api import Browser, BrowserContext, FrameLocator, Page

    from airflow_papertrail.testing.emulator import PapertrailEmulator

AUTHORIZE_DAG = "papertrail_authorize"
QUERY_DAG = "papertrail_query"
CLIENT_ID = "connect-e2e-client"
CLIENT_SECRET = "connect-e2e-secret-" + "Zr4" * 8
#: A second connection that is never connected (the list shows both states).
OTHER_CONN_ID = "papertrail_sandbox"
AUTH_MANAGER = "tests.e2e.auth_managers.ConnectionReaderAuthManager"
remember_secrets(CLIENT_SECRET)


@dataclass
class ConnectStack:
    stack: AirflowStack
    emulator: PapertrailEmulator
    conn_id: str
    key: str
    passwords: dict[str, str] = field(default_factory=dict)

    def grant(self) -> dict[str, Any] | None:
        raw = self.stack.variable(f"papertrail_grant__{self.conn_id}")
        return None if raw is None else TokenCipher([self.key]).open("grant", self.conn_id, raw)

    def health(self) -> dict[str, Any] | None:
        raw = self.stack.variable(f"papertrail_health__{self.conn_id}")
        return None if raw is None else json.loads(raw)


def dags_folder(target: Path) -> Path:
    """Only the two example DAGs the flow needs (less for the dag-processor to parse)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (AUTHORIZE_DAG, QUERY_DAG):
        shutil.copy(REPO / "dags" / f"{name}.py", target / f"{name}.py")
    return target


def start_connect_stack(
    factory: Any, emulator: PapertrailEmulator, dags: Path, *, conn_id: str = "papertrail_connect"
) -> ConnectStack:
    """``factory(dags_folder, extra_env=...)`` -> started AirflowStack (the E2E fixture or AirflowStack)."""
    key = Fernet.generate_key().decode()
    passwords = {"viewer": "pw-" + secrets.token_urlsafe(12), "user": "pw-" + secrets.token_urlsafe(12)}
    remember_secrets(key, *passwords.values())
    stack = factory(
        dags,
        extra_env={
            "AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": key,
            "AIRFLOW__CORE__AUTH_MANAGER": AUTH_MANAGER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer,user:user",
            PASSWORDS_ENV: json.dumps(passwords),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        },
    )
    redirect_uri = f"{stack.base_url}/papertrail/callback"
    emulator.add_client(EmulatorClient(CLIENT_ID, CLIENT_SECRET, [redirect_uri]))
    extra = {
        "redirect_uri": redirect_uri,
        "system": "xero",
        "scope": "accounting.read",
        "issuer": emulator.base_url,
        "ca_bundle": emulator.ca_cert_path,
    }
    for cid in (conn_id, OTHER_CONN_ID):
        stack.create_papertrail_connection(
            cid, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, host=emulator.base_url, **extra
        )
    for dag_id in (AUTHORIZE_DAG, QUERY_DAG):
        stack.wait_for_dag(dag_id, timeout=120)
        stack.unpause(dag_id)
    return ConnectStack(stack, emulator, conn_id, key, passwords)


def user_token(stack: AirflowStack, username: str, password: str) -> str:
    response = stack.http.post(
        f"{stack.base_url}/auth/token", json={"username": username, "password": password}, timeout=30
    )
    assert response.status_code == 201, response.text
    token = str(response.json()["access_token"])
    remember_secrets(token)
    return token


def screenshot_path(name: str) -> Path:
    """docs/img/connect-<name>.png with UPDATE_DOC_SCREENSHOTS=1, else the artifacts folder."""
    if os.environ.get("UPDATE_DOC_SCREENSHOTS", "").strip() in {"1", "true", "yes"}:
        folder = REPO / "docs" / "img"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"connect-{name}.png"
    return artifacts_dir() / f"connect-{name}.png"


class ConnectBrowser:
    """One logged-in browser context on the stack (self-signed emulator TLS accepted)."""

    def __init__(self, browser: Browser, cs: ConnectStack, *, timeout: float = 60.0) -> None:
        self.cs = cs
        self.base = cs.stack.base_url
        self.context: BrowserContext = browser.new_context(
            ignore_https_errors=True, viewport={"width": 1280, "height": 720}
        )
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(timeout * 1000)
        self.page.set_default_navigation_timeout(timeout * 1000)

    def close(self) -> None:
        self.context.close()

    def login(self, username: str = "admin", password: str | None = None) -> None:
        """Through Airflow's own login form (SimpleAuthManager), as a person would."""
        password = password if password is not None else self.cs.stack.password
        self.page.goto(f"{self.base}/", wait_until="domcontentloaded")
        self.page.wait_for_url(re.compile(r".*/auth/login.*"))
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", str(password))
        self.page.click("button[type=submit]")
        self.page.wait_for_url(lambda url: "/auth/" not in url, wait_until="domcontentloaded")

    def open_from_navigation(self) -> FrameLocator:
        """Admin -> Papertrail-ai connections; returns the page's frame inside the UI."""
        self.page.get_by_role("button", name=re.compile("^Admin$", re.I)).click()
        self.page.get_by_role("menuitem", name="Papertrail-ai connections").click()
        self.page.wait_for_url(re.compile(r".*/plugin/papertrail-connections.*"))
        frame = self.page.frame_locator("iframe[src*='papertrail/connections']")
        frame.locator(f"#conn-{self.cs.conn_id}").wait_for()
        return frame

    def open_direct(self) -> Page:
        self.page.goto(f"{self.base}/papertrail/connections", wait_until="domcontentloaded")
        return self.page

    def click_connect(self, where: Page | FrameLocator, *, button: str = "connect") -> str:
        """Click Connect/Reconnect; returns the consent page's URL once it shows."""
        where.locator(f"#conn-{self.cs.conn_id} button.{button}").click()
        self.page.wait_for_url(lambda url: url.startswith(self.cs.emulator.base_url), wait_until="domcontentloaded")
        self.page.locator("#allow").wait_for()
        return self.page.url

    def click_allow(self) -> None:
        self.page.click("#allow")
        self.page.wait_for_url(lambda url: url.startswith(f"{self.base}/papertrail/callback"))
        self.page.locator("#back").wait_for()

    def back_to_page(self) -> None:
        self.page.click("#back")
        self.page.wait_for_url(lambda url: url.split("#")[0].endswith("/papertrail/connections"))

    def state_cell(self):
        return self.page.locator(f"#conn-{self.cs.conn_id} .state")

    def wait_for_state(self, state: str, timeout: float = 90.0) -> float:
        """Wait until the (polling) page shows ``state``; returns when it did (monotonic)."""
        self.page.wait_for_function(
            "([sel, want]) => { const e = document.querySelector(sel); return e && e.textContent === want; }",
            arg=[f"#conn-{self.cs.conn_id} .state", state],
            timeout=timeout * 1000,
            polling=50,
        )
        return time.monotonic()

    def screenshot(self, name: str) -> Path:
        path = screenshot_path(name)
        self.page.screenshot(path=str(path))
        return path
