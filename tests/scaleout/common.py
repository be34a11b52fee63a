"""What the scale-out tests share: the connections, their emulator clients, the encryption key,
and helpers that seed and read grants in the topology's metadata DB."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet

from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig
from tests.conftest import remember_secrets

if TYPE_CHECKING:
    from collections.abc import Iterable

    from airflow_papertrail.testing.emulator import PapertrailEmulator
    from tests.scaleout.topology import ScaleoutTopology

SCALEOUT_DIR = Path(__file__).resolve().parent
#: Figures the scale-out tests measured (printed at the end of the session).
TIMINGS: dict[str, object] = {}
DAG_ID = "papertrail_scaleout"
EXTRACT_DAG_ID = "papertrail_extract"
AUTHORIZE_DAG_ID = "papertrail_authorize"
EXTRACT_MANY_DAG_ID = "papertrail_extract_many"
EXAMPLE_DAGS = SCALEOUT_DIR.parents[1] / "airflow_papertrail" / "example_dags"
TASK_ID = "use_token"
CONNECTIONS = [f"papertrail_scaleout_{n}" for n in range(4)]  # as in dags/papertrail_scaleout.py
TASKS_PER_CONNECTION = 16
REDIRECT_URI = "http://127.0.0.1:9/papertrail/callback"
KEY = Fernet.generate_key().decode()
CLIENTS = {conn_id: (f"org-{n}-client", f"org-{n}-secret-" + "Q7x" * 8) for n, conn_id in enumerate(CONNECTIONS)}
remember_secrets(KEY, *(secret for _, secret in CLIENTS.values()))

READ_GRANTS = """
import json
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore
out = {}
for conn_id in json.loads(input()):
    grant = VariableTokenStore(conn_id, backend=OrmVariables()).load()
    out[conn_id] = None if grant is None else {
        "generation": grant.generation, "refresh_token": grant.token.refresh_token,
        "unknown_refresh_outcomes": grant.unknown_refresh_outcomes,
    }
print(json.dumps(out))
"""


def example_extract_many_dag() -> str:
    """The shipped ``papertrail_extract_many``, unscheduled, its retries 2 s apart instead of 5 min:
    with retries kept, "the dead organisation's tasks failed on their first try" shows that the
    re-authorization error is not retried."""
    text = (EXAMPLE_DAGS / "papertrail_extract_many.py").read_text()
    for old, new in (('schedule="@daily"', "schedule=None"), ("timedelta(minutes=5)", "timedelta(seconds=2)")):
        assert text.count(old) == 1, f"the example DAG no longer has {old}"
        text = text.replace(old, new)
    return text


def example_extract_dag(name: str = "papertrail_extract") -> str:
    """A shipped example extract DAG, unscheduled and without retries: unpausing it must not start
    a daily run of its own (max_active_runs=1 would queue ours behind it), and a failure is final."""
    text = (EXAMPLE_DAGS / f"{name}.py").read_text()
    for old, new in (('schedule="@daily"', "schedule=None"), ('"retries": 2', '"retries": 0')):
        assert text.count(old) == 1, f"the example extract DAG no longer has {old}"
        text = text.replace(old, new)
    return text


def store_expired_grants(
    topo: ScaleoutTopology, emulator: PapertrailEmulator, conn_ids: Iterable[str] = CONNECTIONS
) -> dict[str, dict]:
    """A fresh grant per connection (real code exchange), stored with its access token expired."""
    items, seeded = [], {}
    for conn_id in conn_ids:
        client_id, secret = CLIENTS[conn_id]
        config = OAuthClientConfig(
            client_id=client_id,
            client_secret=secret,
            redirect_uri=REDIRECT_URI,
            system="xero",
            base_url=emulator.base_url,
        )
        token = OAuthClient(config).exchange_code(
            emulator.issue_code(client_id=client_id, redirect_uri=REDIRECT_URI, system="xero")
        )
        items.append(
            {
                "conn_id": conn_id,
                "token": token.with_expiry(time.time() - 60).to_dict(),
                "issued_for": config.binding(),
            }
        )
        seeded[conn_id] = {"refresh_token": token.refresh_token}
    emulator.expire_access_tokens()  # the server agrees: every access token is dead
    out = topo.python("-m", "tests.scaleout.seed_grants", stdin=json.dumps(items)).stdout
    generations = json.loads(out.strip().splitlines()[-1])  # Airflow logs to stdout before it
    for conn_id, generation in generations.items():
        seeded[conn_id]["generation"] = generation
    return seeded


def stored_grants(topo: ScaleoutTopology) -> dict[str, dict]:
    out = topo.python("-c", READ_GRANTS, stdin=json.dumps(CONNECTIONS) + "\n").stdout
    return json.loads(out.strip().splitlines()[-1])
