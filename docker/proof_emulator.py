"""The compose file's ``papertrail-emulator`` plus a small admin port (``docker/local-proof.sh --celery``).

    python proof_emulator.py --admin-port 8444 papertrail-emulator --host 0.0.0.0 ...

Everything after ``--admin-port N`` is the emulator's own command line, as the compose service
runs it (``papertrail-emulator`` itself optional): the same parser, the same emulator. Once
it listens, a second HTTP server on ``--admin-host:--admin-port`` answers

* ``GET /stats``: the emulator's counters (``refresh_grants``, ``grants_revoked``, ...);
* ``POST /expire-access-tokens``: expire every access token now (``{"expired": n}``).

Local proofs only: the admin port has no authentication (local-proof.sh publishes it on the
host's 127.0.0.1 only). Nothing it answers contains a token.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from airflow_papertrail.testing import emulator as emulator_module


def serve_admin(emulator: emulator_module.PapertrailEmulator, host: str, port: int) -> ThreadingHTTPServer:
    class Admin(BaseHTTPRequestHandler):
        def _answer(self, status: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/stats":
                self._answer(200, emulator.stats.snapshot())
            else:
                self._answer(404, {"error": "not_found"})

        def do_POST(self) -> None:
            if self.path == "/expire-access-tokens":
                self._answer(200, {"expired": emulator.expire_access_tokens()})
            else:
                self._answer(404, {"error": "not_found"})

        def log_message(self, format: str, *args: Any) -> None:
            print(f"papertrail-emulator admin: {self.command} {self.path.split('?')[0]}", flush=True)

    server = ThreadingHTTPServer((host, port), Admin)
    threading.Thread(target=server.serve_forever, name="emulator-admin", daemon=True).start()
    print(f"papertrail-emulator admin listening on http://{host}:{port}", flush=True)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-host", default="0.0.0.0")  # noqa: S104 - inside its container
    parser.add_argument("--admin-port", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the emulator's command line")
    args = parser.parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if command[:1] == ["papertrail-emulator"]:
        command = command[1:]

    original_start = emulator_module.PapertrailEmulator.start

    def start(self: emulator_module.PapertrailEmulator) -> emulator_module.PapertrailEmulator:
        started = original_start(self)
        serve_admin(self, args.admin_host, args.admin_port)
        return started

    emulator_module.PapertrailEmulator.start = start  # type: ignore[method-assign]
    return emulator_module.main(command)


if __name__ == "__main__":
    sys.exit(main())
