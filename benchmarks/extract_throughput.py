#!/usr/bin/env python3
"""Throughput and peak memory of extracting a large list to a JSON-lines file.

    .venv/bin/python benchmarks/extract_throughput.py [--records 1000000] [--repeat 3]

The emulator runs in this process on 127.0.0.1 and serves ``gl/list_gl_transaction`` with
``--records`` records (one streamed JSON body). Each contender runs in its own fresh
subprocess, ``--repeat`` times, and reports its wall time and its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* ``drain``: read the body and throw it away: what the server and loopback allow (ceiling);
* ``raw``: the usual hand-written loop, ``requests.get(...).json()`` then one
  ``json.dumps(record, separators=(",", ":"))`` line per record (baseline);
* ``ours``: ``DataClient.extract`` (streaming parser, batched writes, temp file + rename);
* ``http``: ``airflow.providers.http`` ``HttpHook.run(...).json()`` then the same lines,
  when apache-airflow-providers-http is installed.

Printed: median seconds, records/s, ratio to ``raw``, peak RSS. Targets: ours >= 0.8x raw
throughput and <= 150 MB peak RSS. The access token reaches the subprocesses through the
environment only and is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE, QUERY = "gl", "list_gl_transaction"
CONTENDERS = ("drain", "raw", "ours", "http")
TOKEN_ENV = "PT_BENCH_TOKEN"


# ---------------------------------------------------------------------------------------
# child side: one contender, one run
# ---------------------------------------------------------------------------------------
def _child(contender: str, api_url: str, records: int, out: str) -> dict:
    token = os.environ[TOKEN_ENV]
    params = {"system": "xero", "query": QUERY, "count": str(records)}
    url = f"{api_url}/api_{MODULE}.php"
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    # Imports happen before the clock starts and before the baseline RSS is read.
    if contender in ("drain", "raw"):
        import requests
    elif contender == "ours":
        from airflow_papertrail.api.client import DataClient

        client = DataClient(api_url=api_url, default_system="xero", token_provider=lambda force: token)
    elif contender == "http":
        try:
            from airflow.providers.http.hooks.http import HttpHook
        except ImportError:
            return {"skipped": "providers-http not installed"}
        hook = HttpHook(method="GET", http_conn_id="papertrail_bench_http")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = 0
    started = time.perf_counter()
    if contender == "drain":
        with requests.get(url, params=params, headers=headers, stream=True, timeout=60) as response:
            response.raise_for_status()
            for _chunk in response.iter_content(1 << 16):
                pass
        n = records
    elif contender == "raw":
        response = requests.get(url, params=params, headers=headers, timeout=60)
        response.raise_for_status()
        data = response.json()["data"]
        with open(out, "w", encoding="utf-8") as fh:
            for record in data:
                fh.write(json.dumps(record, separators=(",", ":")) + "\n")
                n += 1
    elif contender == "ours":
        n = client.extract(MODULE, QUERY, out, params={"count": records})["records"]
    else:
        response = hook.run(f"/api/api_{MODULE}.php", data=params, headers=headers)
        data = response.json()["data"]
        with open(out, "w", encoding="utf-8") as fh:
            for record in data:
                fh.write(json.dumps(record, separators=(",", ":")) + "\n")
                n += 1
    seconds = time.perf_counter() - started
    if n != records:
        raise SystemExit(f"{contender}: got {n} records, expected {records}")
    return {
        "seconds": seconds,
        "records": n,
        "rss_before_kib": rss_before,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "bytes": os.path.getsize(out) if os.path.exists(out) else 0,
    }


# ---------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------
def _run_child(contender: str, api_url: str, base_url: str, records: int, token: str, workdir: str) -> dict:
    out = os.path.join(workdir, f"{contender}.jsonl")
    env = dict(os.environ)
    env[TOKEN_ENV] = token
    env["PYTHONPATH"] = str(REPO)
    env["AIRFLOW_CONN_PAPERTRAIL_BENCH_HTTP"] = json.dumps({"conn_type": "http", "host": base_url})
    proc = subprocess.run(
        [sys.executable, __file__, "--child", contender, "--api-url", api_url, "--records", str(records), "--out", out],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        tail = proc.stderr[-2000:].replace(token, "[token]")
        raise SystemExit(f"{contender} failed:\n{tail}")
    if os.path.exists(out):
        os.unlink(out)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--api-url", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.api_url, args.records, args.out)))
        return 0

    sys.path.insert(0, str(REPO))
    from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig
    from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator

    client_id, secret, redirect = "bench-client", "bench-secret-" + "x" * 20, "http://127.0.0.1:9/callback"
    emulator = PapertrailEmulator(clients=[EmulatorClient(client_id, secret, [redirect])]).start()
    try:
        config = OAuthClientConfig(
            client_id=client_id, client_secret=secret, redirect_uri=redirect, system="xero", base_url=emulator.base_url
        )
        code = emulator.issue_code(client_id=client_id, redirect_uri=redirect)
        token = OAuthClient(config).exchange_code(code).access_token
        api_url = emulator.base_url + "/api"
        print(
            f"extract {args.records:,} records of {MODULE}/{QUERY} from the emulator on {emulator.base_url}, "
            f"median of {args.repeat} runs, python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
        )
        results: dict[str, list[dict]] = {}
        with tempfile.TemporaryDirectory(prefix="papertrail-bench-") as workdir:
            for repeat in range(args.repeat):
                for contender in args.contenders.split(","):  # interleaved: drift hits all alike
                    result = _run_child(contender, api_url, emulator.base_url, args.records, token, workdir)
                    results.setdefault(contender, []).append(result)
                    if "skipped" in result and repeat == 0:
                        print(f"{contender:>6}: skipped: {result['skipped']}")
        print(
            f"{'':>6}  {'median s':>9} {'records/s':>11} {'vs raw':>7} {'peak RSS':>9} {'RSS before':>10} {'file MB':>8}"
        )
        raw = results.get("raw")
        raw_rate = args.records / statistics.median(r["seconds"] for r in raw) if raw and "seconds" in raw[0] else None
        for contender, runs in results.items():
            if "skipped" in runs[0]:
                continue
            seconds = statistics.median(r["seconds"] for r in runs)
            rate = args.records / seconds
            ratio = f"{rate / raw_rate:.2f}x" if raw_rate else "-"
            peak = max(r["maxrss_kib"] for r in runs) / 1024
            before = max(r["rss_before_kib"] for r in runs) / 1024
            size = runs[0]["bytes"] / 1e6
            print(
                f"{contender:>6}  {seconds:>9.2f} {rate:>11,.0f} {ratio:>7} {peak:>7.1f}MB {before:>8.1f}MB {size:>8.1f}"
            )
        ours = results.get("ours")
        if ours and raw_rate:
            rate = args.records / statistics.median(r["seconds"] for r in ours)
            peak = max(r["maxrss_kib"] for r in ours) / 1024
            print(
                f"targets: throughput {rate / raw_rate:.2f}x raw (>= 0.8x: {'ok' if rate >= 0.8 * raw_rate else 'MISSED'}), "
                f"peak RSS {peak:.0f} MB (<= 150 MB: {'ok' if peak <= 150 else 'MISSED'})"
            )
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
