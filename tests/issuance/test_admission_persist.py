"""Admission budgets survive restarts: each change is persisted, start-up restores it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.errors import RateLimited
from csrproxy.issuance.admission import (
    HOUR,
    THREE_HOURS,
    WEEK,
    Admission,
    BucketMap,
    BudgetRow,
    Budgets,
)
from csrproxy.state.budgets import load_budgets, save_budgets
from csrproxy.state.database import StateDB
from csrproxy.state.store import StateDir

NAMES = ["a.go.example.com", "b.go.example.com"]


class PersistTests(SynchronousTestCase):
    """What ``persist`` hears: once per change, exactly the buckets it touched."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.calls: list[list[BudgetRow]] = []

    def admission(self, budgets: Budgets) -> Admission:
        return Admission(self.clock.seconds, budgets, "example.com", persist=self.calls.append)

    def test_one_call_per_admit_with_the_changed_buckets(self) -> None:
        a = self.admission(Budgets(45, 250, 5, 60))
        a.admit_client("token:ab")
        self.assertEqual(self.calls, [[("client:token:ab", 59.0, 1000.0)]])
        self.calls.clear()
        self.clock.advance(5)
        a.admit_order(["b.go.example.com", "a.go.example.com", "c.other.org"], True)
        self.assertEqual(
            self.calls,
            [
                [
                    ("orders", 249.0, 1005.0),
                    ("same-names:a.go.example.com,b.go.example.com,c.other.org", 4.0, 1005.0),
                    ("new-names:example.com", 44.0, 1005.0),
                    ("new-names:other.org", 44.0, 1005.0),
                ]
            ],
        )

    def test_a_renewal_charges_only_the_same_names(self) -> None:
        a = self.admission(Budgets(45, 250, 5, 0))
        a.admit_order(NAMES, False)
        [rows] = self.calls
        self.assertEqual([name for name, _, _ in rows], [f"same-names:{','.join(NAMES)}"])

    def test_failed_and_valid_authorizations_are_persisted(self) -> None:
        a = self.admission(Budgets(0, 0, 0, 0, 5, 1152))
        a.admit_order(NAMES, True)  # only checked: nothing to write
        self.assertEqual(self.calls, [])
        a.authorization_failed("*.A.go.example.com")
        self.assertEqual(
            self.calls,
            [[("failed-authz:a.go.example.com", 4.0, 1000.0),
              ("consecutive-failures:a.go.example.com", 1151.0, 1000.0)]],
        )  # fmt: skip
        self.calls.clear()
        a.authorizations_valid(NAMES)  # b never failed: no row for it
        self.assertEqual(self.calls, [[("consecutive-failures:a.go.example.com", 1152.0, 0.0)]])
        self.calls.clear()
        a.authorizations_valid(NAMES)  # nothing to reset any more
        self.assertEqual(self.calls, [])

    def test_refund_is_persisted_without_the_orders_budget(self) -> None:
        a = self.admission(Budgets(45, 250, 5, 0))
        refund = a.admit_order(NAMES, True)
        self.calls.clear()
        self.clock.advance(10)
        refund()
        self.assertEqual(
            self.calls,
            [
                [
                    (f"same-names:{','.join(NAMES)}", 5.0, 1010.0),
                    ("new-names:example.com", 45.0, 1010.0),
                ]
            ],
        )

    def test_refusals_and_budgets_turned_off_persist_nothing(self) -> None:
        a = self.admission(Budgets(0, 1, 0, 0))
        refund = a.admit_order(NAMES, True)
        self.calls.clear()
        with self.assertRaises(RateLimited):
            a.admit_order(NAMES, True)
        refund()  # only the orders budget is on, and it is not given back
        off = self.admission(Budgets(0, 0, 0, 0))
        off.admit_client("c")
        off.admit_order(NAMES, True)()
        self.assertEqual(self.calls, [])


