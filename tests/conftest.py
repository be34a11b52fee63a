"""Shared test set-up.

* A private AIRFLOW_HOME for the whole session (set before anything imports Airflow).
* A log canary: every log record of the session (DEBUG and up) and the output of every
  Airflow subprocess is kept; ``tests/test_zz_log_canary.py`` runs last and fails if any
  token, code, verifier or secret that the tests saw appears in it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="papertrail-tests-"))
os.environ.setdefault("AIRFLOW_HOME", str(_SESSION_DIR / "airflow-home"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
# One [core] fernet_key for this process and every Airflow subprocess. Without it, whichever
# process first loads the config before airflow.cfg exists runs with no key (values stored
# unencrypted, _NullFernet) while a later `airflow db migrate` writes a generated one.
if "AIRFLOW__CORE__FERNET_KEY" not in os.environ:
    from cryptography.fernet import Fernet

    os.environ["AIRFLOW__CORE__FERNET_KEY"] = Fernet.generate_key().decode()

os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).parent / "integration" / "dags"))
Path(os.environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)

#: Every sensitive value a test created or received; the canary checks none leaked.
SEEN_SECRETS: set[str] = set()
#: Everything that was logged or printed by Airflow subprocesses during the session.
CAPTURED_LOG = _SESSION_DIR / "captured.log"


class _FileHandler(logging.Handler):
    def __init__(self, path: Path) -> None:
        super().__init__(level=logging.DEBUG)
        self._fh = path.open("a", encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._fh.write(self.format(record) + "\n")
            self._fh.flush()
        except Exception:  # pragma: no cover - never break a test because of the canary
            pass


_handler = _FileHandler(CAPTURED_LOG)
_handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
logging.getLogger().addHandler(_handler)
logging.getLogger().setLevel(logging.DEBUG)
for noisy in ("urllib3", "requests", "airflow_papertrail"):
    logging.getLogger(noisy).setLevel(logging.DEBUG)


def remember_secrets(*values: str | None) -> None:
    SEEN_SECRETS.update(v for v in values if v and len(v) >= 8)


def append_captured(text: str) -> None:
    with CAPTURED_LOG.open("a", encoding="utf-8") as fh:
        fh.write(text)
        fh.write("\n")


@pytest.fixture(autouse=True)
def _canary_handler_attached():
    # Airflow's logging set-up can replace the root handlers; put ours back for every test.
    root = logging.getLogger()
    if _handler not in root.handlers:
        root.addHandler(_handler)
    if root.level > logging.DEBUG:
        root.setLevel(logging.DEBUG)
    return


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Everything a test printed or logged (structlog prints to stdout) feeds the canary.
    text = "\n".join(content for _, content in report.sections)
    if text:
        append_captured(text)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The canary must see the logs of every other test.
    items.sort(key=lambda item: 1 if item.get_closest_marker("canary") else 0)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture
def fernet_key(monkeypatch: pytest.MonkeyPatch) -> str:
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode()
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", key)
    return key


CLIENT_ID = "airflow-test-client"
CLIENT_SECRET = "cs-" + "Zq8x" * 8  # long enough for the masker and the canary
REDIRECT_URI = "http://127.0.0.1:8080/papertrail/callback"


def emulator_connection(base_url: str, *, password: str = CLIENT_SECRET) -> str:
    """The ``AIRFLOW_CONN_<ID>`` value (JSON) of a Papertrail-ai connection to an emulator."""
    import json

    return json.dumps(
        {
            "conn_type": "papertrail",
            "login": CLIENT_ID,
            "password": password,
            "host": base_url,
            "extra": {"redirect_uri": REDIRECT_URI, "system": "xero"},
        }
    )


remember_secrets(CLIENT_SECRET, os.environ["AIRFLOW__CORE__FERNET_KEY"])


@pytest.fixture
def emulator():
    """A real Papertrail-ai emulator on 127.0.0.1 with one registered client."""
    from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator

    emu = PapertrailEmulator(clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])]).start()
    try:
        yield emu
    finally:
        emu.stop()
        remember_secrets(*emu.issued_secrets)


@pytest.fixture
def tls_emulator():
    from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator

    emu = PapertrailEmulator(clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])], tls=True).start()
    try:
        yield emu
    finally:
        emu.stop()
        remember_secrets(*emu.issued_secrets)
