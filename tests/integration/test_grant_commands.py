"""``airflow papertrail grants|rotate-keys`` and the ``papertrail`` console script against a
real metadata DB (SQLite, ``airflow db migrate``): real Airflow CLI discovery of the
provider's ``cli`` entry, real Variables, grants obtained from the emulator."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail.authorization import AuthorizationStore, PendingAuthorization, authorization_id_for, store_grant
from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore, grant_variable_key
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, emulator_connection, remember_secrets
from tests.integration.conftest import BIN, airflow_env, run

pytestmark = pytest.mark.integration

OK_CONN, BAD_CONN, NEW_CONN = "pt_cli_ok", "pt_cli_bad", "pt_cli_new"


def _commands_env(emulator, keys: list[str]) -> dict[str, str]:
    return airflow_env(
        AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS=",".join(keys),
        **{f"AIRFLOW_CONN_{c.upper()}": emulator_connection(emulator.base_url) for c in (OK_CONN, NEW_CONN)},
    )


def _json(stdout: str) -> list[dict]:
    """The command's JSON list; Airflow 3.2.2 prints its own log lines (alembic) on stdout first."""
    match = re.search(r"^\[", stdout, re.M)
    assert match, f"no JSON list in the output:\n{stdout[-2000:]}"
    return json.loads(stdout[match.start() :])


def _mine(rows: list[dict], field: str = "conn_id") -> dict[str, dict]:
    return {r[field]: r for r in rows if str(r.get(field) or "").startswith("pt_cli_") or "pt_cli" in str(r)}


def test_grants_and_rotate_keys_commands(airflow_db, emulator):
    old, new, foreign = (Fernet.generate_key().decode() for _ in range(3))
    remember_secrets(old, new, foreign)
    config = OAuthClientConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        system="xero",
        scope="accounting.read",
        base_url=emulator.base_url,
    )
    client = OAuthClient(config)
    backend = OrmVariables()
    ok = VariableTokenStore(OK_CONN, cipher=TokenCipher([old]), backend=backend)
    code = emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, scope="accounting.read")
    store_grant(OK_CONN, client.exchange_code(code), ok, issued_for=config.binding())
    bad = VariableTokenStore(BAD_CONN, cipher=TokenCipher([foreign]), backend=backend)
    bad.save(client.exchange_code(emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI)))
    backend.delete("papertrail_health__" + BAD_CONN)  # as if stored before health existed
    state = "st-" + Fernet.generate_key().decode()[:30]
    now = time.time()
    pending = PendingAuthorization(
        authorization_id=authorization_id_for(state),
        conn_id=OK_CONN,
        state=state,
        redirect_uri=REDIRECT_URI,
        created_at=now,
        expires_at=now + 600,
        code_verifier="v" * 43,
    )
    AuthorizationStore(cipher=TokenCipher([old]), backend=backend).save(pending)
    pending_key = f"papertrail_auth__{pending.authorization_id}"

    env = _commands_env(emulator, [new, old])  # step 2 of the procedure done: new key first everywhere
    airflow = str(BIN / "airflow")

    # grants: a table and JSON; plain Variables only
    started = time.monotonic()
    table = run([airflow, "papertrail", "grants"], env=env).stdout
    grants_s = time.monotonic() - started
    rows = _mine(_json(run([airflow, "papertrail", "grants", "--output", "json"], env=env).stdout))
    print("\n[grants -o json] " + json.dumps(rows[OK_CONN], indent=2, sort_keys=True))
    assert rows[OK_CONN]["state"] == "valid" and rows[OK_CONN]["generation"] == 1
    assert rows[OK_CONN]["scopes"] == ["accounting.read"]
    assert rows[BAD_CONN]["state"] == "not_recorded"  # a grant, no health yet: nothing was decrypted
    assert rows[NEW_CONN]["state"] == "not_connected"  # an AIRFLOW_CONN_* papertrail connection, no grant
    assert "CONNECTION" in table and OK_CONN in table and "valid" in table
    print(
        f"\n[grants] {grants_s:.2f} s\n"
        + "\n".join(line for line in table.splitlines() if "pt_cli" in line or "CONNECTION" in line)
    )

    before = {k: backend.get(k) for k in (grant_variable_key(OK_CONN), pending_key, grant_variable_key(BAD_CONN))}
    dry = run([airflow, "papertrail", "rotate-keys", "--dry-run", "-o", "json"], env=env, check=False)
    assert dry.returncode == 1  # the foreign grant cannot be decrypted
    dry_rows = _mine(_json(dry.stdout), "variable")
    assert dry_rows[grant_variable_key(OK_CONN)]["outcome"] == "would rotate"
    assert {k: backend.get(k) for k in before} == before  # nothing written

    # the console script, same subcommand: rotate for real
    started = time.monotonic()
    proc = run([sys.executable, "-m", "airflow_papertrail.cli", "rotate-keys"], env=env, check=False)
    rotate_s = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "pt_cli" in ln or pending_key in ln or ln.startswith("VARIABLE")]
    print(f"[rotate-keys] {rotate_s:.2f} s\n" + "\n".join(lines) + "\n" + proc.stderr.strip()[-400:])
    out = proc.stdout
    assert f"{grant_variable_key(OK_CONN)}" in out and "rotated" in out
    assert f"{grant_variable_key(BAD_CONN)}: " in out and "cannot be decrypted" in out
    assert "left untouched" in proc.stderr
    only_new = TokenCipher([new])
    assert only_new.open("grant", OK_CONN, backend.get(grant_variable_key(OK_CONN)))["generation"] == 1
    assert only_new.open("authorization", pending.authorization_id, backend.get(pending_key))["conn_id"] == OK_CONN
    assert backend.get(grant_variable_key(BAD_CONN)) == before[grant_variable_key(BAD_CONN)]  # untouched

    # again, one connection only: already current
    again = run([airflow, "papertrail", "rotate-keys", "--conn-id", OK_CONN, "-o", "json"], env=env)
    outcomes = {r["variable"]: r["outcome"] for r in _json(again.stdout)}
    assert outcomes == {grant_variable_key(OK_CONN): "already current", pending_key: "already current"}

    every_output = table + dry.stdout + proc.stdout + proc.stderr + again.stdout
    for secret in [*emulator.issued_secrets, CLIENT_SECRET, old, new, foreign, state, "v" * 43]:
        assert secret not in every_output