class RestoreTests(SynchronousTestCase):
    """A new Admission rebuilt from what the old one wrote."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)

    def restarted(self, rows: list[BudgetRow], budgets: Budgets) -> Admission:
        a = Admission(self.clock.seconds, budgets, "example.com")
        a.restore(rows)
        return a

    def test_spent_stays_spent_and_refills_from_the_stamp(self) -> None:
        rows: list[BudgetRow] = []
        budgets = Budgets(0, 0, 2, 0)
        a = Admission(self.clock.seconds, budgets, persist=rows.extend)
        a.admit_order(NAMES, False)
        a.admit_order(NAMES, False)
        self.clock.advance(WEEK / 4)  # down for a while: a quarter of the period
        b = self.restarted(rows, budgets)
        with self.assertRaises(RateLimited) as e:
            b.admit_order(NAMES, False)
        self.assertEqual(e.exception.reason, "same-names")
        self.assertAlmostEqual(e.exception.retry_after, WEEK / 4, msg="half a period per token")
        self.clock.advance(WEEK / 4)
        b.admit_order(NAMES, False)

    def test_every_kind_of_bucket_is_restored(self) -> None:
        now = self.clock.seconds()
        for name, names, new, reason in [
            ("orders", ["x.other.org"], True, "orders"),
            ("same-names:a.example.com", ["a.example.com"], False, "same-names"),
            ("new-names:example.com", ["z.example.com"], True, "new-names"),
        ]:
            b = self.restarted([(name, 0.0, now)], Budgets(1, 1, 1, 1))
            with self.assertRaises(RateLimited) as e:
                b.admit_order(names, new)
            self.assertEqual(e.exception.reason, reason)
            if reason != "orders":
                b.admit_order(["y.other.org"], True)  # only that bucket is spent
        b = self.restarted([("client:token:ab", 0.0, now)], Budgets(1, 1, 1, 1))
        self.assertRaises(RateLimited, b.admit_client, "token:ab")
        b.admit_client("token:cd")

    def test_a_lowered_capacity_clamps(self) -> None:
        now = self.clock.seconds()
        # Stored under a budget of 10 with 8 left; the operator lowered it to 3.
        b = self.restarted([("orders", 8.0, now)], Budgets(0, 3, 0, 0))
        for _ in range(3):
            b.admit_order(NAMES, True)
        with self.assertRaises(RateLimited) as e:
            b.admit_order(NAMES, True)
        self.assertAlmostEqual(e.exception.retry_after, THREE_HOURS / 3, msg="the new rate")

    def test_ignored_rows(self) -> None:
        now = self.clock.seconds()
        rows: list[BudgetRow] = [
            ("orders", 0.0, now),  # the orders budget is off now
            ("who-knows:x", 0.0, now),
            ("client", 0.0, now),  # no key
            ("client:nan", float("nan"), now),
            ("client:old", 0.0, now - HOUR),  # full again
        ]
        a = Admission(self.clock.seconds, Budgets(0, 0, 0, 1))
        self.assertEqual(a.restore(rows), 0)
        for client in ["nan", "old", "x"]:
            a.admit_client(client)

    def test_a_stamp_from_the_future_counts_from_now(self) -> None:
        # The clock went back an hour since the row was written: refill starts now.
        now = self.clock.seconds()
        b = self.restarted([("client:c", 0.0, now + HOUR)], Budgets(0, 0, 0, 60))
        self.clock.advance(60)
        b.admit_client("c")

    def test_newest_max_keys_rows_per_budget(self) -> None:
        now = self.clock.seconds()
        a = Admission(self.clock.seconds, Budgets(0, 0, 0, 1))
        a._keyed["client"] = BucketMap(1, HOUR, max_keys=3)
        rows: list[BudgetRow] = [(f"client:{i}", 0.0, now - 100 + i) for i in range(10)]
        self.assertEqual(a.restore(reversed(rows)), 3)
        for i in range(7, 10):
            self.assertRaises(RateLimited, a.admit_client, str(i))
        a.admit_client("0")  # forgotten: full

    def test_restore_queries(self) -> None:
        now = self.clock.seconds()
        a = Admission(self.clock.seconds, Budgets(45, 250, 0, 60))
        self.assertEqual(
            a.restore_queries(),
            [
                ("orders", now - THREE_HOURS, 1),
                ("new-names:", now - WEEK, 100_000),
                ("client:", now - HOUR, 100_000),
                ("failed-authz:", now - HOUR, 100_000),
                ("consecutive-failures:", 0.0, 100_000),  # never refilled: every row
            ],
        )


class RestartTests(SynchronousTestCase):
    """Through a real state database: write, "restart" (a new connection), restore."""

    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, root)
        self.state = StateDir(root / "state")
        self.state.prepare()
        self.clock = Clock()
        self.clock.advance(1_000_000)

    def run_admission(self, budgets: Budgets) -> tuple[Admission, StateDB]:
        """The daemon's start-up: open the database, restore, then persist each change."""
        self.restored = 0
        db = self.state.open_db()
        self.addCleanup(db.close)
        a = Admission(
            self.clock.seconds, budgets, "example.com", persist=lambda rows: save_budgets(db, rows)
        )
        for prefix, since, limit in a.restore_queries():
            self.restored += a.restore(load_budgets(db, since, limit, prefix=prefix))
        return a, db

    def test_spent_budgets_survive_a_crash(self) -> None:
        budgets = Budgets(2, 3, 1, 2)
        first, db = self.run_admission(budgets)
        first.admit_client("token:ab")
        first.admit_client("token:ab")
        first.admit_order(["a.go.example.com"], True)
        refund = first.admit_order(["b.go.example.com"], True)
        refund()  # that order failed: its same-names and new-names charges come back
        db.conn.close()  # killed: nothing more is written
        self.clock.advance(60)
        again, _ = self.run_admission(budgets)
        self.assertEqual(self.restored, 4, "b's same-names was refunded full")
        with self.assertRaises(RateLimited) as e:
            again.admit_client("token:ab")
        self.assertEqual(e.exception.reason, "client")
        self.assertAlmostEqual(e.exception.retry_after, HOUR / 2 - 60)
        with self.assertRaises(RateLimited) as e:
            again.admit_order(["a.go.example.com"], False)
        self.assertEqual(e.exception.reason, "same-names")
        again.admit_order(["b.go.example.com"], True)  # refunded before the crash
        with self.assertRaises(RateLimited) as e:
            again.admit_order(["c.go.example.com"], True)
        self.assertEqual(e.exception.reason, "orders", "three orders in all, refund or not")

    def test_a_pause_survives_a_restart_and_a_week(self) -> None:
        budgets = Budgets(0, 0, 0, 0, 0, 2)
        first, _ = self.run_admission(budgets)
        first.authorization_failed("p.go.example.com")
        first.authorization_failed("p.go.example.com")
        self.clock.advance(WEEK * 10)
        again, _ = self.run_admission(budgets)
        self.assertEqual(self.restored, 1)
        with self.assertRaises(RateLimited) as e:
            again.admit_order(["p.go.example.com"], True)
        self.assertEqual(e.exception.reason, "paused")
        self.assertIsNone(e.exception.retry_after)
        again.authorizations_valid(["p.go.example.com"])  # the reset is written stamped 0
        third, _ = self.run_admission(budgets)
        self.assertEqual(self.restored, 0)
        third.admit_order(["p.go.example.com"], True)

    def test_a_week_later_nothing_is_loaded(self) -> None:
        budgets = Budgets(1, 1, 1, 1)
        first, db = self.run_admission(budgets)
        first.admit_client("c")
        first.admit_order(["a.go.example.com"], True)
        db.close()
        self.clock.advance(WEEK)
        again, _ = self.run_admission(budgets)
        self.assertEqual(self.restored, 0)
        again.admit_client("c")
        again.admit_order(["b.go.example.com"], True)
