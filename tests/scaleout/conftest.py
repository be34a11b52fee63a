"""Scale-out tests (issue 11): a CeleryExecutor topology with workers in their own mount namespaces.

Every test here is marked ``scaleout``; the ones that start the topology (they use the
``topology`` fixture) are skipped unless ``PAPERTRAIL_SCALEOUT=1``, which ``dev.py test`` (beside
the main suite, after the Airflow 3.2 suite) and ``dev.py scaleout`` set: the main suite's own
pytest run skips them (one topology takes 1.5 to 3 minutes to start on 2 cores, the suite 8 to
12). The namespace check of ``test_private_hosts.py`` takes a second and always runs. Alone::

    python3 scripts/dev.py scaleout

With the variable set, a machine that lacks a prerequisite (PostgreSQL, redis-server, nginx,
root for ``unshare``) fails instead of skipping: asking for the suite and not running it is an error.
"""

from __future__ import annotations

import os
import shutil

import pytest

from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator
from tests.conftest import remember_secrets
from tests.scaleout.common import (
    AUTHORIZE_DAG_ID,
    CLIENTS,
    DAG_ID,
    EXAMPLE_DAGS,
    EXTRACT_DAG_ID,
    EXTRACT_MANY_DAG_ID,
    KEY,
    REDIRECT_URI,
    SCALEOUT_DIR,
    TIMINGS,
    example_extract_dag,
    example_extract_many_dag,
)
from tests.scaleout.topology import ScaleoutTopology, missing_prerequisites, topology_config

ENABLE_ENV = "PAPERTRAIL_SCALEOUT"
SKIP_REASON = (
    f"the scale-out topology tests run in `python3 scripts/dev.py test` (beside the main suite) or "
    f"`python3 scripts/dev.py scaleout`; a plain pytest run skips them unless {ENABLE_ENV}=1"
)


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "").strip().lower() not in {"", "0", "false", "no"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "degraded_ok: a scale-out test that runs on what an earlier kill left of the topology"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The fault tests kill components and leave them dead: they run after every other test.
    items.sort(key=lambda item: item.path.is_relative_to(SCALEOUT_DIR) and item.path.name == "test_faults.py")
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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("scale-out figures")
        for name, value in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def emulator():
    emu = PapertrailEmulator(
        clients=[EmulatorClient(cid, secret, [REDIRECT_URI]) for cid, secret in CLIENTS.values()],
        rotate_refresh_tokens=True,
        revoke_on_refresh_reuse=True,
    ).start()
    try:
        yield emu
    finally:
        emu.stop()
        remember_secrets(*emu.issued_secrets)


@pytest.fixture(scope="session")
def topology(emulator, tmp_path_factory, request):
    """One topology for every scale-out test (it takes 1.5 to 3 minutes to start on 2 cores)."""
    # The test DAGs plus the shipped example DAGs, as a user would install them.
    dags = tmp_path_factory.mktemp("scaleout-dags")
    for source in (SCALEOUT_DIR / "dags").glob("*.py"):
        shutil.copy(source, dags / source.name)
    (dags / "papertrail_extract.py").write_text(example_extract_dag())
    (dags / "papertrail_extract_many.py").write_text(example_extract_many_dag())
    shutil.copy(EXAMPLE_DAGS / "papertrail_authorize.py", dags / "papertrail_authorize.py")
    topo = ScaleoutTopology(dags, encryption_key=KEY)
    try:
        topo.start()
        TIMINGS["topology start (s)"] = round(topo.timings["start_s"], 1)
        TIMINGS["topology start phases (s, cumulative)"] = topology_config(topo)["timings"]
        for conn_id, (client_id, secret) in CLIENTS.items():
            topo.create_papertrail_connection(
                conn_id,
                client_id=client_id,
                client_secret=secret,
                host=emulator.base_url,
                redirect_uri=REDIRECT_URI,
                system="xero",
            )
        for dag_id in (DAG_ID, EXTRACT_DAG_ID, EXTRACT_MANY_DAG_ID, AUTHORIZE_DAG_ID):
            topo.wait_for_dag(dag_id, timeout=180)
            topo.unpause(dag_id)
        yield topo
    finally:
        if request.session.testsfailed:
            topo.keep = True  # the logs of a failed session stay for reading (the path is printed)
            TIMINGS["topology kept (a test failed)"] = str(topo.root)
        topo.stop()
        TIMINGS["topology stop (s)"] = round(topo.timings.get("stop_s", -1), 1)
        TIMINGS["topology stop phases (s, cumulative)"] = {
            k: round(v, 1) for k, v in topo.timings.items() if k.startswith("stop_")
        }


@pytest.fixture(autouse=True)
def _whole_topology(request: pytest.FixtureRequest) -> None:
    """Before a test on the topology: restart what an earlier test killed, unless the test runs on
    what is left (``degraded_ok``)."""
    if "topology" not in request.fixturenames or request.node.get_closest_marker("degraded_ok"):
        return
    topo = request.getfixturevalue("topology")
    for name in sorted(topo.killed):
        topo.restart(name)
