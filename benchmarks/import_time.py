#!/usr/bin/env python3
"""What importing the provider's operators and sensor adds to DAG parsing.

    .venv/bin/python benchmarks/import_time.py [--runs 7]

DAG files import ``airflow.sdk`` anyway (it loads ``BaseOperator`` and
``BaseSensorOperator`` with it); what matters is what our modules add on top. Each
measurement is a fresh interpreter that imports ``airflow.sdk`` first, then the module(s)
under test, timing both steps with ``time.perf_counter``. Printed: medians over ``--runs``
interpreters of the baseline and of what each row adds. ``requests`` is a reference row:
a module that imports it at import time pays that much. Target: <= 30 ms for the
operators and the sensor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TARGETS = (
    "airflow_papertrail.operators.papertrail",
    "airflow_papertrail.operators.query",
    "airflow_papertrail.sensors.papertrail",
    "airflow_papertrail.operators.papertrail,airflow_papertrail.operators.query,airflow_papertrail.sensors.papertrail",
)
REFERENCES = ("requests",)
TARGET_MS = 30.0

_PROBE = """
import importlib, json, sys, time
t0 = time.perf_counter()
import airflow.sdk
t1 = time.perf_counter()
for name in sys.argv[1].split(","):
    importlib.import_module(name)
t2 = time.perf_counter()
print(json.dumps({"sdk_ms": (t1 - t0) * 1000, "added_ms": (t2 - t1) * 1000}))
"""


def measure(modules: str, runs: int) -> tuple[float, float]:
    sdk, added = [], []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, modules], env=env, capture_output=True, text=True, timeout=120, check=True
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        sdk.append(result["sdk_ms"])
        added.append(result["added_ms"])
    return statistics.median(sdk), statistics.median(added)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    measure(TARGETS[-1], 1)  # untimed: every measured run finds warm bytecode caches
    print(f"median of {args.runs} fresh interpreters per row, python {sys.version.split()[0]}")
    worst = 0.0
    baselines = []
    for modules in (*TARGETS, *REFERENCES):
        sdk_ms, added_ms = measure(modules, args.runs)
        baselines.append(sdk_ms)
        label = " + ".join(m.removeprefix("airflow_papertrail.") for m in modules.split(","))
        if modules in REFERENCES:
            label += " (reference)"
        else:
            worst = max(worst, added_ms)
        print(f"  {label:<66} +{added_ms:6.1f} ms")
    print(f"baseline: import airflow.sdk {statistics.median(baselines):.0f} ms")
    print(f"target <= {TARGET_MS:.0f} ms added: {'ok' if worst <= TARGET_MS else 'MISSED'} (worst +{worst:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
