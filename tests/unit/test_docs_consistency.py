"""Small facts the docs and docstrings state about the code, checked against the code itself
(envelope format, stored grant fields, ticket lifetimes, callback headers, masking), so a
change on either side fails here until the other follows. Pure parsing, no Airflow runtime."""

from __future__ import annotations

import json
import re
from pathlib import Path

import airflow_papertrail.oauth.envelope as envelope_module
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.oauth.tokens import Token
from airflow_papertrail.plugins.pages import SECURITY_HEADERS
from airflow_papertrail.token_store import GRANT_KIND, StoredGrant

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "airflow_papertrail"


def _bullet(page: str, title: str) -> str:
    """The text of the ``- **<title>**...`` bullet of a Markdown page (up to the next bullet)."""
    match = re.search(rf"^- \*\*{re.escape(title)}\*\*(.*?)(?=^- \*\*|^#|\Z)", page, re.M | re.S)
    assert match, f"no '- **{title}**' bullet"
    return " ".join(match.group(1).split())


def test_envelope_docstring_shows_what_seal_writes():
    doc = envelope_module.__doc__ or ""
    example = json.loads(next(line for line in doc.splitlines() if line.strip().startswith('{"v"')))
    written = json.loads(TokenCipher([TokenCipher.generate_key()]).seal(GRANT_KIND, "papertrail_default", {}))
    assert example["kind"] == written["kind"] == GRANT_KIND
    assert set(example) == set(written)


def test_design_lists_every_field_of_a_stored_grant():
    what = _bullet((DOCS / "design.md").read_text(encoding="utf-8"), "What")
    token = Token(access_token="a", token_type="Bearer", obtained_at=0.0, expires_at=1.0)
    grant = StoredGrant(conn_id="c", token=token, generation=1, updated_at=0.0)
    fields = set(grant.to_payload()) | set(token.to_dict())
    missing = sorted(f for f in fields if f not in what)
    assert not missing, f"docs/design.md's token custody 'What' bullet omits {missing}"


def test_design_states_the_ticket_lifetimes_the_code_uses():
    from airflow_papertrail import refresh

    code = (PACKAGE / "refresh.py").read_text(encoding="utf-8")
    used = set(re.findall(r"open_ticket\([^\n]*?ttl=([A-Z_]+)", code))
    assert used == {"REQUEST_TICKET_TTL", "RESPONSE_TICKET_TTL"}
    ttls = {refresh.REQUEST_TICKET_TTL, refresh.RESPONSE_TICKET_TTL}
    assert ttls == {60, 300}  # request ticket, answer ticket
    refresh = _bullet(
        (DOCS / "design.md").read_text(encoding="utf-8"), "Refresh, serialized across processes and machines"
    )
    for ttl in ttls:
        assert f"{ttl} s" in refresh, f"docs/design.md's refresh bullet does not state the {ttl} s ticket lifetime"


def test_design_does_not_claim_the_state_is_masked():
    design = (DOCS / "design.md").read_text(encoding="utf-8")
    masking = _bullet(design, "Masking")
    assert "verifier" in masking
    assert not re.search(r"\bstate\s*/\s*verifier|\bstate (and|or) (the )?(PKCE )?verifier", masking, re.I)
    assert "State is not masked" in design


def test_authorization_flow_lists_every_callback_header():
    page = " ".join((DOCS / "authorization-flow.md").read_text(encoding="utf-8").split())
    for name, value in SECURITY_HEADERS.items():
        shown = f"{name}: default-src 'none'" if name == "Content-Security-Policy" else f"{name}: {value}"
        assert shown in page, f"docs/authorization-flow.md does not list the header {name}"


def test_no_empty_section_headers_in_the_package():
    rule = r"# -{20,}\n"
    empty = re.compile(rf"{rule}# [^\n]*\n{rule}\s*{rule}")
    hits = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if empty.search(p.read_text(encoding="utf-8"))]
    assert not hits, f"a section header with nothing under it: {hits}"
