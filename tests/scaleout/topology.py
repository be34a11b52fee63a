"""A scale-out Airflow on one machine: CeleryExecutor workers that share nothing but the network.

:class:`ScaleoutTopology` starts, on 127.0.0.1 only:

* a throw-away PostgreSQL cluster (``tests/integration/postgres.py``): the metadata DB and,
  in a second database, Celery's result backend (``db+postgresql+psycopg2://``);
* Debian's ``redis-server`` as the Celery broker, in its own directory, nothing persisted;
* ``api_servers`` replicas of ``airflow api-server`` (one uvicorn worker each) behind Debian's
  nginx, round robin. ``[api] base_url``, ``[core] execution_api_server_url`` and ``[papertrail]
  coordinator_url`` all point at the proxy, so every Execution API call of a task, every
  refresh-coordinator request and every callback reaches whichever replica nginx picks;
* the scheduler, the dag-processor and the triggerer (the "control host", one AIRFLOW_HOME);
* ``workers`` Celery workers (``airflow celery worker``), each a "separate host": started with
  ``unshare --mount --uts --propagation private``, it gets private tmpfs mounts on ``/tmp``,
  ``/var/tmp`` and ``/dev/shm``, its own hostname (``scaleout-worker-N``, in a private
  ``/etc/hosts``), and its own AIRFLOW_HOME and log folder; the topology's directory (every
  other worker's home, the control host's files, PostgreSQL's and Redis' data) is hidden
  under a tmpfs too. So no file, lock or cache is shared between workers: an ``flock`` in
  ``/tmp`` serializes one worker only. Only the network (loopback) is shared, as between
  real hosts.

Every wait is a condition with a deadline (``tests/waiting.py``); each component's output goes
to ``<root>/logs/<component>.log`` and the failure messages quote them. ``stop()`` SIGTERMs the
one process group (SIGKILL after a deadline), checks that no process carrying the topology's
marker variable survived, stops PostgreSQL and removes the directory (kept with ``keep=True``
or ``PAPERTRAIL_SCALEOUT_KEEP=1``). Worker task logs are read from the workers' homes on the
host side (:meth:`ScaleoutTopology.worker_log_files`): the api-server cannot fetch them from the
workers' log servers, since the workers' hostnames resolve only inside their own namespaces.

Sized for a 2-core machine: one uvicorn worker per api-server, 2 task slots per Celery worker,
``[core] parallelism`` = workers x slots, one DAG-parsing process.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil
import requests

from tests.conftest import append_captured, remember_secrets
from tests.e2e.harness import (
    ADMIN_USER,
    HEALTH_KEYS,
    AirflowApi,
    HarnessError,
    _join_group,
    free_port,
    group_pids,
    pids_with_env,
)
from tests.integration.postgres import Cluster, find_bindir, missing_drivers
from tests.waiting import WaitTimeout, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
#: Every process of a topology carries this variable (value: its root directory), so that
#: ``stop()`` can find one that left the process group.
MARKER = "PAPERTRAIL_SCALEOUT_ROOT"
KEEP_ENV = "PAPERTRAIL_SCALEOUT_KEEP"
#: What a worker's mount namespace replaces with an empty tmpfs.
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
#: Longer than the coordinator's own waits (its waiters give up after 160 s, the worker's request
#: after 180 s): the proxy itself never cuts a refresh short unless a test asks for it.
DEFAULT_PROXY_READ_TIMEOUT = 190


def missing_prerequisites() -> list[str]:
    """What this machine lacks for a topology (empty when it can run)."""
    missing = []
    if find_bindir() is None:
        missing.append("PostgreSQL (apt-get install -y postgresql)")
    missing.extend(f"the {name} Python package (dev dependency)" for name in missing_drivers())
    if not Path(REDIS).is_file():
        missing.append("redis-server (apt-get install -y redis-server)")
    if not Path(NGINX).is_file():
        missing.append("nginx (apt-get install -y nginx)")
    if not Path(UNSHARE).is_file():
        missing.append("unshare (util-linux)")
    if os.geteuid() != 0:
        missing.append("root (unshare --mount and tmpfs mounts)")
    for module in ("celery", "redis", "airflow.providers.celery"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the {module} Python package (dev dependency)")
    return missing


def _under(path: Path, parents: Iterable[Path | str]) -> bool:
    return any(path == Path(p) or path.is_relative_to(p) for p in parents)


def private_host_argv(
    name: str, *, home: Path, root: Path, hosts: Path, command: list[str], code: Iterable[Path] = ()
) -> list[str]:
    """``argv`` that runs ``command`` as if on a host of its own named ``name``.

    ``unshare --mount --uts --propagation private`` (nothing mounted inside reaches the real
    machine), then: the host name; ``hosts`` bound on ``/etc/hosts`` (so the name resolves
    without DNS); empty tmpfs mounts on :data:`PRIVATE_DIRS` and on ``root`` (the topology's
    directory: every other worker's home, the control host's files); ``home`` bound back at its
    own path. The repo, this venv and ``code`` stay visible (shared read-only code, as in an
    image), re-bound if they live under a hidden directory (a CI clone in /tmp)."""
    hidden = [*PRIVATE_DIRS, str(root)]
    keep = [home]
    for path in (REPO, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), *code):
        if _under(path, hidden) and not any(_under(path, [k]) for k in keep):
            keep.append(path)
    script = ["set -eu", "mount -t tmpfs -o size=1m,mode=0700 tmpfs /mnt"]
    for i, path in enumerate(keep):
        script += [f"mkdir /mnt/k{i}", f"mount --bind {shlex.quote(str(path))} /mnt/k{i}"]
    script.append(f"mount --bind {shlex.quote(str(hosts))} /etc/hosts")
    for folder in PRIVATE_DIRS:
        script.append(f"mount -t tmpfs -o mode=1777,size=512m tmpfs {folder}")
    quoted_root = shlex.quote(str(root))
    script += [f"mkdir -p {quoted_root}", f"mount -t tmpfs -o mode=0755,size=1m tmpfs {quoted_root}"]
    for i, path in enumerate(keep):
        script += [f"mkdir -p {shlex.quote(str(path))}", f"mount --move /mnt/k{i} {shlex.quote(str(path))}"]
    script += ["umount /mnt", f"hostname {shlex.quote(name)}", "exec " + shlex.join(command)]
    return [UNSHARE, "--mount", "--uts", "--propagation", "private", "--", "sh", "-c", "\n".join(script)]


class ScaleoutTopology(AirflowApi):
    """The whole topology; ``with ScaleoutTopology(dags) as topo:`` starts and stops it.

    The REST API methods of :class:`~tests.e2e.harness.AirflowApi` go through the proxy.

    :param dags_folder: the DAG files every component reads (a "baked image": read-only, shared).
    :param workers: number of Celery workers, each in its own mount and UTS namespace.
    :param worker_concurrency: task slots per worker (``[celery] worker_concurrency``).
    :param api_servers: api-server replicas behind nginx.
    :param proxy_read_timeout: nginx's ``proxy_read_timeout`` in seconds.
    :param refresh_coordinator: ``[papertrail] refresh_coordinator`` on every component
        (``api-server``: what token-custody.md asks of multi-machine deployments).
    :param encryption_key: ``[papertrail] token_encryption_keys`` (generated when None).
    :param extra_env: more variables for every component.
    """

    def __init__(
        self,
        dags_folder: Path | str,
        *,
        workers: int = 3,
        worker_concurrency: int = 2,
        api_servers: int = 2,
        proxy_read_timeout: float = DEFAULT_PROXY_READ_TIMEOUT,
        refresh_coordinator: str = "api-server",
        encryption_key: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        start_timeout: float = 300.0,
        root: Path | str | None = None,
        keep: bool | None = None,
    ) -> None:
        from cryptography.fernet import Fernet

        if workers < 1 or api_servers < 1 or worker_concurrency < 1:
            raise ValueError("workers, api_servers and worker_concurrency must be at least 1")
        self.dags_folder = Path(dags_folder).resolve()
        self.worker_count = workers
        self.worker_concurrency = worker_concurrency
        self.api_server_count = api_servers
        self.proxy_read_timeout = proxy_read_timeout
        self.coordinator_read_timeout = proxy_read_timeout
        self.killed: set[str] = set()
        self.start_timeout = start_timeout
        self.keep = bool(os.environ.get(KEEP_ENV)) if keep is None else keep
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="papertrail-scaleout-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.root / "logs"
        #: One directory every worker sees at the same path (a shared mount, as NFS would be):
        #: where DAGs that write files from several workers put them (``base_path``).
        self.shared_dir = self.root / "shared"
        self.control_home = self.root / "control"
        self.proxy_port = free_port()
        self.api_ports = [free_port() for _ in range(api_servers)]
        self.redis_port = free_port()
        self.worker_names = [f"scaleout-worker-{n}" for n in range(1, workers + 1)]
        self.encryption_key = encryption_key or Fernet.generate_key().decode()
        password = "pw-" + secrets.token_urlsafe(18)
        super().__init__(f"http://127.0.0.1:{self.proxy_port}", password=password)
        self._secrets = {
            "fernet": Fernet.generate_key().decode(),
            "jwt": secrets.token_urlsafe(64),  # HS512: >= 64 bytes or a warning per token
            "api": secrets.token_urlsafe(32),
        }
        remember_secrets(password, self.encryption_key, *self._secrets.values())
        self.refresh_coordinator = refresh_coordinator
        self.extra_env = dict(extra_env or {})
        self.cluster: Cluster | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pgid: int | None = None
        self.timings: dict[str, float] = {}
        self._files: list[IO[bytes]] = []
        self._stopped = False
        self.env: dict[str, str] = {}  # the shared part, complete once PostgreSQL runs

    # -- paths -------------------------------------------------------------------------------------

    def worker_home(self, name: str) -> Path:
        return self.root / "workers" / name

    def worker_log_files(self, name: str | None = None) -> list[Path]:
        """Task log files the workers wrote (one worker's with ``name``)."""
        names = [name] if name else self.worker_names
        found: list[Path] = []
        for worker in names:
            folder = self.worker_home(worker) / "logs"
            if folder.exists():
                found.extend(p for p in folder.rglob("*") if p.is_file())
        return sorted(found)

    @property
    def proxy_access_log(self) -> Path:
        return self.root / "nginx" / "access.log"

    # -- environment -------------------------------------------------------------------------------

    def _shared_env(self, db_url: str, result_backend: str) -> dict[str, str]:
        """What every component must share: one metadata DB, the keys, the URLs of the proxy."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW", "PYTEST_"))}
        env.update(
            {
                MARKER: str(self.root),
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
                "NO_COLOR": "1",
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__PARALLELISM": str(self.worker_count * self.worker_concurrency),
                "AIRFLOW__CORE__FERNET_KEY": self._secrets["fernet"],
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.control_home / "passwords.json"),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": self._secrets["api"],
                "AIRFLOW__API_AUTH__JWT_SECRET": self._secrets["jwt"],
                "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
                "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
                "AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": self.encryption_key,
                "AIRFLOW__PAPERTRAIL__COORDINATOR_URL": f"{self.base_url}/papertrail/token",
                "AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR": self.refresh_coordinator,
                "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
                # idle CPU: see tests/e2e/harness.py (0.49 -> about 0.1 cores per idle stack)
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "1",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
                "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                # see tests/e2e/harness.py: the supervisor notices its task's exit sooner
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
                # A worker killed with its tasks: the scheduler fails them (and retries them on
                # another worker) after 30 s without a heartbeat instead of Airflow's 300 s.
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
            }
        )
        env.update(self.extra_env)
        return env

    def _home_env(self, home: Path, **extra: str) -> dict[str, str]:
        env = dict(self.env)
        env.update(
            AIRFLOW_HOME=str(home),
            AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(home / "logs"),
            AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH=str(home / "dag_bundles"),
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
        )
        env.update(extra)
        return env

    # -- processes ---------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        self._files.append(log)
        proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            **_join_group(self.pgid),
        )
        if self.pgid is None:
            self.pgid = proc.pid
        self.procs[name] = proc
        return proc

    def component_log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def log_tail(self, chars: int = 3000, names: Iterable[str] | None = None) -> str:
        """The end of each component's output (every component without ``names``)."""
        wanted = list(names) if names is not None else sorted(p.stem for p in self.log_dir.glob("*.log"))
        return "\n".join(f"===== {n}\n{self.component_log(n)[-chars:]}" for n in wanted)

    def all_logs(self) -> str:
        """Every component's output and every task log file (what a leak check scans)."""
        parts = [self.component_log(p.stem) for p in sorted(self.log_dir.glob("*.log"))]
        for home in [self.control_home, *(self.worker_home(n) for n in self.worker_names)]:
            folder = home / "logs"
            if folder.exists():
                for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                    parts.append(f"===== {path}\n{path.read_text(encoding='utf-8', errors='replace')}")
        if self.proxy_access_log.exists():
            parts.append(self.proxy_access_log.read_text(errors="replace"))
        return "\n".join(parts)

    def check_running(self) -> None:
        """Raise if a component has exited (with the end of its output)."""
        for name, proc in self.procs.items():
            if name not in self.killed and proc.poll() is not None:
                raise HarnessError(f"{name} exited with {proc.returncode}:\n{self.log_tail(names=[name], chars=6000)}")

    def pids(self) -> list[int]:
        found = set(pids_with_env(MARKER, str(self.root)))
        if self.pgid is not None:
            found.update(group_pids(self.pgid))
        return sorted(found)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> ScaleoutTopology:
        missing = missing_prerequisites()
        if missing:
            raise HarnessError("the scale-out topology needs " + ", ".join(missing))
        if self.procs or self._stopped:
            raise HarnessError("a topology starts once")
        _LIVE.add(self)
        started = time.monotonic()
        try:
            self._start(started)
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - started
        return self

    def _remaining(self, started: float) -> float:
        return max(1.0, self.start_timeout - (time.monotonic() - started))

    def _start(self, started: float) -> None:
        for folder in (self.log_dir, self.control_home, self.root / "redis", self.root / "nginx", self.shared_dir):
            folder.mkdir(parents=True, exist_ok=True)
        bindir = find_bindir()
        assert bindir is not None
        self.cluster = Cluster(bindir).start()
        remember_secrets(self.cluster.password)
        db_url = self.cluster.create_database("airflow")
        results_url = self.cluster.create_database("celery_results")
        self.env = self._shared_env(db_url, "db+" + results_url)
        passwords = self.control_home / "passwords.json"
        passwords.write_text(json.dumps({ADMIN_USER: self.password}) + "\n")
        passwords.chmod(0o600)
        self.timings["postgres_s"] = time.monotonic() - started

        self._start_redis()
        control = self._home_env(self.control_home)
        migrate = subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"],
            env=control,
            cwd=self.control_home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=self._remaining(started),
            check=False,
        )
        (self.log_dir / "db-migrate.log").write_bytes(migrate.stdout)
        if migrate.returncode != 0:
            raise HarnessError(
                f"airflow db migrate exited {migrate.returncode}:\n{self.log_tail(names=['db-migrate'])}"
            )
        self._create_result_tables(results_url)
        self.timings["migrate_s"] = time.monotonic() - started

        for n, port in enumerate(self.api_ports, start=1):
            self._spawn_api_server(f"api-server-{n}", port)
        for name in ("scheduler", "dag-processor", "triggerer"):
            env = self._home_env(
                self.control_home,
                AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST="127.0.0.1",
                AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT=str(free_port()),
            )
            self._spawn(name, [str(BIN / "airflow"), name], env, self.control_home)
        for name in self.worker_names:
            self._start_worker(name)
        self._start_nginx()

        for n, port in enumerate(self.api_ports, start=1):
            self._wait_http(f"http://127.0.0.1:{port}/api/v2/monitor/health", f"api-server-{n}", started)
        # The Execution API sub-app builds itself on its first request (4 s idle, 20 s on a loaded
        # 2-core machine): pay it here, on every replica at once.
        with concurrent.futures.ThreadPoolExecutor(len(self.api_ports)) as pool:
            warm = [
                pool.submit(self._wait_http, f"http://127.0.0.1:{port}/execution/health", "api-server", started)
                for port in self.api_ports
            ]
            for future in warm:
                future.result()
        self._wait_http(f"{self.base_url}/api/v2/monitor/health", "nginx", started)
        wait_until(
            self._healthy_or_crashed,
            self._remaining(started),
            interval=0.25,
            message=lambda: f"not healthy through the proxy: {self.health()}\n{self.log_tail()}",
            ignore=(requests.RequestException,),
        )
        self.timings["healthy_s"] = time.monotonic() - started
        wait_until(
            self._workers_answer,
            self._remaining(started),
            interval=0.5,
            message=lambda: f"Celery workers not all answering a ping:\n{self.log_tail(names=self.worker_names)}",
        )
        self.timings["workers_ready_s"] = time.monotonic() - started

    def _spawn_api_server(self, name: str, port: int) -> None:
        env = self._home_env(self.control_home, AIRFLOW__API__HOST="127.0.0.1", AIRFLOW__API__PORT=str(port))
        self._spawn(name, [str(BIN / "airflow"), "api-server"], env, self.control_home)

    def _healthy_or_crashed(self) -> bool:
        self.check_running()
        health = self.health()
        return all((health.get(key) or {}).get("status") == "healthy" for key in HEALTH_KEYS)

    def _wait_http(self, url: str, what: str, started: float) -> None:
        def answers() -> bool:
            self.check_running()
            return self.http.get(url, timeout=10).status_code == 200

        wait_until(
            answers,
            self._remaining(started),
            interval=0.25,
            message=lambda: f"{what} never answered {url}:\n{self.log_tail()}",
            ignore=(requests.RequestException,),
        )

    def _start_redis(self) -> None:
        folder = self.root / "redis"
        argv = [
            REDIS,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.redis_port),
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        self._spawn("redis", argv, self.env, folder)

        def pong() -> bool:
            self.check_running()
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")

        wait_until(
            pong,
            30,
            interval=0.1,
            message=lambda: f"redis never answered PING:\n{self.log_tail(names=['redis'])}",
            ignore=(OSError,),
        )

    @staticmethod
    def _create_result_tables(results_url: str) -> None:
        """Celery's database backend creates its tables on first use, from every worker at once
        (a race on PostgreSQL's catalog): create them before any worker starts."""
        from celery.backends.database.models import ResultModelBase
        from sqlalchemy import create_engine

        engine = create_engine(results_url)
        try:
            ResultModelBase.metadata.create_all(engine)
        finally:
            engine.dispose()

    def _start_nginx(self) -> None:
        prefix = self.root / "nginx"
        self._write_nginx_conf()
        conf = prefix / "nginx.conf"
        self._spawn("nginx", [NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"], self.env, prefix)

    def _write_nginx_conf(self) -> None:
        prefix = self.root / "nginx"
        servers = "\n".join(f"        server 127.0.0.1:{port};" for port in self.api_ports)
        coordinator_servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=0;" for port in self.api_ports)
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    # $uri, not $request: the query of /papertrail/callback carries the authorization code and
    # the state (docs/scaling-out.md asks the same of every proxy in front of the api-server)
    log_format upstream '$remote_addr "$request_method $uri $server_protocol" $status upstream=$upstream_addr rt=$request_time';
    access_log {prefix}/access.log upstream;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    # round robin (nginx's default); a replica that refuses a connection is skipped for the
    # request (proxy_next_upstream error: never a request it may have started processing)
    upstream airflow {{
{servers}
    }}
    # The coordinator's own group, max_fails=0: nginx counts every timeout as a failed attempt
    # (whatever proxy_next_upstream says), and after one (max_fails=1, fail_timeout=10s) takes
    # the replica out of its group for 10 s. A coordinator request that outlives a short
    # proxy_read_timeout would then take healthy replicas away from the Execution API too
    # (seen: "502 upstream=airflow", no live replica, task heartbeats refused).
    upstream papertrail_coordinator {{
{coordinator_servers}
    }}
    server {{
        listen 127.0.0.1:{self.proxy_port};
        location / {{
            proxy_pass http://airflow;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_read_timeout {self.proxy_read_timeout}s;
            proxy_next_upstream error;
        }}
        # the refresh coordinator, with a read timeout of its own (a test may shorten it)
        location = /papertrail/token {{
            proxy_pass http://papertrail_coordinator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_read_timeout {self.coordinator_read_timeout}s;
            proxy_next_upstream error;
        }}
    }}
}}
"""
        )

    def reload_proxy(self, *, coordinator_read_timeout: float | None = None, timeout: float = 30.0) -> None:
        """Rewrite nginx's configuration and reload it (``SIGHUP``, as ``nginx -s reload``);
        returns once the old worker process has been replaced."""
        self.coordinator_read_timeout = (
            self.proxy_read_timeout if coordinator_read_timeout is None else coordinator_read_timeout
        )
        self._write_nginx_conf()
        master = psutil.Process(self.procs["nginx"].pid)
        old = {p.pid for p in master.children()}
        master.send_signal(signal.SIGHUP)

        def replaced() -> bool:
            self.check_running()
            now = {p.pid for p in master.children() if p.status() != psutil.STATUS_ZOMBIE}
            return bool(now) and not (now & old)

        wait_until(
            replaced, timeout, interval=0.1, message=lambda: f"nginx never reloaded:\n{self.log_tail(names=['nginx'])}"
        )
        self._wait_http(f"{self.base_url}/api/v2/monitor/health", "nginx", time.monotonic())

    # -- faults ------------------------------------------------------------------------------------

    def process_tree(self, name: str) -> list[psutil.Process]:
        """A component's process and every process under it."""
        root = psutil.Process(self.procs[name].pid)
        return [root, *root.children(recursive=True)]

    def kill(self, name: str) -> list[int]:
        """SIGKILL a component and every process under it at once, as a host losing power would
        (a worker's private tmpfs mounts go with its namespace). Returns the pids killed."""
        self.killed.add(name)
        # Freeze the tree first (SIGSTOP), re-listing until no new child appears, so that no
        # process forked between listing and killing escapes; then SIGKILL all at once.
        tree = self.process_tree(name)
        for _ in range(10):  # bounded
            for proc in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGSTOP)
            again = self.process_tree(name)
            if {p.pid for p in again} <= {p.pid for p in tree}:
                break
            tree = again
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(tree, timeout=30)
        if alive:
            raise HarnessError(f"{name}: processes survived SIGKILL: {[p.pid for p in alive]}")
        self.procs[name].wait(timeout=10)
        return [p.pid for p in tree]

    def restart(self, name: str, timeout: float = 240.0) -> None:
        """Start a killed component again (a fresh host for a worker: new namespace, empty /tmp)."""
        if name not in self.killed:
            raise HarnessError(f"{name} was not killed")
        started = time.monotonic()
        deadline = started + timeout
        if name in self.worker_names:
            self._start_worker(name)
            self.killed.discard(name)
            wait_until(
                self._workers_answer,
                max(1.0, deadline - time.monotonic()),
                interval=0.5,
                message=lambda: f"{name} never answered a ping again:\n{self.log_tail(names=[name])}",
            )
        elif name.startswith("api-server-"):
            port = self.api_ports[int(name.rsplit("-", 1)[1]) - 1]
            self._spawn_api_server(name, port)
            self.killed.discard(name)
            start = time.monotonic() - (self.start_timeout - timeout)  # _wait_http's budget = timeout
            self._wait_http(f"http://127.0.0.1:{port}/api/v2/monitor/health", name, start)
            self._wait_http(f"http://127.0.0.1:{port}/execution/health", name, start)
        else:
            raise HarnessError(f"restart() knows workers and api-servers, not {name}")
        self.timings[f"restart_{name}_s"] = time.monotonic() - started

    def task_processes(self) -> list[int]:
        """Task processes running on the workers now (Airflow titles them ``airflow worker -- <ti id>``)."""
        found = []
        for name in self.worker_names:
            if name in self.killed:
                continue
            for proc in self.process_tree(name):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if " ".join(proc.cmdline()).startswith("airflow worker --"):
                        found.append(proc.pid)
        return found

    def api_server_owning(self, local_port: int) -> str | None:
        """The api-server replica one of whose TCP sockets has ``local_port`` as its own port
        (e.g. the source port of the token request the emulator is holding), or None."""
        for n in range(1, self.api_server_count + 1):
            name = f"api-server-{n}"
            if name in self.killed:
                continue
            for proc in self.process_tree(name):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if any(c.laddr and c.laddr.port == local_port for c in proc.net_connections(kind="tcp")):
                        return name
        return None

    def _start_worker(self, name: str) -> None:
        home = self.worker_home(name)
        (home / "logs").mkdir(parents=True, exist_ok=True)
        hosts = home / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + f"\n127.0.1.1 {name}\n")
        env = self._home_env(home, TMPDIR="/tmp")  # its private tmpfs
        worker = [
            str(BIN / "airflow"),
            "celery",
            "worker",
            "--celery-hostname",
            f"{name}@%h",
            "--concurrency",
            str(self.worker_concurrency),
            # the api-server could not resolve this worker's hostname to fetch logs from it anyway
            "--skip-serve-logs",
            "--without-gossip",
            "--without-mingle",
        ]
        argv = private_host_argv(
            name, home=home, root=self.root, hosts=hosts, command=worker, code=[self.dags_folder, self.shared_dir]
        )
        self._spawn(name, argv, env, REPO)

    def _workers_answer(self) -> bool:
        self.check_running()
        from celery import Celery

        app = Celery(broker=self.env["AIRFLOW__CELERY__BROKER_URL"])
        try:
            replies = app.control.ping(timeout=1.0) or []
        finally:
            app.close()
        answered = {node.split("@", 1)[0] for reply in replies for node in reply}
        return answered >= set(self.worker_names)

    def stop(self, timeout: float = 45.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout`` s, check that nothing
        of the topology survived, stop PostgreSQL, hand the logs to the log canary, remove the
        directory (unless kept). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        _LIVE.discard(self)
        started = time.monotonic()
        survivors: list[int] = []
        try:
            # Workers and the scheduler first, while the broker, the result backend and the
            # api-servers they report to still answer (a Celery worker whose broker is gone
            # retries its connection through its warm shutdown); then everything else.
            first = [p for n, p in self.procs.items() if n in {*self.worker_names, "scheduler", "triggerer"}]
            for proc in first:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(WaitTimeout):
                wait_until(lambda: all(p.poll() is not None for p in first), timeout / 2, interval=0.2)
            self.timings["stop_workers_s"] = time.monotonic() - started
            self._note_survivors("after the workers and the scheduler stopped")
            if self.pgid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGTERM)
                try:
                    wait_until(lambda: not self.pids(), timeout, interval=0.2)
                except WaitTimeout:
                    self._note_survivors(f"still running {timeout} s after SIGTERM; SIGKILL")
                    for pid in self.pids():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pgid, signal.SIGKILL)
                    with contextlib.suppress(WaitTimeout):
                        wait_until(lambda: not self.pids(), 10, interval=0.1)
                survivors = self.pids()
            for proc in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            self.timings["stop_processes_s"] = time.monotonic() - started
        finally:
            for handle in self._files:
                handle.close()
            if self.cluster is not None:
                self.cluster.stop()
            self.timings["stop_s"] = time.monotonic() - started
            append_captured(self.all_logs())
            if not self.keep and not survivors:
                shutil.rmtree(self.root, ignore_errors=True)
        if survivors:
            raise HarnessError(f"processes of the topology survived SIGKILL: {survivors} (kept {self.root})")

    def _note_survivors(self, when: str) -> None:
        """Write which processes are still alive (pid and command line) to ``logs/stop.log``."""
        lines = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                lines.append(f"  {pid} {cmd[:160]}")
        with (self.log_dir / "stop.log").open("a") as log:
            log.write(
                f"{time.strftime('%H:%M:%S')} {when}: {len(lines)} processes\n" + "".join(f"{x}\n" for x in lines)
            )

    def __enter__(self) -> ScaleoutTopology:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------------------------------

    def python(self, *args: str, stdin: str = "", timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run this venv's python with the control host's environment (metadata DB, keys), in the repo."""
        env = self._home_env(self.control_home, PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [sys.executable, *args],
            env=env,
            cwd=REPO,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        with (self.log_dir / "control-python.log").open("a") as log:
            log.write(f"$ python {' '.join(args)} -> {proc.returncode}\n{proc.stderr}\n")
        if proc.returncode != 0:
            raise HarnessError(f"python {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return proc

    def proxy_requests(self, path_prefix: str = "") -> list[dict[str, str]]:
        """The proxied requests so far (for paths starting with ``path_prefix``), oldest first:
        ``{"method", "path", "status", "upstream"}`` from nginx's access log."""
        found: list[dict[str, str]] = []
        if not self.proxy_access_log.exists():
            return found
        for line in self.proxy_access_log.read_text(errors="replace").splitlines():
            try:
                method, target = line.split('"', 2)[1].split(" ")[:2]
                status = line.split('"', 2)[2].split()[0]
            except (IndexError, ValueError):
                continue
            path = target.split("?", 1)[0]
            if not path.startswith(path_prefix):
                continue
            upstream = line.split("upstream=", 1)[1].split(" ", 1)[0] if "upstream=" in line else ""
            found.append({"method": method, "path": path, "status": status, "upstream": upstream})
        return found

    def upstreams_used(self, path_prefix: str = "") -> dict[str, int]:
        """How many proxied requests (for paths starting with ``path_prefix``) each api-server replica served."""
        counts: dict[str, int] = {}
        if not self.proxy_access_log.exists():
            return counts
        for line in self.proxy_access_log.read_text(errors="replace").splitlines():
            try:
                path = line.split('"', 2)[1].split(" ")[1]
            except IndexError:
                continue
            if not path.startswith(path_prefix) or "upstream=" not in line:
                continue
            upstream = line.split("upstream=", 1)[1].split(" ", 1)[0]
            counts[upstream] = counts.get(upstream, 0) + 1
        return counts


_LIVE: set[ScaleoutTopology] = set()


@atexit.register
def _stop_leftovers() -> None:  # pytest killed mid-test: do not leave a topology running
    for topology in list(_LIVE):
        with contextlib.suppress(Exception):
            topology.stop(timeout=5)


def topology_config(topology: ScaleoutTopology) -> dict[str, Any]:
    """A summary for reports and failure messages (no secrets)."""
    return {
        "root": str(topology.root),
        "proxy": topology.base_url,
        "api_servers": [f"127.0.0.1:{p}" for p in topology.api_ports],
        "workers": topology.worker_names,
        "worker_concurrency": topology.worker_concurrency,
        "timings": {k: round(v, 1) for k, v in topology.timings.items()},
    }
