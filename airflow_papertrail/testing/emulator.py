"""An offline emulator of the Papertrail-ai accounting API (OAuth 2 + data modules).

A real HTTP(S) server on loopback that behaves like the documented service, for tests and
for offline use. Where the published documents are silent it takes the strictest common
behaviour of OAuth 2 servers: codes are single use and short-lived, refresh tokens rotate
and reusing a rotated one revokes the whole grant, redirect URIs match exactly.

Standard library only; ``cryptography`` is imported lazily, and only when ``tls=True``,
to mint a throw-away CA and server certificate. No Airflow imports.

Endpoints:

* ``GET/POST /api/authorize.php``: consent page, then a redirect with ``code`` or ``error``.
* ``POST /api/token.php``: ``authorization_code`` and ``refresh_token`` grants,
  ``client_secret_post`` or ``client_secret_basic``.
* ``GET|POST /api/api_<module>.php``: data modules (see :data:`MODULES`); list queries
  stream their body and generate records lazily.
* ``GET /healthz``: liveness for container health checks.

Faults (status codes, ``Retry-After``, delays, dropped connections, dropped *answers* after
the request was processed) can be queued per endpoint with :meth:`PapertrailEmulator.inject`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import hmac
import html
import http.server
import ipaddress
import json
import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from email.message import Message
    from types import FrameType

__all__ = [
    "FAULT_ENDPOINTS",
    "MODULES",
    "SYSTEMS",
    "EmulatorClient",
    "EmulatorStats",
    "PapertrailEmulator",
    "main",
]

logger = logging.getLogger("airflow_papertrail.emulator")

#: Data modules and their queries, exactly as documented (``/api/api_<module>.php``).
MODULES: dict[str, tuple[str, ...]] = {
    "bank": ("bank_list", "bank_accounts_list"),
    "customers": (
        "list_customers",
        "list_invoices",
        "invoice_detail",
        "create_customer",
        "create_invoice",
        "create_credit_note",
    ),
    "vendors": ("list_vendors", "list_invoices", "create_vendor", "create_invoice"),
    "gl": ("list_gl_transaction", "list_gl_accounts"),
    "accounts": ("account_create", "account_update", "account_delete"),
    "reports": ("trial_balance", "income_statement", "balance_sheet", "cash_flow"),
    "company": ("co_details", "users"),
}

#: Accounting systems accepted in ``system`` (README, including the later Wave and Syspro).
SYSTEMS: tuple[str, ...] = (
    "freeagent",
    "freshbooks",
    "quickbooks",
    "sage_sa",
    "sage_uk",
    "xero",
    "zoho",
    "wave",
    "syspro",
)

#: Endpoints a fault can be queued for.
FAULT_ENDPOINTS: tuple[str, ...] = ("authorize", "token", "api")

WRITE_QUERIES: frozenset[str] = frozenset(
    {
        "create_customer",
        "create_invoice",
        "create_credit_note",
        "create_vendor",
        "account_create",
        "account_update",
        "account_delete",
    }
)
DEFAULT_LIST_COUNT = 25
MAX_LIST_COUNT = 5_000_000
MAX_BODY_BYTES = 1 << 20
STREAM_CHUNK_BYTES = 64 * 1024

_STAT_KEYS: tuple[str, ...] = (
    "authorize_requests",
    "consents_allowed",
    "consents_denied",
    "codes_issued",
    "token_requests",
    "authorization_code_grants",
    "refresh_grants",
    "invalid_client_errors",
    "invalid_grant_errors",
    "grants_revoked",
    "refresh_tokens_expired",
    "api_requests",
    "invalid_token_errors",
    "records_streamed",
    "writes",
    "faults_served",
)

_CURRENCY: dict[str, str] = {
    "freeagent": "GBP",
    "freshbooks": "USD",
    "quickbooks": "USD",
    "sage_sa": "ZAR",
    "sage_uk": "GBP",
    "xero": "GBP",
    "zoho": "USD",
    "wave": "CAD",
    "syspro": "USD",
}

_WRITE_PREFIX: dict[tuple[str, str], str] = {
    ("customers", "create_customer"): "CU",
    ("customers", "create_invoice"): "SI",
    ("customers", "create_credit_note"): "CN",
    ("vendors", "create_vendor"): "VE",
    ("vendors", "create_invoice"): "PI",
    ("accounts", "account_create"): "GA",
    ("accounts", "account_update"): "GA",
    ("accounts", "account_delete"): "GA",
}

_API_PATH = re.compile(r"/api/api_([A-Za-z0-9_]+)\.php")
# S256 challenges are base64url(sha256) without padding: exactly 43 characters.
_CHALLENGE_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_VERIFIER_RE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_JSON_TYPE = "application/json"
_NO_STORE: tuple[tuple[str, str], ...] = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
# form-action is deliberately absent: browsers apply it to the redirect that follows the
# form submission, and that redirect goes to the client's own origin.
_HTML_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Type", "text/html; charset=utf-8"),
    *_NO_STORE,
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
)
_LOOPBACK_NAMES = ("localhost",)


# ---------------------------------------------------------------------------------------
# public value types
# ---------------------------------------------------------------------------------------
@dataclass
class EmulatorClient:
    """A registered OAuth client (an "app" in Papertrail-ai's words)."""

    client_id: str
    client_secret: str = field(repr=False)
    redirect_uris: list[str]


class EmulatorStats(Mapping[str, int]):
    """Thread-safe read-only view of the emulator's counters (``stats["refresh_grants"]``).

    Shares the emulator's lock; :meth:`snapshot` returns a consistent plain ``dict``.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._counts: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)

    def __getitem__(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._counts))

    def __len__(self) -> int:
        with self._lock:
            return len(self._counts)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def __repr__(self) -> str:
        return f"EmulatorStats({self.snapshot()!r})"

    def _bump(self, key: str, n: int = 1) -> None:
        """Increment a counter; the caller holds the emulator lock."""
        self._counts[key] += n


# ---------------------------------------------------------------------------------------
# internal records
# ---------------------------------------------------------------------------------------
@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    scope: str
    system: str
    code_challenge: str | None
    expires_at: float
    used: bool = False
    grant_id: str | None = None


@dataclass
class _Grant:
    grant_id: str
    client_id: str
    scope: str
    system: str
    org_id: str
    active: bool = True
    access_tokens: set[str] = field(default_factory=set)
    refresh_tokens: set[str] = field(default_factory=set)


@dataclass
class _AccessToken:
    grant_id: str
    scope: str
    expires_at: float


@dataclass
class _RefreshToken:
    grant_id: str
    rotated: bool = False
    #: Emulator clock at issue, and at its last successful presentation (without rotation the
    #: same token is presented again and again: each use restarts its idle time).
    issued_at: float = 0.0
    last_used_at: float | None = None


@dataclass
class _Fault:
    status: int | None
    retry_after: int | None
    delay: float
    drop: bool
    drop_after_processing: bool
    body: dict[str, Any] | str | bytes | None
    remaining: int
    after_processing: bool = False


@dataclass
class _AuthzRequest:
    client_id: str
    redirect_uri: str
    scope: str
    state: str | None
    system: str
    code_challenge: str | None
    code_challenge_method: str | None


@dataclass
class _Request:
    method: str
    path: str
    query: str
    headers: Message
    body: bytes


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | Iterator[bytes] = b""


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------
def _json_response(status: int, payload: Any, extra_headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    headers = [("Content-Type", _JSON_TYPE), *_NO_STORE, *extra_headers]
    return _Response(status, headers, body)


def _oauth_error(
    status: int, error: str, description: str, extra_headers: tuple[tuple[str, str], ...] = ()
) -> _Response:
    return _json_response(status, {"error": error, "error_description": description}, extra_headers)


_BASIC_CHALLENGE = (("WWW-Authenticate", 'Basic realm="papertrail"'),)
_BEARER_CHALLENGE = (("WWW-Authenticate", 'Bearer error="invalid_token"'),)


def _html_page(status: int, title: str, body_html: str) -> _Response:
    page = (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:40em;margin:3em auto;padding:0 1em}"
        "button{font-size:1.1em;margin-right:1em;padding:.4em 1.2em}code{word-break:break-all}</style>"
        f"</head><body><main>\n{body_html}\n</main></body></html>\n"
    )
    return _Response(status, list(_HTML_HEADERS), page.encode("utf-8"))


def _error_page(status: int, message: str) -> _Response:
    return _html_page(
        status,
        "Papertrail-ai: authorization error",
        f'<h1>Authorization error</h1>\n<p id="error">{html.escape(message)}</p>',
    )


def _parse_params(raw: str) -> tuple[dict[str, str], set[str]]:
    """Parse a query string or form body; returns the values and the repeated names."""
    values: dict[str, str] = {}
    repeated: set[str] = set()
    for name, value in urllib.parse.parse_qsl(raw, keep_blank_values=True):
        if name in values:
            repeated.add(name)
        values[name] = value
    return values, repeated


def _append_query(uri: str, params: list[tuple[str, str]]) -> str:
    """Append parameters to a redirect URI that may already carry a query string."""
    parts = urllib.parse.urlsplit(uri)
    extra = urllib.parse.urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urllib.parse.urlunsplit(parts._replace(query=query))


def _redirect(location: str) -> _Response:
    return _Response(302, [("Location", location), *_NO_STORE, ("Referrer-Policy", "no-referrer")], b"")


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _media_type(headers: Message) -> str:
    return (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()


def _validate_redirect_uri(uri: str) -> None:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("a redirect URI must be an absolute http(s) URI")
    if parts.fragment or "#" in uri:
        raise ValueError("a redirect URI must not contain a fragment (RFC 6749 3.1.2)")


def _close_body(response: _Response) -> None:
    close = getattr(response.body, "close", None)
    if callable(close):
        close()


def _default_error_code(status: int, endpoint: str) -> str:
    if status == 401:
        return {"token": "invalid_client", "api": "invalid_token"}.get(endpoint, "unauthorized")
    if status == 403:
        return "access_denied"
    if status == 404:
        return "not_found"
    if status in (429, 502, 503, 504):
        return "temporarily_unavailable"
    if status >= 500:
        return "server_error"
    return "invalid_request"


# ---------------------------------------------------------------------------------------
# deterministic fake records
# ---------------------------------------------------------------------------------------
_DATES: tuple[str, ...] = tuple((date(2024, 1, 1) + timedelta(days=d)).isoformat() for d in range(366))


def _date(i: int, offset: int = 0) -> str:
    return _DATES[(i - 1 + offset) % len(_DATES)]


def _amount(i: int, seed: int) -> str:
    cents = ((i * 2654435761) ^ seed) % 1_000_000 + 1
    return f"{cents // 100}.{cents % 100:02d}"


def _pick(options: tuple[str, ...], i: int, seed: int) -> str:
    return options[(i + seed) % len(options)]


_TXN_KINDS = ("debit", "debit", "credit")
_INVOICE_STATES = ("paid", "authorised", "draft")
_ACCOUNT_TYPES = ("asset", "liability", "equity", "revenue", "expense")
_ROLES = ("admin", "standard", "read_only")


def _rec_bank_list(i: int, seed: int, cur: str) -> str:
    return (
        f'{{"id":"BT-{i:06d}","date":"{_date(i)}","amount":"{_amount(i, seed)}","currency":"{cur}",'
        f'"type":"{_pick(_TXN_KINDS, i, seed)}","description":"Bank transaction {i}",'
        f'"account_id":"BA-{(i + seed) % 3 + 1:06d}"}}'
    )


def _rec_bank_accounts(i: int, seed: int, cur: str) -> str:
    return (
        f'{{"id":"BA-{i:06d}","name":"Bank account {i}","account_number":"****{(i * 7919 + seed) % 10000:04d}",'
        f'"currency":"{cur}","balance":"{_amount(i, seed)}","status":"active"}}'
    )


def _rec_customer(i: int, seed: int, cur: str) -> str:
    return (
        f'{{"id":"CU-{i:06d}","name":"Customer {i}","email":"customer{i}@example.invalid",'
        f'"currency":"{cur}","status":"active"}}'
    )


def _rec_sales_invoice(i: int, seed: int, cur: str) -> str:
    return (
        f'{{"id":"SI-{i:06d}","number":"INV-{i:06d}","customer_id":"CU-{i % 97 + 1:06d}","date":"{_date(i)}",'
        f'"due_date":"{_date(i, 30)}","amount":"{_amount(i, seed)}","currency":"{cur}",'
        f'"status":"{_pick(_INVOICE_STATES, i, seed)}"}}'
    )


def _rec_vendor(i: int, seed: int, cur: str) -> str:
    return (
        f'{{"id":"VE-{i:06d}","name":"Vendor {i}","email":"vendor{i}@example.invalid",'
        f'"currency":"{cur}","status":"active"}}'
    )


def _rec_purchase_invoice(i: int, seed: int, cur: str) -> str:
    return (
        f'{{"id":"PI-{i:06d}","number":"BILL-{i:06d}","vendor_id":"VE-{i % 89 + 1:06d}","date":"{_date(i)}",'
        f'"due_date":"{_date(i, 30)}","amount":"{_amount(i, seed)}","currency":"{cur}",'
        f'"status":"{_pick(_INVOICE_STATES, i, seed)}"}}'
    )


def _rec_gl_transaction(i: int, seed: int, cur: str) -> str:
    amount = _amount((i + 1) // 2, seed)
    debit, credit = (amount, "0.00") if i % 2 else ("0.00", amount)
    return (
        f'{{"id":"GL-{i:06d}","journal_id":"JN-{(i + 1) // 2:06d}","date":"{_date((i + 1) // 2)}",'
        f'"account_code":"{4000 + (i + seed) % 50 * 10}","debit":"{debit}","credit":"{credit}",'
        f'"currency":"{cur}","description":"Journal line {i}"}}'
    )


def _rec_gl_account(i: int, seed: int, cur: str) -> str:
    return (
        f'{{"id":"GA-{i:06d}","code":"{1000 + i * 10}","name":"Account {i}",'
        f'"type":"{_pick(_ACCOUNT_TYPES, i, seed)}","currency":"{cur}","status":"active"}}'
    )


def _rec_user(i: int, seed: int, cur: str) -> str:
    return (
        f'{{"id":"US-{i:06d}","name":"User {i}","email":"user{i}@example.invalid","role":"{_pick(_ROLES, i, seed)}"}}'
    )


_LIST_QUERIES: dict[tuple[str, str], Callable[[int, int, str], str]] = {
    ("bank", "bank_list"): _rec_bank_list,
    ("bank", "bank_accounts_list"): _rec_bank_accounts,
    ("customers", "list_customers"): _rec_customer,
    ("customers", "list_invoices"): _rec_sales_invoice,
    ("vendors", "list_vendors"): _rec_vendor,
    ("vendors", "list_invoices"): _rec_purchase_invoice,
    ("gl", "list_gl_transaction"): _rec_gl_transaction,
    ("gl", "list_gl_accounts"): _rec_gl_account,
    ("company", "users"): _rec_user,
}


def _stream_list(module: str, query: str, system: str, count: int) -> Iterator[bytes]:
    """Yield the JSON body of a list answer in ~64 KiB pieces, one record at a time."""
    render = _LIST_QUERIES[(module, query)]
    seed = zlib.crc32(f"{module}/{query}".encode())
    currency = _CURRENCY[system]
    head = json.dumps(
        {"status": "ok", "module": module, "query": query, "system": system, "count": count}, separators=(",", ":")
    )
    parts: list[str] = [head[:-1], ',"data":[']
    size = 0
    for i in range(1, count + 1):
        record = render(i, seed, currency)
        if i > 1:
            record = "," + record
        parts.append(record)
        size += len(record)
        if size >= STREAM_CHUNK_BYTES:
            yield "".join(parts).encode("utf-8")
            parts = []
            size = 0
    parts.append("]}")
    yield "".join(parts).encode("utf-8")


def _single_read(module: str, query: str, system: str, params: Mapping[str, str], org_id: str) -> dict[str, Any]:
    currency = _CURRENCY[system]
    if query == "co_details":
        return {
            "id": org_id,
            "name": f"Emulated Trading Ltd ({system})",
            "address": {"line1": "1 Ledger Lane", "city": "London", "postcode": "EC1A 1AA", "country": "GB"},
            "phone": "+44 20 7946 0000",
            "base_currency": currency,
            "system": system,
        }
    if query == "invoice_detail":
        invoice_id = params.get("id") or params.get("invoice_id") or "SI-000001"
        return {
            "id": invoice_id,
            "customer_id": "CU-000001",
            "date": "2024-01-01",
            "due_date": "2024-01-31",
            "currency": currency,
            "status": "authorised",
            "lines": [
                {"description": "Consulting services", "quantity": "2", "unit_amount": "250.00", "amount": "500.00"},
                {"description": "Expenses", "quantity": "1", "unit_amount": "42.50", "amount": "42.50"},
            ],
            "total": "542.50",
        }
    period = {"from_date": params.get("from_date", "2024-01-01"), "to_date": params.get("to_date", "2024-12-31")}
    if query == "trial_balance":
        lines = [
            {"account_code": "1200", "account_name": "Bank", "debit": "1500.00", "credit": "0.00"},
            {"account_code": "1100", "account_name": "Accounts receivable", "debit": "500.00", "credit": "0.00"},
            {"account_code": "4000", "account_name": "Sales", "debit": "0.00", "credit": "1800.00"},
            {"account_code": "3000", "account_name": "Equity", "debit": "0.00", "credit": "200.00"},
        ]
        return {**period, "currency": currency, "lines": lines, "totals": {"debit": "2000.00", "credit": "2000.00"}}
    if query == "income_statement":
        return {
            **period,
            "currency": currency,
            "revenue": [{"account": "Sales", "amount": "1800.00"}],
            "expenses": [{"account": "Rent", "amount": "600.00"}],
            "net_profit": "1200.00",
        }
    if query == "balance_sheet":
        return {
            **period,
            "currency": currency,
            "assets": [
                {"account": "Bank", "amount": "1500.00"},
                {"account": "Accounts receivable", "amount": "500.00"},
            ],
            "liabilities": [{"account": "Accounts payable", "amount": "600.00"}],
            "equity": [{"account": "Equity", "amount": "1400.00"}],
        }
    # cash_flow
    return {
        **period,
        "currency": currency,
        "operating": "1200.00",
        "investing": "-300.00",
        "financing": "0.00",
        "net_change": "900.00",
    }


# ---------------------------------------------------------------------------------------
# TLS material
# ---------------------------------------------------------------------------------------
def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _generate_tls_material(directory: str, host: str) -> tuple[str, str, str]:
    """Mint a throw-away CA and a server certificate signed by it.

    Returns ``(ca_cert_path, server_cert_path, server_key_path)``. A separate CA (rather
    than one self-signed leaf) keeps strict verifiers happy (X509_STRICT, webpki).
    """
    from datetime import datetime, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Papertrail-ai emulator throw-away CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    try:
        extra_ip = ipaddress.ip_address(host)
    except ValueError:
        if host and host not in _LOOPBACK_NAMES:
            names.append(x509.DNSName(host))
    else:
        if not extra_ip.is_unspecified and all(
            not (isinstance(n, x509.IPAddress) and n.value == extra_ip) for n in names
        ):
            names.append(x509.IPAddress(extra_ip))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_path = os.path.join(directory, "ca.pem")
    cert_path = os.path.join(directory, "server.pem")
    key_path = os.path.join(directory, "server-key.pem")
    with open(ca_path, "wb") as fh:
        fh.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return ca_path, cert_path, key_path


# ---------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------
class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # Never wait for handler threads at close: idle keep-alive connections or injected
    # delays would make stop() hang. Open connections are shut down explicitly instead.
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        emulator: PapertrailEmulator,
        ssl_context: ssl.SSLContext | None,
        family: socket.AddressFamily,
    ) -> None:
        self.address_family = family
        self.emulator = emulator
        self.ssl_context = ssl_context
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls socket.getfqdn(), a reverse DNS lookup that can
        # take seconds on badly configured hosts; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        if self.ssl_context is not None:
            # The handshake runs in the handler thread (see _Handler.setup) so one silent
            # client cannot block the accept loop.
            conn = self.ssl_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        self.emulator._track(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        self.emulator._untrack(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("papertrail emulator: connection error", exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "PapertrailEmulator/1.0"
    sys_version = ""
    timeout = 30.0

    def setup(self) -> None:
        conn = self.request
        conn.settimeout(self.timeout)
        if isinstance(conn, ssl.SSLSocket):
            conn.do_handshake()
        super().setup()

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes the request line (with query strings: codes, states) to
        # stderr. Only the method and the path are ever logged, at DEBUG.
        path = getattr(self, "path", "") or ""
        logger.debug("%s %s", getattr(self, "command", None) or "-", path.split("?", 1)[0])

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # -- plumbing -------------------------------------------------------------------------
    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding"):
            self._send(
                _json_response(
                    411,
                    {"error": "invalid_request", "error_description": "Content-Length required"},
                    (("Connection", "close"),),
                )
            )
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            self._send(
                _json_response(
                    400,
                    {"error": "invalid_request", "error_description": "bad Content-Length"},
                    (("Connection", "close"),),
                )
            )
            return None
        if length > MAX_BODY_BYTES:
            self._send(
                _json_response(
                    413,
                    {"error": "invalid_request", "error_description": "request body too large"},
                    (("Connection", "close"),),
                )
            )
            return None
        return self.rfile.read(length)

    def _drop(self) -> None:
        """Close the connection without a single byte of response."""
        self.close_connection = True

    def _dispatch(self) -> None:
        emulator = self.server.emulator
        split = urllib.parse.urlsplit(self.path)
        body = self._read_body()
        if body is None:
            return
        route = emulator._route(split.path)
        if route is None:
            if split.path == "/healthz" and self.command == "GET":
                self._send(_json_response(200, {"status": "ok"}))
            else:
                self._send(_json_response(404, {"error": "not_found", "error_description": "no such endpoint"}))
            return
        endpoint, module = route
        request = _Request(self.command, split.path, split.query, self.headers, body)
        fault = emulator._arrive(endpoint)
        if emulator.latency > 0:
            emulator._sleep(emulator.latency)
        if fault is not None:
            if fault.delay > 0:
                held = (endpoint, int(self.client_address[1]))
                with emulator._lock:
                    emulator._held.append(held)
                try:
                    emulator._sleep(fault.delay)
                finally:
                    with emulator._lock:
                        emulator._held.remove(held)
            if fault.drop:
                self._drop()
                return
            if fault.status is not None and not fault.after_processing:
                self._send(emulator._fault_response(endpoint, fault))
                return
        if emulator._stopping.is_set():
            self._drop()
            return
        try:
            response = emulator._handle(endpoint, module, request)
        except Exception:
            logger.exception("papertrail emulator: internal error while handling %s %s", self.command, split.path)
            response = _oauth_error(500, "server_error", "internal emulator error")
        if fault is not None and fault.drop_after_processing:
            _close_body(response)
            self._drop()
            return
        if fault is not None and fault.after_processing:
            _close_body(response)
            response = emulator._fault_response(endpoint, fault)
        self._send(response)

    def _send(self, response: _Response) -> None:
        try:
            self.send_response(response.status)
            for name, value in response.headers:
                self.send_header(name, value)
            if isinstance(response.body, bytes):
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                if response.body:
                    self.wfile.write(response.body)
                return
            if self.request_version == "HTTP/1.0":
                # No chunked coding in HTTP/1.0: the end of the body is the end of the connection.
                self.send_header("Connection", "close")
                self.end_headers()
                for piece in response.body:
                    self.wfile.write(piece)
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in response.body:
                if piece:
                    self.wfile.write(b"%X\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            # Client went away (timeout, closed stream, rejected certificate).
            logger.debug("papertrail emulator: client disconnected during the response")
            self.close_connection = True
        finally:
            _close_body(response)


# ---------------------------------------------------------------------------------------
# the emulator
# ---------------------------------------------------------------------------------------
class PapertrailEmulator:
    """A loopback Papertrail-ai server: consent page, token endpoint and data modules.

    :param host: address to bind; loopback by default.
    :param port: port to bind; ``0`` picks a free one (after :meth:`start`, ``port`` holds
        the bound port, and a restart reuses it).
    :param clients: registered clients (more with :meth:`add_client`).
    :param tls: serve HTTPS with a throw-away CA (:attr:`ca_cert_path`).
    :param access_token_ttl: ``expires_in`` of access tokens, in seconds.
    :param code_ttl: lifetime of authorization codes, in seconds.
    :param rotate_refresh_tokens: each refresh returns a new refresh token and the old one
        dies. Without rotation the refresh answer carries no ``refresh_token`` at all
        (clients must keep the one they have).
    :param revoke_on_refresh_reuse: presenting a rotated refresh token revokes the grant.
    :param require_pkce: refuse authorization requests without an S256 ``code_challenge``.
    :param refresh_token_ttl: when set, token answers that carry a refresh token state its
        lifetime in seconds under ``refresh_token_member`` (``refresh_token_expires_in``, or
        Intuit's ``x_refresh_token_expires_in``), and a refresh token older than that (since
        it was issued, on :attr:`clock`) is refused with ``invalid_grant``.
    :param refresh_token_idle_ttl: when set, a refresh token not presented for longer than
        this many seconds (since it was issued, or since its last use when tokens do not
        rotate) is refused with ``invalid_grant``, like Xero's 60 days or QuickBooks' 100
        days unused. Not stated in answers (those providers do not state it either).
    :param latency: seconds to wait before answering every request.
    :param clock: epoch seconds, for expiry; inject a fake one to expire codes and tokens.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clients: list[EmulatorClient] | None = None,
        tls: bool = False,
        access_token_ttl: int = 3600,
        code_ttl: int = 600,
        rotate_refresh_tokens: bool = True,
        revoke_on_refresh_reuse: bool = True,
        require_pkce: bool = False,
        latency: float = 0.0,
        clock: Callable[[], float] = time.time,
        refresh_token_ttl: int | None = None,
        refresh_token_member: str = "refresh_token_expires_in",  # noqa: S107 - a JSON member name
        refresh_token_idle_ttl: int | None = None,
    ) -> None:
        if access_token_ttl <= 0 or code_ttl <= 0:
            raise ValueError("access_token_ttl and code_ttl must be positive")
        for name, ttl in (("refresh_token_ttl", refresh_token_ttl), ("refresh_token_idle_ttl", refresh_token_idle_ttl)):
            if ttl is not None and ttl <= 0:
                raise ValueError(f"{name} must be positive")
        if latency < 0:
            raise ValueError("latency must not be negative")
        self.host = host
        self.port = port
        self.tls = tls
        self.access_token_ttl = access_token_ttl
        self.code_ttl = code_ttl
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.revoke_on_refresh_reuse = revoke_on_refresh_reuse
        self.require_pkce = require_pkce
        self.latency = latency
        self.clock = clock
        self.refresh_token_ttl = refresh_token_ttl
        self.refresh_token_member = refresh_token_member
        self.refresh_token_idle_ttl = refresh_token_idle_ttl
        self.ca_cert_path: str | None = None

        self._lock = threading.Lock()
        self._stats = EmulatorStats(self._lock)
        self._clients: dict[str, EmulatorClient] = {}
        self._codes: dict[str, _Code] = {}
        self._grants: dict[str, _Grant] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._faults: dict[str, deque[_Fault]] = {name: deque() for name in FAULT_ENDPOINTS}
        self._held: list[tuple[str, int]] = []  # (endpoint, client port) inside an injected delay
        self._issued: set[str] = set()
        self._writes: list[dict[str, Any]] = []
        self._api_params: list[dict[str, str]] = []
        self._write_seq = 0
        self._conns: set[socket.socket] = set()

        self._lifecycle = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._tmpdir: str | None = None
        for client in clients or []:
            self.add_client(client)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> PapertrailEmulator:
        """Bind and serve in a daemon thread; returns ``self``."""
        with self._lifecycle:
            if self._server is not None:
                raise RuntimeError("the emulator is already running")
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            ssl_context: ssl.SSLContext | None = None
            tmpdir: str | None = None
            try:
                if self.tls:
                    tmpdir = tempfile.mkdtemp(prefix="papertrail-emulator-")
                    ca_path, cert_path, key_path = _generate_tls_material(tmpdir, self.host)
                    ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
                    ssl_context.load_cert_chain(cert_path, key_path)
                    self.ca_cert_path = ca_path
                server = _Server((self.host, self.port), self, ssl_context, family)
            except BaseException:
                if tmpdir is not None:
                    shutil.rmtree(tmpdir, ignore_errors=True)
                self.ca_cert_path = None
                raise
            if not self._is_loopback(self.host):
                logger.warning("papertrail emulator bound to non-loopback address %s", self.host)
            self._tmpdir = tmpdir
            self.port = int(server.server_address[1])
            self._stopping.clear()
            self._wake = socket.socketpair()
            thread = threading.Thread(
                target=self._serve,
                args=(server, self._wake[0]),
                name=f"papertrail-emulator-{self.port}",
                daemon=True,
            )
            self._server = server
            self._thread = thread
            thread.start()
            logger.debug("papertrail emulator listening on %s", self.base_url)
            return self

    def stop(self) -> None:
        """Stop serving, cut open connections and remove the TLS material. Idempotent."""
        with self._lifecycle:
            server, thread = self._server, self._thread
            if server is None:
                return
            self._stopping.set()
            if self._wake is not None:
                with contextlib.suppress(OSError):
                    self._wake[1].send(b"x")
            if thread is not None:
                thread.join(timeout=5)
            server.server_close()
            if self._wake is not None:
                for end in self._wake:
                    end.close()
                self._wake = None
            with self._lock:
                conns = list(self._conns)
                self._conns.clear()
            for conn in conns:
                # Bypass SSLSocket.shutdown(): it would unwrap under a reading thread.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(conn, socket.SHUT_RDWR)
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self.ca_cert_path = None
            self._server = None
            self._thread = None

    def __enter__(self) -> PapertrailEmulator:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    # -- URLs -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the emulator has no port yet: call start() first")
        host = self.host
        if host in ("", "0.0.0.0"):  # noqa: S104 - only mapping a wildcard bind to a usable URL
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def issuer(self) -> str:
        """The ``iss`` value sent on authorization responses (RFC 9207)."""
        return self.base_url

    @property
    def authorize_url(self) -> str:
        return self.base_url + "/api/authorize.php"

    @property
    def token_url(self) -> str:
        return self.base_url + "/api/token.php"

    def api_url(self, module: str) -> str:
        return self.base_url + f"/api/api_{module}.php"

    # -- clients ----------------------------------------------------------------------------
    def add_client(self, client: EmulatorClient) -> None:
        """Register a client; its redirect URIs are matched exactly, character for character."""
        if not client.client_id or not client.client_secret:
            raise ValueError("a client needs a client_id and a client_secret")
        if not client.redirect_uris:
            raise ValueError("a client needs at least one redirect URI")
        for uri in client.redirect_uris:
            _validate_redirect_uri(uri)
        stored = EmulatorClient(client.client_id, client.client_secret, list(client.redirect_uris))
        with self._lock:
            if client.client_id in self._clients:
                raise ValueError(f"client {client.client_id!r} is already registered")
            self._clients[client.client_id] = stored

    # -- test helpers -----------------------------------------------------------------------
    def issue_code(
        self,
        *,
        client_id: str,
        redirect_uri: str,
        scope: str = "",
        system: str = "xero",
        code_challenge: str | None = None,
        code_challenge_method: str | None = None,
    ) -> str:
        """Mint an authorization code exactly as if a person had clicked Allow."""
        with self._lock:
            client = self._clients.get(client_id)
        if client is None:
            raise ValueError("unknown client_id")
        if redirect_uri not in client.redirect_uris:
            raise ValueError("redirect_uri is not registered for this client")
        request = _AuthzRequest(
            client_id, redirect_uri, " ".join(scope.split()), None, system, code_challenge, code_challenge_method
        )
        problem = self._authz_problem(request)
        if problem is not None:
            raise ValueError(problem[1])
        return self._mint_code(request)

    def inject(
        self,
        endpoint: str,
        *,
        status: int | None = None,
        retry_after: int | None = None,
        delay: float = 0.0,
        drop: bool = False,
        drop_after_processing: bool = False,
        body: dict[str, Any] | str | bytes | None = None,
        times: int = 1,
        after_processing: bool = False,
    ) -> None:
        """Queue a fault for the next ``times`` requests to ``endpoint``; faults are served FIFO.

        :param endpoint: ``"authorize"``, ``"token"`` or ``"api"`` (every data module).
        :param status: answer with this status (before any processing) and an OAuth-style
            JSON error body (``server_error``, ``temporarily_unavailable``, ...) or ``body``.
        :param retry_after: add ``Retry-After``; alone it implies ``status=429``.
        :param delay: sleep this long first (client timeouts); alone, the request is then
            processed normally, so a client that gave up may still have changed state.
        :param drop: close the connection without any response, nothing processed.
        :param drop_after_processing: process the request fully (rotate a refresh token,
            record a write, spend a code) and then close without answering: the lost
            response case.
        :param body: JSON object, or raw ``str``/``bytes`` served as ``text/html`` (e.g. a
            proxy's error page), for ``status`` faults.
        :param times: how many consecutive requests this fault applies to.
        :param after_processing: with ``status``: process the request fully first (rotate a
            refresh token, record a write), then answer ``status``/``body`` instead of the
            real answer (a 500 after rotation, an unparseable 200).
        """
        if endpoint not in FAULT_ENDPOINTS:
            raise ValueError(f"endpoint must be one of {FAULT_ENDPOINTS}")
        if times < 1:
            raise ValueError("times must be at least 1")
        if delay < 0:
            raise ValueError("delay must not be negative")
        if retry_after is not None and retry_after < 0:
            raise ValueError("retry_after must not be negative")
        if retry_after is not None and status is None:
            status = 429
        if status is not None and not 200 <= status <= 599:
            raise ValueError("status must be an HTTP status between 200 and 599")
        if (status is not None) + drop + drop_after_processing > 1:
            raise ValueError("choose one of status, drop and drop_after_processing")
        if body is not None and status is None:
            raise ValueError("body is only used with status")
        if after_processing and status is None:
            raise ValueError("after_processing is only used with status")
        if status is None and not drop and not drop_after_processing and delay == 0:
            raise ValueError("this fault would do nothing")
        fault = _Fault(status, retry_after, float(delay), drop, drop_after_processing, body, times, after_processing)
        with self._lock:
            self._faults[endpoint].append(fault)

    def held_requests(self, endpoint: str) -> list[int]:
        """The client (source) ports of the requests to ``endpoint`` being held by an injected
        ``delay`` right now: which process sent a held request (its socket's local port)."""
        with self._lock:
            return [port for name, port in self._held if name == endpoint]

    def pending_faults(self, endpoint: str | None = None) -> int:
        """How many faulty answers are still queued (for one endpoint or all)."""
        with self._lock:
            queues = [self._faults[endpoint]] if endpoint else list(self._faults.values())
            return sum(f.remaining for q in queues for f in q)

    def clear_faults(self) -> None:
        with self._lock:
            for queue in self._faults.values():
                queue.clear()

    @property
    def stats(self) -> EmulatorStats:
        return self._stats

    @property
    def issued_secrets(self) -> set[str]:
        """Every code, access token and refresh token ever issued (a copy), for leak canaries."""
        with self._lock:
            return set(self._issued)

    @property
    def writes(self) -> list[dict[str, Any]]:
        """Every accepted write, oldest first (a copy): module, query, system, id, payload (parsed),
        body (the request body's text, as sent), idempotency_key."""
        with self._lock:
            return [dict(w) for w in self._writes]

    @property
    def api_params(self) -> list[dict[str, str]]:
        """The query-string parameters (and ``module``) of every authenticated data call, oldest first."""
        with self._lock:
            return [dict(p) for p in self._api_params]

    def grant_is_active(self, refresh_token_or_access_token: str) -> bool:
        """Whether the grant this access or refresh token belongs to is still alive."""
        token = refresh_token_or_access_token
        with self._lock:
            record: _AccessToken | _RefreshToken | None = self._access.get(token) or self._refresh.get(token)
            return record is not None and self._grants[record.grant_id].active

    def revoke_grant(self, refresh_token_or_access_token: str) -> bool:
        """Revoke the grant a token belongs to (the user disconnected the app); True if it was alive."""
        token = refresh_token_or_access_token
        with self._lock:
            record: _AccessToken | _RefreshToken | None = self._access.get(token) or self._refresh.get(token)
            if record is None:
                return False
            return self._revoke_grant_locked(record.grant_id)

    def revoke_client_grants(self, client_id: str) -> int:
        """Revoke every live grant of ``client_id`` (the app was disconnected or its access
        withdrawn); returns how many were alive. Their refresh tokens are then refused with
        ``invalid_grant`` and their access tokens with 401."""
        with self._lock:
            ids = [g.grant_id for g in self._grants.values() if g.client_id == client_id and g.active]
            return sum(self._revoke_grant_locked(grant_id) for grant_id in ids)

    def expire_access_tokens(self) -> int:
        """Expire every access token now (refresh tokens stay valid); returns how many were live."""
        with self._lock:
            now = self.clock()
            live = [t for t in self._access.values() if t.expires_at > now]
            for record in live:
                record.expires_at = float("-inf")
            return len(live)

    # -- internals: state -------------------------------------------------------------------
    @staticmethod
    def _is_loopback(host: str) -> bool:
        if host in _LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)

    def _untrack(self, conn: Any) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _serve(self, server: _Server, wake: socket.socket) -> None:
        # Like serve_forever(), but stop() wakes it at once through a socket pair instead
        # of waiting for a poll interval (tests start and stop emulators by the hundred).
        server.timeout = 0
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is server.socket and not self._stopping.is_set():
                        server.handle_request()

    def _sleep(self, seconds: float) -> None:
        # Wakes up at stop() so an injected delay never holds a shutdown.
        self._stopping.wait(seconds)

    def _route(self, path: str) -> tuple[str, str | None] | None:
        if path == "/api/authorize.php":
            return "authorize", None
        if path == "/api/token.php":
            return "token", None
        match = _API_PATH.fullmatch(path)
        if match:
            return "api", match.group(1)
        return None

    def _arrive(self, endpoint: str) -> _Fault | None:
        """Count a request and take the next queued fault for its endpoint, if any."""
        with self._lock:
            self._stats._bump(f"{endpoint}_requests")
            queue = self._faults[endpoint]
            if not queue:
                return None
            fault = queue[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.popleft()
            self._stats._bump("faults_served")
            return fault

    def _fault_response(self, endpoint: str, fault: _Fault) -> _Response:
        status = fault.status if fault.status is not None else 500
        extra: list[tuple[str, str]] = []
        if fault.retry_after is not None:
            extra.append(("Retry-After", str(fault.retry_after)))
        if status == 401 and endpoint == "token":
            extra.extend(_BASIC_CHALLENGE)
        elif status == 401 and endpoint == "api":
            extra.extend(_BEARER_CHALLENGE)
        body = fault.body
        if isinstance(body, (str, bytes)):
            raw = body.encode("utf-8") if isinstance(body, str) else body
            return _Response(status, [("Content-Type", "text/html; charset=utf-8"), *_NO_STORE, *extra], raw)
        if body is None and endpoint == "authorize":
            response = _error_page(status, f"The service is unavailable (HTTP {status}). Try again later.")
            response.headers.extend(extra)
            return response
        if body is None:
            body = {
                "error": _default_error_code(status, endpoint),
                "error_description": f"injected fault: HTTP {status}",
            }
        return _json_response(status, body, tuple(extra))

    def _new_secret(self) -> str:
        value = secrets.token_urlsafe(32)
        self._issued.add(value)
        return value

    def _mint_code(self, request: _AuthzRequest) -> str:
        with self._lock:
            code = self._new_secret()
            self._codes[code] = _Code(
                client_id=request.client_id,
                redirect_uri=request.redirect_uri,
                scope=request.scope,
                system=request.system,
                code_challenge=request.code_challenge,
                expires_at=self.clock() + self.code_ttl,
            )
            self._stats._bump("codes_issued")
            return code

    def _new_grant_locked(self, code: _Code) -> _Grant:
        grant_id = secrets.token_hex(8)
        org_id = "org_" + hashlib.sha256(f"{code.client_id}|{code.system}".encode()).hexdigest()[:16]
        grant = _Grant(grant_id, code.client_id, code.scope, code.system, org_id)
        self._grants[grant_id] = grant
        return grant

    def _new_access_locked(self, grant: _Grant, scope: str) -> str:
        token = self._new_secret()
        self._access[token] = _AccessToken(grant.grant_id, scope, self.clock() + self.access_token_ttl)
        grant.access_tokens.add(token)
        return token

    def _new_refresh_locked(self, grant: _Grant) -> str:
        token = self._new_secret()
        self._refresh[token] = _RefreshToken(grant.grant_id, issued_at=self.clock())
        grant.refresh_tokens.add(token)
        return token

    def _revoke_grant_locked(self, grant_id: str) -> bool:
        grant = self._grants.get(grant_id)
        if grant is None or not grant.active:
            return False
        grant.active = False
        self._stats._bump("grants_revoked")
        return True

    # -- internals: request handling --------------------------------------------------------
    def _handle(self, endpoint: str, module: str | None, request: _Request) -> _Response:
        if endpoint == "authorize":
            return self._handle_authorize(request)
        if endpoint == "token":
            return self._handle_token(request)
        return self._handle_api(request, module or "")

    # authorize ------------------------------------------------------------------------------
    def _authz_problem(self, request: _AuthzRequest) -> tuple[str, str] | None:
        """``(error, description)`` for a request whose client and redirect URI are valid."""
        if request.system not in SYSTEMS:
            return "invalid_request", "system must be one of " + ", ".join(SYSTEMS)
        challenge, method = request.code_challenge, request.code_challenge_method
        if method is not None and method != "S256":
            return "invalid_request", "code_challenge_method must be S256 (plain is not supported)"
        if challenge is not None and method is None:
            return "invalid_request", "code_challenge_method=S256 is required (the default, plain, is not supported)"
        if method is not None and challenge is None:
            return "invalid_request", "code_challenge is missing"
        if challenge is not None and not _CHALLENGE_RE.fullmatch(challenge):
            return "invalid_request", "code_challenge is not a base64url S256 value"
        if self.require_pkce and challenge is None:
            return "invalid_request", "PKCE is required: send code_challenge and code_challenge_method=S256"
        return None

    def _check_authorize(self, params: dict[str, str], repeated: set[str]) -> _AuthzRequest | _Response:
        if {"client_id", "redirect_uri"} & repeated:
            return _error_page(400, "client_id and redirect_uri must appear once.")
        client_id = params.get("client_id", "")
        redirect_uri = params.get("redirect_uri", "")
        with self._lock:
            client = self._clients.get(client_id)
        if client is None:
            return _error_page(400, "Unknown client_id. The application is not registered.")
        if redirect_uri not in client.redirect_uris:
            # Never redirect to an unregistered URI (open redirector, RFC 6749 4.1.2.1).
            return _error_page(400, "The redirect_uri is not registered for this application.")
        state = params.get("state") or None

        def fail(error: str, description: str) -> _Response:
            extra = [("error", error), ("error_description", description)]
            if state is not None:
                extra.append(("state", state))
            extra.append(("iss", self.issuer))
            return _redirect(_append_query(redirect_uri, extra))

        if repeated:
            return fail("invalid_request", "parameters must not be repeated: " + ", ".join(sorted(repeated)))
        response_type = params.get("response_type")
        if response_type != "code":
            if response_type:
                return fail("unsupported_response_type", "only response_type=code is supported")
            return fail("invalid_request", "response_type is missing")
        request = _AuthzRequest(
            client_id=client_id,
            redirect_uri=redirect_uri,
            scope=" ".join(params.get("scope", "").split()),
            state=state,
            system=params.get("system", ""),
            code_challenge=params.get("code_challenge") or None,
            code_challenge_method=params.get("code_challenge_method") or None,
        )
        problem = self._authz_problem(request)
        if problem is not None:
            return fail(*problem)
        return request

    def _consent_page(self, request: _AuthzRequest) -> _Response:
        esc = html.escape
        hidden = {
            "response_type": "code",
            "client_id": request.client_id,
            "redirect_uri": request.redirect_uri,
            "scope": request.scope,
            "state": request.state or "",
            "system": request.system,
        }
        if request.code_challenge:
            hidden["code_challenge"] = request.code_challenge
            hidden["code_challenge_method"] = request.code_challenge_method or ""
        fields = "\n".join(
            f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">' for name, value in hidden.items()
        )
        body = (
            "<h1>Authorize access</h1>\n"
            f'<p>The application <strong id="client-id">{esc(request.client_id)}</strong> asks to access your '
            f'<strong id="system">{esc(request.system)}</strong> accounting data through Papertrail-ai.</p>\n'
            f'<p>Scope: <code id="scope">{esc(request.scope) or "(none)"}</code></p>\n'
            f'<p>You will be sent back to <code id="redirect-uri">{esc(request.redirect_uri)}</code>.</p>\n'
            '<form method="post" action="/api/authorize.php">\n'
            f"{fields}\n"
            '<button type="submit" name="decision" value="allow" id="allow">Allow</button>\n'
            '<button type="submit" name="decision" value="deny" id="deny">Deny</button>\n'
            "</form>"
        )
        return _html_page(200, "Papertrail-ai: authorize access", body)

    def _handle_authorize(self, request: _Request) -> _Response:
        if request.method == "GET":
            params, repeated = _parse_params(request.query)
        elif request.method == "POST":
            if _media_type(request.headers) != "application/x-www-form-urlencoded":
                return _error_page(400, "The consent form must be posted as application/x-www-form-urlencoded.")
            params, repeated = _parse_params(request.body.decode("utf-8", "replace"))
        else:
            response = _error_page(405, "Method not allowed.")
            response.headers.append(("Allow", "GET, POST"))
            return response
        checked = self._check_authorize(params, repeated)
        if isinstance(checked, _Response):
            return checked
        if request.method == "GET":
            return self._consent_page(checked)
        decision = params.get("decision")
        extra: list[tuple[str, str]]
        if decision == "allow":
            code = self._mint_code(checked)
            with self._lock:
                self._stats._bump("consents_allowed")
            extra = [("code", code)]
        elif decision == "deny":
            with self._lock:
                self._stats._bump("consents_denied")
            extra = [("error", "access_denied"), ("error_description", "The user denied access")]
        else:
            return _error_page(400, "decision must be allow or deny.")
        if checked.state is not None:
            extra.append(("state", checked.state))
        extra.append(("iss", self.issuer))
        return _redirect(_append_query(checked.redirect_uri, extra))

    # token ----------------------------------------------------------------------------------
    def _invalid_client(self, description: str) -> _Response:
        with self._lock:
            self._stats._bump("invalid_client_errors")
        return _oauth_error(401, "invalid_client", description, _BASIC_CHALLENGE)

    def _invalid_grant_locked(self, description: str) -> _Response:
        self._stats._bump("invalid_grant_errors")
        return _oauth_error(400, "invalid_grant", description)

    def _authenticate_client(self, headers: Message, params: dict[str, str]) -> EmulatorClient | _Response:
        authorization = headers.get("Authorization")
        body_id = params.get("client_id")
        body_secret = params.get("client_secret")
        if authorization is not None:
            scheme, _, credentials = authorization.strip().partition(" ")
            if scheme.lower() != "basic":
                return self._invalid_client("unsupported client authentication scheme")
            if body_secret is not None:
                return _oauth_error(400, "invalid_request", "use exactly one client authentication method")
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return self._invalid_client("malformed Basic credentials")
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                return self._invalid_client("malformed Basic credentials")
            # RFC 6749 2.3.1: both parts are form-urlencoded before base64.
            client_id = urllib.parse.unquote_plus(raw_id)
            client_secret = urllib.parse.unquote_plus(raw_secret)
            if body_id is not None and body_id != client_id:
                return _oauth_error(400, "invalid_request", "client_id in the body differs from the Basic credentials")
        else:
            if not body_id or body_secret is None:
                return self._invalid_client("client authentication is required")
            client_id, client_secret = body_id, body_secret
        with self._lock:
            client = self._clients.get(client_id)
        expected = client.client_secret if client is not None else secrets.token_urlsafe(16)
        ok = hmac.compare_digest(expected.encode("utf-8"), client_secret.encode("utf-8"))
        if client is None or not ok:
            return self._invalid_client("client authentication failed")
        return client

    def _handle_token(self, request: _Request) -> _Response:
        if request.method != "POST":
            return _oauth_error(405, "invalid_request", "the token endpoint only accepts POST", (("Allow", "POST"),))
        if request.query:
            query_params, _ = _parse_params(request.query)
            if {"client_secret", "code", "refresh_token", "code_verifier"} & query_params.keys():
                return _oauth_error(400, "invalid_request", "credentials must not be sent in the URL")
        if _media_type(request.headers) != "application/x-www-form-urlencoded":
            return _oauth_error(400, "invalid_request", "the body must be application/x-www-form-urlencoded")
        params, repeated = _parse_params(request.body.decode("utf-8", "replace"))
        if repeated:
            return _oauth_error(
                400, "invalid_request", "parameters must not be repeated: " + ", ".join(sorted(repeated))
            )
        client = self._authenticate_client(request.headers, params)
        if isinstance(client, _Response):
            return client
        grant_type = params.get("grant_type")
        if not grant_type:
            return _oauth_error(400, "invalid_request", "grant_type is missing")
        if grant_type == "authorization_code":
            return self._grant_authorization_code(client, params)
        if grant_type == "refresh_token":
            return self._grant_refresh_token(client, params)
        return _oauth_error(400, "unsupported_grant_type", "grant_type must be authorization_code or refresh_token")

    def _token_payload(self, grant: _Grant, access_token: str, scope: str, refresh_token: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": self.access_token_ttl,
        }
        if refresh_token is not None:
            payload["refresh_token"] = refresh_token
            if self.refresh_token_ttl is not None:
                payload[self.refresh_token_member] = self.refresh_token_ttl
        payload["scope"] = scope
        payload["x_papertrail_org_id"] = grant.org_id  # deliberately unknown: clients must ignore it
        return payload

    def _grant_authorization_code(self, client: EmulatorClient, params: dict[str, str]) -> _Response:
        code = params.get("code")
        if not code:
            return _oauth_error(400, "invalid_request", "code is missing")
        redirect_uri = params.get("redirect_uri")
        verifier = params.get("code_verifier")
        with self._lock:
            record = self._codes.get(code)
            if record is None:
                return self._invalid_grant_locked("the authorization code is invalid")
            if record.used:
                # RFC 6749 4.1.2: deny, and revoke what the code already produced.
                if record.grant_id is not None:
                    self._revoke_grant_locked(record.grant_id)
                return self._invalid_grant_locked("the authorization code was already used")
            # Any redemption attempt spends the code, successful or not.
            record.used = True
            if record.client_id != client.client_id:
                return self._invalid_grant_locked("the authorization code was issued to another client")
            if self.clock() >= record.expires_at:
                return self._invalid_grant_locked("the authorization code has expired")
            if redirect_uri != record.redirect_uri:
                return self._invalid_grant_locked("redirect_uri differs from the authorization request")
            if record.code_challenge is not None:
                if not verifier:
                    return self._invalid_grant_locked("code_verifier is required")
                if not _VERIFIER_RE.fullmatch(verifier) or not hmac.compare_digest(
                    _s256(verifier), record.code_challenge
                ):
                    return self._invalid_grant_locked("code_verifier does not match the code_challenge")
            elif verifier is not None:
                # RFC 9700 2.1.1: a verifier without a challenge hints at a PKCE downgrade.
                return self._invalid_grant_locked("code_verifier sent but the authorization request had no challenge")
            grant = self._new_grant_locked(record)
            record.grant_id = grant.grant_id
            access = self._new_access_locked(grant, grant.scope)
            refresh = self._new_refresh_locked(grant)
            self._stats._bump("authorization_code_grants")
            payload = self._token_payload(grant, access, grant.scope, refresh)
        return _json_response(200, payload)

    def _grant_refresh_token(self, client: EmulatorClient, params: dict[str, str]) -> _Response:
        token = params.get("refresh_token")
        if not token:
            return _oauth_error(400, "invalid_request", "refresh_token is missing")
        requested_scope = params.get("scope") or None
        with self._lock:
            record = self._refresh.get(token)
            if record is None:
                return self._invalid_grant_locked("the refresh token is invalid")
            grant = self._grants[record.grant_id]
            if grant.client_id != client.client_id:
                return self._invalid_grant_locked("the refresh token was issued to another client")
            if not grant.active:
                return self._invalid_grant_locked("the grant has been revoked")
            if record.rotated:
                if self.revoke_on_refresh_reuse:
                    self._revoke_grant_locked(record.grant_id)
                    return self._invalid_grant_locked("refresh token reuse detected; the grant has been revoked")
                return self._invalid_grant_locked("the refresh token has been rotated")
            expired = self._refresh_expiry_locked(record)
            if expired is not None:
                self._stats._bump("refresh_tokens_expired")
                return self._invalid_grant_locked(expired)
            scope = grant.scope
            if requested_scope is not None:
                wanted = requested_scope.split()
                if not set(wanted) <= set(grant.scope.split()):
                    return _oauth_error(400, "invalid_scope", "the requested scope exceeds the granted scope")
                scope = " ".join(wanted)
            access = self._new_access_locked(grant, scope)
            new_refresh: str | None = None
            if self.rotate_refresh_tokens:
                record.rotated = True
                new_refresh = self._new_refresh_locked(grant)
            else:
                record.last_used_at = self.clock()
            self._stats._bump("refresh_grants")
            payload = self._token_payload(grant, access, scope, new_refresh)
        return _json_response(200, payload)

    def _refresh_expiry_locked(self, record: _RefreshToken) -> str | None:
        """Why ``record`` may no longer be presented (absolute or idle expiry), or None."""
        now = self.clock()
        if self.refresh_token_ttl is not None and now - record.issued_at > self.refresh_token_ttl:
            return "the refresh token has expired"
        idle_since = record.last_used_at if record.last_used_at is not None else record.issued_at
        if self.refresh_token_idle_ttl is not None and now - idle_since > self.refresh_token_idle_ttl:
            return f"the refresh token expired after more than {self.refresh_token_idle_ttl} s unused"
        return None

    # data modules ---------------------------------------------------------------------------
    def _handle_api(self, request: _Request, module: str) -> _Response:
        if module not in MODULES:
            return _json_response(404, {"error": "unknown_module", "valid": sorted(MODULES)})
        params, repeated = _parse_params(request.query)
        if "access_token" in params:
            return _json_response(
                400, {"error": "invalid_request", "error_description": "access tokens must not be sent in the URL"}
            )
        scheme, _, token = (request.headers.get("Authorization") or "").strip().partition(" ")
        token = token.strip()
        grant: _Grant | None = None
        with self._lock:
            record = self._access.get(token) if scheme.lower() == "bearer" and token else None
            if record is not None and record.expires_at > self.clock():
                candidate = self._grants[record.grant_id]
                grant = candidate if candidate.active else None
            if grant is None:
                self._stats._bump("invalid_token_errors")
        if grant is None:
            return _json_response(
                401,
                {
                    "error": "invalid_token",
                    "error_description": "the access token is missing, invalid, expired or revoked",
                },
                _BEARER_CHALLENGE,
            )
        if repeated:
            return _json_response(
                400,
                {
                    "error": "invalid_request",
                    "error_description": "repeated parameters: " + ", ".join(sorted(repeated)),
                },
            )
        with self._lock:  # what a data call asked for, after authentication (tests read api_params)
            self._api_params.append({"module": module, **params})
        system = params.get("system")
        if not system:
            return _json_response(
                400, {"error": "invalid_request", "error_description": "system is missing", "valid": list(SYSTEMS)}
            )
        if system not in SYSTEMS:
            return _json_response(
                400, {"error": "invalid_system", "error_description": "unknown system", "valid": list(SYSTEMS)}
            )
        query = params.get("query", "")
        valid = MODULES[module]
        if query not in valid:
            return _json_response(
                400,
                {
                    "error": "invalid_query",
                    "error_description": f"unknown query for module {module}",
                    "valid": list(valid),
                },
            )
        if query in WRITE_QUERIES:
            if request.method != "POST":
                return _json_response(
                    405,
                    {"error": "method_not_allowed", "error_description": f"{query} needs POST"},
                    (("Allow", "POST"),),
                )
            return self._write(request, module, query, system)
        if request.method != "GET":
            return _json_response(
                405, {"error": "method_not_allowed", "error_description": f"{query} needs GET"}, (("Allow", "GET"),)
            )
        if (module, query) in _LIST_QUERIES:
            raw_count = params.get("count", str(DEFAULT_LIST_COUNT))
            try:
                count = int(raw_count)
            except ValueError:
                count = -1
            if count < 0:
                return _json_response(
                    400, {"error": "invalid_request", "error_description": "count must be a non-negative integer"}
                )
            count = min(count, MAX_LIST_COUNT)
            with self._lock:
                self._stats._bump("records_streamed", count)
            return _Response(
                200, [("Content-Type", _JSON_TYPE), *_NO_STORE], _stream_list(module, query, system, count)
            )
        data = _single_read(module, query, system, params, grant.org_id)
        return _json_response(200, {"status": "ok", "module": module, "query": query, "system": system, "data": data})

    def _write(self, request: _Request, module: str, query: str, system: str) -> _Response:
        media_type = _media_type(request.headers)
        if media_type not in ("", _JSON_TYPE):
            return _json_response(
                415, {"error": "invalid_request", "error_description": "the body must be application/json"}
            )
        try:
            payload = json.loads(request.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return _json_response(400, {"error": "invalid_request", "error_description": "the body is not valid JSON"})
        if not isinstance(payload, dict):
            return _json_response(
                400, {"error": "invalid_request", "error_description": "the body must be a JSON object"}
            )
        idempotency_key = request.headers.get("Idempotency-Key")
        with self._lock:
            self._write_seq += 1
            new_id = f"{_WRITE_PREFIX[(module, query)]}-W{self._write_seq:06d}"
            if query in ("account_update", "account_delete") and isinstance(payload.get("id"), str) and payload["id"]:
                record_id = payload["id"]
            else:
                record_id = new_id
            self._writes.append(
                {
                    "module": module,
                    "query": query,
                    "system": system,
                    "id": record_id,
                    "payload": payload,
                    "body": request.body.decode("utf-8"),
                    "idempotency_key": idempotency_key,
                }
            )
            self._stats._bump("writes")
        data = {**payload, "id": record_id}
        return _json_response(201, {"status": "ok", "module": module, "query": query, "system": system, "data": data})


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="papertrail-emulator",
        description="Serve an offline emulator of the Papertrail-ai API (OAuth 2 + data modules).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8443, help="port to bind, 0 for any free port (default: 8443)")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a throw-away CA (its path is printed)")
    parser.add_argument("--client-id", default="papertrail-emulator-client", help="client ID to register")
    parser.add_argument(
        "--client-secret",
        default=None,
        help="client secret to register (prefer the PAPERTRAIL_EMULATOR_CLIENT_SECRET environment variable)",
    )
    parser.add_argument(
        "--redirect-uri", action="append", default=[], help="registered redirect URI (repeatable, at least one)"
    )
    parser.add_argument("--access-token-ttl", type=int, default=3600, help="access token lifetime in seconds")
    parser.add_argument("--code-ttl", type=int, default=600, help="authorization code lifetime in seconds")
    parser.add_argument("--no-rotate", action="store_true", help="do not rotate refresh tokens")
    parser.add_argument(
        "--no-revoke-on-reuse",
        action="store_true",
        help="do not revoke the grant when a rotated refresh token is reused",
    )
    parser.add_argument(
        "--refresh-token-ttl",
        type=int,
        default=None,
        help="refresh token lifetime in seconds: stated in token answers and enforced (default: none)",
    )
    parser.add_argument(
        "--refresh-token-idle-ttl",
        type=int,
        default=None,
        help="refuse refresh tokens unused for longer than this many seconds (default: never)",
    )
    parser.add_argument("--require-pkce", action="store_true", help="refuse authorization requests without PKCE S256")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before every answer")
    parser.add_argument(
        "--verbose", action="store_true", help="log each request's method and path (never query strings)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``papertrail-emulator``: serve until SIGINT or SIGTERM."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    secret = args.client_secret or os.environ.get("PAPERTRAIL_EMULATOR_CLIENT_SECRET")
    if not secret:
        parser.error("a client secret is required: --client-secret or PAPERTRAIL_EMULATOR_CLIENT_SECRET")
    if not args.redirect_uri:
        parser.error("at least one --redirect-uri is required")
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s")
    try:
        emulator = PapertrailEmulator(
            host=args.host,
            port=args.port,
            clients=[EmulatorClient(args.client_id, secret, list(args.redirect_uri))],
            tls=args.tls,
            access_token_ttl=args.access_token_ttl,
            code_ttl=args.code_ttl,
            rotate_refresh_tokens=not args.no_rotate,
            revoke_on_refresh_reuse=not args.no_revoke_on_reuse,
            require_pkce=args.require_pkce,
            latency=args.latency,
            refresh_token_ttl=args.refresh_token_ttl,
            refresh_token_idle_ttl=args.refresh_token_idle_ttl,
        )
    except ValueError as exc:
        parser.error(str(exc))

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread: rely on KeyboardInterrupt
        pass
    try:
        try:
            emulator.start()
        except OSError as exc:
            print(
                f"papertrail-emulator: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr
            )
            return 1
        print(f"papertrail-emulator listening on {emulator.base_url}", flush=True)
        if emulator.ca_cert_path:
            print(f"papertrail-emulator CA certificate: {emulator.ca_cert_path}", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
