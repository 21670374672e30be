"""Budget rows in the state database, directly and through the store's thread."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from csrproxy.state.budgets import budget_recorder, load_budgets, save_budgets
from csrproxy.state.database import OrderRow, StateDB
from csrproxy.state.store import StateDir, Store


def _state_dir(case: SynchronousTestCase) -> StateDir:
    root = Path(tempfile.mkdtemp())
    case.addCleanup(shutil.rmtree, root)
    state = StateDir(root / "state")
    state.prepare()
    return state


class BudgetRowsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = _state_dir(self)
        self.db = self.state.open_db()
        self.addCleanup(self.db.close)

    def test_a_row_replaces_the_one_of_its_name(self) -> None:
        save_budgets(self.db, [("orders", 5.0, 10.0), ("client:a", 1.0, 11.0)])
        save_budgets(self.db, [("orders", 4.0, 12.0)])
        self.assertEqual(
            load_budgets(self.db, 0.0, 10), [("orders", 4.0, 12.0), ("client:a", 1.0, 11.0)]
        )

    def test_newest_first_since_and_limit(self) -> None:
        save_budgets(self.db, [(f"client:{i}", 0.0, float(i)) for i in range(10)])
        self.assertEqual(
            [r[0] for r in load_budgets(self.db, 5.0, 3)], ["client:9", "client:8", "client:7"]
        )
        self.assertEqual(len(load_budgets(self.db, 5.0, 100)), 5, "stamps 5..9")

    def test_prefix_is_a_range_of_names(self) -> None:
        save_budgets(
            self.db,
            [
                ("orders", 1.0, 1.0),
                ("client:a", 1.0, 2.0),
                ("client;", 1.0, 3.0),  # the first name after the range
                ("clients", 1.0, 4.0),
                ("client", 1.0, 5.0),
                ("client:z", 1.0, 6.0),
            ],
        )
        self.assertEqual(
            [r[0] for r in load_budgets(self.db, 0.0, 10, prefix="client:")],
            ["client:z", "client:a"],
        )
        self.assertEqual(
            [r[0] for r in load_budgets(self.db, 0.0, 10, prefix="orders")], ["orders"]
        )

    def test_a_failed_write_records_none_of_its_rows(self) -> None:
        with self.assertRaises(sqlite3.IntegrityError):
            save_budgets(self.db, [("orders", 1.0, 1.0), ("client:a", None, 1.0)])  # type: ignore[list-item]
        self.assertEqual(load_budgets(self.db, 0.0, 10), [])

    def test_rows_written_before_a_crash_are_there(self) -> None:
        """Closed without anything else: what save_budgets returned from is on disk."""
        save_budgets(self.db, [("same-names:a.example.com", 0.0, 100.0)])
        self.db.conn.close()  # no flush, no checkpoint
        again = self.state.open_db()
        self.addCleanup(again.close)
        self.assertEqual(load_budgets(again, 0.0, 10), [("same-names:a.example.com", 0.0, 100.0)])

    def test_rows_written_before_kill_9_are_there(self) -> None:
        self.db.close()
        script = (
            "import os, signal, sys\n"
            "from csrproxy.state.budgets import save_budgets\n"
            "from csrproxy.state.database import StateDB\n"
            "db = StateDB(sys.argv[1])\n"
            "save_budgets(db, [('orders', 3.0, 50.0), ('client:token:ab', 0.0, 51.0)])\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        done = subprocess.run([sys.executable, "-c", script, str(self.db.path)], check=False)
        self.assertEqual(done.returncode, -signal.SIGKILL)
        again = self.state.open_db()
        self.addCleanup(again.close)
        self.assertEqual(
            load_budgets(again, 0.0, 10), [("client:token:ab", 0.0, 51.0), ("orders", 3.0, 50.0)]
        )


class BudgetRecorderTests(TestCase):
    """The daemon's ``persist``: writes on the store's thread, in order with other writes."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.state = _state_dir(self)
        self.store = Store(reactor, self.state.open_db())
        self.store.start()
        self.addCleanup(self.store.stop)

    @defer.inlineCallbacks
    def test_written_on_the_store_thread_before_the_order_row(self) -> Any:
        threads: list[str] = []
        db = self.store.db

        def watched(db: StateDB, rows: list[tuple[str, float, float]]) -> None:
            threads.append(threading.current_thread().name)
            save_budgets(db, rows)

        import csrproxy.state.budgets as budgets

        self.patch(budgets, "save_budgets", watched)
        record = budget_recorder(self.store)
        record([("orders", 249.0, 1000.0), ("same-names:a.example.com", 4.0, 1000.0)])
        yield self.store.run(db.save_order, OrderRow("o1", "rk", b"c", ["a.example.com"]))
        self.assertEqual(len(threads), 1)
        self.assertNotEqual(threads[0], threading.current_thread().name)
        # Committed: another connection (the next run of the daemon) sees the rows.
        other = StateDB(db.path)
        self.addCleanup(other.close)
        self.assertEqual(
            sorted(load_budgets(other, 0.0, 10)),
            [("orders", 249.0, 1000.0), ("same-names:a.example.com", 4.0, 1000.0)],
        )

    @defer.inlineCallbacks
    def test_a_failed_write_is_logged_and_fails_nothing(self) -> Any:
        def failing(db: StateDB, rows: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        import csrproxy.state.budgets as budgets

        self.patch(budgets, "save_budgets", failing)
        record = budget_recorder(self.store)
        with capturedLogs() as events:
            self.assertIsNone(record([("orders", 1.0, 1.0)]))
            yield self.store.run(self.store.db.probe_write)  # FIFO: after the failed one
        self.assertEqual(
            [e["log_format"] for e in events if e.get("log_namespace") == budgets.__name__],
            ["admission budgets not recorded: {err}"],
        )
        self.assertTrue(self.store.healthy, "the next good write made it healthy again")
