#!/usr/bin/env python3
"""Token-endpoint calls when 32 concurrent tasks find the access token expired.

    .venv/bin/python benchmarks/refresh_concurrency.py [--parallelism 8]

Real scheduler (LocalExecutor) + api-server + triggerer on 127.0.0.1, the emulator rotating
refresh tokens and revoking a grant on reuse (as QuickBooks/Xero do). Runs the same 32
mapped tasks twice with a freshly expired grant: once through ``get_access_token()``
(the refresh coordinator), once the way a hand-written DAG does it (baseline). Prints
token-endpoint calls, tasks that succeeded and whether the grant survived. Target for the
coordinated path: exactly 1 call, 32 successes, grant alive.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig  # noqa: E402
from airflow_papertrail.oauth.envelope import TokenCipher  # noqa: E402
from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator  # noqa: E402
from tests.e2e.harness import AirflowStack  # noqa: E402

CONN_ID = "papertrail_bench"
CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret-" + "y" * 20
REDIRECT_URI = "http://127.0.0.1:9/papertrail/callback"
KEY = Fernet.generate_key().decode()


def store_expired_grant(stack: AirflowStack, emulator: PapertrailEmulator) -> None:
    config = OAuthClientConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        system="xero",
        base_url=emulator.base_url,
    )
    token = OAuthClient(config).exchange_code(
        emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, system="xero")
    )
    cipher = TokenCipher([KEY])
    envelope = cipher.seal(
        "grant",
        CONN_ID,
        {"token": token.with_expiry(time.time() - 60).to_dict(), "generation": 1, "updated_at": time.time()},
    )
    stack.cli("variables", "set", f"papertrail_grant__{CONN_ID}", envelope, log_stdout=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallelism", type=int, default=8)
    args = parser.parse_args()
    emulator = PapertrailEmulator(clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])]).start()
    stack = AirflowStack(
        REPO / "benchmarks" / "dags",
        extra_env={"AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": KEY, "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "32"},
        parallelism=args.parallelism,
    )
    rows = []
    try:
        stack.start()
        stack.create_connection(
            {
                "connection_id": CONN_ID,
                "conn_type": "papertrail",
                "login": CLIENT_ID,
                "password": CLIENT_SECRET,
                "host": emulator.base_url,
                "extra": json.dumps({"redirect_uri": REDIRECT_URI, "system": "xero"}),
            }
        )
        for mode in ("coordinated", "naive"):
            dag_id = f"bench_refresh_{mode}"
            stack.wait_for_dag(dag_id, timeout=120)
            stack.unpause(dag_id)
            store_expired_grant(stack, emulator)
            before, revoked_before = emulator.stats["refresh_grants"], emulator.stats["grants_revoked"]
            requests_before = emulator.stats["token_requests"]
            run_id = stack.trigger(dag_id)
            stack.wait_for_run(dag_id, run_id, timeout=300)
            tis = stack.task_instances(dag_id, run_id)
            grant = TokenCipher([KEY]).open("grant", CONN_ID, stack.variable(f"papertrail_grant__{CONN_ID}"))
            rows.append(
                (
                    mode,
                    emulator.stats["token_requests"] - requests_before,
                    emulator.stats["refresh_grants"] - before,
                    sum(ti["state"] == "success" for ti in tis),
                    emulator.grant_is_active(grant["token"]["refresh_token"]),
                    emulator.stats["grants_revoked"] - revoked_before,
                )
            )
    finally:
        stack.stop()
        emulator.stop()
    print()
    print(f"32 tasks, expired access token, LocalExecutor parallelism {args.parallelism}, rotating refresh tokens")
    print(f"{'mode':<14}{'token calls':>12}{'refreshes':>11}{'tasks ok':>10}{'grant alive':>13}{'revocations':>13}")
    for mode, calls, refreshes, ok, alive, revoked in rows:
        print(f"{mode:<14}{calls:>12}{refreshes:>11}{ok:>7}/32{alive!s:>13}{revoked:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
