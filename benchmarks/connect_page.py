#!/usr/bin/env python3
"""The Connect page in a real browser against a real Airflow, with Airflow's own page as baseline.

    .venv/bin/python benchmarks/connect_page.py [--runs 10] [--think 0 --think 8]

Starts api-server + scheduler + dag-processor + triggerer (LocalExecutor, SQLite), the
emulator over TLS and headless Chromium, logs in through Airflow's login form, then per
run (each timed with ``time.monotonic`` in this process):

(a) **Connect -> consent page**: click Connect on ``/papertrail/connections`` until the
    emulator's consent page shows its Allow button (target p50 <= 5 s);
(b) **Allow -> valid**: click Allow, click "Back to Papertrail-ai connections" on the
    callback page, until the (polling) page shows ``valid`` (target p50 <= 3 s).
    Measured for each ``--think`` value: seconds the person spends on the consent page
    before clicking Allow (0: at once; 8: about when the DAG's sensor has deferred);
(c) baseline: Airflow's own connection list (``/connections`` in the UI) from navigation
    start until its table shows the connection.

Each run waits for its ``papertrail_authorize`` run to finish (``max_active_runs=1``).
Printed: p50 / p95 / max per measurement, and the DAG-run timeline of the last run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_papertrail.testing.emulator import PapertrailEmulator  # noqa: E402
from tests.e2e.connect_flow import (  # noqa: E402
    AUTHORIZE_DAG,
    ConnectBrowser,
    dags_folder,
    start_connect_stack,
)
from tests.e2e.harness import AirflowStack, headless_chromium  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(name: str, values: list[float], target: str) -> str:
    return (
        f"{name:<38}{pct(values, 0.5):>7.2f}{pct(values, 0.95):>7.2f}{max(values):>7.2f}"
        f"{statistics.mean(values):>7.2f}   {target}"
    )


def latest_run(stack: AirflowStack) -> dict:
    runs = stack.get_json(f"/api/v2/dags/{AUTHORIZE_DAG}/dagRuns", limit=100)["dag_runs"]
    return max(runs, key=lambda r: r["queued_at"] or "")


def timeline(stack: AirflowStack, run: dict) -> str:
    """Seconds from the run's creation (queued_at) to each task's start and end."""
    import pendulum

    t0 = pendulum.parse(run["queued_at"])
    parts = []
    for ti in stack.task_instances(AUTHORIZE_DAG, run["dag_run_id"]):
        start = pendulum.parse(ti["start_date"]) if ti.get("start_date") else None
        end = pendulum.parse(ti["end_date"]) if ti.get("end_date") else None
        s = f"{(start - t0).total_seconds():.1f}" if start else "-"
        e = f"{(end - t0).total_seconds():.1f}" if end else "-"
        parts.append(f"{ti['task_id']} {s}..{e} s")
    return "; ".join(parts)


def one(b: ConnectBrowser, stack: AirflowStack, think: float) -> tuple[float, float, str]:
    b.open_direct()
    b.page.locator(f"#conn-{b.cs.conn_id} button.connect").wait_for()
    t0 = time.monotonic()
    b.click_connect(b.page)
    consent = time.monotonic() - t0
    if think:
        time.sleep(think)
    t1 = time.monotonic()
    b.click_allow()
    b.back_to_page()
    b.wait_for_state("valid", timeout=120)
    allowed = time.monotonic() - t1
    run = latest_run(stack)
    assert stack.wait_for_run(AUTHORIZE_DAG, run["dag_run_id"], timeout=180) == "success"
    return consent, allowed, timeline(stack, stack.dag_run(AUTHORIZE_DAG, run["dag_run_id"]))


def make_unvalid(cs) -> None:
    """Make the next Allow observable: the row must change back to ``valid`` from something else."""
    grant = cs.grant()
    if grant:
        cs.emulator.revoke_grant(grant["token"]["refresh_token"])
    cs.stack.request("DELETE", f"/api/v2/variables/papertrail_health__{cs.conn_id}", expected=(204, 404))
    cs.stack.request("DELETE", f"/api/v2/variables/papertrail_grant__{cs.conn_id}", expected=(204, 404))


def baseline(b: ConnectBrowser) -> float:
    t0 = time.monotonic()
    b.page.goto(f"{b.base}/connections", wait_until="commit")
    b.page.get_by_text(b.cs.conn_id, exact=True).first.wait_for()
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--think", type=float, action="append", help="seconds on the consent page (repeatable)")
    args = parser.parse_args()
    thinks = args.think or [0.0, 8.0]

    emulator = PapertrailEmulator(tls=True).start()
    home = Path(tempfile.mkdtemp(prefix="connect-bench-"))
    stacks: list[AirflowStack] = []

    def factory(dags: Path, extra_env: dict) -> AirflowStack:
        stack = AirflowStack(dags, home=home / "airflow", extra_env=extra_env)
        stacks.append(stack)
        return stack.start()

    results: dict[str, list[float]] = {"consent": [], "baseline": []}
    timelines: dict[float, str] = {}
    try:
        started = time.monotonic()
        cs = start_connect_stack(factory, emulator, dags_folder(home / "dags"), conn_id="papertrail_bench")
        print(f"stack ready in {time.monotonic() - started:.1f} s", flush=True)
        with headless_chromium() as browser:
            b = ConnectBrowser(browser, cs, timeout=120)
            b.login()
            baseline(b)  # warm-up: the UI's bundle and the first API calls
            make_unvalid(cs)
            one(b, cs.stack, 0.0)  # warm-up: first trigger, first task start
            for think in thinks:
                key = f"allow (think {think:g} s)"
                results[key] = []
                for i in range(args.runs):
                    make_unvalid(cs)
                    consent, allowed, line = one(b, cs.stack, think)
                    results["consent"].append(consent)
                    results[key].append(allowed)
                    results["baseline"].append(baseline(b))
                    timelines[think] = line
                    print(
                        f"  think {think:g} s run {i + 1}: connect->consent {consent:.2f} s, allow->valid {allowed:.2f} s",
                        flush=True,
                    )
            b.close()
    finally:
        for stack in stacks:
            stack.stop()
        emulator.stop()

    print()
    print(f"Connect page, {args.runs} runs per row (s){'':<7}{'p50':>7}{'p95':>7}{'max':>7}{'mean':>7}")
    print(row("(a) click Connect -> consent page", results["consent"], "target p50 <= 5"))
    for think in thinks:
        key = f"allow (think {think:g} s)"
        print(row(f"(b) Allow -> 'valid' (read {think:g} s)", results[key], "target p50 <= 3"))
    print(row("(c) baseline: Airflow's /connections", results["baseline"], "Airflow's own page"))
    print()
    for think, line in timelines.items():
        print(f"last run, think {think:g} s: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
