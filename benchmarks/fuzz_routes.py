#!/usr/bin/env python3
"""Forged, mutated, replayed, oversized and malformed requests against the plugin's two routes.

    .venv/bin/python benchmarks/fuzz_routes.py [--requests 10000] [--seed 1] [--threads 8]

A real ``airflow api-server`` (with scheduler, dag-processor and triggerer, SQLite) on
127.0.0.1 holds a live grant and a pending authorization whose connection expects an
issuer. Then ``--requests`` requests (bounded, loopback only, from a seeded generator) go to
``GET /papertrail/callback`` and ``POST /papertrail/token``: forged and mutated states
(including the real state with a wrong or missing ``iss``), malformed, duplicated, oversized
and non-ASCII query strings, slash and path variants, garbage bodies, forged tickets,
tickets sealed with another key or for another purpose, stale (replayed) tickets, oversized
bodies. No request carries the real state with what the callback would accept, and no
ticket is a fresh genuine one, so every request must be refused.

Prints requests per route and status, and the five figures whose target is 0: 5xx answers,
forged callbacks accepted, Variables changed (every Variable, exported before and after),
token-endpoint calls made, and requests whose input was reflected in the answer. Exits 1 if
any of them is not 0 (``.ci/run`` runs it with ``--requests 1000``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlencode

import requests
from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_papertrail.authorization import AuthorizationStore, PendingAuthorization  # noqa: E402
from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig, build_authorization_request  # noqa: E402
from airflow_papertrail.oauth.envelope import TokenCipher, seal_ticket  # noqa: E402
from airflow_papertrail.refresh import REQUEST_PURPOSE, RESPONSE_PURPOSE  # noqa: E402
from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator  # noqa: E402
from airflow_papertrail.token_store import VariableTokenStore  # noqa: E402
from tests.e2e.harness import AirflowStack  # noqa: E402

CONN_ID = "papertrail_fuzz"
CLIENT_ID, CLIENT_SECRET = "fuzz-client", "fuzz-secret-" + "k" * 20
KEY = Fernet.generate_key().decode()
OTHER_KEY = Fernet.generate_key().decode()


class RestVariables:
    """The stack's Variables as an admin sees them (for storing the grant and the pending entry)."""

    def __init__(self, stack: AirflowStack) -> None:
        self.stack = stack

    def get(self, key: str) -> str | None:
        return self.stack.variable_unredacted(key)

    def set(self, key: str, value: str, description: str | None = None) -> None:
        self.stack.set_variable(key, value, description=description)

    def delete(self, key: str) -> None:  # pragma: no cover - not needed here
        raise NotImplementedError


def export_variables(stack: AirflowStack, path: Path) -> dict[str, str]:
    stack.cli("variables", "export", str(path), log_stdout=False)
    return json.loads(path.read_text())


