#!/usr/bin/env python3
"""Many client organisations on the Celery topology: one query each, every token expired (issue 11).

    .venv/bin/python benchmarks/scaleout_many.py [--connections 200] [--workers 3] [--concurrency 2]

Starts the scale-out topology of the tests (``tests/scaleout/topology.py``: PostgreSQL, Redis,
2 api-servers behind nginx, scheduler, dag-processor, triggerer, Celery workers each in a mount
namespace of its own; needs root), the emulator rotating refresh tokens with reuse detection, and
``--connections`` ``papertrail`` connections, one client organisation (one grant) each, all
stored with their access token expired. Then one run of ``benchmarks/dags/papertrail_bench_many.py``:
one ``company/co_details`` query per connection with ``PapertrailQueryOperator``, mapped over the
connection ids.

Prints: the run's wall time; token calls (target: exactly one refresh per connection, no reuse,
no revocation); the latency (p50/p99) of ``/api/v2/monitor/health`` and ``/execution/health``
through the proxy while the run goes, against an idle baseline measured first in the same run;
and the metadata-DB rows (and bytes) the provider keeps per connection.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig  # noqa: E402
from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator  # noqa: E402
from benchmarks.refresh_storm import Prober, percentile  # noqa: E402
from tests.scaleout.topology import ScaleoutTopology, missing_prerequisites  # noqa: E402

DAG_ID = "papertrail_bench_many"
CLIENT_ID, CLIENT_SECRET = "many-orgs-client", "many-orgs-secret-" + "k" * 20
REDIRECT_URI = "http://127.0.0.1:9/papertrail/callback"
BASELINE_SECONDS = 20.0

COUNT_ROWS = """
import json
from sqlalchemy import text
from airflow.utils.session import create_session
with create_session() as session:
    variables = session.execute(text("SELECT key, length(val) FROM variable WHERE key LIKE 'papertrail%'")).all()
    connections = session.execute(text("SELECT count(*) FROM connection WHERE conn_type = 'papertrail'")).scalar()
    xcom = session.execute(text("SELECT count(*) FROM xcom WHERE dag_id = :d"), {"d": input()}).scalar()
by_kind = {}
for key, size in variables:
    kind = key.split("__", 1)[0] + "__" if "__" in key else key
    rows, total = by_kind.get(kind, (0, 0))
    by_kind[kind] = (rows + 1, total + (size or 0))
