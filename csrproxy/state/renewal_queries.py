"""The state database's renewal and ARI queries (a part of :class:`StateDB`): what is due,
parked, rescheduled, looked up — each one search of a partial index."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from csrproxy.state.engine import Connection, Cursor, Dialect
from csrproxy.state.rows import _RENEWABLE, CertificateRow, cert_from_row

#: Seconds a renewal is leased to the instance that read it due (far longer than an order
#: takes: ``[acme] order_timeout`` is minutes).
RENEWAL_LEASE = 900.0


class RenewalQueries:
    """Mixed into :class:`csrproxy.state.database.StateDB`, which gives the connection."""

    conn: Connection
    dialect: Dialect
    instance: str

    def _write(self, sql: str, args: Sequence[Any] | dict[str, Any]) -> Cursor:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError


    def due_certificates(self, now: float, limit: int) -> list[CertificateRow]:
        """Current certificates not parked whose renewal time has come, soonest first.

        On a shared database (PostgreSQL) the rows returned are leased to this instance for
        ``RENEWAL_LEASE`` seconds (``FOR UPDATE SKIP LOCKED``: instances asking together get
        different rows), and rows another instance holds a lease on are left out: a renewal
        runs on one instance, and on another once the lease of one that died ran out.
        """
        if self.dialect.name == "sqlite":
            rows = self.conn.execute(
                f"SELECT * FROM certificates WHERE renew_at <= ? AND {_RENEWABLE} "
                "ORDER BY renew_at LIMIT ?",
                (now, limit),
            )
            return [cert_from_row(r) for r in rows]
        with self.transaction() as conn:
            claimed = conn.execute(
                "UPDATE certificates SET lease_owner = ?, lease_until = ? WHERE id IN "
                f"(SELECT id FROM certificates WHERE renew_at <= ? AND {_RENEWABLE} "
                "AND (lease_until IS NULL OR lease_until < ? OR lease_owner = ?) "
                "ORDER BY renew_at LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING *",
                (self.instance, now + RENEWAL_LEASE, now, now, self.instance, limit),
            ).fetchall()
        found = [cert_from_row(r) for r in claimed]
        found.sort(key=lambda row: row.renew_at or 0.0)
        return found

    def schedule_unscheduled(self, recheck: float, limit: int) -> int:
        """Give up to ``limit`` current certificates without a renewal time one (a random
        point between 2/3 and 3/4 of their lifetime) and an ARI look-up time; the count."""
        random = self.dialect.random_fraction
        cur = self._write(
            "UPDATE certificates SET "
            f"renew_at = not_before + (not_after - not_before) * (2.0 / 3 + {random} / 12), "
            f"ari_next = coalesce(ari_next, ? + {random} * ?) "
            f"WHERE id IN (SELECT id FROM certificates WHERE renew_at IS NULL "
            f"AND {_RENEWABLE} LIMIT ?)",
            (time.time(), recheck, limit),
        )
        return int(cur.rowcount)

    def park(self, cert_ids: Sequence[str]) -> None:
        """Renewal found these due and their installations inactive: leave them until they
        ask again (:meth:`touch_certificate`, :meth:`certificate_signed`)."""
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE certificates SET dormant = 1 WHERE id = ?", [(i,) for i in cert_ids]
            )

    def mark_renewed(self, cert_id: str) -> None:
        """A renewal of ``cert_id`` succeeded: it is superseded, whatever request key the
        new certificate was recorded under (a row copied or restored under another key)."""
        self._write(
            "UPDATE certificates SET superseded = coalesce(superseded, ?), lease_until = NULL "
            "WHERE id = ?",
            (time.time(), cert_id),
        )

    def renew_later(self, cert_id: str, when: float) -> None:
        self._write(
            "UPDATE certificates SET renew_at = ?, lease_until = NULL WHERE id = ?", (when, cert_id)
        )

    def ari_due(
        self, now: float, limit: int
    ) -> list[tuple[str, str, float | None, float | None, str | None]]:
        """(id, chain, ari_start, ari_end, ca) of renewable certificates whose ARI look-up
        is due."""
        rows = self.conn.execute(
            f"SELECT id, chain, ari_start, ari_end, ca FROM certificates WHERE ari_next <= ? "
            f"AND {_RENEWABLE} ORDER BY ari_next LIMIT ?",
            (now, limit),
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def ari_looked(
        self,
        cert_id: str,
        window: tuple[float, float] | None,
        next_look: float,
        renew_at: float | None,
    ) -> None:
        """Record an ARI look-up: the window (None: unchanged), when to look again, and the
        renewal time the window gives (None: unchanged)."""
        if window is None:
            self._write(
                "UPDATE certificates SET ari_next = ? WHERE id = ?", (next_look, cert_id)
            )
            return
        self._write(
            "UPDATE certificates SET ari_start = ?, ari_end = ?, ari_next = ?, "
            "renew_at = coalesce(?, renew_at) WHERE id = ?",
            (window[0], window[1], next_look, renew_at, cert_id),
        )
