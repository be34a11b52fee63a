"""The E2E harness's own proof, shared by the modules that use it: a real Airflow runs a DAG with
a deferral, the REST helpers read it back, headless Chromium follows a form POST and a 302 to the
stack's port, and stop() leaves nothing behind.

``run_stack_smoke`` runs on the stack of tests/e2e/test_refresh_concurrency.py (same DAGs folder)
as that module's last test: one Airflow start less in CI (about 40 s to a minute and a half on a
loaded 2-core machine)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from tests.e2e.dags.e2e_smoke import MARKER, PAYLOAD
from tests.e2e.harness import open_and_click

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.sync_api import Browser

    from tests.e2e.harness import AirflowStack

DAG_ID = "e2e_smoke"

CONSENT_PAGE = b"""<!doctype html>
<html><head><title>Consent</title></head>
<body><h1>Allow access?</h1>
<form method="post" action="/decide"><input type="hidden" name="choice" value="allow">
<button id="allow" type="submit">Allow</button></form></body></html>"""


@contextlib.contextmanager
def consent_server(redirect_to: str) -> Iterator[str]:
    """A page with an "Allow" form on 127.0.0.1; submitting it answers 302 to ``redirect_to``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(CONSENT_PAGE)))
            self.end_headers()
            self.wfile.write(CONSENT_PAGE)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/consent"
    finally:
        server.shutdown()
        server.server_close()


def run_stack_smoke(stack: AirflowStack, browser: Browser) -> None:
    """The harness's own proof, on a started stack whose DAGs folder is tests/e2e/dags; it ends
    by stopping the stack, so it is the last thing a module does with it."""
    t0 = time.monotonic()
    timings = dict(stack.timings)

    # -- a DAG run through the REST API, with a deferral through the triggerer --------------------
    # Deadlines, not sleeps: generous, because CI runs the version suites beside this one.
    stack.wait_for_dag(DAG_ID, timeout=180)
    stack.unpause(DAG_ID)
    t_trigger = time.monotonic()
    run_id = stack.trigger(DAG_ID, conf={"origin": "e2e"})
    assert stack.wait_for_task_state(DAG_ID, run_id, "wait_deferred", {"deferred"}, timeout=180) == "deferred"
    assert stack.wait_for_run(DAG_ID, run_id, timeout=180) == "success", stack.task_states(DAG_ID, run_id)
    timings["trigger_to_success_s"] = time.monotonic() - t_trigger

    assert stack.task_states(DAG_ID, run_id) == {"produce": "success", "wait_deferred": "success", "report": "success"}
    seen = stack.seen_states(DAG_ID, run_id, "wait_deferred")
    assert "deferred" in seen and seen[-1] == "success", seen
    assert stack.xcom(DAG_ID, run_id, "produce") == PAYLOAD
    ti = stack.task_instance(DAG_ID, run_id, "wait_deferred")
    assert ti["try_number"] == 1 and ti["start_date"] and ti["end_date"], ti
    log = stack.task_log(DAG_ID, run_id, "report")
    assert f"{MARKER} answer=42" in log, log
    assert stack.dag_run(DAG_ID, run_id)["conf"] == {"origin": "e2e"}

    # -- Variables through the REST API (and what Airflow redacts) ---------------------------------
    assert stack.variable("e2e_missing") is None
    stack.set_variable("e2e_plain", "visible-value")
    assert stack.variable("e2e_plain") == "visible-value"
    stack.set_variable("e2e_token_probe", "hidden-value")
    assert stack.variable("e2e_token_probe") == "***"  # the API redacts keys that look sensitive
    assert stack.variable_unredacted("e2e_token_probe") == "hidden-value"
    assert stack.variable_unredacted("e2e_missing") is None

    # -- headless Chromium: form POST -> 302 -> the stack's port -----------------------------------
    target = f"{stack.base_url}/e2e/landing?x=1"
    t_browser = time.monotonic()
    with consent_server(target) as consent_url:
        final_url, text = open_and_click(browser, consent_url, "#allow", wait_for_url_prefix=f"{stack.base_url}/e2e/")
    timings["browser_s"] = time.monotonic() - t_browser
    assert final_url == target
    assert isinstance(text, str)

    # -- stop: nothing of this stack survives -------------------------------------------------------
    pgid = stack.pgid
    assert pgid is not None and stack.pids()
    stopping = _ticks_since_boot()
    stack.stop()
    timings["stop_s"] = stack.timings["stop_s"]
    assert stack.pids() == []
    pgrep = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True, check=False)
    # Once the group is gone its id may be reused by a new group (CI runs other suites beside this
    # one): only a process that started before stop() can be a leftover of this stack.
    left = [pid for pid in pgrep.stdout.split() if (_started_at(int(pid)) or stopping) < stopping]
    assert left == [], f"processes left in group {pgid}: {left}"
    assert "harness       | stopped" in stack.logs()
    assert stack.password and stack.password not in stack.all_logs()

    timings["total_s"] = time.monotonic() - t0
    print("E2E timings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))


def _ticks_since_boot() -> int:
    with open("/proc/uptime") as fh:
        return int(float(fh.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _started_at(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    return int(raw[raw.rfind(")") + 2 :].split()[19])
