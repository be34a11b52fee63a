"""Static checks of docker/ (Dockerfile, docker-compose.yaml, .env.example); no Docker engine needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from airflow_papertrail.oauth.config import OAuthClientConfig
from airflow_papertrail.testing import emulator

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"

AIRFLOW_COMPONENTS = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)
LONG_RUNNING = (
    "postgres",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "papertrail-emulator",
    "redis",
    "airflow-worker",
)
SHARED_ENV = (
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS",
    "AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR",
    "AIRFLOW__PAPERTRAIL__COORDINATOR_URL",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW_CONN_PAPERTRAIL_DEFAULT",
)
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}; "$$" is an escaped literal "$".
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:]?[-?][^}]*)?\}")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _interpolate(text: str, env: dict[str, str]) -> str:
    return VAR_RE.sub(lambda m: env[m.group(1)], text.replace("$$", "\0")).replace("\0", "$")


def _env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of environment"
    return {k: str(v) for k, v in env.items()}


def test_required_services_present():
    services = _compose()["services"]
    for name in (*AIRFLOW_COMPONENTS, "postgres", "papertrail-emulator", "redis"):
        assert name in services, name
    assert services["postgres"]["image"] == "postgres:16"
    assert services["airflow-apiserver"]["command"] == "api-server"
    # the optional celery setup must not start with a plain "up"
    assert services["redis"]["profiles"] == ["celery"]
    assert services["airflow-worker"]["profiles"] == ["celery"]
    for name in services:
        if name not in ("redis", "airflow-worker"):
            assert "profiles" not in services[name], name


def test_airflow_components_share_secrets_and_urls():
    services = _compose()["services"]
    reference = _env_of(services["airflow-apiserver"])
    assert reference["AIRFLOW__CORE__FERNET_KEY"] == "${AIRFLOW_FERNET_KEY}"
    assert reference["AIRFLOW__API_AUTH__JWT_SECRET"] == "${AIRFLOW_JWT_SECRET}"
    # the api-server reads task logs from a worker's log server with tokens signed by [api] secret_key
    assert reference["AIRFLOW__API__SECRET_KEY"] == "${AIRFLOW_API_SECRET_KEY}"
    assert reference["AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS"] == "${PAPERTRAIL_TOKEN_ENCRYPTION_KEYS}"
    assert reference["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    # refreshes serialized by the api-server only, at an address the workers reach
    assert reference["AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR"] == "api-server"
    assert reference["AIRFLOW__PAPERTRAIL__COORDINATOR_URL"] == "http://airflow-apiserver:8080/papertrail/token"
    # Celery's result backend on the metadata PostgreSQL with the installed driver (psycopg2)
    assert reference["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")
    assert reference["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert reference["AIRFLOW__API__BASE_URL"] == "http://localhost:8080"
    for name in AIRFLOW_COMPONENTS:
        env = _env_of(services[name])
        for key in SHARED_ENV:
            assert env.get(key) == reference[key], f"{name}: {key}"
    assert services["airflow-worker"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_connection_is_valid_for_the_provider():
    """The connection must pass the provider's own URL checks (http only on loopback)."""
    env = _env_of(_compose()["services"]["airflow-scheduler"])
    conn = json.loads(_interpolate(env["AIRFLOW_CONN_PAPERTRAIL_DEFAULT"], _env_example()))
    assert conn["conn_type"] == "papertrail"
    extra = conn["extra"]
    assert extra["redirect_uri"] == "http://localhost:8080/papertrail/callback"
    config = OAuthClientConfig(
        client_id=conn["login"],
        client_secret=conn["password"],
        redirect_uri=extra["redirect_uri"],
        system=extra["system"],
        scope=extra["scope"],
        authorize_url=extra["authorize_url"],
        token_url=extra["token_url"],
        api_url=extra["api_url"],
    )
    assert config.problems() == []
    # the browser opens authorize_url: it must be the emulator's host-published port
    ports = _compose()["services"]["papertrail-emulator"]["ports"]
    assert extra["authorize_url"].startswith("http://localhost:8443/")
    assert any(str(p).endswith(":8443:8443") for p in ports)


