"""Log-leak canary: runs after every other test (see conftest) and fails if any token,
authorization code, PKCE verifier or client secret seen during the session appears in
what was logged or printed: pytest-captured output and logs, Airflow subprocess output
(dag.test task logs, api-server logs) and task log files under AIRFLOW_HOME/logs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import CAPTURED_LOG, CLIENT_SECRET, SEEN_SECRETS


@pytest.mark.canary
def test_no_secret_reached_any_log():
    texts = [CAPTURED_LOG.read_text(encoding="utf-8", errors="replace") if CAPTURED_LOG.exists() else ""]
    logs = Path(os.environ["AIRFLOW_HOME"]) / "logs"
    if logs.exists():
        texts += [p.read_text(encoding="utf-8", errors="replace") for p in logs.rglob("*") if p.is_file()]
    corpus = "\n".join(texts)
    assert CLIENT_SECRET in SEEN_SECRETS
    leaked = sorted(s[:6] + "..." for s in SEEN_SECRETS if s in corpus)
    assert not leaked, f"{len(leaked)} secret value(s) appeared in logs: {leaked}"


@pytest.mark.canary
def test_canary_can_fail():
    # The canary is only worth something if it sees what is logged: prove it does.
    marker = "canary-self-check-" + os.urandom(8).hex()
    import logging

    logging.getLogger("tests.canary").warning("value %s", marker)
    assert marker in CAPTURED_LOG.read_text(encoding="utf-8")
