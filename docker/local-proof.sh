#!/usr/bin/env bash
# Run docker/docker-compose.yaml for real without Docker Hub: build the images it needs from
# Debian packages (debootstrap + docker import), start the stack, authorize through the
# emulator's consent page, extract, and print a summary. Manual proof, not part of CI.
#
#   sudo docker/local-proof.sh [--celery [--workers N]] [--keep | --down] [--workdir DIR]
#
# Needs root (debootstrap, chroot, dockerd), debootstrap, dockerd, docker, docker-compose
# (1.29 or the v2 plugin) and python3 on the host, and Debian packages and PyPI reachable
# (the Debian mirror is read from the host's apt sources; LOCAL_PROOF_MIRROR overrides it).
# Everything lives in the work dir (default /tmp/papertrail-local-proof): the rootfs cache,
# a private dockerd (own socket, data root, exec root, pid file), logs and the summary.
# Images are reused on the next run (delete the work dir to start over).
#
# --celery  the compose file's celery profile: a Redis image from Debian's redis-server too,
#           CeleryExecutor with N workers (--workers, default 2), and after the extract the
#           refresh check: the stored grant's access token expired (in the grant and at the
#           emulator), 16 mapped tasks that each need a token (docker/papertrail_refresh_proof.py)
#           must all succeed, on at least 2 workers, with exactly one refresh at the emulator
#           and no refresh token presented twice (no revocation).
# --keep    leave the stack and the private dockerd running (UI on http://127.0.0.1:8080)
# --down    stop what a --keep run left: docker-compose down -v, then the private dockerd
#
# LOCAL_PROOF_HEALTH_TIMEOUT (seconds, default 120): the timeout of the healthchecks that
# import Airflow (the compose file says 10 s; on a loaded machine they take longer).
# LOCAL_PROOF_API_TIMEOUT (seconds, default 60): [workers] execution_api_timeout (Airflow: 5 s).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=/tmp/papertrail-local-proof
KEEP=0
DOWN=0
CELERY=0
WORKERS=2
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep) KEEP=1 ;;
        --down) DOWN=1 ;;
        --celery) CELERY=1 ;;
        --workers) WORKERS=$2; shift ;;
        --workdir) WORK=$2; shift ;;
        -h | --help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] && ((WORKERS >= 2)) || { echo "--workers needs a number >= 2" >&2; exit 2; }
for knob in LOCAL_PROOF_HEALTH_TIMEOUT LOCAL_PROOF_API_TIMEOUT; do
    [[ "${!knob:-1}" =~ ^[1-9][0-9]*$ ]] || { echo "$knob: a number of seconds" >&2; exit 2; }
done
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
WORK_ARG=""
[[ "$WORK" == /tmp/papertrail-local-proof ]] || WORK_ARG="--workdir $WORK"

SUITE=bookworm
AIRFLOW_VERSION=$(sed -n 's/^ARG AIRFLOW_VERSION=//p' "$REPO/docker/Dockerfile")
BASE_IMAGE=papertrail-local/airflow-base:$AIRFLOW_VERSION
PG_MAJOR=15 # bookworm's PostgreSQL (the compose file names postgres:16 from Docker Hub)
PG_IMAGE=papertrail-local/postgres:$PG_MAJOR
REDIS_MAJOR=7 # bookworm's redis-server is 7.0 (the compose file names redis:7.2-bookworm)
REDIS_IMAGE=papertrail-local/redis:$REDIS_MAJOR
# the base image holds the Celery provider too (as the official image does); images built by an
# older local-proof.sh lack this label and are rebuilt
BASE_LABEL=org.papertrail.local-proof.base=2
REFRESH_DAG=papertrail_refresh_proof
REFRESH_TASKS=16 # as in docker/papertrail_refresh_proof.py
EMULATOR_ADMIN_PORT=8444
PROJECT=papertrail-proof
AIRFLOW_UID=50000
VENV=/home/airflow/.venv
# bounds (seconds)
DOCKERD_TIMEOUT=60
UP_TIMEOUT=600
HEALTHY_TIMEOUT=600
FLOW_TIMEOUT=600
# The healthchecks of dag-processor, triggerer and workers start a Python that imports Airflow
# (`airflow jobs check`, `celery inspect ping`): on a quiet 2-core machine a few seconds, on a
# loaded one over a minute, past the compose file's 10 s timeout (then the service never turns
# healthy). The proof allows this much (seconds); the compose file itself is unchanged.
HEALTH_TIMEOUT=${LOCAL_PROOF_HEALTH_TIMEOUT:-120}
# Likewise a task's calls to the Execution API ([workers] execution_api_timeout, Airflow's
# default 5 s, "increase this value if you experience timeout errors under high load"): on a
# loaded machine the api-server answers later and the task is killed after its retries.
API_TIMEOUT=${LOCAL_PROOF_API_TIMEOUT:-60}
REFRESH_TIMEOUT=600

export COMPOSE_DOCKER_CLI_BUILD=0 DOCKER_BUILDKIT=0 # classic builder: no frontend image to pull

