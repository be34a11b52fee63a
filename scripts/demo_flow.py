"""Second stage of ``scripts/dev.py demo`` (runs inside the bootstrapped venv).

Drives the running local Airflow through its REST API: triggers ``papertrail_authorize``,
gives consent (headless Chromium clicks Allow, or the person does with ``--manual``),
then runs ``papertrail_extract`` and prints a summary. Nothing printed contains a token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import CHROMIUM, AirflowApi, headless_chromium, open_and_click  # noqa: E402


def say(message: str) -> None:
    print(f"[papertrail] {message}", flush=True)


def consent_automatically(url: str, callback_prefix: str) -> None:
    if CHROMIUM.exists():
        with headless_chromium() as browser:
            result = open_and_click(browser, url, "#allow", wait_for_url_prefix=callback_prefix)
        say(f"headless Chromium clicked Allow; the callback page says: {result.text.splitlines()[0]!r}")
        return
    from urllib.parse import parse_qs, urlsplit

    import requests  # no browser here: submit the same form over HTTP

    fields = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    answer = requests.post(url.split("?")[0], data={**fields, "decision": "allow"}, allow_redirects=False, timeout=30)
    requests.get(answer.headers["Location"], timeout=30).raise_for_status()
    say("no Chromium found: consent submitted over HTTP instead")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--conn-id", default="papertrail_default")
    parser.add_argument("--output", required=True)
    parser.add_argument("--manual", action="store_true", help="print the consent link and wait for a person")
    args = parser.parse_args()
    api = AirflowApi(args.base_url, password=args.password)

    say("triggering papertrail_authorize")
    api.wait_for_dag("papertrail_authorize", timeout=180)
    api.unpause("papertrail_authorize")
    run_id = api.trigger("papertrail_authorize", conf={"conn_id": args.conn_id})
    api.wait_for_task_state("papertrail_authorize", run_id, "authorize", {"success"}, timeout=180)
    url = api.xcom("papertrail_authorize", run_id, "authorize")["consent_url"]
    if args.manual:
        say(f"open this link and click Allow (valid 10 minutes):\n\n    {url}\n")
        timeout = 900.0
    else:
        api.wait_for_task_state(
            "papertrail_authorize", run_id, "wait_for_consent", {"deferred", "running"}, timeout=180
        )
        consent_automatically(url, f"{args.base_url}/papertrail/callback")
        timeout = 180.0
    state = api.wait_for_run("papertrail_authorize", run_id, timeout=timeout)
    if state != "success":
        say(f"papertrail_authorize ended {state}; see its task logs in the UI")
        return 1
    grant = api.xcom("papertrail_authorize", run_id, "report_grant")

    say("running papertrail_extract")
    api.wait_for_dag("papertrail_extract", timeout=180)
    started = time.monotonic()
    extract_run = api.trigger("papertrail_extract", conf={"conn_id": args.conn_id, "base_path": args.output})
    api.unpause("papertrail_extract")
    state = api.wait_for_run("papertrail_extract", extract_run, timeout=900)
    results = {}
    for task_id, ti_state in sorted(api.task_states("papertrail_extract", extract_run).items()):
        if task_id == "clear_manifest":  # returns nothing
            continue
        results[task_id] = api.xcom("papertrail_extract", extract_run, task_id) if ti_state == "success" else ti_state

    print()
    print("  Papertrail-ai demo summary")
    print(
        f"  grant:     connection {grant['conn_id']!r}, generation {grant['generation']}, "
        f"access token valid until {grant['expires_at']}, scope {grant['scope']!r}"
    )
    print(f"  extract:   {state} in {time.monotonic() - started:.1f} s, files under {args.output}")
    for task_id, result in results.items():
        if isinstance(result, dict) and "records" in result:
            print(f"    {task_id:<40} {result['records']:>8} records  {result['path']}")
        elif isinstance(result, dict) and "folder" in result:  # write_manifest: the snapshot is complete
            print(f"    {task_id:<40} {result['files']:>8} files    {result['folder']}/_MANIFEST.json")
        elif result is not None and not isinstance(result, dict):
            print(f"    {task_id:<40} {result}")
    print()
    return 0 if state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
