"""Secrets reach Airflow's masker where they are created or first handled, checked on the
real maskers (not a stand-in callback), with the real metadata DB and the emulator."""

from __future__ import annotations

import json

import pytest

from airflow_papertrail.authorization import AuthorizationStore, pending_variable_key
from airflow_papertrail.operators.papertrail import PapertrailAuthorizeOperator
from airflow_papertrail.token_store import OrmVariables
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, remember_secrets

pytestmark = pytest.mark.integration

CONN = "pt_masking"


def _task_masker_hides(value: str) -> bool:
    """Whether the Task SDK's masker (task processes, triggerer) replaces ``value``."""
    from airflow.sdk._shared.secrets_masker import redact

    return redact(f"<{value}>") == "<***>"


@pytest.fixture
def connection(airflow_db, emulator, monkeypatch, fernet_key):
    conn = {
        "conn_type": "papertrail",
        "login": CLIENT_ID,
        "password": CLIENT_SECRET,
        "host": emulator.base_url,
        "extra": {"redirect_uri": REDIRECT_URI, "system": "xero"},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", json.dumps(conn))
    return emulator


def test_authorize_task_masks_the_verifier_it_creates(connection):
    result = PapertrailAuthorizeOperator(task_id="authorize", papertrail_conn_id=CONN).execute({})
    store = AuthorizationStore(backend=OrmVariables())  # no masking callback: only the task's own masking counts
    pending = store.load(result["authorization_id"])
    try:
        assert pending is not None and pending.code_verifier
        remember_secrets(pending.code_verifier)
        assert _task_masker_hides(pending.code_verifier)
        assert not _task_masker_hides(pending.state)  # public: it is in the consent URL the task logs
    finally:
        OrmVariables().delete(pending_variable_key(result["authorization_id"]))
