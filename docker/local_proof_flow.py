"""Drive the compose stack through its REST API (used by docker/local-proof.sh; standard library only).

1. ``GET /auth/token`` (all-admins mode), wait until both example DAGs are parsed;
2. unpause and trigger ``papertrail_authorize``, read the consent URL from the ``authorize``
   task's XCom, fetch the emulator's consent page, submit its form with ``decision=allow``
   (what the Allow button does), follow the redirect to the api-server's callback;
3. wait for the run to succeed, then trigger ``papertrail_extract`` and wait for it;
4. print a JSON summary (timings, run and task states, records per extract task).

With ``--refresh-check`` (``local-proof.sh --celery``, once the stored grant's access token was
expired) it runs the refresh check instead: expire every access token at the emulator too
(``proof_emulator.py``'s admin port), trigger the DAG of mapped tasks that each need a token,
and check that every task succeeded, that they ran on at least 2 workers (the task instances'
hostnames), and that the emulator counted exactly one refresh and no refresh token presented
twice (no ``invalid_grant``, no revoked grant).

Nothing printed contains a token, code or secret.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

FINISHED_RUN = {"success", "failed"}
# seconds per HTTP request: on a loaded 2-core machine the api-server can take tens of seconds
REQUEST_TIMEOUT = 60
FINISHED_TI = {"success", "failed", "skipped", "upstream_failed", "removed"}


def say(message: str) -> None:
    print(f"[local-proof flow] {message}", file=sys.stderr, flush=True)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


# Never send 127.0.0.1/localhost through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
NO_REDIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())


class Api:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._token: str | None = None

    def token(self, refresh: bool = False) -> str:
        if self._token is None or refresh:
            with OPENER.open(f"{self.base_url}/auth/token", timeout=REQUEST_TIMEOUT) as resp:
                self._token = str(json.load(resp)["access_token"])
        return self._token

    def call(self, method: str, path: str, body: Any = None, expected: tuple[int, ...] = (200,)) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            url = f"{self.base_url}/api/v2{path}"
            request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http(s) checked in main
            request.add_header("Authorization", f"Bearer {self.token(refresh=attempt == 2)}")
            request.add_header("Accept", "application/json")
            if data is not None:
                request.add_header("Content-Type", "application/json")
            try:
                with OPENER.open(request, timeout=REQUEST_TIMEOUT) as resp:
                    status, text = resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                status, text = exc.code, exc.read().decode("utf-8", "replace")
            if status != 401:
                break
        if status not in expected:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {text[:500]}")
        return status, (json.loads(text) if text else None)

    def get(self, path: str) -> Any:
        return self.call("GET", path)[1]


def wait_until(what: str, timeout: float, check: Callable[[], Any], interval: float = 2.0) -> Any:
    """Poll ``check`` until it returns something true. A check that cannot reach the api-server
    (refused, or no answer within the request timeout: a loaded machine) counts as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except OSError as exc:  # TimeoutError, URLError; HTTP errors are answers (Api.call)
            if time.monotonic() >= deadline:
                raise
            say(f"waiting for {what}: {type(exc).__name__}: {exc}; trying again")
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s: {what}")
        time.sleep(interval)


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def wait_for_dag(api: Api, dag_id: str, timeout: float) -> None:
    def visible() -> bool:
        status, _ = api.call("GET", f"/dags/{q(dag_id)}", expected=(200, 404))
        if status == 200:
            return True
        for error in api.get("/importErrors?limit=100")["import_errors"]:
            if dag_id in str(error.get("filename", "")):
                raise RuntimeError(f"{dag_id} failed to import: {error.get('stack_trace')}")
        return False

    wait_until(f"DAG {dag_id} parsed", timeout, visible)


def trigger(api: Api, dag_id: str, conf: dict[str, Any] | None = None) -> str:
    _, body = api.call("POST", f"/dags/{q(dag_id)}/dagRuns", {"logical_date": None, "conf": conf or {}})
    return str(body["dag_run_id"])


def unpause(api: Api, dag_id: str) -> None:
    api.call("PATCH", f"/dags/{q(dag_id)}", {"is_paused": False})


