"""The operator's status page (``GET /status``): one server-rendered HTML document.

Off unless ``[status] enabled``; only holders of a token in ``[status] tokens_file`` (the
API tokens' format) may see it, as ``Authorization: Bearer <token>`` or as the password of
HTTP Basic (what a browser asks for; the user name is ignored). The page has no script
and no external asset (``Content-Security-Policy: default-src 'none'``), is never cached,
and costs three small database reads (:mod:`csrproxy.state.status_queries`).

It shows: readiness checks; each CA (its account, circuit breaker, budgets left per
zone); orders in flight and their age; the last failed orders and their problems;
certificates due for renewal in the next ``due_days`` days; DNS answers by rcode and the
response-rate-limiting counters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred

from csrproxy.errors import Unauthorized
from csrproxy.state.rows import OrderRow
from csrproxy.state.status_queries import StatusRows
from csrproxy.web.auth import Token
from csrproxy.web.health import Check

#: Rows of each table at most (the queries' limit).
ROWS = 20


@dataclass(frozen=True)
class CAStatus:
    """One CA as the page shows it."""

    directory: str
    account: str | None
    breaker: str
    detail: str
    #: (what, room left): e.g. ("new certificates for example.com this week", 41.0).
    budgets: Sequence[tuple[str, float]]


@dataclass(frozen=True)
class Snapshot:
    """Everything one rendering shows."""

    now: float
    instance: str
    checks: Sequence[Check]
    cas: Sequence[CAStatus]
    rows: StatusRows
    due_days: float
    rcodes: Sequence[tuple[str, int]]
    rrl: Sequence[tuple[str, int]]


class StatusPage:
    """Who may see the page, and what it is made from (callables, asked per request)."""

    def __init__(
        self,
        tokens: Sequence[Token],
        snapshot: Callable[[], Deferred[Snapshot]],
    ) -> None:
        self.tokens = tuple(tokens)
        self.snapshot = snapshot

    def check(self, authorization: str | None) -> None:
        """Raise :class:`Unauthorized` unless ``authorization`` carries a status token."""
        presented = _presented(authorization)
        if presented is None:
            raise Unauthorized("the status page needs a status token (Basic or Bearer)")
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found = False
        for token in self.tokens:  # every one compared in constant time, no early stop
            found |= hmac.compare_digest(digest, token.digest)
        if not found:
            raise Unauthorized("that is not a status token")

    def render(self) -> Deferred[bytes]:
        return self.snapshot().addCallback(render)


def _presented(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        password = decoded.partition(":")[2]
        return password or None
    return None


# -- rendering ---------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.2em 0}td,th{border:1px solid #ccc;padding:.2em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}.ok{color:#176b1c}.bad{color:#b00020;
font-weight:bold}.muted{color:#777}code{font-size:.95em}
"""


def render(snap: Snapshot) -> bytes:
    """The page for ``snap``: UTF-8 HTML, every value escaped."""
    ready = all(c.ok for c in snap.checks)
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>csrproxy status</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>csrproxy {_e(snap.instance)}: ",
        '<span class="ok">ready</span>' if ready else '<span class="bad">not ready</span>',
        "</h1>",
        f'<p class="muted">as of {_e(_when(snap.now))}</p>',
        "<h2>Readiness</h2>",
        _table(
            ("check", "state", "detail"),
            ((c.name, _state(c.ok), c.detail) for c in snap.checks),
            raw_columns={1},
        ),
        "<h2>Certificate authorities</h2>",
    ]
    for ca in snap.cas:
        parts.append(
            f"<p><code>{_e(ca.directory)}</code><br>account: "
            f"{_e(ca.account or 'not known yet')}<br>"
            f"breaker: {_e(ca.breaker)} ({_e(ca.detail)})</p>"
        )
        parts.append(
            _table(("budget", "room left"), ((w, _room(r)) for w, r in ca.budgets))
            if ca.budgets
            else '<p class="muted">no budget turned on</p>'
        )
    rows = snap.rows
    parts += [
        f"<h2>Orders in flight ({len(rows.in_flight)}"
        f"{'+' if len(rows.in_flight) >= ROWS else ''})</h2>",
        _orders(rows.in_flight, snap.now, failed=False),
        "<h2>Last failures</h2>",
        _orders(rows.failures, snap.now, failed=True),
        f"<h2>Renewals due in the next {snap.due_days:g} days: {rows.due_count}"
        f"{'+' if rows.due_count >= 10_000 else ''}</h2>",
        _table(
            ("certificate", "names", "renew at", "expires", "CA"),
            (
                (
                    d.id[:16],
                    ", ".join(d.names),
                    _when(d.renew_at),
                    _when(d.not_after),
                    d.ca or "[acme]",
                )
                for d in rows.due
            ),
        ),
        "<h2>DNS</h2>",
        _table(("answers by rcode", "count"), ((k, str(v)) for k, v in snap.rcodes)),
        _table(("rate limiting", "count"), ((k, str(v)) for k, v in snap.rrl))
        if snap.rrl
        else '<p class="muted">no response was rate limited</p>',
        "</body></html>",
    ]
    return "".join(parts).encode("utf-8")


def _orders(orders: Sequence[OrderRow], now: float, failed: bool) -> str:
    if not orders:
        return '<p class="muted">none</p>'
    if failed:
        return _table(
            ("order", "names", "failed", "problem", "CA"),
            (
                (o.id, ", ".join(o.names), _ago(now - o.updated), o.error or "", o.ca or "[acme]")
                for o in orders
            ),
        )
    return _table(
        ("order", "names", "status", "age", "instance", "CA"),
        (
            (o.id, ", ".join(o.names), o.status, _ago(now - o.created), o.owner or "",
             o.ca or "[acme]")
            for o in orders
        ),
    )  # fmt: skip


def _table(
    head: Sequence[str],
    rows: Iterable[Sequence[str]],
    raw_columns: frozenset[int] | set[int] = frozenset(),
) -> str:
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    empty = True
    for row in rows:
        empty = False
        out.append("<tr>")
        out.extend(
            f"<td>{cell if i in raw_columns else _e(cell)}</td>" for i, cell in enumerate(row)
        )
        out.append("</tr>")
    if empty:
        out.append(f'<tr><td colspan={len(head)} class="muted">none</td></tr>')
    out.append("</table>")
    return "".join(out)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _state(ok: bool) -> str:
    return '<span class="ok">ok</span>' if ok else '<span class="bad">failing</span>'


def _room(room: float) -> str:
    return "unlimited" if room == float("inf") else f"{room:.0f}"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


__all__ = ["ROWS", "CAStatus", "Snapshot", "StatusPage", "render"]
