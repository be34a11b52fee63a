#!/usr/bin/env python3
"""Throughput and peak memory of extracting a large list to a JSON-lines file.

    .venv/bin/python benchmarks/extract_throughput.py [--records 1000000] [--repeat 3]
    .venv/bin/python benchmarks/extract_throughput.py --large-records 1,10,60 [--repeat 3]

The emulator runs in this process on 127.0.0.1 and serves ``gl/list_gl_transaction`` with
``--records`` records (one streamed JSON body). Each contender runs in its own fresh
subprocess, ``--repeat`` times, and reports its wall time and its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* ``drain``: read the body and throw it away: what the server and loopback allow (ceiling);
* ``raw``: the usual hand-written loop, ``requests.get(...).json()`` then one
  ``json.dumps(record, separators=(",", ":"))`` line per record (baseline);
* ``ours``: ``DataClient.extract`` itself (byte-exact parser, envelope checks, temporary
  file, fsync, rename);
* ``parser``: the parser alone, for reference: ``requests`` ``iter_content(65536)`` into
  ``RecordStream(raw=True).feed_lines``, each blob written to a plain file
  (:func:`_extract_lines`);
* ``ijson``: ``ijson.items(..., "data.item", use_float=True)`` with the yajl2_c backend
  over the streamed body, then one ``json.dumps`` line per record (skipped when ijson or
  its C backend is not installed);
* ``http``: ``airflow.providers.http`` ``HttpHook.run(...).json()`` then the same lines,
  when apache-airflow-providers-http is installed.

Printed: median seconds, records/s, ratios to ``drain`` and to ``raw``, the best run and
its ratio to drain's best run (this VM's neighbours shift single runs by up to 1.5 s; the
best run is the least disturbed), every run, peak RSS. Targets:
ours >= 0.8x drain throughput and <= 150 MB peak RSS (printed as ok/MISSED). The access
token reaches the subprocesses through the environment only and is never printed.

``--large-records 1,10,60`` measures instead one record of each size (MB) in a fresh
subprocess that generates the body itself (no emulator): ``RecordStream`` in raw and
object mode fed in 64 KiB chunks, against ``json.loads`` of the same text, seconds and
MB/s per size, so that linearity is visible.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODULE, QUERY = "gl", "list_gl_transaction"
CONTENDERS = ("drain", "raw", "ours", "parser", "ijson", "http")
TOKEN_ENV = "PT_BENCH_TOKEN"


# ---------------------------------------------------------------------------------------
# child side: one contender, one run
# ---------------------------------------------------------------------------------------
def _extract_lines(response: Any, out: str) -> int:
    """What DataClient.extract does with the byte-exact parser: one blob per network chunk."""
    from airflow_papertrail.api.jsonstream import RecordStream

    stream = RecordStream(raw=True)
    n = 0
    with open(out, "wb") as fh:
        for chunk in response.iter_content(1 << 16):
            blob, count = stream.feed_lines(chunk)
            if count:
                fh.write(blob)
                n += count
        blob, count = stream.close_lines()
        fh.write(blob)
        n += count
    return n


def _child(contender: str, api_url: str, records: int, out: str) -> dict:
    token = os.environ[TOKEN_ENV]
    params = {"system": "xero", "query": QUERY, "count": str(records)}
    url = f"{api_url}/api_{MODULE}.php"
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    # Imports happen before the clock starts and before the baseline RSS is read.
    if contender in ("drain", "raw", "parser"):
        import requests

        if contender == "parser":
            import airflow_papertrail.api.jsonstream  # noqa: F401  # imported before the clock
    elif contender == "ijson":
        try:
            import ijson
            import requests

            items = ijson.get_backend("yajl2_c").items
        except ImportError as exc:
            return {"skipped": f"ijson with the yajl2_c backend not installed ({exc})"}
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
    elif contender == "parser":
        with requests.get(url, params=params, headers=headers, stream=True, timeout=60) as response:
            response.raise_for_status()
            n = _extract_lines(response, out)
    elif contender == "ijson":
        with requests.get(url, params=params, headers=headers, stream=True, timeout=60) as response:
            response.raise_for_status()
            response.raw.decode_content = True
            with open(out, "w", encoding="utf-8") as fh:
                for record in items(response.raw, "data.item", use_float=True, buf_size=1 << 16):
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


def _report(results: dict[str, list[dict]], records: int) -> None:
    print(
        f"{'':>7}  {'median s':>9} {'records/s':>11} {'vs drain':>8} {'vs raw':>7} {'best s':>7} {'best vs drain':>13} "
        f"{'peak RSS':>9} {'RSS before':>10} {'file MB':>8}  runs (s)"
    )

    def rate_of(name: str) -> float | None:
        runs = results.get(name)
        if not runs or "seconds" not in runs[0]:
            return None
        return records / statistics.median(r["seconds"] for r in runs)

    def best_of(name: str) -> float | None:
        runs = results.get(name)
        if not runs or "seconds" not in runs[0]:
            return None
        return min(r["seconds"] for r in runs)

    drain_rate, raw_rate, drain_best = rate_of("drain"), rate_of("raw"), best_of("drain")
    for contender, runs in results.items():
        if "skipped" in runs[0]:
            continue
        seconds = statistics.median(r["seconds"] for r in runs)
        rate = records / seconds
        vs_drain = f"{rate / drain_rate:.2f}x" if drain_rate else "-"
        vs_raw = f"{rate / raw_rate:.2f}x" if raw_rate else "-"
        peak = max(r["maxrss_kib"] for r in runs) / 1024
        before = max(r["rss_before_kib"] for r in runs) / 1024
        size = runs[0]["bytes"] / 1e6
        best = min(r["seconds"] for r in runs)
        best_vs = f"{drain_best / best:.2f}x" if drain_best else "-"
        every = " ".join(f"{r['seconds']:.2f}" for r in runs)
        print(
            f"{contender:>7}  {seconds:>9.2f} {rate:>11,.0f} {vs_drain:>8} {vs_raw:>7} {best:>7.2f} {best_vs:>13} "
            f"{peak:>7.1f}MB {before:>8.1f}MB {size:>8.1f}  {every}"
        )
    ours = rate_of("ours")
    if ours and drain_rate:
        peak = max(r["maxrss_kib"] for r in results["ours"]) / 1024
        ours_best = best_of("ours")
        best_ratio = drain_best / ours_best if drain_best and ours_best else 0.0
        print(
            f"targets: throughput {ours / drain_rate:.2f}x drain by medians, {best_ratio:.2f}x by best runs "
            f"(>= 0.8x: {'ok' if ours >= 0.8 * drain_rate else 'MISSED'}), "
            f"peak RSS {peak:.0f} MB (<= 150 MB: {'ok' if peak <= 150 else 'MISSED'})"
        )


# ---------------------------------------------------------------------------------------
# large records: one record of N MB, no emulator
# ---------------------------------------------------------------------------------------
def _large_body(megabytes: float) -> bytes:
    """``{"status":"ok","data":[<one record of ~N MB>, {"small":1}]}``: invoice-like lines."""
    line = '{"line":%d,"account_code":"4010","amount":1150.00,"memo":"caf\u00e9 ],{\\"data\\":[ é"}'
    target = int(megabytes * 1_000_000)
    parts: list[str] = []
    size = i = 0
    while size < target:
        piece = line % i
        parts.append(piece)
        size += len(piece) + 1
        i += 1
    record = '{"id":"INV-1","lines":[' + ",".join(parts) + '],"total":"12345678901234567.89"}'
    return ('{"status":"ok","data":[' + record + ',{"small":1}]}').encode()


def _large_child(megabytes: float) -> dict:
    from airflow_papertrail.api.jsonstream import RecordStream

    body = _large_body(megabytes)
    chunks = [body[i : i + (1 << 16)] for i in range(0, len(body), 1 << 16)]
    result: dict[str, Any] = {"bytes": len(body)}
    started = time.perf_counter()
    json.loads(body)
    result["json.loads"] = time.perf_counter() - started
    for mode in ("raw", "object"):
        stream = RecordStream(raw=mode == "raw")
        n = 0
        started = time.perf_counter()
        for chunk in chunks:
            n += len(stream.feed(chunk))
        n += len(stream.close())
        result[mode] = time.perf_counter() - started
        if n != 2:
            raise SystemExit(f"{mode}: {n} records, expected 2")
        result[f"{mode}_joins"] = stream._joins
    result["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result


def _large(sizes: str, repeat: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"one record of N MB, fed in 64 KiB chunks, median of {repeat} runs, python {sys.version.split()[0]}")
    print(
        f"{'MB':>6} {'json.loads s':>12} {'MB/s':>6} {'raw s':>7} {'MB/s':>6} {'object s':>8} {'MB/s':>6} "
        f"{'joins':>5} {'peak RSS':>9}"
    )
    for size in sizes.split(","):
        runs = []
        for _ in range(repeat):
            proc = subprocess.run(
                [sys.executable, __file__, "--large-child", size],
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
                check=True,
            )
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        mb = runs[0]["bytes"] / 1e6
        cells = []
        for key in ("json.loads", "raw", "object"):
            seconds = statistics.median(r[key] for r in runs)
            cells.append(
                f"{seconds:>{12 if key == 'json.loads' else 7 if key == 'raw' else 8}.2f} {mb / seconds:>6.0f}"
            )
        peak = max(r["maxrss_kib"] for r in runs) / 1024
        print(f"{mb:>6.1f} {' '.join(cells)} {runs[0]['raw_joins']:>5} {peak:>7.0f}MB")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--api-url", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument(
        "--large-records", metavar="MB,...", help="measure one record of each size (MB) instead (no emulator)"
    )
    parser.add_argument("--large-child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.api_url, args.records, args.out)))
        return 0
    if args.large_child:
        print(json.dumps(_large_child(args.large_child)))
        return 0
    if args.large_records:
        return _large(args.large_records, args.repeat)

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
        _report(results, args.records)
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
