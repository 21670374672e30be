"""Read-only queries behind the operator's status page (``GET /status``).

Each reads at most ``limit`` rows through an index (``orders_unfinished``,
``orders_finished``, ``certificates_due``), takes no lease and writes nothing: asking the
page costs the state database three small reads, whatever its size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from csrproxy.state.database import StateDB
from csrproxy.state.rows import _RENEWABLE, OrderRow, order_from_row
from csrproxy.state.sql import UNFINISHED_SQL


@dataclass(frozen=True)
class DueCertificate:
    """A current certificate whose renewal is due by some time."""

    id: str
    names: list[str]
    renew_at: float
    not_after: float
    ca: str | None


@dataclass(frozen=True)
class StatusRows:
    """What the page shows from the database."""

    in_flight: list[OrderRow]
    failures: list[OrderRow]
    due: list[DueCertificate]
    due_count: int


def status_rows(db: StateDB, due_by: float, limit: int = 20) -> StatusRows:
    """Orders not finished (oldest first), the last failed ones (newest first), and current
    certificates due for renewal by ``due_by`` (soonest first, and how many in all, counted
    up to 10,000)."""
    conn = db.conn
    in_flight = [
        order_from_row(r)
        for r in conn.execute(
            f"SELECT * FROM orders WHERE status IN ({UNFINISHED_SQL}) ORDER BY created LIMIT ?",
            (limit,),
        )
    ]
    failures = [
        order_from_row(r)
        for r in conn.execute(
            "SELECT * FROM orders WHERE status = 'invalid' ORDER BY updated DESC LIMIT ?",
            (limit,),
        )
    ]
    due = [
        DueCertificate(r[0], db_names(r[1]), float(r[2]), float(r[3]), r[4])
        for r in conn.execute(
            "SELECT id, names, renew_at, not_after, ca FROM certificates "
            f"WHERE renew_at <= ? AND {_RENEWABLE} ORDER BY renew_at LIMIT ?",
            (due_by, limit),
        )
    ]
    (count,) = conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM certificates "
        f"WHERE renew_at <= ? AND {_RENEWABLE} LIMIT 10000) AS due",
        (due_by,),
    ).fetchone()
    return StatusRows(in_flight, failures, due, int(count))


def db_names(text: str) -> list[str]:
    return [str(n) for n in json.loads(text)]


__all__ = ["DueCertificate", "StatusRows", "status_rows"]
