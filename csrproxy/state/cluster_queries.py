"""The state database's queries for several instances on one database (a part of
:class:`csrproxy.state.database.StateDB`): whose challenge records are whose, announcing
their changes, order leases and their takeover, an order another instance runs. On
SQLite (one instance) each answers as if alone."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from csrproxy.state.engine import POSTGRESQL, SQLITE, Connection, Cursor, Dialect
from csrproxy.state.rows import ChallengeRow, OrderRow, order_from_row
from csrproxy.state.sql import UNFINISHED_SQL as _UNFINISHED_SQL


class OrderRunningElsewhere(Exception):
    """Another instance runs the order for this CSR (``order_id``): join it."""

    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id} for this CSR runs on another instance")
        self.order_id = order_id


#: Seconds an order is leased to its instance by default; a heartbeat extends it.
ORDER_LEASE = 60.0
#: The PostgreSQL channel a change of the challenge records is announced on.
CHALLENGES_CHANNEL = "csrproxy_challenges"

class ClusterQueries:
    """Mixed into :class:`csrproxy.state.database.StateDB`, which gives the connection."""

    conn: Connection
    dialect: Dialect
    instance: str
    order_lease: float

    def _write(self, sql: str, args: Any) -> Cursor:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def challenges(self) -> list[ChallengeRow]:
        raise NotImplementedError

    @property
    def shared(self) -> bool:
        """True when other instances may share this database (PostgreSQL)."""
        return self.dialect is POSTGRESQL

    def _challenges_changed(self) -> None:
        # Tells the other instances at commit (LISTEN csrproxy_challenges), in the write's
        # own transaction: they never hear of a change that did not happen.
        if self.dialect is POSTGRESQL:
            self.conn.execute(f"SELECT pg_notify('{CHALLENGES_CHANNEL}', ?)", (self.instance,))

    def own_challenges(self) -> list[ChallengeRow]:
        """The records this instance published (SQLite: all, whatever their instance)."""
        if self.dialect is SQLITE:
            return self.challenges()
        rows = self.conn.execute(
            "SELECT * FROM challenges WHERE instance = ? OR instance IS NULL", (self.instance,)
        )
        return [ChallengeRow(**dict(r)) for r in rows]

    def others_challenges(self, backend: str = "builtin") -> list[tuple[str, str]]:
        """(name, value) of the ``backend`` records other instances published (a multiset)."""
        if self.dialect is SQLITE:
            return []
        rows = self.conn.execute(
            "SELECT name, value FROM challenges WHERE backend = ? AND instance IS NOT NULL "
            "AND instance != ? ORDER BY id",
            (backend, self.instance),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    def running_elsewhere(self, request_key: str, now: float) -> OrderRow | None:
        """An unfinished order for ``request_key`` another live instance runs (its lease
        has not run out), or None; always None unless the database is shared."""
        if not self.shared:
            return None
        row = self.conn.execute(
            f"SELECT * FROM orders WHERE request_key = ? AND status IN ({_UNFINISHED_SQL}) "
            "AND owner != ? AND lease_until >= ? ORDER BY created DESC LIMIT 1",
            (request_key, self.instance, now),
        ).fetchone()
        return order_from_row(row) if row else None

    def extend_leases(self, until: float) -> int:
        """This instance still runs its unfinished orders: their leases last until ``until``."""
        cur = self._write(
            f"UPDATE orders SET lease_until = ? WHERE owner = ? AND status IN ({_UNFINISHED_SQL})",
            (until, self.instance),
        )
        return int(cur.rowcount)

    def take_over_orders(
        self, now: float, limit: int
    ) -> list[tuple[OrderRow, list[ChallengeRow]]]:
        """Unfinished orders whose owner's lease ran out (it died), now this instance's, with
        their challenge records (now this instance's too), oldest first. Instances asking
        together get different orders (``FOR UPDATE SKIP LOCKED``). Shared databases only."""
        if not self.shared:
            return []
        with self.transaction() as conn:
            taken = [
                order_from_row(r)
                for r in conn.execute(
                    "UPDATE orders SET owner = ?, lease_until = ? WHERE id IN (SELECT id FROM "
                    f"orders WHERE status IN ({_UNFINISHED_SQL}) AND lease_until < ? "
                    "AND owner != ? ORDER BY created LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING *",
                    (self.instance, now + self.order_lease, now, self.instance, limit),
                ).fetchall()
            ]
            out = []
            for order in sorted(taken, key=lambda o: o.created):
                records = [
                    ChallengeRow(**dict(r))
                    for r in conn.execute(
                        "UPDATE challenges SET instance = ? WHERE order_id = ? RETURNING *",
                        (self.instance, order.id),
                    ).fetchall()
                ]
                out.append((order, records))
            if taken:
                self._challenges_changed()
        return out

