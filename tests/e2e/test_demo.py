"""The README's main command, `python3 scripts/dev.py demo`. Pointed at a service through
PAPERTRAIL_* settings alone (here an emulator the test starts), with `--auto-consent
--exit-when-ready`: it starts no emulator of its own, authorizes through headless Chromium, runs
papertrail_extract, prints the summary and stops everything it started. Without those settings
it starts the emulator itself, and Ctrl-C stops every process it started."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading

from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator
from tests.conftest import append_captured, remember_secrets
from tests.e2e.harness import REPO, free_port, proc_stat
from tests.waiting import wait_until


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW", "PYTEST_", "PAPERTRAIL_"))}
    env.update(extra)
    return env


def _demo(*args: str, env: dict[str, str], timeout: float = 900) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "dev.py"), "demo", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    append_captured(out)
    return proc.returncode, out


def _assert_summary(out: str) -> None:
    assert re.search(r"grant: +connection 'papertrail_default', generation 1, access token valid until ", out)
    assert re.search(r"extract: +success", out)
    lines = re.findall(r"^ +(\w+__\w+) +(\d+) records +(\S+\.jsonl)$", out, flags=re.M)
    assert len(lines) == 12, out[-3000:]
    assert re.search(r"^ +write_manifest +12 files +\S+/_MANIFEST\.json$", out, flags=re.M), out[-3000:]
    for task_id, records, path in lines:
        with open(path) as fh:
            assert sum(1 for _ in fh) == int(records) > 0, task_id


def _recorded_groups() -> set[int]:
    """The process groups the demo recorded (empty when it recorded none)."""
    path = REPO / ".demo" / "process-groups"
    return {int(line) for line in path.read_text().split()} if path.exists() else set()


def _leftovers() -> list[str]:
    """Pids of processes the demo started that still run: any process in the process groups or
    sessions it recorded in .demo/process-groups (Airflow's children rename themselves with
    setproctitle, which wipes /proc/<pid>/environ, so the environment alone does not find
    them), or with the demo's AIRFLOW_HOME in its environment."""
    groups = _recorded_groups()
    assert groups, "the demo recorded no process groups"
    demo_home = str(REPO / ".demo" / "airflow-home")
    leftovers = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        stat = proc_stat(int(pid))
        if stat is None or stat[0] == "Z":
            continue
        if groups & set(stat[1:]):
            leftovers.append(pid)
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if f"AIRFLOW_HOME={demo_home}".encode() in fh.read():
                    leftovers.append(pid)
        except OSError:
            continue
    return leftovers


def _assert_nothing_left_running() -> None:
    leftovers = _leftovers()
    assert not leftovers, f"demo processes left running: {leftovers}"


def test_demo_uses_the_service_named_by_the_environment():
    """PAPERTRAIL_CLIENT_ID/SECRET/BASE_URL alone switch the demo to "the real service": here an
    emulator this test runs itself, standing in for Papertrail-ai. The demo starts no emulator of
    its own, its connection carries exactly these settings, and the whole flow goes through."""
    port = free_port()
    client_id, secret = "registered-app", "registered-secret-" + "x" * 16
    remember_secrets(secret)
    service = PapertrailEmulator(
        clients=[EmulatorClient(client_id, secret, [f"http://127.0.0.1:{port}/papertrail/callback"])]
    ).start()
    try:
        env = _clean_env(
            PAPERTRAIL_CLIENT_ID=client_id, PAPERTRAIL_CLIENT_SECRET=secret, PAPERTRAIL_BASE_URL=service.base_url
        )
        rc, out = _demo("--exit-when-ready", "--port", str(port), "--auto-consent", env=env)
        assert rc == 0, out[-4000:]
        assert f"using Papertrail-ai at {service.base_url} as client 'registered-app' (no emulator)" in out
        assert "starting the Papertrail-ai emulator" not in out
        _assert_summary(out)
        stats = service.stats.snapshot()
        assert stats["consents_allowed"] == 1 and stats["authorization_code_grants"] == 1
        assert stats["api_requests"] >= 12 and stats["invalid_client_errors"] == 0
        _assert_nothing_left_running()
    finally:
        service.stop()
        remember_secrets(*service.issued_secrets)
    assert secret not in out


def test_demo_without_the_client_secret_says_what_to_set():
    rc, out = _demo("--exit-when-ready", env=_clean_env(PAPERTRAIL_CLIENT_ID="registered-app"), timeout=60)
    assert rc != 0
    assert "export PAPERTRAIL_CLIENT_SECRET" in out
    assert "starting Airflow" not in out  # refused before anything was started


def test_demo_starts_its_own_emulator_then_ctrl_c_stops_everything_it_started():
    """The README's ``dev.py demo`` without PAPERTRAIL_* settings starts the emulator itself (and
    waits for it to answer), then keeps Airflow running until a person presses Ctrl-C: it says it
    stops, exits 0, and no process it started (Airflow components, the emulator) is left.
    ``--no-flow``: the flow (Chromium clicks Allow, the extraction, the summary) runs in the test
    above, against an emulator named by the environment; one flow run fewer saves about 80 s of CI."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "dev.py"), "demo", "--no-flow"],
        cwd=REPO,
        env=_clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "press Ctrl-C to stop" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(timeout=600), "".join(lines)[-3000:]
        emulator_up = any("Emulator:" in line for line in lines)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
            for pgid in _recorded_groups():  # never leave Airflow running behind a failed test
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        reader.join(timeout=10)
        append_captured("".join(lines))
    out = "".join(lines)
    assert emulator_up, out[-3000:]
    assert "starting the Papertrail-ai emulator on 127.0.0.1:" in out and "(no emulator)" not in out
    assert "headless Chromium" not in out  # --no-flow: nothing ran against it
    assert rc == 0, out[-3000:]
    assert "[papertrail] stopping" in out
    # children get SIGTERM, then SIGKILL after 30 s
    wait_until(lambda: not _leftovers(), timeout=35, message=lambda: f"demo processes left running: {_leftovers()}")
