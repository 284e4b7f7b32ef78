"""The status page's HTML: ``render_html(StatusReport.data())``, and the script that refreshes it.

The page is plain HTML rendered from ``StatusReport.data()``; every figure in it is an element
bound to a path into that data (``data-k="backends gpu-pool 1m rps"``, with a format in
``data-f``), so the few lines of script at its end refresh it from ``/status.json`` every 2 s by
setting each bound element's text, with the same formats as the server's. A list row is bound
too (``data-r``) and hidden while the data has nothing at its path. When what the tables hold
changes (a reload added a backend) the data's ``layout`` differs from the page's and the script
reloads the page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Sequence
from typing import Any

import orjson

from gateway.status import ERRORS_KEPT, THROTTLED_SHOWN

REFRESH_MS = 2000

STATES = {
    "healthy": "healthy",
    "unchecked": "up (unchecked)",
    "unhealthy": "failing health checks",
    "open": "breaker open",
    "half_open": "breaker half-open",
    "draining": "draining",
    "starting": "starting",
}

_SCRIPT = """(() => {
const S = __STATES__;
const F = {
  t: v => v == null ? '\u2013' : v === true ? 'yes' : v === false ? 'no' : String(v),
  opt: v => v == null ? '' : String(v),
  n: v => v == null ? '\u2013' : Number.isInteger(v) ? String(v)
    : Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(1),
  pct: v => v == null ? '\u2013' : (v * 100).toFixed(1) + '%',
  ms: v => v == null ? '\u2013' : v < 10 ? v.toFixed(1) + ' ms' : v < 1000 ? v.toFixed(0) + ' ms'
    : (v / 1000).toFixed(2) + ' s',
  dur: v => { if (v == null) return '\u2013'; v = Math.max(0, Math.floor(v));
    const d = Math.floor(v / 86400), h = Math.floor(v % 86400 / 3600), m = Math.floor(v % 3600 / 60);
    return d ? d + 'd ' + h + 'h' : h ? h + 'h ' + m + 'm' : m ? m + 'm ' + v % 60 + 's' : v + 's'; },
  ago: (v, now) => v == null ? '\u2013' : F.dur(now - v) + ' ago',
  time: v => v == null ? '\u2013' : new Date(v * 1000).toISOString().slice(11, 19) + 'Z',
  hash: v => v == null ? '\u2013' : String(v).slice(0, 12),
  state: v => S[v] || F.t(v),
};
const at = (d, p) => p.split(' ').reduce((o, k) => o == null ? undefined : o[k], d);
async function tick() {
  let d;
  try {
    const r = await fetch(location.pathname + '.json', {cache: 'no-store'});
    if (!r.ok) throw new Error(r.status);
    d = await r.json();
  } catch (e) { document.body.dataset.stale = 'yes'; return; }
  if (d.layout !== document.body.dataset.layout) { location.reload(); return; }
  document.body.dataset.stale = '';
  for (const el of document.querySelectorAll('[data-r]')) el.hidden = at(d, el.dataset.r) == null;
  for (const el of document.querySelectorAll('[data-k]')) {
    const v = at(d, el.dataset.k);
    el.textContent = F[el.dataset.f || 't'](v, d.now);
    if ('v' in el.dataset) el.dataset.v = v == null ? '' : String(v);
  }
}
setInterval(tick, __REFRESH_MS__);
})();""".replace("__STATES__", orjson.dumps(STATES).decode()).replace("__REFRESH_MS__", str(REFRESH_MS))
#: for the page's Content-Security-Policy: this script and no other may run
SCRIPT_SHA256 = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()

_STYLE = """
body{font:13px/1.4 system-ui,sans-serif;margin:1em 1.5em;color:#1b1f24;background:#fafbfc}
h1{font-size:20px;margin:0 0 .2em}h2{font-size:15px;margin:1.4em 0 .4em}
header p{margin:0;color:#57606a}
table{border-collapse:collapse;background:#fff;margin-bottom:.5em}
th,td{border:1px solid #d0d7de;padding:2px 6px;text-align:left;vertical-align:top}
thead th{background:#f1f3f5;position:sticky;top:0}
td.n,th.n{text-align:right;white-space:nowrap}
td.msg{max-width:40em;overflow-wrap:anywhere}
ol{margin:0;padding-left:1.3em}
[data-v=healthy]{background:#dafbe1}[data-v=unchecked]{background:#eef6ee}
[data-v=open]{background:#ffd8d3;font-weight:600}[data-v=half_open],[data-v=unhealthy]{background:#fff1c2}
[data-v=draining],[data-v=starting]{background:#eaeef2}
[data-v=true].flag{background:#ffd8d3;font-weight:600}
#stale{display:none;color:#cf222e;font-weight:600}
body[data-stale=yes] #stale{display:inline}
.muted{color:#57606a}
"""


def _dur(v: float) -> str:
    s = max(0, int(v))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {s % 60}s" if m else f"{s}s"


def fmt(kind: str, v: Any, now: float) -> str:
    """A value as the page shows it; the script's ``F`` formats alike."""
    if v is None:
        return "" if kind == "opt" else "\u2013"
    if kind == "n":
        if float(v).is_integer():
            return str(int(v))
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"
    if kind == "pct":
        return f"{v * 100:.1f}%"
    if kind == "ms":
        return f"{v:.1f} ms" if v < 10 else f"{v:.0f} ms" if v < 1000 else f"{v / 1000:.2f} s"
    if kind == "dur":
        return _dur(v)
    if kind == "ago":
        return _dur(now - v) + " ago"
    if kind == "time":
        return time.strftime("%H:%M:%SZ", time.gmtime(v))
    if kind == "hash":
        return str(v)[:12]
    if kind == "state":
        return STATES.get(v, str(v))
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


class _Page:
    """One rendering: the data, and helpers that emit bound elements."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.now: float = data["now"]
        self.out: list[str] = []

    def get(self, path: Sequence[object]) -> Any:
        node: Any = self.data
        for key in path:
            if isinstance(node, dict):
                node = node.get(key)
            elif isinstance(node, list) and isinstance(key, int) and key < len(node):
                node = node[key]
            else:
                return None
        return node

    def bound(
        self, path: Sequence[object], f: str = "t", tag: str = "td", cls: str = "", state: bool = False
    ) -> str:
        value = self.get(path)
        attrs = f' data-k="{html.escape(" ".join(map(str, path)))}"'
        if f != "t":
            attrs += f' data-f="{f}"'
        if state:
            attrs += f' data-v="{html.escape("" if value is None else str(value).lower())}"'
        if cls:
            attrs += f' class="{cls}"'
        return f"<{tag}{attrs}>{html.escape(fmt(f, value, self.now))}</{tag}>"

    def pair(self, base: Sequence[object], field: str, f: str) -> str:
        """A 1m / 5m cell."""
        one = self.bound([*base, "1m", field], f, "span")
        five = self.bound([*base, "5m", field], f, "span")
        return f'<td class="n">{one} / {five}</td>'

    def row(self, path: Sequence[object], cells: str) -> str:
        hidden = "" if self.get(path) is not None else " hidden"
        return f'<tr data-r="{html.escape(" ".join(map(str, path)))}"{hidden}>{cells}</tr>'


def render_html(data: dict[str, Any]) -> str:
    p = _Page(data)
    o = p.out
    esc = html.escape
    o.append(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Interlock status: {esc(data['gateway']['replica'])}</title><style>{_STYLE}</style></head>"
        f'<body data-layout="{esc(data["layout"])}" data-stale="">'
        "<header><h1>Interlock status</h1><p>replica "
        f"{p.bound(['gateway', 'replica'], tag='b')}, updated {p.bound(['now'], 'time', 'span')}"
        f' (every {REFRESH_MS // 1000} s) <span id="stale">not refreshing</span></p></header>'
    )
    g = ["gateway"]
    o.append('<h2>Gateway</h2><table class="kv" id="gateway"><tbody>')
    for label, cell in (
        ("Version", p.bound([*g, "version"])),
        ("Uptime", p.bound([*g, "uptime_s"], "dur")),
        ("Shutting down", p.bound([*g, "draining"], cls="flag", state=True)),
        ("Config hash", p.bound([*g, "config", "hash"], "hash")),
        ("Config source", p.bound([*g, "config", "source"])),
        ("Config loaded", p.bound([*g, "config", "loaded_at"], "ago")),
        ("Last reload", p.bound([*g, "reload", "last_status"])),
        ("Last reload attempt", p.bound([*g, "reload", "last_attempt_at"], "ago")),
        ("Last reload error", p.bound([*g, "reload", "last_error"], cls="msg")),
        ("Response cache", p.bound([*g, "cache"])),
    ):
        o.append(f"<tr><th>{label}</th>{cell}</tr>")
    o.append("</tbody></table>")

    o.append(
        '<h2>Replicas</h2><table id="replicas"><thead><tr><th>Replica</th><th>Version</th>'
        "<th>Config hash</th><th>Differs from this one</th><th>Seen</th></tr></thead><tbody>"
    )
    for i, _ in enumerate(data["replicas"]):
        r = ["replicas", i]
        o.append(
            p.row(
                r,
                p.bound([*r, "id"])
                + p.bound([*r, "version"])
                + p.bound([*r, "config_hash"], "hash")
                + p.bound([*r, "hash_differs"], cls="flag", state=True)
                + p.bound([*r, "seen_at"], "ago"),
            )
        )
    o.append("</tbody></table>")
    _backends(p)
    _routes(p)
    _limits(p)
    _errors(p)
    o.append(f"<script>{_SCRIPT}</script></body></html>")
    return "".join(o)


def _backends(p: _Page) -> None:
    o, data = p.out, p.data
    o.append(
        '<h2>Backends</h2><table id="backends"><thead><tr><th>Backend</th><th>Kind</th><th>State</th>'
        '<th>Health check</th><th class="n">In flight</th><th class="n">Queued</th>'
        '<th class="n">Calls/s 1m / 5m</th><th class="n">Errors 1m / 5m</th>'
        '<th class="n">TTFT p50 1m / 5m</th><th class="n">TTFT p95 1m / 5m</th>'
        '<th class="n">Tokens/s 1m / 5m</th><th>Last error</th><th>Detail</th></tr></thead><tbody>'
    )
    pools = []
    for key, backend in data["backends"].items():
        b = ["backends", key]
        if backend.get("endpoints"):
            pools.append(key)
        o.append(
            f'<tr data-backend="{html.escape(key)}"><th>{html.escape(key)}</th>'
            + p.bound([*b, "kind"])
            + p.bound([*b, "state"], "state", cls="state", state=True)
            + f"<td>{p.bound([*b, 'health', 'checked_at'], 'ago', 'span')}"
            + f' <span class="muted">{p.bound([*b, "health", "reason"], "opt", "span")}</span></td>'
            + p.bound([*b, "in_flight"], "n", cls="n")
            + p.bound([*b, "queued"], "n", cls="n")
            + p.pair(b, "rps", "n")
            + p.pair(b, "error_rate", "pct")
            + p.pair(b, "ttft_p50_ms", "ms")
            + p.pair(b, "ttft_p95_ms", "ms")
            + p.pair(b, "tokens_per_s", "n")
            + f'<td class="msg">{p.bound([*b, "last_error_at"], "ago", "span", cls="muted")} '
            + f"{p.bound([*b, 'last_error'], 'opt', 'span')}</td>"
            + p.bound([*b, "detail"], cls="msg muted")
            + "</tr>"
        )
    o.append("</tbody></table>")
    if not pools:
        return
    o.append(
        '<h2>vLLM pool endpoints</h2><table id="endpoints"><thead><tr><th>Backend</th><th>Endpoint</th>'
        '<th>Healthy</th><th class="n">In flight</th><th class="n">Running</th><th class="n">Waiting</th>'
        '<th class="n">KV cache usage</th><th class="n">Prefix hits</th><th class="n">Scrape age</th>'
        "</tr></thead><tbody>"
    )
    for key in pools:
        for i, _ in enumerate(data["backends"][key]["endpoints"]):
            e = ["backends", key, "endpoints", i]
            o.append(
                f"<tr><th>{html.escape(key)}</th>"
                + p.bound([*e, "url"])
                + p.bound([*e, "healthy"], cls="flag", state=True)
                + p.bound([*e, "in_flight"], "n", cls="n")
                + p.bound([*e, "running"], "n", cls="n")
                + p.bound([*e, "waiting"], "n", cls="n")
                + p.bound([*e, "kv_cache_usage"], "pct", cls="n")
                + p.bound([*e, "prefix_hit_rate"], "pct", cls="n")
                + p.bound([*e, "scrape_age_s"], "n", cls="n")
                + "</tr>"
            )
    o.append("</tbody></table>")


def _routes(p: _Page) -> None:
    o, data = p.out, p.data
    note = "" if data["gateway"]["metrics"] else ' <span class="muted">(metrics off: no figures)</span>'
    o.append(
        f'<h2>Routes{note}</h2><table id="routes"><thead><tr><th>Route</th><th>Policy</th>'
        "<th>Order for a typical request, and why</th>"
        '<th class="n">Requests/s 1m / 5m</th><th class="n">p95 1m / 5m</th>'
        '<th class="n">Errors 1m / 5m</th><th class="n">Cache hits 1m / 5m</th>'
        '<th class="n">429s 1m / 5m</th><th class="n">Fallbacks 1m / 5m</th></tr></thead><tbody>'
    )
    for name, route in data["routes"].items():
        r = ["routes", name]
        order = "".join(
            f"<li>{p.bound([*r, 'order', i, 'backend'], tag='b')}: "
            f"{p.bound([*r, 'order', i, 'reason'], tag='span')}</li>"
            for i in range(len(route["order"]))
        )
        o.append(
            f'<tr data-route="{html.escape(name)}"><th>{html.escape(name)}</th>'
            + p.bound([*r, "policy"])
            + f"<td><ol>{order}</ol></td>"
            + p.pair(r, "rps", "n")
            + p.pair(r, "p95_ms", "ms")
            + p.pair(r, "error_rate", "pct")
            + p.pair(r, "cache_hit_rate", "pct")
            + p.pair(r, "rate_limited_rate", "pct")
            + p.pair(r, "fallbacks", "n")
            + "</tr>"
        )
    o.append("</tbody></table>")


def _limits(p: _Page) -> None:
    o, limits = p.out, p.data["limits"]
    o.append("<h2>Limits</h2>")
    if not limits["configured"]:
        o.append('<p id="limits">No limits configured.</p>')
        return
    o.append(
        f'<p id="limits">Counters: {p.bound(["limits", "mode"], tag="b")}; keys throttled now: '
        f"{p.bound(['limits', 'throttled_count'], 'n', 'b')}</p>"
        '<table id="throttled"><thead><tr><th>Key</th><th>Limit</th><th class="n">Retry in</th>'
        "</tr></thead><tbody>"
    )
    for i in range(THROTTLED_SHOWN):
        t = ["limits", "throttled", i]
        cells = p.bound([*t, "key"]) + p.bound([*t, "limit"]) + p.bound([*t, "retry_in_s"], "dur", cls="n")
        o.append(p.row(t, cells))
    o.append("</tbody></table>")


def _errors(p: _Page) -> None:
    o = p.out
    o.append(
        '<h2>Last errors</h2><p class="muted">Requests that failed, were refused with 429 or were '
        "answered only after a backend failed; newest first.</p>"
        '<table id="errors"><thead><tr><th>When</th><th>Request id</th><th>Route</th><th>Backend</th>'
        '<th class="n">Status</th><th>Message</th></tr></thead><tbody>'
    )
    for i in range(ERRORS_KEPT):
        e = ["errors", i]
        o.append(
            p.row(
                e,
                p.bound([*e, "at"], "time")
                + p.bound([*e, "request_id"])
                + p.bound([*e, "route"])
                + p.bound([*e, "backend"])
                + p.bound([*e, "status"], "n", cls="n")
                + p.bound([*e, "message"], cls="msg"),
            )
        )
    o.append("</tbody></table>")
