"""Renewal timing and the scheduler, on a Clock, over a real state database."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.issuance.ledger import lifetime_due
from csrproxy.issuance.renewal import (
    BATCH,
    DAY,
    RenewalScheduler,
    is_active,
    next_check_hint,
)
from csrproxy.state.database import CertificateRow, StateDB
from tests.support.renewals import SyncRenewals, add_certificates


def row(renew_at: float | None = None, last: float = 0.0) -> CertificateRow:
    return CertificateRow(
        "c", "k", b"", [], "", "", 0.0, 90 * DAY, last_requested=last, renew_at=renew_at
    )


def temp_db(case: SynchronousTestCase) -> StateDB:
    tmp = tempfile.TemporaryDirectory()
    case.addCleanup(tmp.cleanup)
    db = StateDB(Path(tmp.name) / "state.sqlite3")
    case.addCleanup(db.close)
    return db


class TimingTests(SynchronousTestCase):
    def test_without_ari_between_two_thirds_and_three_quarters(self) -> None:
        rng = random.Random(7)
        times = [lifetime_due(0.0, 90 * DAY, rng) for _ in range(500)]
        self.assertTrue(all(60 * DAY <= t <= 67.5 * DAY for t in times))
        self.assertGreater(max(times) - min(times), 6 * DAY, "not spread")

    def test_active_and_hint(self) -> None:
        self.assertTrue(is_active(row(last=0), 30 * DAY, 30))
        self.assertFalse(is_active(row(last=0), 31 * DAY, 30))
        self.assertEqual(next_check_hint(row(renew_at=10 * DAY), 9 * DAY), DAY)
        self.assertEqual(next_check_hint(row(), 70 * DAY), 60.0)
        self.assertEqual(next_check_hint(row(), 50 * DAY), 10 * DAY)


class SchedulerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.db = temp_db(self)
        self.source = SyncRenewals(self.db)
        self.calls: list[str] = []
        self.result: Deferred[None] | None = None

    def renew(self, c: CertificateRow) -> Deferred[None]:
        self.calls.append(c.id)
        if self.result is not None:
            return self.result
        return succeed(None)

    def scheduler(self, active_days: float = 30.0, max_parallel: int = 4) -> RenewalScheduler:
        s = RenewalScheduler(
            self.clock,
            self.source,
            self.renew,
            interval=3600,
            active_days=active_days,
            max_parallel=max_parallel,
        )
        s.start()
        self.addCleanup(s.stop)
        return s

    def test_renews_when_due_and_not_before(self) -> None:
        add_certificates(self.db, 1, renew_at=60 * DAY, last_requested=59 * DAY)
        s = self.scheduler()
        self.clock.advance(60 * DAY - 1800)
        self.assertEqual(self.calls, [])
        self.clock.advance(3600)
        self.assertEqual(self.calls, ["c0"])
        self.assertEqual(s.renewed, 1)
        self.clock.pump([3600] * 5)
        self.assertEqual(self.calls, ["c0"], "a renewed certificate came back")

    def test_a_certificate_without_a_renewal_time_gets_one(self) -> None:
        add_certificates(self.db, 3, renew_at=None, last_requested=60 * DAY)
        self.scheduler()
        self.clock.advance(3600)
        times = [r[0] for r in self.db.conn.execute("SELECT renew_at FROM certificates")]
        self.assertTrue(all(t is not None and 60 * DAY <= t <= 67.5 * DAY for t in times), times)
        self.assertEqual(self.calls, [])
        self.clock.pump([3600] * 24 * 68)
        self.assertEqual(sorted(self.calls), ["c0", "c1", "c2"])

    def test_no_pass_while_paused(self) -> None:
        add_certificates(self.db, 1, renew_at=60 * DAY, last_requested=59 * DAY)
        s = self.scheduler()
        paused = [True]
        s.paused = lambda: paused[0]
        self.clock.pump([3600] * 24 * 61)
        self.assertEqual(self.calls, [])
        paused[0] = False
        self.clock.advance(3600)
        self.assertEqual(self.calls, ["c0"])

    def test_inactive_installation_is_parked_until_it_asks_again(self) -> None:
        add_certificates(self.db, 1, renew_at=60 * DAY, last_requested=0)
        s = self.scheduler(active_days=30)
        self.clock.pump([3600] * 24 * 61)
        self.assertEqual(self.calls, [])
        self.assertEqual(s.skipped_inactive, 1, "parked once, not skipped every pass")
        self.assertEqual(self.db.due_certificates(62 * DAY, 10), [])
        self.db.touch_certificate("c0", 62 * DAY)  # the installation reads its certificate
        self.clock.advance(3600)
        self.assertEqual(self.calls, ["c0"])

    def test_a_sign_request_unparks_it_too(self) -> None:
        [cid] = add_certificates(self.db, 1, renew_at=60 * DAY, last_requested=0)
        self.scheduler(active_days=30)
        self.clock.pump([3600] * 24 * 61)
        key = self.db.certificate(cid)
        assert key is not None
        self.db.certificate_signed(key.request_key, 61 * DAY, None)
        self.clock.advance(3600)
        self.assertEqual(self.calls, [cid])

    def test_failure_is_retried_later_not_at_once_and_survives_a_restart(self) -> None:
        add_certificates(self.db, 1, renew_at=60 * DAY, last_requested=60 * DAY)
        self.result = fail(RuntimeError("CA down"))
        s = self.scheduler()
        self.clock.advance(60 * DAY + 3600)
        self.assertEqual(self.calls, ["c0"])
        self.assertEqual(s.failed, 1)
        self.result = None
        # The retry time is on record: a new scheduler (a restart) waits for it too.
        s.stop()
        self.scheduler()
        self.clock.advance(3600)
        self.assertEqual(self.calls, ["c0"], "retried at once")
        self.clock.pump([3600] * 12)
        self.assertEqual(self.calls, ["c0", "c0"])

    def test_parallel_renewals_are_bounded(self) -> None:
        add_certificates(self.db, 10, renew_at=60 * DAY, last_requested=60 * DAY)
        self.result = Deferred()
        s = self.scheduler(max_parallel=3)
        self.clock.advance(60 * DAY + 3600)
        self.assertEqual(len(self.calls), 3)
        self.clock.advance(3600)
        self.assertEqual(len(self.calls), 3, "started more while three run")
        self.assertEqual(s.running, 3)

    def test_a_pass_reads_only_what_is_due_not_every_certificate(self) -> None:
        # 5,000 certificates not due and 3 due: the pass reads 3 rows, by the due index.
        add_certificates(self.db, 5000, prefix="later", renew_at=80 * DAY, last_requested=0)
        add_certificates(self.db, 3, prefix="due", renew_at=10 * DAY, last_requested=10 * DAY)
        self.scheduler()
        self.clock.advance(10 * DAY + 3600)
        self.assertEqual(sorted(self.calls), ["due0", "due1", "due2"])
        self.assertLessEqual(max(self.source.due_calls), 3)

    def test_many_inactive_due_are_parked_in_batches_and_active_ones_still_found(self) -> None:
        add_certificates(self.db, 3 * BATCH + 5, prefix="dead", renew_at=1.0, last_requested=0)
        add_certificates(self.db, 1, prefix="live", renew_at=2.0, last_requested=40 * DAY)
        s = self.scheduler(active_days=30)
        self.clock.advance(40 * DAY)
        self.assertEqual(self.calls, ["live0"])
        self.assertEqual(s.skipped_inactive, 3 * BATCH + 5)

    def test_the_oldest_of_more_installations_than_any_batch_is_renewed(self) -> None:
        # No in-memory bound decides what is renewed: the first certificate ever recorded,
        # among more than BATCH * ROUNDS others due later, is still found when it is due.
        add_certificates(self.db, 1, prefix="oldest", renew_at=20 * DAY, last_requested=20 * DAY)
        add_certificates(self.db, 20_000, prefix="n", renew_at=30 * DAY, last_requested=0)
        self.scheduler(max_parallel=1)
        self.clock.advance(20 * DAY + 3600)
        self.assertEqual(self.calls, ["oldest0"])

    def test_pass_observer_hears_each_pass(self) -> None:
        add_certificates(self.db, 2, renew_at=1.0, last_requested=0)
        seen: list[tuple[Any, ...]] = []
        s = RenewalScheduler(
            self.clock,
            self.source,
            self.renew,
            interval=3600,
            on_pass=lambda seconds, started, parked: seen.append((started, parked)),
        )
        s.start()
        self.addCleanup(s.stop)
        self.clock.advance(31 * DAY)
        self.assertEqual(seen[0], (0, 2))

    def test_each_renewal_that_ends_lets_the_next_due_one_start(self) -> None:
        add_certificates(self.db, 40, renew_at=1.0, last_requested=30 * DAY)
        pending: list[Deferred[None]] = []

        def renew(c: Any) -> Deferred[None]:
            self.calls.append(c.id)
            d: Deferred[None] = Deferred()
            pending.append(d)
            return d

        s = RenewalScheduler(self.clock, self.source, renew, interval=3600, max_parallel=4)
        s.start()
        self.addCleanup(s.stop)
        self.clock.advance(30 * DAY)
        self.assertEqual(len(self.calls), 4)
        for _ in range(36):  # each renewal takes 5 s; the interval is an hour
            self.clock.advance(5)
            pending.pop(0).callback(None)
            self.clock.advance(0)
        self.assertEqual(len(set(self.calls)), 40, "throughput was bounded by the interval")
        self.assertLess(self.clock.seconds() - 30 * DAY, 3600)
