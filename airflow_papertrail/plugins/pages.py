"""The HTML the callback shows a person: self-contained, escaped, strict headers."""

from __future__ import annotations

import base64
import hashlib
import html

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#1d2433}"
    "h1{font-size:1.4rem}.ok{color:#1a7f37}.bad{color:#b42318}p{line-height:1.5}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()

#: No scripts, no external anything, no framing, no form posts, no referrer.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def render(title: str, message: str, *, ok: bool, link: tuple[str, str] | None = None) -> str:
    """A complete page; every dynamic value is escaped. ``link``: (href, text) of a plain
    link to offer (http(s) or a path only)."""
    cls = "ok" if ok else "bad"
    link_html = ""
    if link and (
        link[0].startswith(("https://", "http://")) or (link[0].startswith("/") and not link[0].startswith("//"))
    ):
        link_html = f'<p><a id=back href="{html.escape(link[0])}">{html.escape(link[1])}</a></p>'

    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        "<meta name=referrer content=no-referrer>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1 class={cls} id=title>{html.escape(title)}</h1><p id=message>{html.escape(message)}</p>{link_html}"
        "<p>Papertrail-ai for Apache Airflow</p></body></html>"
    )
