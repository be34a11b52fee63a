#!/usr/bin/env python3
"""Does a slow token endpoint starve the api-server? (issue 9 item 4)

    .venv/bin/python benchmarks/refresh_storm.py [--delay 5] [--parallelism 8]

A real scheduler (LocalExecutor), api-server, dag-processor and triggerer on a throw-away
PostgreSQL (as in production), the emulator rotating refresh tokens with its token endpoint
slowed to ``--delay`` seconds per request. Two storms of 32 mapped tasks whose access
tokens have all expired: 32 tasks on one grant, then 4 tasks on each of 8 grants at once.
Meanwhile a prober asks the api-server's ``/api/v2/monitor/health`` and the Execution API's
``/execution/health`` (the server task heartbeats go to) every 50 ms. Prints the token
calls per grant (target: exactly 1) and p50/p99 probe latency during each storm against
an idle baseline measured first, in the same run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import requests
from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_papertrail.oauth.envelope import TokenCipher  # noqa: E402
from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator  # noqa: E402
from tests.e2e.harness import AirflowStack, emulator_grant  # noqa: E402
from tests.integration.postgres import Cluster, find_bindir  # noqa: E402

CLIENT_ID, CLIENT_SECRET = "storm-client", "storm-secret-" + "v" * 20
REDIRECT_URI = "http://127.0.0.1:9/papertrail/callback"
KEY = Fernet.generate_key().decode()
DAG_ID = "bench_refresh_storm"


class Prober:
    """Latency of two health routes, sampled every 50 ms while ``running``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.samples: dict[str, list[float]] = {"/api/v2/monitor/health": [], "/execution/health": []}
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + 900  # bounded whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            for path, found in self.samples.items():
                started = time.perf_counter()
                try:
                    session.get(self.base_url + path, timeout=30).raise_for_status()
                except requests.RequestException:
                    self.errors += 1
                found.append(time.perf_counter() - started)
            self._stop.wait(0.05)

    def __enter__(self) -> Prober:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def store_expired_grants(stack: AirflowStack, emulator: PapertrailEmulator, conn_ids: list[str]) -> None:
    cipher = TokenCipher([KEY])
    for conn_id in conn_ids:
        config, token = emulator_grant(
            emulator, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI
        )
        envelope = cipher.seal(
            "grant",
            conn_id,
            {
                "token": token.with_expiry(time.time() - 60).to_dict(),
                "generation": 1,
                "updated_at": time.time(),
                "issued_for": config.binding(),
            },
        )
        stack.set_variable(f"papertrail_grant__{conn_id}", envelope)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=5.0, help="seconds the token endpoint takes per request")
    parser.add_argument("--parallelism", type=int, default=8)
    args = parser.parse_args()
    bindir = find_bindir()
    if bindir is None:
        sys.exit("needs PostgreSQL (apt-get install -y postgresql)")
    cluster = Cluster(bindir).start()
    emulator = PapertrailEmulator(clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])]).start()
    stack = AirflowStack(
        REPO / "benchmarks" / "dags",
        extra_env={
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": cluster.create_database("airflow_storm"),
            "AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": KEY,
            "AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR": "api-server",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "32",
        },
        parallelism=args.parallelism,
    )
    rows = []
    try:
        stack.start()
        all_ids = [f"papertrail_storm_{i}" for i in range(8)]
        for conn_id in all_ids:
            stack.create_papertrail_connection(
                conn_id,
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                host=emulator.base_url,
                redirect_uri=REDIRECT_URI,
                system="xero",
            )
        stack.wait_for_dag(DAG_ID, timeout=120)
        stack.unpause(DAG_ID)
        with Prober(stack.base_url) as idle:
            time.sleep(10)  # benchmark baseline window, not a readiness wait
        rows.append(("idle baseline", idle, None, None, None))
        for name, conn_ids in (("32 tasks, 1 grant", [all_ids[0]] * 32), ("4 tasks x 8 grants", all_ids * 4)):
            grants = sorted(set(conn_ids))
            store_expired_grants(stack, emulator, grants)
            emulator.inject("token", delay=args.delay, times=1000)
            before = emulator.stats["refresh_grants"]
            started = time.monotonic()
            with Prober(stack.base_url) as storm:
                run_id = stack.trigger(DAG_ID, conf={"conn_ids": conn_ids})
                state = stack.wait_for_run(DAG_ID, run_id, timeout=600)
            wall = time.monotonic() - started
            emulator.clear_faults()
            tis = stack.task_instances(DAG_ID, run_id)
            ok = sum(ti["state"] == "success" for ti in tis if ti["task_id"] == "use_token")
            rows.append((name, storm, (emulator.stats["refresh_grants"] - before, len(grants)), (ok, state), wall))
    finally:
        stack.stop()
        emulator.stop()
        cluster.stop()
    print()
    print(f"token endpoint {args.delay:.0f} s per request, LocalExecutor parallelism {args.parallelism}, PostgreSQL")
    print(f"{'phase':<22}{'refreshes/grants':>17}{'tasks ok':>10}{'wall s':>8}"
          f"{'health p50/p99 ms':>20}{'execution p50/p99 ms':>23}{'probe errors':>14}")  # fmt: skip
    for name, prober, refreshes, tasks, wall in rows:
        h = prober.samples["/api/v2/monitor/health"]
        e = prober.samples["/execution/health"]
        ref = f"{refreshes[0]}/{refreshes[1]}" if refreshes else "-"
        ok = f"{tasks[0]}/32" if tasks else "-"
        print(
            f"{name:<22}{ref:>17}{ok:>10}{(f'{wall:.1f}' if wall else '-'):>8}"
            f"{f'{percentile(h, 0.5) * 1000:.0f} / {percentile(h, 0.99) * 1000:.0f}':>20}"
            f"{f'{percentile(e, 0.5) * 1000:.0f} / {percentile(e, 0.99) * 1000:.0f}':>23}{prober.errors:>14}"
        )
    print("samples per route and phase: " + ", ".join(str(len(p.samples["/execution/health"])) for _, p, *_ in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