def test_long_running_services_have_healthchecks():
    services = _compose()["services"]
    for name in LONG_RUNNING:
        test = services[name].get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
    assert "http://localhost:8080/api/v2/monitor/health" in services["airflow-apiserver"]["healthcheck"]["test"]
    assert "http://localhost:8974/health" in services["airflow-scheduler"]["healthcheck"]["test"]
    assert "DagProcessorJob" in " ".join(services["airflow-dag-processor"]["healthcheck"]["test"])
    assert "TriggererJob" in " ".join(services["airflow-triggerer"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["papertrail-emulator"]["healthcheck"]["test"])
    assert _env_of(services["airflow-scheduler"])["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"


def test_dags_mounted_and_dependencies():
    services = _compose()["services"]
    for name in AIRFLOW_COMPONENTS:
        assert "../dags:/opt/airflow/dags" in services[name]["volumes"], name
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        if name != "airflow-init":
            assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
        assert services[name]["build"] == {
            "context": "..",
            "dockerfile": "docker/Dockerfile",
            "args": {"BASE_IMAGE": "apache/airflow:3.3.2", "AIRFLOW_VERSION": "3.3.2"},
        }


def test_emulator_uses_the_same_build():
    """One image for every service that builds it: the same base image and build args, so a
    BASE_IMAGE override (docker/local-proof.sh) reaches the emulator too."""
    services = _compose()["services"]
    assert services["papertrail-emulator"]["build"] == services["airflow-apiserver"]["build"]
    assert services["papertrail-emulator"]["image"] == services["airflow-apiserver"]["image"]


def test_local_proof_script_parses():
    """docker/local-proof.sh (a manual proof, not run here) is valid bash, and shellcheck-clean
    when shellcheck is installed."""
    script = DOCKER / "local-proof.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout


def test_env_example_matches_compose_variables():
    text = COMPOSE.read_text().replace("$$", "")
    referenced = set(VAR_RE.findall(text))
    defined = set(_env_example())
    assert referenced == defined, (
        f"only in compose: {referenced - defined}; only in .env.example: {defined - referenced}"
    )


def test_dockerfile_pins_airflow():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=apache/airflow:3\.3\.2$", text, re.M)
    assert re.search(r"^ARG AIRFLOW_VERSION=3\.3\.2$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert 'pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/papertrail' in text
    assert not re.search(r"(?i)^\s*(ENV|ARG)\s+\S*(SECRET|KEY|PASSWORD|TOKEN)", text, re.M)


def test_emulator_command_flags_exist():
    service = _compose()["services"]["papertrail-emulator"]
    command = [str(c) for c in service["command"]]
    assert command[0] == "papertrail-emulator"
    parser = emulator._build_parser()
    known = {opt for action in parser._actions for opt in action.option_strings}
    flags = [c for c in command[1:] if c.startswith("--")]
    assert flags and set(flags) <= known, set(flags) - known
    env = _compose_env_example_interpolated(service)
    args = parser.parse_args(_interpolate(" ".join(command[1:]), _env_example()).split())
    assert args.redirect_uri == ["http://localhost:8080/papertrail/callback"]
    assert args.client_id == _env_example()["PAPERTRAIL_CLIENT_ID"]
    assert env["PAPERTRAIL_EMULATOR_CLIENT_SECRET"] == _env_example()["PAPERTRAIL_CLIENT_SECRET"]
    with pytest.raises(SystemExit) as exc:
        emulator.main(["--help"])
    assert exc.value.code == 0


def _compose_env_example_interpolated(service: dict) -> dict[str, str]:
    return {k: _interpolate(v, _env_example()) for k, v in _env_of(service).items()}


def test_dockerfile_builds_with_the_classic_builder():
    """No BuildKit-only syntax: docker-compose 1.29 builds with the classic builder, and a
    ``# syntax=`` line would make BuildKit pull a frontend image (docker/local-proof.sh)."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"(?im)^#\s*syntax\s*=", text)
    assert "<<" not in text, "heredocs need BuildKit"
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M)
    sources = [src for line in copied for src in line.split()]
    assert "docker/loopback-forward.py" in sources
    # .dockerignore is an allowlist: everything is ignored except what COPY uses, so the
    # build context stays small (the repo holds virtualenvs of hundreds of MB).
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [line for line in ignore if line and not line.startswith("#")]
    assert ignore[0] == "*"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} is missing"
        assert f"!{src}" in ignore, f"{src} is not allowed into the build context by .dockerignore"


def test_loopback_forwarder_forwards_http():
    """The forwarder baked into the image relays HTTP from 127.0.0.1 to another address."""
    script = DOCKER / "loopback-forward.py"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"ok " + self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), "127.0.0.1", str(upstream.server_address[1])],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "loopback-forward" in proc.stdout.readline()
        for _ in range(2):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                assert resp.read() == b"ok /healthz"
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        upstream.shutdown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_proof_emulator_runs_the_compose_command_with_an_admin_port():
    """docker/proof_emulator.py (local-proof.sh --celery) runs the emulator service's own command
    line, and its admin port reports the counters and expires access tokens."""
    service = _compose()["services"]["papertrail-emulator"]
    command = _interpolate(" ".join(str(c) for c in service["command"]), _env_example()).split()
    port, admin_port = _free_port(), _free_port()
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        command[command.index(flag) + 1] = value
    env = {**os.environ, **_compose_env_example_interpolated(service)}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(DOCKER / "proof_emulator.py"),
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            str(admin_port),
            *command,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert any("admin listening" in line for line in lines), lines
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert json.load(resp) == {"status": "ok"}
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as resp:
            stats = json.load(resp)
        assert stats["refresh_grants"] == 0 and "grants_revoked" in stats
        request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/expire-access-tokens", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert json.load(resp) == {"expired": 0}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_refresh_proof_dag_matches_the_script():
    """local-proof.sh --celery expects as many mapped tasks as docker/papertrail_refresh_proof.py makes."""
    script = (DOCKER / "local-proof.sh").read_text()
    dag = (DOCKER / "papertrail_refresh_proof.py").read_text()
    assert re.search(r"^REFRESH_DAG=papertrail_refresh_proof$", script, re.M)
    assert 'dag_id="papertrail_refresh_proof"' in dag
    tasks = re.search(r"^REFRESH_TASKS=(\d+)", script, re.M)
    assert tasks and f"TASKS = {tasks.group(1)}\n" in dag


def _compose_tool() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates():
    tool = _compose_tool()
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("neither 'docker compose' nor 'docker-compose' is installed; CI must validate docker/")
        pytest.skip("neither 'docker compose' nor 'docker-compose' is installed")
    result = subprocess.run(
        [*tool, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
