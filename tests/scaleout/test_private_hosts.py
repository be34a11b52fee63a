"""The workers' isolation itself (``private_host_argv``), without Airflow: one second, always run.

A process started the way the topology starts a Celery worker must see its own home and the
code, and nothing of the real /tmp, /var/tmp, /dev/shm or of the other workers' homes; what
it writes there must not reach the real machine; it must have its own host name, resolvable
without DNS.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.scaleout.topology import REPO, UNSHARE, private_host_argv

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(UNSHARE).is_file(), reason="needs root and unshare (util-linux)"
)

PROBE = """
set -u
echo "host=$(hostname)"
echo "resolves=$(python3 -c 'import socket; print(socket.gethostbyname(socket.gethostname()))')"
echo "own=$(cat "$OWN/mine")"
[ -e "$OTHER/theirs" ] && echo "other=visible" || echo "other=hidden"
[ -e "$HOST_TMP_FILE" ] && echo "host_tmp=visible" || echo "host_tmp=hidden"
[ -e "$REPO_FILE" ] && echo "repo=visible" || echo "repo=hidden"
echo inside > /tmp/written-inside-$$ && echo "wrote=/tmp/written-inside-$$"
echo later > "$OWN/written-by-worker"
"""


def test_a_private_host_sees_only_its_own_files():
    root = Path(tempfile.mkdtemp(prefix="papertrail-scaleout-probe-"))  # under /tmp, like a topology
    host_tmp = Path(tempfile.mkstemp(prefix="papertrail-host-only-", dir="/tmp")[1])
    try:
        own, other = root / "workers" / "w1", root / "workers" / "w2"
        own.mkdir(parents=True)
        other.mkdir(parents=True)
        (own / "mine").write_text("mine")
        (other / "theirs").write_text("theirs")
        hosts = own / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + "\n127.0.1.1 probe-host-1\n")
        argv = private_host_argv("probe-host-1", home=own, root=root, hosts=hosts, command=["sh", "-c", PROBE])
        env = dict(
            os.environ,
            OWN=str(own),
            OTHER=str(other),
            HOST_TMP_FILE=str(host_tmp),
            REPO_FILE=str(REPO / "pyproject.toml"),
        )
        proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        seen = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        assert seen["host"] == "probe-host-1" != socket.gethostname()
        assert seen["resolves"] == "127.0.1.1"
        assert seen["own"] == "mine"
        assert seen["other"] == "hidden"  # another worker's home
        assert seen["host_tmp"] == "hidden"  # the real /tmp
        assert seen["repo"] == "visible"  # the code
        assert not Path(seen["wrote"]).exists()  # its /tmp stayed its own
        assert (own / "written-by-worker").read_text() == "later\n"  # its home is the real one
    finally:
        host_tmp.unlink()
        shutil.rmtree(root, ignore_errors=True)