class Generator:
    """Seeded requests, each ``(route, method, path, kwargs, marker)``; ``marker`` must never come back."""

    def __init__(self, seed: int, pending: PendingAuthorization, issuer: str) -> None:
        self.rng = random.Random(seed)
        self.pending = pending
        self.issuer = issuer
        self.stale = (
            Fernet(KEY.encode())
            .encrypt_at_time(
                json.dumps(
                    {"purpose": REQUEST_PURPOSE, "payload": {"conn_id": CONN_ID, "seen_generation": 1}}
                ).encode(),
                int(time.time()) - 3600,
            )
            .decode()
        )
        self.replays: list[tuple[str, str, str, dict, str]] = []

    def token(self, n: int) -> str:
        return "".join(
            self.rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") for _ in range(n)
        )

    def mutated_state(self) -> str:
        state = list(self.pending.state)
        i = self.rng.randrange(len(state))
        state[i] = "A" if state[i] != "A" else "B"
        return "".join(state)

    def callback(self, marker: str) -> tuple[str, str, str, dict, str]:
        code = f"{marker}{self.token(20)}"
        kind = self.rng.randrange(14)
        if kind == 0:
            query = urlencode({"code": code, "state": self.token(43), "iss": self.issuer})
        elif kind == 1:
            query = urlencode({"code": code, "state": self.mutated_state(), "iss": self.issuer})
        elif kind == 2:  # the real state from another server (mix-up), or with no issuer at all
            iss = self.rng.choice([f"https://{marker}.example.com", None])
            params = {"code": code, "state": self.pending.state, **({"iss": iss} if iss else {})}
            query = urlencode(params)
        elif kind == 3:
            query = urlencode({"code": code, "state": self.pending.state[: self.rng.randrange(1, 43)]})
        elif kind == 4:
            query = urlencode({"code": code, "state": self.pending.state + self.token(self.rng.randrange(1, 90))})
        elif kind == 5:
            query = f"code={code}&code={code}&state={self.pending.state}&iss={quote(self.issuer)}"
        elif kind == 6:
            query = f"code={code}&state={self.pending.state}&state={self.pending.state}"
        elif kind == 7:
            query = urlencode({"code": code * self.rng.randrange(40, 400), "state": self.token(43)})
        elif kind == 8:
            query = "%ff%fe%00=" + marker + "&state=%c3%28" + self.token(30)
        elif kind == 9:
            query = urlencode({"error": f"<script>{marker}</script>", "state": self.token(43)})
        elif kind == 10:
            query = urlencode({"code": code, "error": "access_denied", "state": self.pending.state, "iss": self.issuer})
        elif kind == 11:
            query = "&".join(f"k{i}={marker}" for i in range(self.rng.randrange(17, 60)))
        elif kind == 12:
            query = urlencode({"code": f'"><img src=x onerror={marker}>', "state": self.mutated_state()})
        else:
            query = urlencode({"code": code, "state": self.token(self.rng.randrange(0, 200))})
        path = self.rng.choice(
            ["/papertrail/callback"] * 6 + ["/papertrail/callback/", "/papertrail//callback", "/papertrail/callback;x"]
        )
        request = ("callback", "GET", f"{path}?{query}", {}, marker)
        if self.rng.random() < 0.1:
            self.replays.append(request)
        return request

    def token_route(self, marker: str) -> tuple[str, str, str, dict, str]:
        kind = self.rng.randrange(11)
        headers = {"Content-Type": "application/json"}
        if kind == 0:
            body: bytes = json.dumps({"ticket": f"gAAAAA{marker}{self.token(120)}"}).encode()
        elif kind == 1:
            wrong = TokenCipher([OTHER_KEY])
            ticket = seal_ticket(
                wrong, REQUEST_PURPOSE, {"conn_id": CONN_ID, "seen_generation": 1, "force": True, "x": marker}
            )
            body = json.dumps({"ticket": ticket}).encode()
        elif kind == 2:  # genuine key, but an answer ticket offered as a request
            ticket = seal_ticket(TokenCipher([KEY]), RESPONSE_PURPOSE, {"conn_id": CONN_ID, "x": marker})
            body = json.dumps({"ticket": ticket}).encode()
        elif kind == 3:  # a captured request, replayed an hour later
            body = json.dumps({"ticket": self.stale}).encode()
        elif kind == 4:
            body = b"{" + marker.encode() + self.token(self.rng.randrange(0, 300)).encode()
        elif kind == 5:
            body = json.dumps([marker, {"ticket": marker}]).encode()
        elif kind == 6:
            body = json.dumps({"ticket": marker * self.rng.randrange(400, 2000)}).encode()
        elif kind == 7:
            body = b'{"ticket": "' + marker.encode() * self.rng.randrange(5_000, 120_000) + b'"}'
        elif kind == 8:
            headers = {"Content-Type": self.rng.choice(["text/plain", "application/x-www-form-urlencoded", ""])}
            body = f"ticket={marker}".encode()
        elif kind == 9:
            body = json.dumps({"ticket": None, "conn_id": CONN_ID, "force": True, "m": marker}).encode()
        else:
            body = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(0, 2000))) + marker.encode()
        return ("token", "POST", "/papertrail/token", {"data": body, "headers": headers}, marker)

    def next(self, i: int) -> tuple[str, str, str, dict, str]:
        marker = f"FZ{i:06d}Q"
        if self.replays and self.rng.random() < 0.05:
            route, method, path, kwargs, _ = self.rng.choice(self.replays)
            return route, method, path, kwargs, "FZreplayQ-never-sent"
        return self.callback(marker) if self.rng.random() < 0.6 else self.token_route(marker)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    if not 1 <= args.requests <= 100_000:
        parser.error("--requests must be between 1 and 100000")
    emulator = PapertrailEmulator(tls=False).start()
    work = Path(__import__("tempfile").mkdtemp(prefix="papertrail-fuzz-"))
    (work / "dags").mkdir()
    stack = AirflowStack(
        work / "dags", home=work / "home", extra_env={"AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": KEY}
    )
    redirect_uri = f"{stack.base_url}/papertrail/callback"
    emulator.add_client(EmulatorClient(CLIENT_ID, CLIENT_SECRET, [redirect_uri]))
    counts: Counter[tuple[str, int]] = Counter()
    accepted = reflected = 0
    lock = threading.Lock()
    try:
        stack.start()
        stack.create_papertrail_connection(
            CONN_ID,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            host=emulator.base_url,
            redirect_uri=redirect_uri,
            system="xero",
            issuer=emulator.base_url,
        )
        config = OAuthClientConfig(
            client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=redirect_uri, system="xero",
            base_url=emulator.base_url, issuer=emulator.base_url,
        )  # fmt: skip
        cipher = TokenCipher([KEY])
        token = OAuthClient(config).exchange_code(
            emulator.issue_code(client_id=CLIENT_ID, redirect_uri=redirect_uri, system="xero")
        )
        VariableTokenStore(CONN_ID, cipher=cipher, backend=RestVariables(stack)).save(
            token, issued_for=config.binding()
        )  # a live grant
        request = build_authorization_request(config, now=time.time(), ttl=3600)
        pending = PendingAuthorization.from_request(request, conn_id=CONN_ID, expected_issuer=config.issuer)
        AuthorizationStore(cipher=cipher, backend=RestVariables(stack)).save(pending)  # a pending authorization
        before = export_variables(stack, work / "before.json")
        token_calls = emulator.stats["token_requests"]
        generator = Generator(args.seed, pending, emulator.base_url)
        plan = [generator.next(i) for i in range(args.requests)]
        local = threading.local()

        def send(item: tuple[str, str, str, dict, str]) -> None:
            nonlocal accepted, reflected
            route, method, path, kwargs, marker = item
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
            response = session.request(method, stack.base_url + path, timeout=30, allow_redirects=False, **kwargs)
            text = response.text
            with lock:
                counts[(route, response.status_code)] += 1
                if route == "callback" and "Authorization received" in text:
                    accepted += 1
                if marker in text or marker in response.headers.get("location", ""):
                    reflected += 1

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            list(pool.map(send, plan))
        elapsed = time.monotonic() - started
        after = export_variables(stack, work / "after.json")
        token_calls = emulator.stats["token_requests"] - token_calls
    finally:
        stack.stop()
        emulator.stop()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    five_xx = sum(n for (_, status), n in counts.items() if status >= 500)
    print()
    print(f"{args.requests} requests (seed {args.seed}, {args.threads} threads) in {elapsed:.1f} s, "
          f"{args.requests / elapsed:.0f} requests/s, against a real api-server on 127.0.0.1")  # fmt: skip
    print(f"{'route':<10}{'status':>8}{'requests':>10}")
    for (route, status), n in sorted(counts.items()):
        print(f"{route:<10}{status:>8}{n:>10}")
    figures = {
        "5xx answers": five_xx,
        "forged callbacks accepted": accepted,
        "Variables changed": len(changed),
        "token-endpoint calls": token_calls,
        "reflected input": reflected,
    }
    print()
    for name, value in figures.items():
        print(f"{name:<28}{value:>6}   (target 0)")
    if changed:
        print(f"changed: {changed}")
    return 0 if not any(figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
