"""The README's main command, non-interactively: `python3 scripts/dev.py demo --exit-when-ready`
starts a throw-away Airflow and the emulator, authorizes through headless Chromium, runs
papertrail_extract, prints the summary and stops everything it started."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import append_captured
from tests.e2e.harness import REPO


def test_demo_runs_end_to_end_and_cleans_up():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW", "PYTEST_"))}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "dev.py"), "demo", "--exit-when-ready"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    append_captured(out)
    assert proc.returncode == 0, out[-4000:]
    assert "headless Chromium clicked Allow" in out
    assert re.search(r"grant: +connection 'papertrail_default', generation 1, access token valid until ", out)
    assert re.search(r"extract: +success", out)
    lines = re.findall(r"^ +(\w+__\w+) +(\d+) records +(\S+\.jsonl)$", out, flags=re.M)
    assert len(lines) == 12, out[-3000:]
    for task_id, records, path in lines:
        with open(path) as fh:
            assert sum(1 for _ in fh) == int(records) > 0, task_id
    # nothing left running from the demo's AIRFLOW_HOME
    demo_home = str(REPO / ".demo" / "airflow-home")
    leftovers = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if f"AIRFLOW_HOME={demo_home}".encode() in fh.read():
                        leftovers.append(pid)
            except OSError:
                continue
    assert not leftovers, f"demo processes left running: {leftovers}"
