"""Keeping the state database bounded: what is deleted after ``[state] retention_days``.

With ``cutoff = now - retention_days`` days:

- a superseded certificate goes once it was superseded and expired before the cutoff (until
  it expires it may still be revoked);
- a current certificate goes once it expired before the cutoff (its installation has not
  renewed for the whole retention period);
- a finished order (``issued`` or ``invalid``) goes once it ended before the cutoff;
- an admission budget goes once untouched for :data:`BUDGET_DAYS` (it is full again), but
  a count of failed authorizations in a row (:data:`UNTIL_RESET`) never refills: it goes
  only once reset (stamped 0 then).

Each rule runs in steps of at most ``chunk`` rows, one transaction each, on the rule's
index, so that a step never holds the store thread (and the write lock) for long.  After a
pass, freed pages go back to the file system in steps of ``pages`` pages, when the database
was created with ``auto_vacuum = INCREMENTAL``.  :class:`Pruner` runs the passes from the
reactor, one store call at a time.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, fields
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from csrproxy.state.database import StateDB
from csrproxy.state.engine import SQLITE, Connection
from csrproxy.state.store import Store

log = Logger()

DAY = 86400.0
#: Days after which an untouched admission budget is full again (the longest budget window).
BUDGET_DAYS = 7.0
#: Budget rows that stay until reset, whatever their age (``CONSECUTIVE`` in
#: :mod:`csrproxy.issuance.limits`): one per identifier that failed since its last
#: valid authorization.
UNTIL_RESET = "consecutive-failures:"

SUPERSEDED = "superseded_certificates"
EXPIRED = "expired_certificates"
ORDERS = "finished_orders"
BUDGETS = "budgets"
#: The rules, in the order a pass runs them.
RULES = (SUPERSEDED, EXPIRED, ORDERS, BUDGETS)

# A superseded certificate may still be valid until it expires: it goes once both its
# superseding and its expiry are before the cutoff (one expression index, no walk).
SUPERSEDED_DELETE = (
    "DELETE FROM certificates WHERE id IN (SELECT id FROM certificates "
    "WHERE superseded IS NOT NULL AND max(superseded, not_after) < :cutoff LIMIT :chunk)"
)
# Every row of these index ranges goes: delete from the start until a step finds fewer.
EXPIRED_DELETE = (
    "DELETE FROM certificates WHERE id IN (SELECT id FROM certificates "
    "WHERE superseded IS NULL AND not_after < :cutoff LIMIT :chunk)"
)
ORDERS_DELETE = (
    "DELETE FROM orders WHERE id IN (SELECT id FROM orders "
    "WHERE status IN ('issued', 'invalid') AND updated < :cutoff LIMIT :chunk)"
)
# Budgets have no index on their stamp: walk the primary key, ``chunk`` rows a step.
BUDGETS_FIRST = "SELECT name, stamp FROM budgets WHERE name >= '' ORDER BY name LIMIT :chunk"
BUDGETS_NEXT = "SELECT name, stamp FROM budgets WHERE name > :name ORDER BY name LIMIT :chunk"
# The stamp again: a row an instance charged since it was read stays (shared database).
DELETE_BUDGET = "DELETE FROM budgets WHERE name = :name AND stamp < :cutoff"


@dataclass(frozen=True)
class Step:
    """What one step of a rule did."""

    deleted: int
    #: Rows it read (at most the chunk; more than ``deleted`` for walked rules).
    looked: int
    #: False once the rule has nothing more to look at in this pass.
    more: bool
    #: Where the rule's next step starts (walked rules only).
    after: tuple[Any, ...] = ()


@dataclass
class PruneCounts:
    """Rows deleted by rule, and pages given back to the file system."""

    superseded_certificates: int = 0
    expired_certificates: int = 0
    finished_orders: int = 0
    budgets: int = 0
    pages: int = 0

    @property
    def rows(self) -> int:
        return sum(getattr(self, rule) for rule in RULES)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def rule_cutoff(rule: str, now: float, retention_days: float) -> float:
    """The moment before which ``rule``'s rows go."""
    return now - (BUDGET_DAYS if rule == BUDGETS else retention_days) * DAY


