"""docs/troubleshooting.md must quote every message the provider can show a person.

Pure file parsing (``ast`` over ``airflow_papertrail/``, except the emulator in ``testing/``),
no Airflow import. What counts as a message:

* every ``raise <call>(...)``, and every call that builds an exception or another message
  carrier (``Outcome``, ``ProbeResult``, ``_fail``) even when it is returned rather than
  raised: its string arguments;
* in the functions listed in :data:`MESSAGE_SCOPES` (texts assembled piece by piece: the
  callback pages, ``test_connection``, the configuration problems, the HTTP-status hints,
  the OAuth error format and hints): the strings they return, assign or append.

From each string, every constant piece between placeholders that is at least
:data:`MIN_PIECE` characters long (surrounding punctuation stripped, whitespace collapsed)
must appear verbatim in the page. A reworded message therefore fails here until the page
is updated; the failure names the file and line.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "airflow_papertrail"
PAGE = ROOT / "docs" / "troubleshooting.md"

#: Shorter constant pieces (", got ", "HTTP", "unexpected") identify nothing on their own.
MIN_PIECE = 12

#: Calls that carry a user-visible message without being named ``*Error``/``*Exception``.
CARRIERS = frozenset({"Outcome", "ProbeResult", "_fail"})

#: (file relative to the package, function or ``Class.method``, or ``"*"`` for the whole
#: module): texts built from pieces, collected from returns, assignments and ``append``.
MESSAGE_SCOPES = (
    ("exceptions.py", "*"),
    ("oauth/config.py", "check_url"),
    ("oauth/config.py", "OAuthClientConfig.problems"),
    ("oauth/config.py", "OAuthClientConfig.validate"),
    ("oauth/config.py", "system_warnings"),
    ("oauth/client.py", "OAuthClient._interpret"),
    ("hooks/papertrail.py", "PapertrailHook.test_connection"),
    ("hooks/papertrail.py", "PapertrailHook._describe_grant"),
    ("plugins/callback_app.py", "handle_callback"),
    ("authorization.py", "examine"),
    ("api/modules.py", "validate"),
    ("api/client.py", "_retry_after"),
    ("api/client.py", "DataClient._attempt"),
    ("api/client.py", "DataClient._status_error"),
    ("api/client.py", "DataClient._malformed"),
    ("api/client.py", "DataClient._interrupted_error"),
    ("api/jsonstream.py", "JsonStreamError.__init__"),
    ("operators/query.py", "PapertrailQueryOperator._too_large"),
    ("refresh.py", "open_refresh_request"),
    ("refresh.py", "RefreshJob.attempt"),
    ("refresh.py", "busy_answer"),
    ("hooks/papertrail.py", "PapertrailHook._test_connection"),
    ("token_store.py", "VariableTokenStore._write_verified"),
    ("health.py", "*"),
    ("cli.py", "render_health"),
    ("cli.py", "render_rotation"),
    ("cli.py", "rotate_keys_command"),
)

#: Pieces no person can meet, with the reason. Each must still exist in the code (checked).
INTERNAL = {
    ("api/jsonstream.py", "feed() after close"): "RecordStream misuse; DataClient never feeds after close()",
    (
        "api/jsonstream.py",
        "feed_lines()/close_lines() need RecordStream(raw=True",
    ): "TypeError for a programming error; DataClient always uses raw mode for them",
    ("oauth/config.py", "must not contain a query string, got"): "check_url(allow_query=False) has no caller",
    ("oauth/envelope.py", "invalid ticket"): "TicketError, always caught (refresh.py)",
    ("oauth/envelope.py", "ticket older than"): "StaleTicket, always caught (refresh.py)",
    ("refresh.py", "stale_ticket"): "route answer; the worker shows its own stale-ticket message",
    ("refresh.py", "another request is refreshing the grant of"): "RefreshInProgress, always caught: the route waits",
    ("refresh.py", "the refresh ticket is older than"): "route answer; the worker shows its own stale-ticket message",
    ("oauth/envelope.py", "ticket for another purpose"): "TicketError, always caught (refresh.py)",
    ("authorization.py", "waiting for consent"): "the 'keep waiting' outcome, never shown",
}


@dataclass(frozen=True)
class Piece:
    file: str
    line: int
    text: str

    def where(self) -> str:
        return f"airflow_papertrail/{self.file}:{self.line}"


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _literal_pieces(node: ast.AST | None) -> list[str]:
    """The constant text of a string expression: literal parts of f-strings, both sides of
    ``+``, both branches of ``x if c else y``, items of tuples/lists/dicts. Placeholders
    and calls contribute nothing (their strings are not message text)."""
    if node is None:
        return []
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) else []
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    if isinstance(node, ast.BinOp):
        return _literal_pieces(node.left) + _literal_pieces(node.right)
    if isinstance(node, ast.IfExp):
        return _literal_pieces(node.body) + _literal_pieces(node.orelse)
    if isinstance(node, ast.BoolOp):
        return [p for v in node.values for p in _literal_pieces(v)]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [p for v in node.elts for p in _literal_pieces(v)]
    if isinstance(node, ast.Dict):
        return [p for v in node.values for p in _literal_pieces(v)]
    return []


def _significant(raw: str) -> str | None:
    text = _normalise(raw).strip(" ;:,.()")
    return text if len(text) >= MIN_PIECE else None


def _call_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _exception_names(trees: dict[str, ast.Module]) -> set[str]:
    """Classes of the package that derive (transitively) from an exception."""
    names: set[str] = set()
    bases: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
    changed = True
    while changed:
        changed = False
        for name, parents in bases.items():
            if name not in names and any(p in names or p.endswith(("Error", "Exception")) for p in parents):
                names.add(name)
                changed = True
    return names


def _is_carrier(call: ast.Call, exceptions: set[str]) -> bool:
    name = _call_name(call)
    return name in exceptions or name in CARRIERS or name.endswith(("Error", "Exception"))


def _call_pieces(call: ast.Call) -> list[str]:
    return [p for arg in [*call.args, *(k.value for k in call.keywords)] for p in _literal_pieces(arg)]


def _scope_nodes(tree: ast.Module, name: str) -> list[ast.AST]:
    if name == "*":
        return [tree]
    found: list[ast.AST] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}{child.name}"
                if qualname == name:
                    found.append(child)
                visit(child, f"{qualname}.")

    visit(tree, "")
    return found


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _scope_pieces(scope: ast.AST, docstrings: set[int]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(scope):
        values: list[ast.AST] = []
        if isinstance(node, ast.Return) and node.value is not None:
            values.append(node.value)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            values.append(node.value)
        elif isinstance(node, ast.Call) and _call_name(node) in ("append", "extend", "__init__"):
            values.extend([*node.args, *(k.value for k in node.keywords)])
        for value in values:
            if id(value) not in docstrings:
                line: int = getattr(value, "lineno", 0)
                out.extend((line, p) for p in _literal_pieces(value))
    return out


def collect_pieces() -> list[Piece]:
    trees = {
        path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
        if "testing" not in path.relative_to(PACKAGE).parts
    }
    exceptions = _exception_names(trees)
    raw: list[tuple[str, int, str]] = []
    for file, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                raw.extend((file, node.lineno, p) for p in _call_pieces(node.exc))
            elif isinstance(node, ast.Call) and _is_carrier(node, exceptions):
                raw.extend((file, node.lineno, p) for p in _call_pieces(node))
    for file, name in MESSAGE_SCOPES:
        tree = trees[file]
        scopes = _scope_nodes(tree, name)
        assert scopes, f"MESSAGE_SCOPES names {file}:{name}, which no longer exists; update the list"
        docstrings = _docstrings(tree)
        for scope in scopes:
            raw.extend((file, line, p) for line, p in _scope_pieces(scope, docstrings))
    pieces: dict[tuple[str, str], Piece] = {}
    for file, line, text in raw:
        significant = _significant(text)
        if significant is not None:
            pieces.setdefault((file, significant), Piece(file, line, significant))
    return sorted(pieces.values(), key=lambda p: (p.file, p.line, p.text))


@pytest.fixture(scope="module")
def page() -> str:
    assert PAGE.exists(), "docs/troubleshooting.md is missing"
    return _normalise(PAGE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pieces() -> list[Piece]:
    return collect_pieces()


def test_collector_finds_the_messages(pieces: list[Piece]) -> None:
    # A collector that silently found nothing would make the next test pass vacuously.
    files = {p.file for p in pieces}
    assert len(pieces) > 150, len(pieces)
    for expected in ("oauth/envelope.py", "plugins/callback_app.py", "api/client.py", "refresh.py", "exceptions.py"):
        assert expected in files
    texts = {p.text for p in pieces}
    assert any(t.startswith("no token encryption key is configured") for t in texts)  # raised (envelope.py)
    assert "Authorization expired" in texts  # callback page title (CallbackError)
    assert "the client ID is missing: put the app's client ID in the connection's Login field" in texts  # scope
    assert "Re-run the papertrail_authorize DAG and approve access to try again" in texts  # Outcome


def test_every_message_is_on_the_troubleshooting_page(page: str, pieces: list[Piece]) -> None:
    missing = [f"{p.where()}: {p.text!r}" for p in pieces if (p.file, p.text) not in INTERNAL and p.text not in page]
    assert not missing, (
        f"{len(missing)} message text(s) raised or shown by the provider are not quoted in "
        "docs/troubleshooting.md (add the message, what it means and what to do, or list it in INTERNAL "
        "with a reason if no person can meet it):\n  " + "\n  ".join(missing)
    )


def test_internal_exemptions_are_current(pieces: list[Piece]) -> None:
    present = {(p.file, p.text) for p in pieces}
    stale = sorted(f"{file}: {text!r}" for file, text in INTERNAL if (file, text) not in present)
    assert not stale, "INTERNAL lists texts the code no longer has; remove them:\n  " + "\n  ".join(stale)


def test_every_exception_class_is_on_the_page(page: str) -> None:
    tree = ast.parse((PACKAGE / "exceptions.py").read_text(encoding="utf-8"))
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert len(classes) >= 14, classes
    missing = [name for name in classes if not re.search(rf"\b{name}\b", page)]
    assert not missing, f"exception classes of airflow_papertrail/exceptions.py not named on the page: {missing}"


def test_relative_links_resolve() -> None:
    text = PAGE.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", text)
    assert targets, "the page links to no other docs page"
    broken = sorted({t for t in targets if "://" not in t and not (PAGE.parent / t).is_file()})
    assert not broken, f"docs/troubleshooting.md links to missing pages: {broken}"
