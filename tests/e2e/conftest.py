"""Fixtures for end-to-end tests: real Airflow processes (tests/e2e/harness.py) and headless Chromium.

Every test under tests/e2e is marked ``e2e``. Without /usr/bin/chromium (or Playwright) they are
skipped, except when ``CI`` is set: CI must not pass by skipping, so there they fail.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.harness import CHROMIUM, AirflowStack, headless_chromium

if TYPE_CHECKING:
    from playwright.sync_api import Browser

E2E_DIR = Path(__file__).resolve().parent
E2E_DAGS = E2E_DIR / "dags"

StackFactory = Callable[..., AirflowStack]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: real Airflow processes and a headless browser")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


def _missing_prerequisites() -> list[str]:
    missing = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright Python package (dev dependency)")
    return missing


@pytest.fixture(scope="session", autouse=True)
def _e2e_prerequisites() -> None:
    """Session-scoped so it runs before any (module-scoped) Airflow stack is started."""
    missing = _missing_prerequisites()
    if not missing:
        return
    reason = "end-to-end tests need " + " and ".join(missing)
    if os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}:
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def airflow_stack_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    """``factory(dags_folder=E2E_DAGS, *, extra_env=None, **AirflowStack kwargs) -> started stack``.

    Module-scoped: a stack (about 20 s to start) can serve every test of a module. All stacks are
    stopped when the module is done (``stack.stop()`` is idempotent, so a test may stop it first).
    """
    stacks: list[AirflowStack] = []

    def factory(
        dags_folder: Path | str = E2E_DAGS, *, extra_env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> AirflowStack:
        stack = AirflowStack(dags_folder, home=tmp_path_factory.mktemp("airflow-home"), extra_env=extra_env, **kwargs)
        stacks.append(stack)
        return stack.start()

    yield factory
    for stack in reversed(stacks):
        stack.stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Headless Chromium (function-scoped: Playwright's sync API must not outlive the test's loop)."""
    with headless_chromium() as chromium:
        yield chromium
