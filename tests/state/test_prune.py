"""Pruning the state database: the rules, their chunks and indexes, vacuum, and the Pruner."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from csrproxy.state import prune as prune_module
from csrproxy.state.database import CertificateRow, OrderRow, StateDB
from csrproxy.state.prune import (
    BUDGETS,
    DAY,
    EXPIRED,
    ORDERS,
    SUPERSEDED,
    PruneCounts,
    Pruner,
    PrunerService,
    Step,
    auto_vacuum,
    prune,
    prune_step,
    rule_cutoff,
    vacuum_step,
)
from csrproxy.state.store import Store

NOW = 1_800_000_000.0
RETENTION = 30.0
CUT = NOW - RETENTION * DAY
#: A chain of a realistic size, so that pruning frees pages.
CHAIN = "-----BEGIN CERTIFICATE-----\n" + "A" * 2000 + "\n-----END CERTIFICATE-----\n"


def tmpdir(case: SynchronousTestCase) -> Path:
    d = Path(tempfile.mkdtemp())
    case.addCleanup(shutil.rmtree, d)
    return d


def db_in_mode(path: Path, auto_vacuum: str) -> StateDB:
    """A new state database in this ``auto_vacuum`` mode (fixed before any table exists)."""
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA auto_vacuum = {auto_vacuum}")
    conn.execute("PRAGMA user_version = 0")  # writes the header: the mode is set
    conn.commit()
    conn.close()
    return StateDB(path)


def add_certificate(
    db: StateDB, cid: str, not_after: float, superseded: float | None = None, key: str = "rk"
) -> None:
    db.save_certificate(
        CertificateRow(
            id=cid,
            request_key=key,
            csr=b"csr",
            names=["a.go.example.test"],
            spki_sha256="ab",
            chain=CHAIN,
            not_before=not_after - 90 * DAY,
            not_after=not_after,
            superseded=superseded,
        )
    )


def add_certificates(db: StateDB, rows: Sequence[tuple[str, float, float | None]]) -> None:
    """Many rows in one transaction: (id, not_after, superseded)."""
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO certificates (id, request_key, csr, names, spki_sha256, chain, "
            "not_before, not_after, created, last_requested, superseded) "
            "VALUES (?, 'rk', x'00', '[]', 'ab', ?, 0, ?, 0, 0, ?)",
            [(cid, CHAIN, not_after, superseded) for cid, not_after, superseded in rows],
        )


def add_order(db: StateDB, oid: str, status: str, updated: float) -> None:
    db.save_order(
        OrderRow(oid, "rk", b"csr", ["a.go.example.test"], status=status, updated=updated)
    )


def add_budget(db: StateDB, name: str, stamp: float) -> None:
    with db.transaction() as conn:
        conn.execute("INSERT INTO budgets (name, tokens, stamp) VALUES (?, 1, ?)", (name, stamp))


def ids(db: StateDB, table: str) -> set[str]:
    column = "name" if table == "budgets" else "id"
    return {r[0] for r in db.conn.execute(f"SELECT {column} FROM {table}")}


class RuleTests(SynchronousTestCase):
    """Each rule deletes the rows just before its cutoff and keeps those just after."""

    def setUp(self) -> None:
        self.db = StateDB(tmpdir(self) / "s.sqlite3")
        self.addCleanup(self.db.close)

    def test_superseded_certificate_goes_once_superseded_and_expired_before_the_cutoff(
        self,
    ) -> None:
        add_certificate(self.db, "gone", not_after=CUT - 1, superseded=CUT - 1)
        add_certificate(self.db, "superseded-late", not_after=CUT - 1, superseded=CUT + 1)
        add_certificate(self.db, "still-valid", not_after=CUT + 1, superseded=CUT - 1)
        add_certificate(self.db, "on-the-cutoff", not_after=CUT, superseded=CUT - 1)
        counts = prune(self.db, NOW, RETENTION)
        self.assertEqual(
            ids(self.db, "certificates"), {"superseded-late", "still-valid", "on-the-cutoff"}
        )
        self.assertEqual((counts.superseded_certificates, counts.expired_certificates), (1, 0))

    def test_current_certificate_goes_once_expired_before_the_cutoff(self) -> None:
        add_certificate(self.db, "gone", not_after=CUT - 1)
        add_certificate(self.db, "kept", not_after=CUT + 1)
        add_certificate(self.db, "revoked-gone", not_after=CUT - 1, key="rk2")
        self.db.mark_revoked("revoked-gone", 1)
        counts = prune(self.db, NOW, RETENTION)
        self.assertEqual(ids(self.db, "certificates"), {"kept"})
        self.assertEqual((counts.superseded_certificates, counts.expired_certificates), (0, 2))

    def test_finished_order_goes_once_ended_before_the_cutoff(self) -> None:
        add_order(self.db, "issued-gone", "issued", CUT - 1)
        add_order(self.db, "invalid-gone", "invalid", CUT - 1)
        add_order(self.db, "issued-kept", "issued", CUT + 1)
        add_order(self.db, "invalid-kept", "invalid", CUT + 1)
        for status in ("new", "pending", "ready", "processing", "valid"):
            add_order(self.db, f"{status}-unfinished", status, CUT - 1000 * DAY)
        counts = prune(self.db, NOW, RETENTION)
        self.assertEqual(
            ids(self.db, "orders"),
            {"issued-kept", "invalid-kept"}
            | {f"{s}-unfinished" for s in ("new", "pending", "ready", "processing", "valid")},
        )
        self.assertEqual(counts.finished_orders, 2)

    def test_budget_goes_once_untouched_for_a_week_whatever_the_retention(self) -> None:
        add_budget(self.db, "gone", NOW - 7 * DAY - 1)
        add_budget(self.db, "kept", NOW - 7 * DAY + 1)
        counts = prune(self.db, NOW, retention_days=365)
        self.assertEqual(ids(self.db, "budgets"), {"kept"})
        self.assertEqual(counts.budgets, 1)
        self.assertEqual(rule_cutoff(BUDGETS, NOW, 365), NOW - 7 * DAY)

    def test_failures_in_a_row_stay_until_reset(self) -> None:
        from csrproxy.issuance.admission import CONSECUTIVE, RESET_STAMP
        from csrproxy.state.prune import UNTIL_RESET

        self.assertEqual(UNTIL_RESET, CONSECUTIVE + ":")
        add_budget(self.db, "consecutive-failures:old.example.test", NOW - 400 * DAY)
        add_budget(self.db, "consecutive-failures:reset.example.test", RESET_STAMP)
        add_budget(self.db, "failed-authz:old.example.test", NOW - 7 * DAY - 1)
        counts = prune(self.db, NOW, retention_days=365)
        self.assertEqual(ids(self.db, "budgets"), {"consecutive-failures:old.example.test"})
        self.assertEqual(counts.budgets, 2)

    def test_nothing_to_prune_is_one_step_per_rule_and_no_rows(self) -> None:
        add_certificate(self.db, "kept", not_after=NOW)
        self.assertEqual(prune(self.db, NOW, RETENTION), PruneCounts())
        for rule in (SUPERSEDED, EXPIRED, ORDERS, BUDGETS):
            step = prune_step(self.db, rule, CUT, 10)
            self.assertEqual((step.deleted, step.more), (0, False))

    def test_unknown_rule_and_empty_chunk_are_refused(self) -> None:
        with self.assertRaises(ValueError):
            prune_step(self.db, "everything", CUT)
        with self.assertRaises(ValueError):
            prune_step(self.db, EXPIRED, CUT, chunk=0)


class ChunkTests(SynchronousTestCase):
    """No step touches more than ``chunk`` rows; the steps together delete them all."""

    def setUp(self) -> None:
        self.db = StateDB(tmpdir(self) / "s.sqlite3")
        self.addCleanup(self.db.close)

    def steps(self, rule: str, chunk: int, looked: list[int] | None = None) -> list[int]:
        """Steps of ``rule`` to its end: rows deleted by each (and rows read, into ``looked``)."""
        deleted: list[int] = []
        step = Step(0, 0, more=True)
        while step.more:
            step = prune_step(self.db, rule, rule_cutoff(rule, NOW, RETENTION), chunk, step.after)
            self.assertLessEqual(step.looked, chunk)
            deleted.append(step.deleted)
            if looked is not None:
                looked.append(step.looked)
        return deleted

    def test_expired_certificates_in_chunks(self) -> None:
        add_certificates(self.db, [(f"c{i}", CUT - 1 - i, None) for i in range(2500)])
        add_certificate(self.db, "kept", not_after=CUT + 1)
        self.assertEqual(self.steps(EXPIRED, 1000), [1000, 1000, 500])
        self.assertEqual(ids(self.db, "certificates"), {"kept"})

    def test_finished_orders_in_chunks(self) -> None:
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO orders (id, request_key, csr, names, status, created, updated) "
                "VALUES (?, 'rk', x'00', '[]', 'issued', 0, ?)",
                [(f"o{i}", CUT - 1) for i in range(2000)],
            )
        # Exactly two chunks: a third step finds nothing more.
        self.assertEqual(self.steps(ORDERS, 1000), [1000, 1000, 0])
        self.assertEqual(ids(self.db, "orders"), set())

    def test_superseded_rows_go_in_chunks_past_unexpired_rows_and_ties(self) -> None:
        # 2,500 still valid, then 2,500 sharing one superseded time, every other one expired:
        # the expression index finds exactly the 1,250 that go, 1,000 a step, none missed,
        # and a step's cost does not grow with the rows that stay (no walk past them).
        keep = [(f"valid{i}", CUT + DAY, CUT - 10 * DAY + i) for i in range(2500)]
        tied = [(f"tied{i}", CUT - 1 if i % 2 else CUT + 1, CUT - DAY) for i in range(2500)]
        add_certificates(self.db, keep + tied)
        deleted = self.steps(SUPERSEDED, 1000)
        self.assertEqual(deleted, [1000, 250])
        left = ids(self.db, "certificates")
        self.assertEqual(len(left), 2500 + 1250)
        self.assertTrue(all(f"tied{i}" not in left for i in range(1, 2500, 2)))

    def test_budgets_walk_in_bounded_steps(self) -> None:
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO budgets (name, tokens, stamp) VALUES (?, 1, ?)",
                [(f"b{i:05}", NOW if i % 3 else NOW - 8 * DAY) for i in range(2500)],
            )
        deleted = self.steps(BUDGETS, 1000)
        self.assertEqual(len(deleted), 3)
        self.assertEqual(sum(deleted), 834)
        self.assertEqual(len(ids(self.db, "budgets")), 2500 - 834)


class QueryPlanTests(SynchronousTestCase):
    """Every query searches its index: never a scan of a table, never a sort."""

    def test_every_query_searches_an_index(self) -> None:
        db = StateDB(tmpdir(self) / "s.sqlite3")
        self.addCleanup(db.close)
        add_certificates(db, [(f"c{i}", NOW + i, None if i % 2 else NOW - i) for i in range(200)])
        for i in range(200):
            add_order(db, f"o{i}", ("issued", "invalid", "pending")[i % 3], NOW - i)
            add_budget(db, f"b{i}", NOW - i)
        args = {"cutoff": CUT, "chunk": 10, "superseded": CUT, "rowid": 1, "name": "b"}
        expected = {
            "SUPERSEDED_DELETE": "certificates_gone",
            "EXPIRED_DELETE": "certificates_expiry",
            "ORDERS_DELETE": "orders_finished",
            "BUDGETS_FIRST": "PRIMARY KEY",
            "BUDGETS_NEXT": "PRIMARY KEY",
            "DELETE_BUDGET": "PRIMARY KEY",
        }
        for analyzed in (False, True):
            if analyzed:
                db.conn.execute("ANALYZE")
            for name, index in expected.items():
                sql = getattr(prune_module, name)
                bound = (1,) if "?" in sql else {k: v for k, v in args.items() if f":{k}" in sql}
                plan = [r[3] for r in db.conn.execute(f"EXPLAIN QUERY PLAN {sql}", bound)]
                searches = [line for line in plan if line.startswith(("SEARCH", "SCAN"))]
                self.assertTrue(searches, (name, plan))
                for line in searches:
                    self.assertRegex(line, r"^SEARCH \w+ USING ", (name, plan))
                self.assertIn(index, searches[-1], (name, plan))
                self.assertFalse([line for line in plan if "TEMP B-TREE" in line], (name, plan))


class VacuumTests(SynchronousTestCase):
    def test_incremental_vacuum_shrinks_the_file_in_bounded_steps(self) -> None:
        path = tmpdir(self) / "s.sqlite3"
        db = db_in_mode(path, "INCREMENTAL")
        self.addCleanup(db.close)
        self.assertEqual(auto_vacuum(db), "incremental")
        add_certificates(db, [(f"c{i}", CUT - 1, None) for i in range(3000)])
        add_certificate(db, "kept", not_after=NOW)
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = path.stat().st_size
        self.assertEqual(prune(db, NOW, RETENTION).expired_certificates, 3000)
        free = db.conn.execute("PRAGMA freelist_count").fetchone()[0]
        self.assertGreater(free, 1000)
        steps = [vacuum_step(db, 500)]
        while steps[-1] == 500:
            steps.append(vacuum_step(db, 500))
        self.assertEqual(sum(steps), free)
        self.assertEqual(steps[0], 500)
        self.assertEqual(db.conn.execute("PRAGMA freelist_count").fetchone()[0], 0)
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        after = path.stat().st_size
        self.assertLess(after, before / 4, (before, after))
        self.assertEqual(ids(db, "certificates"), {"kept"})
        self.assertEqual(vacuum_step(db, 500), 0)

    def test_without_incremental_mode_vacuum_does_nothing(self) -> None:
        db = db_in_mode(tmpdir(self) / "s.sqlite3", "NONE")
        self.addCleanup(db.close)
        self.assertEqual(auto_vacuum(db), "none")
        add_certificates(db, [(f"c{i}", CUT - 1, None) for i in range(500)])
        prune(db, NOW, RETENTION)
        free = db.conn.execute("PRAGMA freelist_count").fetchone()[0]
        self.assertGreater(free, 0)
        self.assertEqual(vacuum_step(db, 100), 0)
        self.assertEqual(db.conn.execute("PRAGMA freelist_count").fetchone()[0], free)


class PrunerTests(TestCase):
    """The Pruner on a Clock, its steps on a real store thread (as in test_store)."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.dir = tmpdir(self)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.reactor = reactor

    def store(self, db: StateDB) -> Store:
        store = Store(self.reactor, db)
        store.start()
        self.addCleanup(store.stop)
        return store

    def pruner(self, store: Store, **kwargs: Any) -> tuple[Pruner, list[defer.Deferred[Any]]]:
        """A Pruner, and the list of its passes' ends (a Deferred each) as they start."""
        pruner = Pruner(store, self.clock, RETENTION, interval=3600, first_delay=60, **kwargs)
        passes: list[defer.Deferred[Any]] = []
        real = pruner.run_pass

        def run_pass() -> defer.Deferred[Any]:
            # The caller (the LoopingCall: it schedules the next pass) hears first, the test next.
            outer, ended = defer.Deferred[Any](), defer.Deferred[Any]()
            passes.append(ended)

            def fire(result: Any) -> None:
                outer.callback(result)
                ended.callback(result)

            real().addCallback(fire)
            return outer

        pruner.run_pass = run_pass  # type: ignore[method-assign]
        return pruner, passes

    def calls(self, store: Store) -> list[str]:
        """The names of the functions the store runs, from now on."""
        seen: list[str] = []
        real = store.run

        def run(method: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            seen.append(method.__name__)
            return real(method, *args, **kwargs)

        store.run = run  # type: ignore[method-assign]
        return seen

    @defer.inlineCallbacks
    def test_passes_after_the_first_delay_then_every_interval(self) -> Any:
        store = self.store(db_in_mode(self.dir / "s.sqlite3", "INCREMENTAL"))
        add_certificates(store.db, [(f"c{i}", CUT - 1, None) for i in range(250)])
        add_certificates(store.db, [(f"s{i}", CUT - 1, CUT - 1) for i in range(50)])
        add_order(store.db, "o1", "issued", CUT - 1)
        add_budget(store.db, "b", NOW - 8 * DAY)
        pruner, passes = self.pruner(store, chunk=100, vacuum_pages=20)
        calls = self.calls(store)
        service = PrunerService(pruner)
        service.startService()
        self.addCleanup(service.stopService)
        self.clock.advance(59)
        self.assertEqual(passes, [])
        with capturedLogs() as events:
            self.clock.advance(1)
            counts = yield passes[0]
        self.assertEqual(
            (counts.superseded_certificates, counts.expired_certificates),
            (50, 250),
        )
        self.assertEqual((counts.finished_orders, counts.budgets), (1, 1))
        self.assertGreater(counts.pages, 20, "vacuumed in several steps")
        self.assertEqual(
            calls[:6],
            ["prune_step"] * 6,  # 1 superseded, then 100 + 100 + 50 expired, 1 order, 1 budget
        )
        self.assertEqual(calls[6], "auto_vacuum")
        self.assertEqual(set(calls[7:]), {"vacuum_step"})
        self.assertEqual(store.db.conn.execute("PRAGMA freelist_count").fetchone()[0], 0)
        self.assertEqual(
            dict(pruner.pruned),
            {SUPERSEDED: 50, EXPIRED: 250, ORDERS: 1, BUDGETS: 1},
        )
        self.assertEqual(pruner.pages, counts.pages)
        [line] = [e for e in events if e.get("log_namespace") == prune_module.__name__]
        self.assertEqual(line["log_level"], LogLevel.info)
        self.assertEqual((line["expired_certificates"], line["pages"]), (250, counts.pages))
        self.assertEqual(line["calls"], len(calls))

        # Nothing left: the next pass an interval later logs nothing (one look at the free list).
        del calls[:]
        with capturedLogs() as events:
            self.clock.advance(3599)
            self.assertEqual(len(passes), 1)
            self.clock.advance(1)
            counts = yield passes[1]
        self.assertEqual(counts, PruneCounts())
        self.assertEqual(calls, ["prune_step"] * 4 + ["vacuum_step"])
        self.assertEqual([e for e in events if e.get("log_namespace") == prune_module.__name__], [])

    @defer.inlineCallbacks
    def test_database_without_incremental_vacuum_is_said_once(self) -> Any:
        store = self.store(db_in_mode(self.dir / "s.sqlite3", "NONE"))
        add_certificate(store.db, "gone", not_after=CUT - 1)
        pruner, _ = self.pruner(store)
        calls = self.calls(store)
        with capturedLogs() as events:
            first = yield pruner.run_pass()
            add_certificate(store.db, "gone-too", not_after=CUT - 1)
            second = yield pruner.run_pass()
        self.assertEqual((first.expired_certificates, second.expired_certificates), (1, 1))
        self.assertEqual((first.pages, second.pages), (0, 0))
        self.assertNotIn("vacuum_step", calls)
        said = [e for e in events if "auto_vacuum=none" in e.get("log_format", "")]
        self.assertEqual(len(said), 1)
        self.assertEqual(calls.count("auto_vacuum"), 1)

    @defer.inlineCallbacks
    def test_never_two_passes_at_once(self) -> Any:
        store = self.store(StateDB(self.dir / "s.sqlite3"))
        add_certificates(store.db, [(f"c{i}", CUT - 1, None) for i in range(30)])
        pruner, _ = self.pruner(store, chunk=10)
        calls = self.calls(store)
        first = pruner.run_pass()
        second = pruner.run_pass()
        self.assertIsNone(self.successResultOf(second))
        counts = yield first
        self.assertEqual(counts.expired_certificates, 30)
        self.assertEqual(calls.count("prune_step"), 1 + 4 + 1 + 1)
        again = yield pruner.run_pass()
        self.assertEqual(again, PruneCounts())

    @defer.inlineCallbacks
    def test_a_failing_store_ends_the_pass_and_the_next_interval_tries_again(self) -> Any:
        store = self.store(StateDB(self.dir / "s.sqlite3"))
        add_certificate(store.db, "gone", not_after=CUT - 1)
        add_order(store.db, "o1", "issued", CUT - 1)
        pruner, passes = self.pruner(store)
        real = prune_module.prune_step

        def failing(db: StateDB, rule: str, *args: Any) -> Any:
            if rule == ORDERS:
                raise sqlite3.OperationalError("disk I/O error")
            return real(db, rule, *args)

        self.patch(prune_module, "prune_step", failing)
        pruner.start()
        self.addCleanup(pruner.stop)
        with capturedLogs() as events:
            self.clock.advance(60)
            counts = yield passes[0]
        self.assertEqual((counts.expired_certificates, counts.finished_orders), (1, 0))
        self.assertEqual(pruner.failed_passes, 1)
        self.assertFalse(store.healthy)
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("disk I/O error", warning["err"])
        self.assertEqual(warning["expired_certificates"], 1)

        self.patch(prune_module, "prune_step", real)
        self.clock.advance(3600)
        counts = yield passes[1]
        self.assertEqual(counts.finished_orders, 1)
        self.assertTrue(store.healthy)
        self.assertEqual(ids(store.db, "orders"), set())

    @defer.inlineCallbacks
    def test_stop_ends_a_pass_after_its_current_step_and_cancels_the_timers(self) -> Any:
        store = self.store(StateDB(self.dir / "s.sqlite3"))
        add_certificates(store.db, [(f"c{i}", CUT - 1, None) for i in range(30)])
        pruner, passes = self.pruner(store, chunk=10)
        calls = self.calls(store)
        service = PrunerService(pruner)
        service.startService()
        self.clock.advance(60)
        self.assertEqual(len(calls), 1)
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        counts = yield passes[0]
        self.assertEqual(calls, ["prune_step"])
        self.assertEqual(counts.rows, 0)
        self.clock.advance(10 * 3600)
        self.assertEqual(len(passes), 1)

    def test_stop_before_the_first_pass_cancels_it(self) -> None:
        pruner = Pruner(None, self.clock, RETENTION)  # type: ignore[arg-type]
        pruner.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        pruner.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
