"""Admission budgets in the state database: one ``(name, tokens, stamp)`` row per bucket.

The rows are opaque here (:mod:`csrproxy.issuance.admission` names and reads
them).  The daemon writes them through :class:`~csrproxy.state.store.Store`, whose
one thread commits calls in the order they were made: a charge recorded before an
order's own row is on disk no later than that row, even after a ``kill -9``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.state.database import StateDB
from csrproxy.state.store import Store

log = Logger()

#: A bucket as stored: its name, its tokens and when they were counted (epoch seconds).
BudgetRow = tuple[str, float, float]


def save_budgets(db: StateDB, rows: Sequence[BudgetRow]) -> None:
    """Record ``rows`` in one transaction; a row replaces the one of the same name."""
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO budgets (name, tokens, stamp) VALUES (?, ?, ?) ON CONFLICT (name) "
            "DO UPDATE SET tokens = excluded.tokens, stamp = excluded.stamp",
            rows,
        )


def load_budgets(db: StateDB, since: float, limit: int, prefix: str = "") -> list[BudgetRow]:
    """At most ``limit`` rows stamped at ``since`` or later, newest first.

    With ``prefix``, only rows whose name starts with it (a range of the primary key).
    """
    if prefix:
        rows = db.conn.execute(
            "SELECT name, tokens, stamp FROM budgets WHERE name >= ? AND name < ? "
            "AND stamp >= ? ORDER BY stamp DESC LIMIT ?",
            (prefix, _after_prefix(prefix), since, limit),
        )
    else:
        rows = db.conn.execute(
            "SELECT name, tokens, stamp FROM budgets WHERE stamp >= ? ORDER BY stamp DESC LIMIT ?",
            (since, limit),
        )
    return [(str(name), float(tokens), float(stamp)) for name, tokens, stamp in rows]


def _after_prefix(prefix: str) -> str:
    """The least string greater than every string starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def budget_recorder(store: Store) -> Callable[[list[BudgetRow]], None]:
    """The ``persist`` of :class:`~csrproxy.issuance.admission.Admission`, through ``store``.

    A failed write is logged and fails nothing else (the store turns unhealthy).
    """

    failing = [False]  # one line when writes start failing, one when they work again

    def failed(failure: Failure) -> None:
        if not failing[0]:
            failing[0] = True
            log.warn("admission budgets not recorded: {err}", err=failure.getErrorMessage())

    def recorded(_: object) -> None:
        if failing[0]:
            failing[0] = False
            log.info("admission budgets recorded again")

    def record(rows: list[BudgetRow]) -> None:
        store.run(save_budgets, store.db, rows).addCallbacks(recorded, failed)

    return record