STARTED_DOCKERD=0
COMPOSE_STARTED=0
MOUNTS=()
PHASES=()
T0=$SECONDS
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

log() { printf '[local-proof %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

phase_start() { PHASE_NAME=$1; PHASE_T=$SECONDS; log "== $1"; }
phase_end() { PHASES+=("$(printf '%-34s %5d s' "$PHASE_NAME" $((SECONDS - PHASE_T)))"); }

# wait_for SECONDS DESCRIPTION COMMAND...: run COMMAND every 2 s until it succeeds or time is up.
wait_for() {
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${limit} s: $what"
            return 1
        fi
        sleep 2
    done
}

PROFILE_ARGS=()
((CELERY == 0)) || PROFILE_ARGS=(--profile celery)

compose() {
    "${COMPOSE[@]}" -p "$PROJECT" --env-file "$WORK/compose.env" \
        -f "$REPO/docker/docker-compose.yaml" -f "$WORK/compose.override.yaml" "${PROFILE_ARGS[@]}" "$@"
}

# timed_compose SECONDS ARGS...: compose ARGS, killed after SECONDS
timed_compose() {
    local limit=$1
    shift
    timeout "$limit" "${COMPOSE[@]}" -p "$PROJECT" --env-file "$WORK/compose.env" \
        -f "$REPO/docker/docker-compose.yaml" -f "$WORK/compose.override.yaml" "${PROFILE_ARGS[@]}" "$@"
}

cleanup() {
    local status=$?
    set +e
    local m
    for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
    if ((COMPOSE_STARTED)) && ((status != 0)); then
        log "failed: container states and log tails are in $WORK/failure.log"
        {
            compose ps
            compose logs --no-color --tail 80
        } >"$WORK/failure.log" 2>&1
        tail -n 40 "$WORK/failure.log" >&2
    fi
    if ((KEEP)); then
        log "--keep: the stack is still running (UI http://127.0.0.1:8080)"
        if ((STARTED_DOCKERD)); then
            log "  export DOCKER_HOST=$DOCKER_HOST   # for docker and docker-compose -p $PROJECT"
        fi
        log "  stop everything: $0 --down${WORK_ARG:+ $WORK_ARG}"
        exit "$status"
    fi
    if ((COMPOSE_STARTED)); then
        log "docker-compose down -v"
        timeout 300 "${COMPOSE[@]}" -p "$PROJECT" --env-file "$WORK/compose.env" \
            -f "$REPO/docker/docker-compose.yaml" -f "$WORK/compose.override.yaml" \
            --profile celery down -v --remove-orphans >/dev/null 2>&1 ||
            log "docker-compose down failed"
    fi
    if ((STARTED_DOCKERD)); then
        local pid
        pid=$(cat "$WORK/docker/dockerd.pid" 2>/dev/null || true)
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            log "stopping the private dockerd (pid $pid)"
            kill -TERM "$pid"
            local deadline=$((SECONDS + 60))
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ $(id -u) == 0 ]] || die "run as root (debootstrap, chroot and dockerd need it)"
for tool in debootstrap chroot docker python3 curl; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
if command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    die "neither docker-compose nor the docker compose plugin is installed"
fi

if ((DOWN)); then
    ((KEEP == 0)) || die "--keep and --down exclude each other"
    if [[ -S "$WORK/docker/docker.sock" ]] && [[ -f "$WORK/docker/dockerd.pid" ]]; then
        export DOCKER_HOST="unix://$WORK/docker/docker.sock"
        STARTED_DOCKERD=1 # the private dockerd of a --keep run: stop it too
    fi
    [[ -f "$WORK/compose.override.yaml" ]] && COMPOSE_STARTED=1
    log "stopping what a --keep run left in $WORK"
    exit 0 # cleanup (the EXIT trap) does the rest
fi

# results of an earlier run in the same work dir (never read as this run's)
rm -f "$WORK"/{summary.txt,failure.log,flow-summary.json,refresh-summary.json,coordinator-requests.log,grant.log}

# --- a. Docker daemon -------------------------------------------------------------------------
phase_start "docker daemon"
if timeout 20 docker info >/dev/null 2>&1; then
    log "using the running Docker daemon (${DOCKER_HOST:-default socket})"
else
    command -v dockerd >/dev/null || die "no usable Docker daemon and no dockerd to start"
    mkdir -p "$WORK/docker"
    export DOCKER_HOST="unix://$WORK/docker/docker.sock"
    log "starting a private dockerd on $DOCKER_HOST (log: $WORK/docker/dockerd.log)"
    dockerd --host "$DOCKER_HOST" --data-root "$WORK/docker/data" --exec-root "$WORK/docker/exec" \
        --pidfile "$WORK/docker/dockerd.pid" >"$WORK/docker/dockerd.log" 2>&1 &
    STARTED_DOCKERD=1
    wait_for "$DOCKERD_TIMEOUT" "dockerd answering on $DOCKER_HOST" \
        timeout 10 docker info >/dev/null 2>&1 || die "dockerd did not start; see $WORK/docker/dockerd.log"
fi
phase_end

