"""Admission budgets in the state database: one ``(name, tokens, stamp)`` row per bucket.

The rows are opaque here (:mod:`csrproxy.issuance.admission` names and reads
them).  The daemon writes them through :class:`~csrproxy.state.store.Store`, whose
one thread commits calls in the order they were made: a charge recorded before an
order's own row is on disk no later than that row, even after a ``kill -9``.

On a shared database (PostgreSQL) the rows are the budgets themselves:
:func:`settle_budgets` decides in one transaction, the rows locked, so that instances
spend one budget between them (:mod:`csrproxy.issuance.cluster_admission`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.state.database import StateDB
from csrproxy.state.store import Store

log = Logger()

#: A bucket as stored: its name, its tokens and when they were counted (epoch seconds).
BudgetRow = tuple[str, float, float]
T = TypeVar("T")

# Makes each missing row (as given: full) and locks every row, in one statement: an
# upsert, unlike INSERT DO NOTHING then SELECT FOR UPDATE, cannot miss a row the pruner
# deletes in between. Rows are taken in the order given (unnest keeps it).
_LOCK = (
    "INSERT INTO budgets (name, tokens, stamp) SELECT * FROM unnest(?::text[], "
    "?::double precision[], ?::double precision[]) ON CONFLICT (name) "
    "DO UPDATE SET tokens = budgets.tokens RETURNING name, tokens, stamp"
)
_SET = "UPDATE budgets SET tokens = ?, stamp = ? WHERE name = ?"
# Rows only looked at: never made, not locked (a check racing a charge is harmless).
_PEEK = "SELECT name, tokens, stamp FROM budgets WHERE name = ANY(?::text[])"


def save_budgets(db: StateDB, rows: Sequence[BudgetRow]) -> None:
    """Record ``rows`` in one transaction; a row replaces the one of the same name."""
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO budgets (name, tokens, stamp) VALUES (?, ?, ?) ON CONFLICT (name) "
            "DO UPDATE SET tokens = excluded.tokens, stamp = excluded.stamp",
            rows,
        )


def settle_budgets(
    db: StateDB,
    full: Sequence[BudgetRow],
    decide: Callable[[dict[str, BudgetRow]], tuple[Sequence[BudgetRow], T]],
    peek: Sequence[str] = (),
    scope: str = "",
) -> T:
    """Lock the rows of ``full`` and let ``decide`` change them, in one transaction.

    PostgreSQL only. A missing row is first made as given in ``full`` (a full bucket,
    what no row means). Rows are locked in the order of their names, so that two
    instances never wait on each other in a cycle. ``decide`` gets the locked rows by
    name and returns the rows to write and its result; another instance deciding on
    any of these rows waits until this one commits.  The rows named in ``peek`` that
    exist are handed to ``decide`` too, neither made nor locked; ``decide`` may write them.
    ``scope`` prefixes every row's name in the table (a fallback CA's budgets apart from
    ``[acme]``'s); ``decide`` sees and returns the names without it.
    """
    ordered = sorted((scope + n, t, s) for n, t, s in full)
    cut = len(scope)
    with db.transaction() as conn:
        columns = [list(column) for column in zip(*ordered, strict=True)] or [[], [], []]
        rows = conn.execute(_LOCK, columns).fetchall()
        if peek:
            rows += conn.execute(_PEEK, [sorted(scope + p for p in peek)]).fetchall()
        locked = {str(n)[cut:]: (str(n)[cut:], float(t), float(s)) for n, t, s in rows}
        changed, result = decide(locked)
        if changed:
            conn.executemany(_SET, [(t, s, scope + n) for n, t, s in sorted(changed)])
    return result


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
