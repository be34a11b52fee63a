"""The new user's path (issue 12), followed literally: README.md "Use it in your Airflow".

Not our lock file, but the resolver a user has: a fresh virtualenv, ``pip install`` of the
wheel that ``scripts/dev.py build`` makes plus ``apache-airflow`` at the newest 3.3.x the
index offers. Then, with that venv's ``airflow``: ``db migrate``, the connection imported
from a 0600 file, the example DAGs copied **from the installed package**, unpaused and
triggered through the CLI, consent given in headless Chromium at the emulator, the grant
stored, and one query run through ``PapertrailQueryOperator``.

Every shell command the test runs is asserted to be in the README's install section as
written, so the README and this test cannot drift apart; and the DAG files come from the
installed wheel, so a wheel that lacks a file the README names fails here.

Timings (install, first grant, first query) are printed and written to
``$PAPERTRAIL_USER_PATH_TIMINGS`` when set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail.example_dags import EXAMPLE_DAGS
from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator
from airflow_papertrail.token_store import TokenCipher
from tests.conftest import remember_secrets
from tests.e2e.harness import AirflowStack, open_and_click
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CLIENT_ID = "new-user-client"
CLIENT_SECRET = "nu-secret-" + "Hx4" * 8
KEY = Fernet.generate_key().decode()
remember_secrets(CLIENT_SECRET, KEY)

#: What the README tells the user to run, word for word (the test runs each of these).
README_COMMANDS = (
    "python3 scripts/dev.py build",
    'pip install "apache-airflow==<your Airflow version>" dist/airflow_provider_papertrail-*-py3-none-any.whl',
    "umask 077",
    "airflow connections import papertrail_default.json && rm papertrail_default.json",
    'python -m airflow_papertrail.example_dags "$(airflow config get-value core dags_folder)"',
    "airflow dags unpause papertrail_authorize",
    "airflow dags trigger papertrail_authorize",
    "airflow dags unpause papertrail_query && airflow dags trigger papertrail_query",
    "airflow connections test papertrail_default",
)

CONSENT_URL = re.compile(r"(https?://127\.0\.0\.1:\d+/api/authorize\.php\?\S+)")


def _install_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("<!-- --8<-- [start:install] -->")
    return text[start : text.index("<!-- --8<-- [end:install] -->")]


def test_readme_names_every_command_this_test_runs():
    section = _install_section()
    missing = [command for command in README_COMMANDS if command not in section]
    assert not missing, f"README's install section no longer says: {missing}"
    for name in EXAMPLE_DAGS:
        assert name in section, f"README does not name the example DAG {name}"


def _run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 900) -> str:
    # Never this checkout as the working directory: `python -c`/`-m` would import the package from it.
    cwd = cwd or Path(tempfile.gettempdir())
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    found: dict[str, float] = {}
    yield found
    line = ", ".join(f"{k} {v:.1f} s" for k, v in found.items())
    print(f"\n[user path] {line}")
    target = os.environ.get("PAPERTRAIL_USER_PATH_TIMINGS")
    if target:
        Path(target).write_text(json.dumps(found, indent=2) + "\n")


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory, timings) -> Path:
    """A fresh venv with the built wheel and the newest Apache Airflow 3.3.x, installed by pip."""
    work = tmp_path_factory.mktemp("user-install")
    started = time.monotonic()
    # README step 1 in the checkout: `python3 scripts/dev.py build` (wheel + sdist, twine-checked).
    _run([sys.executable, str(REPO / "scripts" / "dev.py"), "build", "--out-dir", str(work / "dist")], cwd=REPO)
    wheels = list((work / "dist").glob("airflow_provider_papertrail-*-py3-none-any.whl"))
    assert len(wheels) == 1, wheels
    timings["build_s"] = time.monotonic() - started
    started = time.monotonic()
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW", "VIRTUAL_ENV", "UV_"))}
    # The newest 3.3.x pip finds; "<your Airflow version>" of the README, for a user on 3.3.
    _run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
         "apache-airflow>=3.3,<3.4", str(wheels[0])],
        env=env,
    )  # fmt: skip
    timings["pip_install_s"] = time.monotonic() - started
    return venv


def _installed_versions(venv: Path) -> dict[str, str]:
    out = _run([str(venv / "bin" / "python"), "-c", (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d: m.version(d) for d in ('apache-airflow', 'airflow-provider-papertrail')}))"
    )])  # fmt: skip
    return json.loads(out)


@pytest.mark.timeout(900)  # the pip install of Airflow is in the fixture: about 75 s with an empty pip cache
def test_the_readme_path_in_a_fresh_venv(user_venv, timings, tmp_path, browser):
    from airflow_papertrail import __version__

    versions = _installed_versions(user_venv)
    assert versions["airflow-provider-papertrail"] == __version__
    assert versions["apache-airflow"].startswith("3.3."), versions
    print(f"\n[user path] pip chose apache-airflow {versions['apache-airflow']}")

    dags = tmp_path / "dags"  # the user's (empty) DAGs folder
    dags.mkdir()
    emulator = PapertrailEmulator().start()
    stack = AirflowStack(
        dags,
        home=tmp_path / "airflow-home",
        bin_dir=user_venv / "bin",
        # README step 2: the same key on every component.
        extra_env={"AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": KEY, "AIRFLOW__CORE__TEST_CONNECTION": "Enabled"},
    )
    redirect_uri = f"{stack.base_url}/papertrail/callback"
    emulator.add_client(EmulatorClient(CLIENT_ID, CLIENT_SECRET, [redirect_uri]))
    try:
        started = time.monotonic()
        stack.start()  # airflow db migrate, then api-server, scheduler, dag-processor, triggerer
        timings["migrate_and_start_s"] = time.monotonic() - started
        assert any(p.get("name") == "papertrail" for p in stack.plugins()), stack.plugins()

        # README step 4: the connection from a file only the user can read.
        conn_file = tmp_path / "papertrail_default.json"
        old_umask = os.umask(0o077)
        try:
            conn_file.write_text(
                json.dumps(
                    {
                        "papertrail_default": {
                            "conn_type": "papertrail",
                            "login": CLIENT_ID,
                            "password": CLIENT_SECRET,
                            "host": emulator.base_url,  # "Base URL": the emulator stands in for Papertrail-ai
                            "extra": {"redirect_uri": redirect_uri, "system": "xero"},
                        }
                    }
                )
            )
        finally:
            os.umask(old_umask)
        assert conn_file.stat().st_mode & 0o077 == 0
        stack.cli("connections", "import", str(conn_file))
        conn_file.unlink()

        # README step 5: the example DAGs from the installed package.
        dags_folder = stack.cli("config", "get-value", "core", "dags_folder").stdout.strip()
        assert Path(dags_folder).resolve() == dags.resolve()
        copy = subprocess.run(
            [str(user_venv / "bin" / "python"), "-m", "airflow_papertrail.example_dags", dags_folder],
            env=stack.env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert copy.returncode == 0, copy.stderr
        assert sorted(p.name for p in dags.glob("*.py")) == sorted(EXAMPLE_DAGS)
        installed = Path(
            _run(
                [
                    str(user_venv / "bin" / "python"),
                    "-c",
                    "import airflow_papertrail; print(airflow_papertrail.__file__)",
                ]
            ).strip()
        ).parent
        assert installed.is_relative_to(user_venv), installed  # from the wheel, not this checkout
        for name in EXAMPLE_DAGS:
            assert (dags / name).read_bytes() == (installed / "example_dags" / name).read_bytes()

        # README step 6: unpause and trigger with the CLI.
        stack.wait_for_dag("papertrail_authorize", timeout=120)
        assert stack.dag("papertrail_authorize")["is_paused"] is True  # why the README says to unpause
        stack.cli("dags", "unpause", "papertrail_authorize")
        started = time.monotonic()
        run_id = _trigger(stack, "papertrail_authorize")

        # README step 7: the consent link from the authorize task's log, Allow in a browser.
        stack.wait_for_task_state("papertrail_authorize", run_id, "authorize", {"success"}, timeout=120)
        log = stack.task_log("papertrail_authorize", run_id, "authorize")
        match = CONSENT_URL.search(log)
        assert match, f"no consent link in the authorize task's log:\n{log[-3000:]}"
        assert "no healthy triggerer" not in log
        stack.wait_for_task_state("papertrail_authorize", run_id, "wait_for_consent", {"deferred"}, timeout=120)
        result = open_and_click(
            browser, match.group(1), "#allow", wait_for_url_prefix=redirect_uri, screenshot_dir=tmp_path
        )
        assert "Authorization received" in result.text, result.text[:500]
        assert stack.wait_for_run("papertrail_authorize", run_id, timeout=120) == "success"
        timings["trigger_to_grant_s"] = time.monotonic() - started
        raw = stack.variable("papertrail_grant__papertrail_default")
        assert raw is not None
        grant = TokenCipher([KEY]).open("grant", "papertrail_default", raw)
        remember_secrets(grant["token"]["access_token"], grant["token"].get("refresh_token"))

        # README step 8: one query through PapertrailQueryOperator.
        stack.wait_for_dag("papertrail_query", timeout=120)
        started = time.monotonic()
        stack.cli("dags", "unpause", "papertrail_query")
        query_run = _trigger(stack, "papertrail_query")
        assert stack.wait_for_run("papertrail_query", query_run, timeout=180) == "success"
        timings["first_query_s"] = time.monotonic() - started
        answer = stack.xcom("papertrail_query", query_run, "trial_balance")
        assert answer["data"]["lines"], answer  # real rows from the emulator's trial balance
        assert stack.xcom("papertrail_query", query_run, "summarize")["type"] == "dict"

        # `airflow connections test` shows our message with the grant state, not only "success".
        test = stack.cli("connections", "test", "papertrail_default")
        shown = test.stdout + test.stderr
        assert "Connection success!" in shown
        assert "credentials accepted" in shown and "Stored grant: valid until" in shown, shown[-2000:]
        counts = emulator.stats.snapshot()
        assert counts["authorization_code_grants"] == 1 and counts["consents_allowed"] == 1, counts
    finally:
        stack.stop()
        emulator.stop()
        remember_secrets(*emulator.issued_secrets)


def _trigger(stack: AirflowStack, dag_id: str) -> str:
    out = stack.cli("dags", "trigger", dag_id, "--output", "json").stdout
    # Airflow logs to stdout too (a graphviz warning, "creating dag run"): the JSON is its own line.
    rows = next(json.loads(line) for line in out.splitlines() if line.startswith("[{"))
    run_id = rows[0]["dag_run_id"]
    wait_until(lambda: stack.dag_run(dag_id, run_id), 30, message=f"run {run_id} of {dag_id} not visible")
    return run_id