print(json.dumps({"variables": by_kind, "connections": connections, "xcom": xcom}))
"""


def seed(topo: ScaleoutTopology, emulator: PapertrailEmulator, conn_ids: list[str]) -> None:
    config = OAuthClientConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        system="xero",
        base_url=emulator.base_url,
    )
    client = OAuthClient(config)
    items = []
    for conn_id in conn_ids:
        token = client.exchange_code(emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, system="xero"))
        items.append(
            {"conn_id": conn_id, "token": token.with_expiry(time.time() - 60).to_dict(), "issued_for": config.binding()}
        )
    emulator.expire_access_tokens()
    topo.python("-m", "tests.scaleout.seed_grants", stdin=json.dumps(items), timeout=600)


def latency_row(name: str, prober: Prober) -> list[str]:
    out = [name]
    for samples in prober.samples.values():
        out += [f"{percentile(samples, 0.5) * 1000:.0f}", f"{percentile(samples, 0.99) * 1000:.0f}"]
    out.append(str(sum(len(s) for s in prober.samples.values())))
    out.append(str(prober.errors))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="task slots per worker")
    args = parser.parse_args()
    missing = missing_prerequisites()
    if missing:
        sys.exit("the topology needs " + ", ".join(missing))
    conn_ids = [f"papertrail_org_{n:03d}" for n in range(args.connections)]
    key = Fernet.generate_key().decode()
    emulator = PapertrailEmulator(
        clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])],
        rotate_refresh_tokens=True,
        revoke_on_refresh_reuse=True,
    ).start()
    dags = Path(tempfile.mkdtemp(prefix="papertrail-bench-many-dags-"))
    shutil.copy(REPO / "benchmarks" / "dags" / f"{DAG_ID}.py", dags)
    topo = ScaleoutTopology(
        dags,
        workers=args.workers,
        worker_concurrency=args.concurrency,
        encryption_key=key,
        extra_env={"AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "256"},
    )
    phases: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        topo.start()
        phases["topology start"] = time.monotonic() - t0
        t0 = time.monotonic()
        for conn_id in conn_ids:
            topo.create_papertrail_connection(
                conn_id,
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                host=emulator.base_url,
                redirect_uri=REDIRECT_URI,
                system="xero",
            )
        phases[f"create {len(conn_ids)} connections (REST API)"] = time.monotonic() - t0
        t0 = time.monotonic()
        seed(topo, emulator, conn_ids)
        phases[f"store {len(conn_ids)} expired grants"] = time.monotonic() - t0
        topo.wait_for_dag(DAG_ID, timeout=180)
        topo.unpause(DAG_ID)

        with Prober(topo.base_url) as idle:
            time.sleep(BASELINE_SECONDS)  # the idle baseline's sampling window (a benchmark, not a test)
        before = emulator.stats.snapshot()
        started = time.monotonic()
        with Prober(topo.base_url) as busy:
            run_id = topo.trigger(DAG_ID, conf={"conn_ids": conn_ids})
            state = topo.wait_for_run(DAG_ID, run_id, timeout=3600)
        wall = time.monotonic() - started
        after = emulator.stats.snapshot()
        delta = {k: after[k] - before.get(k, 0) for k in after}
        tis = [ti for ti in topo.task_instances(DAG_ID, run_id) if ti["task_id"] == "query"]
        states: dict[str, int] = {}
        hosts: dict[str, int] = {}
        for ti in tis:
            states[ti["state"]] = states.get(ti["state"], 0) + 1
            hosts[ti.get("hostname") or "?"] = hosts.get(ti.get("hostname") or "?", 0) + 1
        rows = json.loads(topo.python("-c", COUNT_ROWS, stdin=DAG_ID + "\n").stdout.strip().splitlines()[-1])
        coordinator = topo.upstreams_used("/papertrail/token")
    finally:
        topo.stop()
        emulator.stop()
        shutil.rmtree(dags, ignore_errors=True)

    n = len(conn_ids)
    print(f"\n## {n} connections, one query each, every access token expired\n")
    print(
        f"topology: {args.workers} Celery workers x {args.concurrency} slots, 2 api-servers behind nginx, PostgreSQL\n"
    )
    for name, seconds in phases.items():
        print(f"- {name}: {seconds:.1f} s")
    print(f"- run: **{state}** in {wall:.1f} s wall ({n / wall:.2f} tasks/s); task states {states}")
    print(f"- tasks per worker: {dict(sorted(hosts.items()))}")
    print(
        f"- token endpoint: {delta['refresh_grants']} refreshes (target {n}), {delta['token_requests']} token requests, "
        f"{delta['grants_revoked']} revoked, {delta['invalid_grant_errors']} invalid_grant; "
        f"{delta['api_requests']} data API requests"
    )
    print(f"- coordinator requests per api-server replica: {coordinator}")
    print(
        "\n| api-server latency through the proxy | health p50 ms | health p99 ms | execution p50 ms "
        "| execution p99 ms | samples | errors |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in (latency_row("idle baseline", idle), latency_row(f"during the {n}-task run", busy)):
        print("| " + " | ".join(row) + " |")
    print("\n| metadata-DB rows the provider keeps | rows | per connection | bytes per connection |")
    print("| --- | --- | --- | --- |")
    for kind, (count, size) in sorted(rows["variables"].items()):
        print(f"| Variable `{kind}*` | {count} | {count / n:.2f} | {size / n:.0f} |")
    print(f"| Connection (`papertrail`) | {rows['connections']} | {rows['connections'] / n:.2f} | - |")
    print(f"| XCom of the run (Airflow's, one per task) | {rows['xcom']} | {rows['xcom'] / n:.2f} | - |")
    ok = state == "success" and delta["refresh_grants"] == n and delta["grants_revoked"] == 0
    print(f"\nresult: {'OK' if ok else 'NOT OK'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