def prune_step(
    db: StateDB, rule: str, cutoff: float, chunk: int = 1000, after: tuple[Any, ...] = ()
) -> Step:
    """One transaction of ``rule``: look at (walked rules) or delete at most ``chunk`` rows.

    ``after`` is the previous step's :attr:`Step.after` (empty for a rule's first step).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk}")
    with db.transaction() as conn:
        if rule == BUDGETS:
            return _walk_budgets(conn, cutoff, chunk, after)
        if rule == SUPERSEDED:
            deleted = conn.execute(SUPERSEDED_DELETE, {"cutoff": cutoff, "chunk": chunk}).rowcount
        elif rule == EXPIRED:
            deleted = conn.execute(EXPIRED_DELETE, {"cutoff": cutoff, "chunk": chunk}).rowcount
        elif rule == ORDERS:
            deleted = conn.execute(ORDERS_DELETE, {"cutoff": cutoff, "chunk": chunk}).rowcount
        else:
            raise ValueError(f"no pruning rule {rule!r}")
        return Step(deleted, deleted, more=deleted == chunk)


def _walk_budgets(
    conn: Connection, cutoff: float, chunk: int, after: tuple[Any, ...]
) -> Step:
    args: dict[str, Any] = {"chunk": chunk}
    if after:
        args["name"] = after[0]
    rows = conn.execute(BUDGETS_NEXT if after else BUDGETS_FIRST, args).fetchall()
    gone = [
        {"name": r[0], "cutoff": cutoff}
        for r in rows
        if r[1] < cutoff and (r[1] <= 0 or not str(r[0]).startswith(UNTIL_RESET))
    ]
    conn.executemany(DELETE_BUDGET, gone)
    last = (rows[-1][0],) if rows else ()
    return Step(len(gone), len(rows), more=len(rows) == chunk, after=last)


def prune(db: StateDB, now: float, retention_days: float, chunk: int = 1000) -> PruneCounts:
    """Every rule to its end, step after step on the calling thread (for ``csrproxy-admin``)."""
    counts = PruneCounts()
    for rule in RULES:
        step = Step(0, 0, more=True)
        while step.more:
            step = prune_step(db, rule, rule_cutoff(rule, now, retention_days), chunk, step.after)
            setattr(counts, rule, getattr(counts, rule) + step.deleted)
    return counts


def auto_vacuum(db: StateDB) -> str:
    """The database's ``auto_vacuum`` mode: ``none``, ``full`` or ``incremental``
    (``server`` on PostgreSQL, whose autovacuum is the server's business)."""
    if db.dialect is not SQLITE:
        return "server"
    mode = int(db.conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    return {0: "none", 1: "full", 2: "incremental"}.get(mode, str(mode))


def vacuum_step(db: StateDB, pages: int = 2000) -> int:
    """Give at most ``pages`` free pages back to the file system; returns how many it gave.

    Does nothing unless the database is in ``auto_vacuum = INCREMENTAL`` mode.  In WAL mode
    the file shrinks at the next checkpoint.
    """
    with db.transaction() as conn:
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        if free == 0 or auto_vacuum(db) != "incremental":
            return 0
        # Python's sqlite3 steps a statement without result columns once: one page a call.
        for _ in range(min(pages, free)):
            conn.execute("PRAGMA incremental_vacuum(1)")
        return free - int(conn.execute("PRAGMA freelist_count").fetchone()[0])


class Pruner:
    """Runs a pruning pass every ``interval`` seconds from the reactor, one store call a step.

    Passes never overlap.  A failing store ends the pass (logged); the next interval tries
    again.  ``pruned`` and ``pages`` count what all passes did, for the metrics.
    """

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        retention_days: float,
        *,
        interval: float = 6 * 3600.0,
        first_delay: float = 60.0,
        chunk: int = 1000,
        vacuum_pages: int = 2000,
    ) -> None:
        self.store = store
        self.clock = clock
        self.retention_days = retention_days
        self.interval = interval
        self.first_delay = first_delay
        self.chunk = chunk
        self.vacuum_pages = vacuum_pages
        #: Rows deleted since start, by rule (:data:`RULES`).
        self.pruned: collections.Counter[str] = collections.Counter()
        #: Pages given back to the file system since start.
        self.pages = 0
        #: Passes ended by a store failure.
        self.failed_passes = 0
        self._mode: str | None = None
        self._running = False
        self._stopping = False
        self._first: IDelayedCall | None = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        """The first pass after ``first_delay`` seconds, then one every ``interval``."""
        self._stopping = False
        self._first = self.clock.callLater(self.first_delay, self._start_loop)

    def stop(self) -> None:
        """No more passes; a running one ends after its current step."""
        self._stopping = True
        if self._first is not None and self._first.active():
            self._first.cancel()
        self._first = None
        if self._loop.running:
            self._loop.stop()

    def _start_loop(self) -> None:
        self._first = None
        done = self._loop.start(self.interval, now=True)
        done.addErrback(lambda f: log.failure("state pruning stopped", f))

    def _tick(self) -> Deferred[PruneCounts | None]:
        return self.run_pass()

    def run_pass(self) -> Deferred[PruneCounts | None]:
        """One pass now; fires with its counts, or with None at once if a pass is running."""
        if self._running:
            return succeed(None)
        self._running = True
        return Deferred.fromCoroutine(self._pass())

    async def _pass(self) -> PruneCounts:
        try:
            return await self._steps()
        finally:
            self._running = False

    async def _steps(self) -> PruneCounts:
        counts, calls, started = PruneCounts(), 0, self.clock.seconds()
        db = self.store.db
        try:
            for rule in RULES:
                limit = rule_cutoff(rule, started, self.retention_days)
                step = Step(0, 0, more=True)
                while step.more and not self._stopping:
                    step = await self.store.run(prune_step, db, rule, limit, self.chunk, step.after)
                    calls += 1
                    setattr(counts, rule, getattr(counts, rule) + step.deleted)
                    self.pruned[rule] += step.deleted
            if self._mode is None and not self._stopping:
                self._mode = await self.store.run(auto_vacuum, db)
                calls += 1
                if self._mode == "none":
                    log.info(
                        "state database {path} has auto_vacuum=none: pruned space is reused "
                        "but the file does not shrink (a VACUUM after PRAGMA "
                        "auto_vacuum=INCREMENTAL, with csrproxy stopped, changes that)",
                        path=db.where,
                    )
            freed = self.vacuum_pages if self._mode == "incremental" else 0
            while freed == self.vacuum_pages and not self._stopping:
                freed = await self.store.run(vacuum_step, db, self.vacuum_pages)
                calls += 1
                counts.pages += freed
                self.pages += freed
        except Exception as e:
            self.failed_passes += 1
            log.warn(
                "state pruning failed after {calls} store calls: {err}; next pass in "
                "{interval:.0f} s",
                calls=calls,
                err=str(e),
                interval=self.interval,
                **counts.as_dict(),
            )
            return counts
        if counts.rows or counts.pages:
            log.info(
                "state pruned: {superseded_certificates} superseded and "
                "{expired_certificates} expired certificates, {finished_orders} finished "
                "orders, {budgets} budgets; {pages} pages given back ({calls} store calls, "
                "{seconds:.1f} s)",
                calls=calls,
                seconds=self.clock.seconds() - started,
                **counts.as_dict(),
            )
        return counts


class PrunerService(Service):
    """Runs a :class:`Pruner` while the daemon runs."""

    def __init__(self, pruner: Pruner) -> None:
        self.pruner = pruner

    def startService(self) -> None:
        # Not super(): mypy then sees twisted's unannotated method as our untyped call.
        Service.startService(self)
        self.pruner.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.pruner.stop()
