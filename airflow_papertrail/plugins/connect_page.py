"""The Connect page's HTML: server-rendered, every value escaped, one hashed style and script.

Shown inside Airflow's UI (an iframe of the same origin, so ``frame-ancestors 'self'``) and
on its own. Forms submit with ``target="_top"`` (consent pages refuse to be framed); in the
UI's sandboxed frame the script submits them from the top document (see ``_SCRIPT``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from airflow_papertrail.health import NOT_CONNECTED

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow_papertrail.health import GrantHealth

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1d2433}"
    "h1{font-size:1.35rem}table{border-collapse:collapse;width:100%}"
    "th,td{border-bottom:1px solid #d0d7de;padding:.45rem .6rem;text-align:left;vertical-align:top;font-size:.9rem}"
    "th{background:#f6f8fa}.state{font-weight:600;font-family:ui-monospace,monospace}"
    ".s-valid{color:#1a7f37}.s-reauthorization_required,.s-refresh_failing,.s-outcome_unknown{color:#b42318}"
    ".s-not_connected,.s-not_recorded{color:#6e7781}form{display:inline;margin:0 .3rem .3rem 0}td.actions,td.when{white-space:nowrap}"
    "button{padding:.3rem .7rem;font-size:.9rem;cursor:pointer}.muted{color:#6e7781}"
    ".flash{padding:.6rem .8rem;border-radius:.3rem;margin:0 0 1rem}.flash.bad{background:#fde7e9}"
    ".flash.ok{background:#e6f4ea}input.link{width:100%;font-family:ui-monospace,monospace;font-size:.85rem}"
    "code{font-size:.85rem}"
)

#: 1. Polls the status route and reloads when a row changed (no framework, no external code).
#: 2. Inside Airflow's UI the page is in an iframe sandboxed without allow-top-navigation, so
#:    a ``target=_top`` form cannot leave it (and consent pages refuse to be framed): the
#:    same form is then submitted from the (same-origin) top document instead, which may
#:    navigate itself. Origin, cookie and CSRF token are those of the original form.
_SCRIPT = (
    "(function(){document.querySelectorAll('form[data-top]').forEach(function(f){"
    "f.addEventListener('submit',function(ev){if(window.top===window)return;var d;"
    "try{d=window.top.document;d.body}catch(x){return}ev.preventDefault();"
    "var g=d.createElement('form');g.method='post';g.action=f.action;g.style.display='none';"
    "var data=new FormData(f);if(ev.submitter&&ev.submitter.name)data.append(ev.submitter.name,ev.submitter.value);"
    "data.forEach(function(v,k){var i=d.createElement('input');i.type='hidden';i.name=k;i.value=v;g.appendChild(i)});"
    "d.body.appendChild(g);g.submit()})});"
    "var t=document.getElementById('connections');if(!t)return;"
    "var url=t.getAttribute('data-status-url'),start=Date.now();"
    "function seen(){var m={};t.querySelectorAll('tr[data-version]').forEach(function(r){"
    "m[r.getAttribute('data-conn-id')]=r.getAttribute('data-version')});return m}"
    "function tick(){if(document.visibilityState==='hidden'){return later()}"
    "fetch(url,{credentials:'same-origin',headers:{Accept:'application/json'}})"
    ".then(function(r){return r.ok?r.json():null}).then(function(d){if(!d)return later();"
    "var now=seen(),changed=false;d.connections.forEach(function(c){if(now[c.conn_id]!==c.version)changed=true});"
    "if(changed){location.reload()}else{later()}}).catch(later)}"
    "function later(){setTimeout(tick,Date.now()-start<120000?1000:10000)}later()})();"
)


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


#: Same origin only: scripts and styles by hash, fetch to ourselves, forms to ourselves or
#: (after the 303 to the consent page, which Chromium checks against form-action) https.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_sha256(_STYLE)}'; script-src 'sha256-{_sha256(_SCRIPT)}'; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self' https:; frame-ancestors 'self'"
    ),
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on our own
    # form posts, and the Origin check would refuse them.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "SAMEORIGIN",
}

MODE_CONNECT = "connect"
MODE_LINK = "link"


@dataclass(frozen=True)
class Row:
    conn_id: str
    description: str | None
    health: GrantHealth
    may_edit: bool
    csrf_token: str | None


def version(health: GrantHealth) -> str:
    """What the poller compares: changes whenever the row would render differently."""
    error = (health.last_error or {}).get("code") or ""
    return f"{health.state}|{health.generation}|{error}|{health.updated_at}"


def _when(epoch: float | None, now: float) -> str:
    """HTML: the UTC time, and below it how long ago / from now."""
    if epoch is None:
        return "—"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))
    delta = epoch - now
    if abs(delta) < 48 * 3600:
        rel = f"{abs(delta) / 3600:.1f} h" if abs(delta) >= 3600 else f"{abs(delta) / 60:.0f} min"
    else:
        rel = f"{abs(delta) / 86400:.0f} d"
    return f"{html.escape(stamp)}<br><span class=muted>{'in ' + rel if delta >= 0 else rel + ' ago'}</span>"


def row_anchor(conn_id: str) -> str:
    return f"conn-{quote(conn_id, safe='')}"


def action_path(root_path: str, conn_id: str) -> str:
    return f"{root_path}/connections/{quote(conn_id, safe='')}/connect"


def _row(row: Row, *, root_path: str, now: float) -> str:
    h = row.health
    e = html.escape
    error = "—"
    if h.last_error:
        code = e(str(h.last_error.get("code") or ""))
        desc = e(str(h.last_error.get("description") or ""))
        error = f"<code class=error-code>{code}</code>" + (f": <span class=error-desc>{desc}</span>" if desc else "")
    if row.may_edit and row.csrf_token:
        label = "Connect" if h.state == NOT_CONNECTED else "Reconnect"
        token = e(row.csrf_token)
        action = e(action_path(root_path, row.conn_id))
        actions = (
            f'<form method=post action="{action}" target=_top data-top>'
            f'<input type=hidden name=csrf_token value="{token}">'
            f"<button type=submit name=mode value={MODE_CONNECT} class=connect>{label}</button></form>"
            f'<form method=post action="{action}" target=_top data-top>'
            f'<input type=hidden name=csrf_token value="{token}">'
            f"<button type=submit name=mode value={MODE_LINK} class=get-link>Get a link to send</button></form>"
        )
    else:
        actions = "<span class='muted no-edit'>You may view this connection but not edit it.</span>"
    description = f"<br><span class=muted>{e(row.description)}</span>" if row.description else ""
    return (
        f'<tr id="{e(row_anchor(row.conn_id))}" data-conn-id="{e(row.conn_id)}" data-version="{e(version(h))}">'
        f"<td><code class=conn-id>{e(row.conn_id)}</code>{description}</td>"
        f"<td><span class='state s-{e(h.state)}'>{e(h.state)}</span></td>"
        f"<td class=when>{_when(h.access_expires_at, now)}</td>"
        f"<td class=when>{_when(h.refresh_expires_at, now) if h.refresh_expires_at else ('unknown' if h.has_refresh_token else '—')}</td>"
        f"<td class=when>{_when(h.last_refresh_at, now)}</td>"
        f"<td class=when>{_when(h.last_used_at, now)}</td>"
        f"<td class=last-error>{error}</td>"
        f"<td>{e(' '.join(h.scopes)) or '—'}</td>"
        f"<td class=actions>{actions}</td></tr>"
    )


def _document(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def render_list(
    rows: Sequence[Row],
    *,
    root_path: str,
    user_name: str,
    flash: tuple[str, bool] | None = None,
    now: float | None = None,
) -> str:
    """The list of connections with their health and actions."""
    now = time.time() if now is None else now
    e = html.escape
    flash_html = ""
    if flash:
        message, ok = flash
        flash_html = f"<p class='flash {'ok' if ok else 'bad'}' id=flash role=status>{e(message)}</p>"
    if rows:
        table = (
            f'<table id=connections data-status-url="{e(root_path)}/connections/status">'
            "<thead><tr><th>Connection</th><th>State</th><th>Access token expires</th>"
            "<th>Refresh token expires</th><th>Last refresh</th><th>Last use</th><th>Last error</th>"
            "<th>Scopes</th><th></th></tr></thead><tbody>"
            + "".join(_row(r, root_path=root_path, now=now) for r in rows)
            + "</tbody></table>"
        )
    else:
        table = (
            "<p id=empty>No Papertrail-ai connection you may see. Create one with connection type "
            "<code>papertrail</code> (Admin &rarr; Connections).</p>"
        )
    body = (
        f"<h1>Papertrail-ai connections</h1>{flash_html}"
        "<p class=muted>Connect / Reconnect sends you to the accounting system's consent page; "
        "<em>Get a link to send</em> gives you the consent link for the person who may approve access "
        f"(and sends it through the notifiers of the papertrail_authorize DAG). Signed in as {e(user_name)}.</p>"
        f"{table}<script>{_SCRIPT}</script>"
    )
    return _document("Papertrail-ai connections", body)


def render_link(*, conn_id: str, consent_url: str, expires_at: float, root_path: str, run_id: str) -> str:
    """The consent link to copy (the "Get a link to send" answer)."""
    e = html.escape
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires_at))
    body = (
        f"<h1>Consent link for <code>{e(conn_id)}</code></h1>"
        "<p>Send this link to the person who may approve access to the organisation's books. It is valid "
        f"until {e(expires)} and works once. The notifiers of the papertrail_authorize DAG (if it has any) "
        f"were asked to send it too (run <code>{e(run_id)}</code>).</p>"
        f'<p><input class=link id=consent-link readonly value="{e(consent_url)}" aria-label="Consent link"></p>'
        f'<p><a id=back href="{e(root_path)}/connections#{e(row_anchor(conn_id))}">Back to Papertrail-ai connections</a></p>'
    )
    return _document(f"Consent link for {conn_id}", body)


def render_message(title: str, message: str, *, root_path: str | None = None) -> str:
    """A refusal (403, 405) or another short answer."""
    e = html.escape
    back = (
        f'<p><a id=back href="{e(root_path)}/connections">Back to Papertrail-ai connections</a></p>'
        if root_path
        else ""
    )
    return _document(title, f"<h1 id=title>{e(title)}</h1><p id=message>{e(message)}</p>{back}")
