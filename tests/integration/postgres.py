"""A throw-away PostgreSQL cluster for tests, from Debian's binaries (``apt-get install postgresql``).

``initdb`` into a temporary directory (as the ``postgres`` user, else ``nobody``, when we are
root: initdb refuses root), ``pg_ctl start`` listening on 127.0.0.1 only, on a free port, with
its unix socket inside that directory; readiness is a ``pg_isready`` loop with a deadline.
``stop()`` shuts it down and removes the directory. No pytest imports: the fixture decides
whether a missing PostgreSQL skips or fails (``required()``).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.waiting import wait_until

#: Set by .ci/run: a missing PostgreSQL (or driver, in the locked .venv) fails instead of skipping.
REQUIRE_ENV = "PAPERTRAIL_REQUIRE_POSTGRES"
SUPERUSER = "papertrail"
DRIVER = "postgresql+psycopg2"
_TOOLS = ("initdb", "pg_ctl", "pg_isready", "createdb")


def required() -> bool:
    return bool(os.environ.get(REQUIRE_ENV) or os.environ.get("CI"))


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` that has every tool we use (Debian's layout)."""

    def major(path: Path) -> int:
        match = re.fullmatch(r"\d+", path.parent.name)
        return int(match.group()) if match else -1

    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True):
        if all((bindir / tool).is_file() for tool in _TOOLS):
            return bindir
    return None


def missing_drivers() -> list[str]:
    """Airflow on PostgreSQL needs a sync driver (psycopg2, our URL's) and asyncpg (its derived async URL)."""
    return [name for name in ("psycopg2", "asyncpg") if importlib.util.find_spec(name) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One PostgreSQL cluster in its own temporary directory; ``start()`` ... ``stop()``."""

    def __init__(self, bindir: Path, *, ready_timeout: float = 60.0) -> None:
        self.bindir = bindir
        self.ready_timeout = ready_timeout
        self.root = Path(tempfile.mkdtemp(prefix="papertrail-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "postgres.log"
        self.port = 0
        self.password = secrets.token_urlsafe(24)
        self._as: list[str] = []
        self._uid = self._gid = -1
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Cluster:
        self._prepare_user()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        self._tool(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",  # the socket dir is 0700, ours only
            "--auth-host=scram-sha-256",
            "--no-locale",
            "-E",
            "UTF8",
            "--no-sync",
            timeout=120,
        )
        pwfile.unlink()
        self.port = free_port()
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-k {self.sockets}",
                # a throw-away cluster: durability buys nothing here, speed does
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=100",
            ]
        )
        # -W: do not let pg_ctl wait; readiness is checked below with our own deadline
        self._tool("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-W", "start", timeout=60)
        self._started = True
        self._wait_ready()
        return self

    def stop(self) -> None:
        try:
            if self._started:
                proc = self._tool(
                    "pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60, check=False
                )
                if proc.returncode != 0:
                    self._kill_postmaster()
                self._started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- use -----------------------------------------------------------------------------------
    def create_database(self, name: str) -> str:
        """Create ``name``; return its SQLAlchemy URL (TCP on 127.0.0.1, password auth)."""
        self._tool("createdb", "-h", str(self.sockets), "-p", str(self.port), "-U", SUPERUSER, name, timeout=60)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"{DRIVER}://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    # -- internals -------------------------------------------------------------------------
    def _prepare_user(self) -> None:
        """initdb refuses root: run every tool as ``postgres`` (or ``nobody``), owning the directory."""
        self.sockets.mkdir(mode=0o700)
        if os.geteuid() != 0:
            return
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            self._as = ["runuser", "-u", name, "--"]
            break
        else:
            raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists for initdb")
        os.chmod(self.root, 0o700)
        for path in (self.root, self.sockets):
            self._chown(path)

    def _chown(self, path: Path) -> None:
        if self._as:
            os.chown(path, self._uid, self._gid)

    def _tool(self, name: str, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self._as, str(self.bindir / name), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}\n"
                f"server log:\n{self.log_tail()}"
            )
        return proc

    def _wait_ready(self) -> None:
        started = time.monotonic()
        last = ""

        def ready() -> bool:
            nonlocal last
            proc = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t", "2"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            last = proc.stdout.strip()
            if proc.returncode == 0:
                return True
            # pg_ctl -W returns before the postmaster writes its pid file: judge "gone" after a grace period
            status = self._tool("pg_ctl", "-D", str(self.data), "status", timeout=30, check=False)
            if status.returncode == 3 and time.monotonic() - started > 5:
                raise RuntimeError(f"PostgreSQL exited during start-up\nserver log:\n{self.log_tail()}")
            return False

        wait_until(
            ready,
            timeout=self.ready_timeout,
            message=lambda: f"PostgreSQL not ready (pg_isready: {last})\nserver log:\n{self.log_tail()}",
        )

    def _kill_postmaster(self) -> None:
        """``pg_ctl stop`` failed: SIGKILL the postmaster this cluster started (its pid file's first line)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
