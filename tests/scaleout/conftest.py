"""Scale-out tests (issue 11): a CeleryExecutor topology with workers in their own mount namespaces.

Every test here is marked ``scaleout``; the ones that start the topology (they use the
``topology`` fixture) are skipped unless ``PAPERTRAIL_SCALEOUT=1`` (CI budget: a topology takes
1.5 to 3 minutes to start on 2 cores, the suite 6 to 7). The namespace check of
``test_private_hosts.py`` takes a second and always runs. Run the whole suite with::

    PAPERTRAIL_SCALEOUT=1 .venv/bin/python -m pytest tests/scaleout -q

With the variable set, a machine that lacks a prerequisite (PostgreSQL, redis-server, nginx,
root for ``unshare``) fails instead of skipping: asking for the suite and not running it is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.scaleout.topology import missing_prerequisites

SCALEOUT_DIR = Path(__file__).resolve().parent
ENABLE_ENV = "PAPERTRAIL_SCALEOUT"
SKIP_REASON = (
    f"scale-out topology tests are opt-in (CI budget): run them with "
    f"`{ENABLE_ENV}=1 .venv/bin/python -m pytest tests/scaleout -q`"
)


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "").strip().lower() not in {"", "0", "false", "no"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    on = enabled()
    for item in items:
        if item.path.is_relative_to(SCALEOUT_DIR):
            item.add_marker(pytest.mark.scaleout)
            if not on and "topology" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session", autouse=True)
def _scaleout_prerequisites() -> None:
    if not enabled():
        return
    missing = missing_prerequisites()
    if missing:
        pytest.fail(f"{ENABLE_ENV} is set but the topology needs " + ", ".join(missing), pytrace=False)


#: Figures the scale-out tests measured (printed at the end of the session).
TIMINGS: dict[str, object] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("scale-out figures")
        for name, value in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {value}")
