"""Commands: ``airflow papertrail grants|rotate-keys`` and the ``papertrail`` console script.

Airflow (3.2 and 3.3: ``ProvidersManager._discover_cli_command``, ``cli_parser``) adds the
commands a provider lists under ``get_provider_info()["cli"]``: :func:`get_cli_commands`
returns them. The ``papertrail`` console script (pyproject ``[project.scripts]``) runs the
same functions where ``airflow`` cannot load provider commands (another provider's broken
metadata stops discovery; ``AIRFLOW_PACKAGE_NAME`` set). Both need what ``airflow
variables list`` needs: the metadata DB configured (api-server or scheduler host).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.cli.cli_config import CLICommand

    from airflow_papertrail.health import GrantHealth
    from airflow_papertrail.rotation import RotationResult

GRANTS_HELP = "Health of every Papertrail-ai connection's grant (reads plain Variables only; decrypts nothing)"
ROTATE_HELP = (
    "Re-encrypt every stored grant and pending authorization with the first key of the papertrail "
    "token_encryption_keys option, under the refresh coordinator's row lock"
)


def get_cli_commands() -> list[CLICommand]:
    """``airflow papertrail ...`` (listed in ``get_provider_info()["cli"]``)."""
    from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand, lazy_load_command

    output = Arg(("-o", "--output"), help="table (default) or json", choices=("table", "json"), default="table")
    conn_id = Arg(("--conn-id",), help="only this connection's grant and pending authorizations")
    dry_run = Arg(("--dry-run",), help="report what would be re-encrypted; write nothing", action="store_true")
    return [
        GroupCommand(
            name="papertrail",
            help="Papertrail-ai grants: health and encryption-key rotation",
            subcommands=(
                ActionCommand(
                    name="grants",
                    help=GRANTS_HELP,
                    func=lazy_load_command("airflow_papertrail.cli.grants_command"),
                    args=(output,),
                ),
                ActionCommand(
                    name="rotate-keys",
                    help=ROTATE_HELP,
                    func=lazy_load_command("airflow_papertrail.cli.rotate_keys_command"),
                    args=(conn_id, dry_run, output),
                ),
            ),
        )
    ]


# -- grants ------------------------------------------------------------------------------------
def papertrail_connection_ids() -> list[str]:
    """Every ``papertrail`` connection in the metadata DB or in ``AIRFLOW_CONN_*``, and every
    connection that has a grant or health Variable (a connection defined in a secrets backend
    only shows once it has one: backends cannot be listed)."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from airflow_papertrail.health import HEALTH_VARIABLE_PREFIX
    from airflow_papertrail.rotation import stored_variable_keys
    from airflow_papertrail.token_store import GRANT_VARIABLE_PREFIX

    found: set[str] = set()
    with create_session() as session:
        found.update(
            str(c) for c in session.scalars(select(Connection.conn_id).where(Connection.conn_type == "papertrail"))
        )
    for name, value in os.environ.items():
        if name.startswith("AIRFLOW_CONN_") and _env_conn_type(value) == "papertrail":
            found.add(name[len("AIRFLOW_CONN_") :].lower())
    for prefix in (GRANT_VARIABLE_PREFIX, HEALTH_VARIABLE_PREFIX):
        found.update(key[len(prefix) :] for key in stored_variable_keys(prefix))
    return sorted(found)


def _env_conn_type(value: str) -> str | None:
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            return None
        return str(data.get("conn_type")) if isinstance(data, dict) else None
    scheme = text.split("://", 1)[0] if "://" in text else None
    return scheme.replace("-", "_") if scheme else None


def grant_healths(now: float | None = None) -> list[GrantHealth]:
    from airflow_papertrail.health import read_health
    from airflow_papertrail.token_store import OrmVariables

    backend = OrmVariables()
    at = time.time() if now is None else now
    return [read_health(conn_id, backend=backend, clock=lambda: at) for conn_id in papertrail_connection_ids()]


def _when(value: float | None) -> str:
    return "-" if value is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(value))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def render_health(healths: list[GrantHealth], output: str) -> str:
    if output == "json":
        return json.dumps([h.to_dict() for h in healths], indent=2, sort_keys=True)
    if not healths:
        return "No Papertrail-ai connections or grants found."
    rows = []
    for h in healths:
        error = h.last_error or {}
        rows.append(
            [
                h.conn_id,
                h.state,
                "-" if h.generation is None else str(h.generation),
                _when(h.access_expires_at),
                _when(h.refresh_expires_at),
                _when(h.last_refresh_at),
                _when(h.last_used_at),
                f"{error.get('code')}: {error.get('description')}" if error else "-",
            ]
        )
    headers = [
        "CONNECTION",
        "STATE",
        "GEN",
        "ACCESS EXPIRES",
        "REFRESH EXPIRES",
        "LAST REFRESH",
        "LAST USE",
        "LAST ERROR",
    ]
    return _table(headers, rows)


def grants_command(args: argparse.Namespace) -> None:
    print(render_health(grant_healths(), getattr(args, "output", "table") or "table"))


# -- rotate-keys -------------------------------------------------------------------------------
def render_rotation(results: list[RotationResult], output: str, *, dry_run: bool) -> str:
    if output == "json":
        return json.dumps([r.to_dict() for r in results], indent=2, sort_keys=True)
    if not results:
        return "No Papertrail-ai grants or pending authorizations are stored."
    rows = [
        [r.variable, r.kind, r.conn_id or "-", "-" if r.generation is None else str(r.generation), r.outcome]
        for r in results
    ]
    text = _table(["VARIABLE", "KIND", "CONNECTION", "GEN", "OUTCOME"], rows)
    for r in results:
        if r.error:
            text += f"\n{r.variable}: {r.error}"
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    return text + f"\n{'Dry run, nothing written: ' if dry_run else ''}{summary}."


def rotate_keys_command(args: argparse.Namespace) -> None:
    from airflow_papertrail.rotation import UNDECRYPTABLE, rotate_all

    dry_run = bool(getattr(args, "dry_run", False))
    results = rotate_all(conn_id=getattr(args, "conn_id", None), dry_run=dry_run)
    print(render_rotation(results, getattr(args, "output", "table") or "table", dry_run=dry_run))
    if any(r.outcome == UNDECRYPTABLE for r in results):
        print(
            "Some Variables cannot be decrypted with the configured keys and were left untouched: add the key they "
            "were written with to [papertrail] token_encryption_keys and run rotate-keys again, or re-authorize "
            "those connections. Do not remove an old key while this happens.",
            file=sys.stderr,
        )
        raise SystemExit(1)


# -- console script ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="papertrail", description="Papertrail-ai grants: health and key rotation")
    sub = parser.add_subparsers(dest="command", required=True)
    grants = sub.add_parser("grants", help=GRANTS_HELP)
    grants.add_argument("-o", "--output", choices=("table", "json"), default="table")
    grants.set_defaults(func=grants_command)
    rotate = sub.add_parser("rotate-keys", help=ROTATE_HELP)
    rotate.add_argument("--conn-id", default=None)
    rotate.add_argument("--dry-run", action="store_true")
    rotate.add_argument("-o", "--output", choices=("table", "json"), default="table")
    rotate.set_defaults(func=rotate_keys_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