def task_states(api: Api, dag_id: str, run_id: str) -> dict[str, str | None]:
    body = api.get(f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances?limit=100")
    return {ti["task_id"]: ti.get("state") for ti in body["task_instances"]}


def wait_for_task(api: Api, dag_id: str, run_id: str, task_id: str, states: set[str], timeout: float) -> str:
    def reached() -> str | None:
        state = api.get(f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances/{q(task_id)}").get("state")
        if state in states:
            return str(state)
        if state in FINISHED_TI:
            raise RuntimeError(f"{dag_id}/{task_id} finished as {state}, wanted {sorted(states)}")
        return None

    return str(wait_until(f"{dag_id}/{task_id} in {sorted(states)}", timeout, reached, interval=1.0))


def wait_for_run(api: Api, dag_id: str, run_id: str, timeout: float) -> str:
    """Wait until the run finishes; fail at once when a task fails or waits for a retry (the
    example DAGs retry after minutes: the cause is in the first attempt's log)."""

    def finished() -> str | None:
        state = api.get(f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}")["state"]
        if state in FINISHED_RUN:
            return str(state)
        bad = {t: s for t, s in task_states(api, dag_id, run_id).items() if s in ("up_for_retry", "failed")}
        if bad:
            raise RuntimeError(f"{dag_id}/{run_id}: tasks {bad}; see their logs in the UI or /opt/airflow/logs")
        return None

    return str(wait_until(f"run {dag_id}/{run_id} finished", timeout, finished))


def xcom(api: Api, dag_id: str, run_id: str, task_id: str) -> Any:
    return api.get(f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances/{q(task_id)}/xcomEntries/return_value")[
        "value"
    ]


class ConsentForm(HTMLParser):
    """The emulator's consent page: the form's action and hidden fields, and the Allow button."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.buttons: dict[str, tuple[str, str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.action = a.get("action", "")
        elif tag == "input" and a.get("type") == "hidden":
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "button" and "id" in a:
            self.buttons[a["id"]] = (a.get("name", ""), a.get("value", ""))


def click_allow(consent_url: str, callback_prefix: str) -> str:
    """GET the consent page, submit its form as the Allow button does, follow the redirect."""
    with OPENER.open(consent_url, timeout=REQUEST_TIMEOUT) as resp:
        page = resp.read().decode()
    form = ConsentForm()
    form.feed(page)
    if form.action is None or "allow" not in form.buttons:
        raise RuntimeError("the consent page has no form with an Allow button")
    name, value = form.buttons["allow"]
    post_url = urllib.parse.urljoin(consent_url, form.action)
    data = urllib.parse.urlencode({**form.fields, name: value}).encode()
    if urllib.parse.urlsplit(post_url).scheme not in ("http", "https"):
        raise RuntimeError("the consent form posts to a non-http URL")
    request = urllib.request.Request(post_url, data=data, method="POST")  # noqa: S310 - scheme checked above
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        NO_REDIRECT.open(request, timeout=REQUEST_TIMEOUT)
        raise RuntimeError("the consent form did not redirect")
    except urllib.error.HTTPError as exc:
        if exc.code not in (302, 303):
            raise
        location = exc.headers["Location"]
    if not location.startswith(callback_prefix):
        raise RuntimeError(f"consent redirected elsewhere: {location.split('?')[0]}")
    with OPENER.open(location, timeout=2 * REQUEST_TIMEOUT) as resp:
        text = resp.read().decode("utf-8", "replace")
        return f"HTTP {resp.status}: {_title(text)}"


def _title(html_text: str) -> str:
    start = html_text.find("<title>")
    end = html_text.find("</title>")
    return html_text[start + 7 : end].strip() if start >= 0 and end > start else "(no title)"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8080")
    parser.add_argument("--callback-prefix", default="http://localhost:8080/papertrail/callback")
    parser.add_argument("--summary", required=True, help="write the JSON summary here")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound for each wait")
    check = parser.add_argument_group("the refresh check (local-proof.sh --celery)")
    check.add_argument("--refresh-check", action="store_true", help="run the refresh check instead of the flow")
    check.add_argument("--refresh-dag", default="papertrail_refresh_proof")
    check.add_argument("--expect-tasks", type=int, default=16)
    check.add_argument("--emulator-admin", default="http://127.0.0.1:8444", help="proof_emulator.py's admin port")
    check.add_argument("--workers", default="", help="the Celery workers' hostnames, comma-separated")
    check.add_argument("--grant-before", default="{}", help='the stored grant: {"generation", "expires_in"}')
    check.add_argument(
        "--release-after",
        type=float,
        default=60.0,
        help="seconds after the trigger at which every task asks for a token",
    )
    args = parser.parse_args()
    for url in (args.base_url, args.emulator_admin):
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            parser.error(f"not an http(s) URL: {url}")
    api = Api(args.base_url)
    summary: dict[str, Any] = {"phases": {}}
    timeout = args.timeout
    if args.refresh_check:
        try:
            return refresh_check(api, args, summary)
        finally:
            with open(args.summary, "w") as out:
                json.dump(summary, out, indent=2)

    def phase(name: str, started: float) -> None:
        summary["phases"][name] = round(time.monotonic() - started, 1)

    try:
        t = time.monotonic()
        wait_until("GET /auth/token", timeout, lambda: _try(api.token))
        wait_for_dag(api, "papertrail_authorize", timeout)
        wait_for_dag(api, "papertrail_extract", timeout)
        phase("dags_parsed", t)

        t = time.monotonic()
        unpause(api, "papertrail_authorize")
        run_id = trigger(api, "papertrail_authorize")
        say(f"triggered papertrail_authorize: {run_id}")
        wait_for_task(api, "papertrail_authorize", run_id, "authorize", {"success"}, timeout)
        consent_url = xcom(api, "papertrail_authorize", run_id, "authorize")["consent_url"]
        say(f"consent URL from XCom: {consent_url.split('?')[0]}?...")
        # deferred: the sensor handed the wait to the triggerer (no worker slot held)
        waiting = wait_for_task(api, "papertrail_authorize", run_id, "wait_for_consent", {"deferred"}, timeout)
        phase("authorize_until_consent_link", t)
        t = time.monotonic()
        callback = click_allow(consent_url, args.callback_prefix)
        say(f"clicked Allow (wait_for_consent was {waiting}); callback page: {callback}")
        state = wait_for_run(api, "papertrail_authorize", run_id, timeout)
        phase("consent_to_authorize_finished", t)
        summary["papertrail_authorize"] = {
            "run_id": run_id,
            "state": state,
            "wait_for_consent_seen": waiting,
            "callback_page": callback,
            "tasks": task_states(api, "papertrail_authorize", run_id),
        }
        if state == "success":
            grant = xcom(api, "papertrail_authorize", run_id, "report_grant")
            summary["papertrail_authorize"]["grant"] = {k: grant[k] for k in ("generation", "expires_at", "scope")}
        say(f"papertrail_authorize: {state}")
        if state != "success":
            return 1

        t = time.monotonic()
        extract_run = trigger(api, "papertrail_extract")
        unpause(api, "papertrail_extract")
        say(f"triggered papertrail_extract: {extract_run}")
        state = wait_for_run(api, "papertrail_extract", extract_run, timeout)
        phase("extract", t)
        tasks = task_states(api, "papertrail_extract", extract_run)
        records = {}
        for task_id, ti_state in sorted(tasks.items()):
            if ti_state == "success" and "__" in task_id:  # the extract tasks (not clear/write_manifest)
                result = xcom(api, "papertrail_extract", extract_run, task_id)
                records[task_id] = {"records": result["records"], "bytes": result["bytes"], "path": result["path"]}
            elif ti_state == "success" and task_id == "write_manifest":
                summary.setdefault("manifest", xcom(api, "papertrail_extract", extract_run, task_id))
        summary["papertrail_extract"] = {"run_id": extract_run, "state": state, "tasks": tasks, "outputs": records}
        # unpausing also started the latest scheduled run (catchup=False): report it too
        runs = api.get(f"/dags/{q('papertrail_extract')}/dagRuns?limit=100")["dag_runs"]
        summary["papertrail_extract"]["all_runs"] = {r["dag_run_id"]: r["state"] for r in runs}
        say(f"papertrail_extract: {state} ({sum(1 for s in tasks.values() if s == 'success')}/{len(tasks)} tasks)")
        return 0 if state == "success" else 1
    finally:
        with open(args.summary, "w") as out:
            json.dump(summary, out, indent=2)


def admin(base_url: str, method: str, path: str) -> dict[str, Any]:
    """The emulator's admin port (docker/proof_emulator.py)."""
    url = f"{base_url.rstrip('/')}{path}"
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)  # noqa: S310 - http(s) checked in main
    with OPENER.open(request, timeout=REQUEST_TIMEOUT) as resp:
        return dict(json.load(resp))


def mapped_instances(api: Api, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    body = api.get(f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances?limit=100")
    return [ti for ti in body["task_instances"] if ti.get("map_index", -1) >= 0]


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1)


def refresh_check(api: Api, args: argparse.Namespace, summary: dict[str, Any]) -> int:
    """Mapped tasks with an expired token on several Celery workers: exactly one refresh."""
    timeout = args.timeout
    dag_id = args.refresh_dag
    grant_before = json.loads(args.grant_before)
    t = time.monotonic()
    wait_until("GET /auth/token", timeout, lambda: _try(api.token))
    wait_for_dag(api, dag_id, timeout)
    summary["phases"]["refresh_dag_parsed"] = round(time.monotonic() - t, 1)

    expired = admin(args.emulator_admin, "POST", "/expire-access-tokens")["expired"]
    before = admin(args.emulator_admin, "GET", "/stats")
    say(
        f"stored grant generation {grant_before['generation']} expired {-grant_before['expires_in']} s ago; "
        f"the emulator expired {expired} live access token(s)"
    )
    t = time.monotonic()
    unpause(api, dag_id)
    # every task asks for its token at this instant (or once the last one started, if later)
    release_at = time.time() + args.release_after
    run_id = trigger(api, dag_id, {"release_at": release_at})
    say(f"triggered {dag_id}: {run_id}; its tasks ask for a token {args.release_after:.0f} s from now")
    state = wait_for_run(api, dag_id, run_id, timeout)
    summary["phases"]["refresh_check_run"] = round(time.monotonic() - t, 1)
    after = admin(args.emulator_admin, "GET", "/stats")
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}

    instances = mapped_instances(api, dag_id, run_id)
    per_host: dict[str, int] = {}
    for ti in instances:
        per_host[str(ti.get("hostname"))] = per_host.get(str(ti.get("hostname")), 0) + 1
    reports = []
    for ti in sorted(instances, key=lambda ti: ti["map_index"]):
        if ti.get("state") == "success":
            path = f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances/{q(ti['task_id'])}/xcomEntries/return_value"
            reports.append(api.get(f"{path}?map_index={ti['map_index']}")["value"])
    starts = sorted(ti["start_date"] for ti in instances if ti.get("start_date"))
    ends = sorted(ti["end_date"] for ti in instances if ti.get("end_date"))
    generations = sorted({r["generation"] for r in reports})
    released = [r["released_at"] for r in reports if r.get("released_at")]
    check = {
        "run_id": run_id,
        "state": state,
        "tasks": len(instances),
        "tasks_success": sum(1 for ti in instances if ti.get("state") == "success"),
        "tasks_per_worker": per_host,
        "worker_hostnames": args.workers.split(",") if args.workers else [],
        "first_task_start_to_last_end_s": _seconds(starts[0], ends[-1]) if starts and ends else None,
        "left_the_barrier_together": sum(1 for r in reports if r.get("arrived_at_release", 0) >= args.expect_tasks),
        "barrier_release_spread_s": round(max(released) - min(released), 2) if released else None,
        "released_after_release_at_s": round(max(released) - release_at, 2) if released else None,
        "generation_before": grant_before["generation"],
        "generations_seen_by_tasks": generations,
        "access_tokens_expired_at_emulator": expired,
        "emulator_delta": delta,
        "emulator_totals": {k: after[k] for k in ("refresh_grants", "grants_revoked", "invalid_grant_errors")},
    }
    summary["refresh_check"] = check
    problems = []
    if state != "success" or check["tasks_success"] != args.expect_tasks or len(instances) != args.expect_tasks:
        problems.append(
            f"{check['tasks_success']}/{len(instances)} tasks succeeded (run {state}), wanted {args.expect_tasks}"
        )
    if check["left_the_barrier_together"] != args.expect_tasks:
        problems.append(
            f"only {check['left_the_barrier_together']} task(s) left the barrier with all {args.expect_tasks} started"
        )
    if len(per_host) < 2:
        problems.append(f"the tasks ran on {len(per_host)} worker(s): {per_host}")
    if check["worker_hostnames"] and not set(per_host) <= set(check["worker_hostnames"]):
        problems.append(f"task hostnames {sorted(per_host)} are not the workers' {check['worker_hostnames']}")
    if delta.get("refresh_grants", 0) != 1 or delta.get("token_requests", 0) != 1:
        problems.append(
            f"the emulator counted {delta.get('refresh_grants', 0)} refreshes in "
            f"{delta.get('token_requests', 0)} token requests, wanted exactly 1"
        )
    if delta.get("grants_revoked", 0) or delta.get("invalid_grant_errors", 0):
        problems.append(f"a refresh token was refused or presented twice: {delta}")
    if generations != [grant_before["generation"] + 1]:
        problems.append(f"the tasks saw grant generations {generations}, wanted [{grant_before['generation'] + 1}]")
    check["problems"] = problems
    for problem in problems:
        say(f"REFRESH CHECK FAILED: {problem}")
    say(
        f"{dag_id}: {state}, {check['tasks_success']}/{len(instances)} tasks, per worker {per_host}, "
        f"emulator refreshes {delta.get('refresh_grants', 0)}, revoked {delta.get('grants_revoked', 0)}"
    )
    return 1 if problems else 0


def _try(call: Callable[[], object]) -> bool:
    try:
        call()
        return True
    except (OSError, ValueError, KeyError):
        return False


if __name__ == "__main__":
    sys.exit(main())