# --- b/c. Base images from Debian packages ------------------------------------------------------
debian_mirror() {
    if [[ -n "${LOCAL_PROOF_MIRROR:-}" ]]; then
        echo "$LOCAL_PROOF_MIRROR"
        return
    fi
    # deb822 (*.sources): the first URI of a "deb" stanza whose Suites include $SUITE itself;
    # one-line (*.list): "deb [options] URI $SUITE components".
    local f uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" && -z "$uri" ]] || continue
        uri=$(awk -v suite="$SUITE" '
            function flush() { if (deb && has && uri != "") { print uri; found = 1; exit } deb = has = 0; uri = "" }
            /^[[:space:]]*$/ { flush(); next }
            /^Types:/ { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) has = 1 }
            END { if (!found) flush() }' "$f")
    done
    if [[ -z "$uri" ]]; then
        uri=$(cat /etc/apt/sources.list.d/*.list /etc/apt/sources.list 2>/dev/null |
            sed -e 's/\[[^]]*\]//' | awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }')
    fi
    [[ -n "$uri" ]] && echo "$uri"
}

chroot_mount_proc() {
    mount -t proc proc "$1/proc"
    MOUNTS+=("$1/proc")
}

chroot_unmount_proc() {
    umount "$1/proc"
    local keep=() m
    for m in "${MOUNTS[@]}"; do [[ "$m" == "$1/proc" ]] || keep+=("$m"); done
    MOUNTS=("${keep[@]}")
}

in_chroot() {
    local root=$1
    shift
    chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

# new_rootfs DIR: a fresh copy of the cached debootstrap rootfs, ready for apt-get in a chroot
new_rootfs() {
    local root=$1
    rm -rf "$root"
    mkdir -p "$root"
    tar --numeric-owner -xpf "$WORK/cache/$SUITE-minbase.tar" -C "$root"
    cp /etc/resolv.conf "$root/etc/resolv.conf" # name resolution while building only
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" # start no service in the chroot
    chmod 755 "$root/usr/sbin/policy-rc.d"
    chroot_mount_proc "$root"
    in_chroot "$root" apt-get update -qq
}

# finish_rootfs DIR: undo the build-time pieces, clear caches
finish_rootfs() {
    local root=$1
    in_chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root/usr/sbin/policy-rc.d" "$root"/tmp/* "$root"/root/.cache
    : >"$root/etc/resolv.conf" # Docker provides its own
    chroot_unmount_proc "$root"
}

apt_install() {
    local root=$1
    shift
    in_chroot "$root" apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "$@" \
        >"$WORK/apt-$(basename "$root").log" 2>&1 || {
        tail -n 30 "$WORK/apt-$(basename "$root").log" >&2
        return 1
    }
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
base_image_ok() {
    [[ $(docker image inspect -f '{{index .Config.Labels "org.papertrail.local-proof.base"}}' "$BASE_IMAGE" \
        2>/dev/null) == "${BASE_LABEL#*=}" ]]
}
images_needed() { # the images this run still has to build
    base_image_ok || echo "$BASE_IMAGE"
    image_exists "$PG_IMAGE" || echo "$PG_IMAGE"
    ((CELERY == 0)) || image_exists "$REDIS_IMAGE" || echo "$REDIS_IMAGE"
}

phase_start "debootstrap $SUITE minbase"
mkdir -p "$WORK/cache"
if [[ -f "$WORK/cache/$SUITE-minbase.tar" ]]; then
    log "cached: $WORK/cache/$SUITE-minbase.tar"
elif [[ -z "$(images_needed)" ]]; then
    log "not needed: every image exists"
else
    MIRROR=$(debian_mirror) || die "no '$SUITE' Debian mirror found in the host's apt sources (set LOCAL_PROOF_MIRROR)"
    log "debootstrap --variant=minbase $SUITE from the host's Debian mirror"
    rm -rf "$WORK/cache/rootfs"
    debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$WORK/cache/rootfs" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 30 "$WORK/debootstrap.log" >&2
        die "debootstrap failed"
    }
    tar --numeric-owner -C "$WORK/cache/rootfs" -cf "$WORK/cache/$SUITE-minbase.tar.part" .
    mv "$WORK/cache/$SUITE-minbase.tar.part" "$WORK/cache/$SUITE-minbase.tar"
    rm -rf "$WORK/cache/rootfs"
fi
phase_end

# Pins for pip: every package of uv.lock with a single locked version (the official image
# installs with Airflow's constraints file; this is the repo's equivalent), the provider's
# runtime dependencies and build requirements from pyproject.toml, and the Celery executor
# (the official image has it): the newest locked version of the provider, celery, redis.
python3 - "$REPO" "$WORK" <<'PY'
import sys
from collections import defaultdict
from pathlib import Path

import tomllib

repo, work = Path(sys.argv[1]), Path(sys.argv[2])
versions = defaultdict(set)
for package in tomllib.loads((repo / "uv.lock").read_text()).get("package", []):
    if "registry" in package.get("source", {}):
        versions[package["name"]].add(package["version"])
pins = [f"{name}=={next(iter(v))}" for name, v in sorted(versions.items()) if len(v) == 1]
(work / "constraints.txt").write_text("\n".join(pins) + "\n")
project = tomllib.loads((repo / "pyproject.toml").read_text())
deps = [d for d in project["project"]["dependencies"] if not d.replace(" ", "").startswith("apache-airflow")]
(work / "provider-deps.txt").write_text("\n".join(deps) + "\n")
(work / "build-requires.txt").write_text("\n".join(project["build-system"]["requires"]) + "\n")


def newest(name: str) -> str:
    return max(versions[name], key=lambda v: tuple(int(p) if p.isdigit() else 0 for p in v.split(".")))


celery = ("apache-airflow-providers-celery", "celery", "redis")
(work / "celery-reqs.txt").write_text("".join(f"{name}=={newest(name)}\n" for name in celery))
PY

phase_start "airflow base image"
if base_image_ok; then
    log "exists: $BASE_IMAGE"
else
    ROOT="$WORK/rootfs-airflow"
    new_rootfs "$ROOT"
    # python3.11 (bookworm), a venv for the airflow user, dumb-init (compose entrypoint), curl (healthchecks)
    apt_install "$ROOT" python3 python3-venv dumb-init curl ca-certificates procps
    # the official image: user airflow, uid 50000, gid 0 (root group), HOME /home/airflow,
    # AIRFLOW_HOME /opt/airflow with dags/ and logs/, everything owned airflow:0 and group-writable
    in_chroot "$ROOT" useradd --uid "$AIRFLOW_UID" --gid 0 --home-dir /home/airflow --create-home \
        --shell /bin/bash airflow
    mkdir -p "$ROOT/opt/airflow/dags" "$ROOT/opt/airflow/logs" "$ROOT/opt/pip-wheels"
    in_chroot "$ROOT" python3 -m venv "$VENV"
    cp "$WORK/constraints.txt" "$WORK/provider-deps.txt" "$WORK/build-requires.txt" "$WORK/celery-reqs.txt" "$ROOT/tmp/"
    # pip in the chroot trusts what the host trusts (for this download only; not kept in the image)
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/tmp/host-ca.crt"
    PIP=(in_chroot "$ROOT" "$VENV/bin/pip" --disable-pip-version-check --cert /tmp/host-ca.crt)
    log "pip install apache-airflow==$AIRFLOW_VERSION psycopg2-binary asyncpg $(tr '\n' ' ' <"$WORK/celery-reqs.txt")(+ provider deps) from PyPI"
    "${PIP[@]}" install -q --no-cache-dir -c /tmp/constraints.txt \
        "apache-airflow==$AIRFLOW_VERSION" psycopg2-binary asyncpg -r /tmp/celery-reqs.txt -r /tmp/provider-deps.txt \
        >"$WORK/pip-base.log" 2>&1 || {
        tail -n 30 "$WORK/pip-base.log" >&2
        die "pip install failed"
    }
    # wheels of the build backend, so the Dockerfile's `pip install /opt/papertrail` builds offline
    "${PIP[@]}" download -q --no-cache-dir -d /opt/pip-wheels -r /tmp/build-requires.txt >>"$WORK/pip-base.log" 2>&1
    cat >"$ROOT/etc/pip.conf" <<'EOF'
# papertrail-local base image (docker/local-proof.sh): everything the Dockerfile's pip step
# needs is installed already or in /opt/pip-wheels, so it runs without an index.
[global]
no-index = true
find-links = /opt/pip-wheels
EOF
    cat >"$ROOT/entrypoint" <<'EOF'
#!/usr/bin/env bash
# The official apache/airflow image's entrypoint, reduced to what docker-compose.yaml uses:
# `bash ...` and `python ...` run as they are, `airflow <args>` and a bare Airflow
# subcommand (`api-server`, `scheduler`, `celery worker`, ...) run `airflow <args>`.
set -euo pipefail
umask 0002
if [[ $# -eq 0 ]]; then
    exec airflow --help
fi
case "$1" in
    bash) shift; exec /bin/bash "$@" ;;
    python) shift; exec python "$@" ;;
    airflow) shift ;;
esac
exec airflow "$@"
EOF
    chmod 755 "$ROOT/entrypoint"
    in_chroot "$ROOT" chown -R "$AIRFLOW_UID:0" /home/airflow /opt/airflow
    in_chroot "$ROOT" chmod -R g+rwX /home/airflow /opt/airflow
    finish_rootfs "$ROOT"
    log "docker import -> $BASE_IMAGE"
    tar --numeric-owner -C "$ROOT" -c . | docker import \
        --change 'USER airflow' \
        --change "ENV PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change 'ENV HOME=/home/airflow' \
        --change 'ENV AIRFLOW_HOME=/opt/airflow' \
        --change "ENV AIRFLOW_UID=$AIRFLOW_UID" \
        --change 'ENV AIRFLOW_USER_HOME_DIR=/home/airflow' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PYTHONUNBUFFERED=1' \
        --change 'WORKDIR /opt/airflow' \
        --change "LABEL $BASE_LABEL" \
        --change 'EXPOSE 8080' \
        --change 'ENTRYPOINT ["/usr/bin/dumb-init", "--", "/entrypoint"]' \
        --change 'CMD []' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$ROOT"
fi
phase_end

phase_start "postgres image"
if image_exists "$PG_IMAGE"; then
    log "exists: $PG_IMAGE"
else
    ROOT="$WORK/rootfs-postgres"
    new_rootfs "$ROOT"
    mkdir -p "$ROOT/etc/postgresql-common"
    echo 'create_main_cluster = false' >"$ROOT/etc/postgresql-common/createcluster.conf"
    apt_install "$ROOT" "postgresql-$PG_MAJOR"
    mkdir -p "$ROOT/var/lib/postgresql/data" "$ROOT/run/postgresql"
    in_chroot "$ROOT" chown postgres:postgres /var/lib/postgresql/data /run/postgresql
    chmod 700 "$ROOT/var/lib/postgresql/data"
    chmod 2775 "$ROOT/run/postgresql"
    cat >"$ROOT/usr/local/bin/postgres-entrypoint" <<'EOF'
#!/usr/bin/env bash
# The official postgres image's first-start contract: POSTGRES_USER (superuser),
# POSTGRES_PASSWORD (scram-sha-256 over TCP from anywhere in the container network),
# POSTGRES_DB (created). Later starts only run the server.
set -euo pipefail
: "${PGDATA:=/var/lib/postgresql/data}" "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    [[ -n "${POSTGRES_PASSWORD:-}" ]] || { echo "POSTGRES_PASSWORD is required" >&2; exit 1; }
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    if [[ "$POSTGRES_DB" != postgres ]]; then
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
        createdb -U "$POSTGRES_USER" "$POSTGRES_DB"
        pg_ctl -D "$PGDATA" -m fast -w stop
    fi
fi
exec postgres -D "$PGDATA"
EOF
    chmod 755 "$ROOT/usr/local/bin/postgres-entrypoint"
    finish_rootfs "$ROOT"
    log "docker import -> $PG_IMAGE"
    tar --numeric-owner -C "$ROOT" -c . | docker import \
        --change 'USER postgres' \
        --change "ENV PATH=/usr/lib/postgresql/$PG_MAJOR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change 'ENV PGDATA=/var/lib/postgresql/data' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'EXPOSE 5432' \
        --change 'ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]' \
        - "$PG_IMAGE" >/dev/null
    rm -rf "$ROOT"
fi
phase_end

if ((CELERY)); then
    phase_start "redis image"
    if image_exists "$REDIS_IMAGE"; then
        log "exists: $REDIS_IMAGE"
    else
        ROOT="$WORK/rootfs-redis"
        new_rootfs "$ROOT"
        apt_install "$ROOT" redis-server # with redis-tools: redis-cli, the compose healthcheck
        mkdir -p "$ROOT/data"
        in_chroot "$ROOT" chown redis:redis /data
        cat >"$ROOT/usr/local/bin/redis-entrypoint" <<'EOF'
#!/bin/sh
# The official redis image's contract without a config file: redis-server on every interface,
# protected mode off (the container network is the boundary), data in /data. Arguments that
# start with "-" go to redis-server; anything else runs as given.
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
    shift
    set -- redis-server --bind 0.0.0.0 --protected-mode no --dir /data "$@"
fi
exec "$@"
EOF
        chmod 755 "$ROOT/usr/local/bin/redis-entrypoint"
        finish_rootfs "$ROOT"
        log "docker import -> $REDIS_IMAGE"
        tar --numeric-owner -C "$ROOT" -c . | docker import \
            --change 'USER redis' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'WORKDIR /data' \
            --change 'EXPOSE 6379' \
            --change 'ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]' \
            --change 'CMD ["redis-server"]' \
            - "$REDIS_IMAGE" >/dev/null
        rm -rf "$ROOT"
    fi
    phase_end
fi

# --- d. The compose stack -------------------------------------------------------------------------
EXECUTOR=LocalExecutor
((CELERY == 0)) || EXECUTOR=CeleryExecutor
python3 - "$WORK/compose.env" "$EXECUTOR" <<'PY'
import base64
import os
import secrets
import sys

def fernet() -> str:  # what cryptography's Fernet.generate_key() returns
    return base64.urlsafe_b64encode(os.urandom(32)).decode()

with open(sys.argv[1], "w") as out:
    out.write(
        f"AIRFLOW_EXECUTOR={sys.argv[2]}\n"
        f"AIRFLOW_FERNET_KEY={fernet()}\n"
        f"AIRFLOW_JWT_SECRET={secrets.token_urlsafe(64)}\n"
        f"AIRFLOW_API_SECRET_KEY={secrets.token_urlsafe(48)}\n"
        f"PAPERTRAIL_TOKEN_ENCRYPTION_KEYS={fernet()}\n"
        "PAPERTRAIL_CLIENT_ID=local-proof-client\n"
        f"PAPERTRAIL_CLIENT_SECRET={secrets.token_urlsafe(32)}\n"
    )
PY
chmod 600 "$WORK/compose.env"

BUILT_SERVICES=(airflow-init airflow-apiserver airflow-scheduler airflow-dag-processor airflow-triggerer
    papertrail-emulator airflow-worker)
AIRFLOW_SERVICES=(airflow-init airflow-apiserver airflow-scheduler airflow-dag-processor airflow-triggerer
    airflow-worker)
if ((CELERY)); then
    # the repo's dags/ plus the refresh check's DAG, mounted where the compose file mounts dags/
    rm -rf "$WORK/dags"
    mkdir -p "$WORK/dags"
    cp "$REPO"/dags/*.py "$REPO/docker/$REFRESH_DAG.py" "$WORK/dags/"
    chmod -R a+rX "$WORK/dags"
fi
{
    echo "# written by docker/local-proof.sh: local images instead of Docker Hub's"
    echo "services:"
    echo "  postgres:"
    echo "    image: $PG_IMAGE"
    ((CELERY == 0)) || printf '  redis:\n    image: %s\n' "$REDIS_IMAGE"
    for service in "${BUILT_SERVICES[@]}"; do
        echo "  $service:"
        echo "    build:"
        echo "      args:"
        echo "        BASE_IMAGE: $BASE_IMAGE"
        case "$service" in
            airflow-dag-processor | airflow-triggerer | airflow-worker)
                printf '    healthcheck:\n      timeout: %ss\n' "$HEALTH_TIMEOUT"
                ;;
        esac
        if [[ " ${AIRFLOW_SERVICES[*]} " == *" $service "* ]]; then
            echo "    environment:"
            echo "      AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT: \"$API_TIMEOUT\""
            if ((CELERY)) && [[ "$service" == airflow-worker ]]; then
                echo "      # $REFRESH_TASKS tasks, $((REFRESH_TASKS / 2)) slots per worker: one worker cannot take them all at once"
                echo "      AIRFLOW__CELERY__WORKER_CONCURRENCY: \"$((REFRESH_TASKS / 2))\""
            fi
        fi
        ((CELERY)) || continue
        if [[ " ${AIRFLOW_SERVICES[*]} " == *" $service "* ]]; then
            echo "    volumes:"
            echo "      - $WORK/dags:/opt/airflow/dags"
        fi
        if [[ "$service" == papertrail-emulator ]]; then
            echo "    # the service's own command line, run with an admin port (docker/proof_emulator.py)"
            echo "    entrypoint: [/usr/bin/dumb-init, --, python, /opt/papertrail/proof_emulator.py,"
            echo "      --admin-port, \"$EMULATOR_ADMIN_PORT\"]"
            echo "    volumes:"
            echo "      - $REPO/docker/proof_emulator.py:/opt/papertrail/proof_emulator.py:ro"
            echo "    ports:"
            echo "      - \"127.0.0.1:$EMULATOR_ADMIN_PORT:$EMULATOR_ADMIN_PORT\""
        fi
    done
} >"$WORK/compose.override.yaml"
compose config >"$WORK/compose.effective.yaml"
grep -q "BASE_IMAGE: $BASE_IMAGE" "$WORK/compose.effective.yaml" || die "the override did not set BASE_IMAGE"
# every built service must build FROM the local base image (no pull from Docker Hub)
ACTIVE_BUILT=("${BUILT_SERVICES[@]}")
((CELERY)) || ACTIVE_BUILT=("${BUILT_SERVICES[@]/airflow-worker/}")
python3 - "$WORK/compose.effective.yaml" "$BASE_IMAGE" "${ACTIVE_BUILT[@]}" <<'PY' || die "the override is incomplete"
import re
import sys

text, base, services = open(sys.argv[1]).read(), sys.argv[2], [s for s in sys.argv[3:] if s]
blocks = dict(re.findall(r"(?m)^  ([a-z][a-z0-9-]*):\n((?:(?:    .*)?\n)*)", text))
missing = [s for s in services if f"BASE_IMAGE: {base}" not in blocks.get(s, "")]
sys.exit(f"services without the local BASE_IMAGE: {missing}" if missing else 0)
PY

phase_start "docker-compose build"
compose down -v --remove-orphans >/dev/null 2>&1 || true # leftovers of an earlier --keep run
timed_compose 1800 build >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log" >&2
    die "docker-compose build failed (log: $WORK/build.log)"
}
phase_end

phase_start "docker-compose up -d"
COMPOSE_STARTED=1
UP_T=$SECONDS
SCALE_ARGS=()
((CELERY == 0)) || SCALE_ARGS=(--scale "airflow-worker=$WORKERS")
timed_compose "$UP_TIMEOUT" up -d "${SCALE_ARGS[@]}" >"$WORK/up.log" 2>&1 || {
    tail -n 40 "$WORK/up.log" >&2
    die "docker-compose up failed (log: $WORK/up.log)"
}
phase_end

phase_start "all services healthy"
declare -A READY_AT=()
EXPECTED=(postgres airflow-init airflow-apiserver airflow-scheduler airflow-dag-processor airflow-triggerer
    papertrail-emulator)
((CELERY == 0)) || EXPECTED+=(redis airflow-worker)
# services_ready: record when each service became healthy (airflow-init: completed); every
# replica of airflow-worker must be healthy
services_ready() {
    local service id ids state want missing=0 healthy
    for service in "${EXPECTED[@]}"; do
        [[ -n "${READY_AT[$service]:-}" ]] && continue
        want=1
        [[ "$service" == airflow-worker ]] && want=$WORKERS
        mapfile -t ids < <(compose ps -q "$service" 2>/dev/null)
        if ((${#ids[@]} < want)); then
            missing=1
            continue
        fi
        healthy=0
        for id in "${ids[@]}"; do
            state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")
            case "$service:$state" in
                airflow-init:"exited 0 "*) READY_AT[$service]="completed by $((SECONDS - UP_T)) s" ;;
                airflow-init:exited*) die "airflow-init failed: $state" ;;
                *:"running 0 healthy") healthy=$((healthy + 1)) ;;
            esac
        done
        if [[ "$service" != airflow-init ]] && ((healthy >= want)); then
            READY_AT[$service]="healthy by $((SECONDS - UP_T)) s"
            ((want == 1)) || READY_AT[$service]="$want of $want healthy by $((SECONDS - UP_T)) s"
        fi
        [[ -n "${READY_AT[$service]:-}" ]] || missing=1
    done
    return "$missing"
}
wait_for "$HEALTHY_TIMEOUT" "every service healthy (or completed)" services_ready ||
    die "not every service became healthy: $(declare -p READY_AT)"
for service in "${EXPECTED[@]}"; do log "  $service: ${READY_AT[$service]}"; done
phase_end

phase_start "authorize + consent + extract"
set +e
python3 "$REPO/docker/local_proof_flow.py" --base-url http://127.0.0.1:8080 \
    --summary "$WORK/flow-summary.json" --timeout "$FLOW_TIMEOUT"
FLOW_STATUS=$?
set -e
phase_end
FILES=$(timed_compose 120 exec -T airflow-scheduler find /opt/airflow/papertrail_extract -type f -name '*.jsonl' 2>/dev/null |
    wc -l)
EXTRACT_DIR=$(timed_compose 120 exec -T airflow-scheduler ls -ld /opt/airflow/papertrail_extract 2>/dev/null || true)

# --- e. The refresh check (--celery) ----------------------------------------------------------------
# The stored grant of papertrail_default, read or with its access token expired, in the metadata
# DB through the provider's token store (in the scheduler container, which has the keys). Prints
# {"generation", "expires_in"} only: no token leaves the container.
GRANT_PY='
import json, sys, time
from dataclasses import replace
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore

store = VariableTokenStore("papertrail_default", backend=OrmVariables())
grant = store.load()
if grant is None:
    sys.exit("no grant is stored for papertrail_default")
if sys.argv[1] == "expire":
    store.write(replace(grant, token=grant.token.with_expiry(time.time() - 60)))
    grant = store.load()
print(json.dumps({"generation": grant.generation, "expires_in": round(grant.token.expires_at - time.time())}))
'
stored_grant() { # stored_grant read|expire: the last line of GRANT_PY's output
    timed_compose 180 exec -T airflow-scheduler python - "$1" <<<"$GRANT_PY" 2>>"$WORK/grant.log" | tail -n 1
}
REFRESH_STATUS=0
WORKER_HOSTS="" GRANT_BEFORE="" GRANT_AFTER="" COORDINATOR_CALLS=""
if ((CELERY)) && ((FLOW_STATUS == 0)); then
    phase_start "refresh check ($REFRESH_TASKS tasks)"
    WORKER_HOSTS=$(compose ps -q airflow-worker | xargs docker inspect -f '{{.Config.Hostname}}' | paste -sd, -)
    GRANT_BEFORE=$(stored_grant expire)
    [[ "$GRANT_BEFORE" == "{"* ]] || die "could not expire the stored grant (log: $WORK/grant.log)"
    log "stored grant with its access token expired: $GRANT_BEFORE; workers: $WORKER_HOSTS"
    set +e
    python3 "$REPO/docker/local_proof_flow.py" --base-url http://127.0.0.1:8080 \
        --summary "$WORK/refresh-summary.json" --timeout "$REFRESH_TIMEOUT" --refresh-check \
        --refresh-dag "$REFRESH_DAG" --expect-tasks "$REFRESH_TASKS" --workers "$WORKER_HOSTS" \
        --emulator-admin "http://127.0.0.1:$EMULATOR_ADMIN_PORT" --grant-before "$GRANT_BEFORE"
    REFRESH_STATUS=$?
    set -e
    phase_end
    GRANT_AFTER=$(stored_grant read)
    # the coordinator's requests in the api-server's access log, by answer and by worker
    timed_compose 120 logs --no-color airflow-apiserver 2>/dev/null | grep 'path=/papertrail/token' \
        >"$WORK/coordinator-requests.log" || true
    COORDINATOR_CALLS=$(grep -o 'status_code=[0-9]*' "$WORK/coordinator-requests.log" | sort | uniq -c |
        awk '{ n += $1; by = by sep $2 " x" $1; sep = ", " } END { printf "%d (%s)", n, by }' || true)
    for id in $(compose ps -q airflow-worker); do
        ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id")
        COORDINATOR_CALLS+="; from $(docker inspect -f '{{.Config.Hostname}}' "$id"):"
        COORDINATOR_CALLS+=" $(grep -cE "client_addr=['\"]?${ip//./\\.}([:'\" ]|$)" "$WORK/coordinator-requests.log" || true)"
    done
    python3 - "$GRANT_BEFORE" "${GRANT_AFTER:-null}" <<'PY' || REFRESH_STATUS=1
import json
import sys

before, after = (json.loads(a) for a in sys.argv[1:3])
if not after or after["generation"] != before["generation"] + 1 or after["expires_in"] <= 0:
    sys.exit(f"the stored grant after the check: {after}, wanted generation {before['generation'] + 1}, valid")
PY
fi

# --- summary ----------------------------------------------------------------------------------------
{
    echo "=== docker/local-proof.sh summary ==="
    echo "images: $BASE_IMAGE ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')), $PG_IMAGE,$( ((CELERY == 0)) || echo " $REDIS_IMAGE,") airflow-provider-papertrail:local"
    echo "host: $(nproc) CPUs; load average (1, 5, 15 min) at the start $LOAD_START, now $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "phases:"
    printf '  %s\n' "${PHASES[@]}"
    echo "  total                              $((SECONDS - T0)) s"
    echo "services (seconds since docker-compose up started; polled every 2 s after it returned):"
    for service in "${EXPECTED[@]}"; do printf '  %-22s %s\n' "$service" "${READY_AT[$service]}"; done
    echo "flow (seconds and states):"
    python3 - "$WORK/flow-summary.json" <<'PY'
import json
import sys
from pathlib import Path

path = Path(sys.argv[1])
s = json.loads(path.read_text()) if path.exists() else {}
for name, seconds in s.get("phases", {}).items():
    print(f"  {name:34} {seconds:6.1f} s")
for dag in ("papertrail_authorize", "papertrail_extract"):
    run = s.get(dag)
    if run:
        tasks = run["tasks"]
        ok = sum(1 for state in tasks.values() if state == "success")
        print(f"  {dag}: run {run['state']}, {ok}/{len(tasks)} tasks success")
        bad = {t: st for t, st in tasks.items() if st != "success"}
        if bad:
            print(f"    not success: {bad}")
        if run.get("all_runs"):
            print(f"    all runs of {dag}: {run['all_runs']}")
grant = s.get("papertrail_authorize", {}).get("grant")
if grant:
    print(f"  grant: generation {grant['generation']}, expires {grant['expires_at']}, scope {grant['scope']!r}")
outputs = s.get("papertrail_extract", {}).get("outputs", {})
if outputs:
    print(f"  extract: {sum(o['records'] for o in outputs.values())} records, {sum(o['bytes'] for o in outputs.values())} bytes")
PY
    echo "files in the papertrail-extract volume: $FILES (*.jsonl); $EXTRACT_DIR"
    if ((CELERY)); then
        echo "refresh check (CeleryExecutor, $WORKERS workers: $WORKER_HOSTS):"
        echo "  stored grant before: $GRANT_BEFORE; after: $GRANT_AFTER"
        echo "  refresh coordinator requests (POST /papertrail/token, api-server access log): $COORDINATOR_CALLS"
        python3 - "$WORK/refresh-summary.json" <<'PY'
import json
import sys
from pathlib import Path

path = Path(sys.argv[1])
s = json.loads(path.read_text()) if path.exists() else {}
for name, seconds in s.get("phases", {}).items():
    print(f"  {name:34} {seconds:6.1f} s")
c = s.get("refresh_check")
if c:
    d = c["emulator_delta"]
    print(f"  {c['run_id']}: run {c['state']}, {c['tasks_success']}/{c['tasks']} tasks success, "
          f"first start to last end {c['first_task_start_to_last_end_s']} s")
    print(f"  tasks per worker: {c['tasks_per_worker']}")
    print(f"  tasks that asked for a token only once all {c['tasks']} had started: {c['left_the_barrier_together']}, "
          f"released within {c['barrier_release_spread_s']} s (the last {c['released_after_release_at_s']} s after the "
          "instant they were given)")
    print(f"  access tokens expired at the emulator: {c['access_tokens_expired_at_emulator']}")
    print(f"  emulator during the check: {d.get('refresh_grants', 0)} refresh(es), {d.get('token_requests', 0)} token "
          f"request(s), {d.get('invalid_grant_errors', 0)} invalid_grant, {d.get('grants_revoked', 0)} grants revoked, "
          f"{d.get('invalid_token_errors', 0)} 401s, {d.get('api_requests', 0)} data calls")
    print(f"  emulator totals for the whole run: {c['emulator_totals']}")
    print(f"  grant generations the tasks saw: {c['generations_seen_by_tasks']} (before: {c['generation_before']})")
    for problem in c.get("problems", []):
        print(f"  FAILED: {problem}")
PY
    fi
} | tee "$WORK/summary.txt"
((FLOW_STATUS == 0)) || die "the product flow failed (see above and $WORK/flow-summary.json)"
((REFRESH_STATUS == 0)) || die "the refresh check failed (see above and $WORK/refresh-summary.json)"
log "PASS"
