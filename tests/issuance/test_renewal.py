"""Renewal timing and the scheduler, driven by a Clock."""

from __future__ import annotations

import random

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.issuance.renewal import (
    DAY,
    Renewable,
    RenewalScheduler,
    due_at,
    is_active,
    next_check_hint,
)


def cert(
    cid: str = "c1", last: float = 0.0, window: tuple[float, float] | None = None
) -> Renewable:
    return Renewable(cid, not_before=0.0, not_after=90 * DAY, last_requested=last, window=window)


class TimingTests(SynchronousTestCase):
    def test_without_ari_between_two_thirds_and_three_quarters(self) -> None:
        rng = random.Random(7)
        for _ in range(200):
            t = due_at(cert(), rng)
            self.assertTrue(60 * DAY <= t <= 67.5 * DAY, t / DAY)

    def test_ari_window_wins_and_is_spread(self) -> None:
        rng = random.Random(7)
        times = [due_at(cert(window=(10 * DAY, 11 * DAY)), rng) for _ in range(200)]
        self.assertTrue(all(10 * DAY <= t <= 11 * DAY for t in times))
        self.assertGreater(max(times) - min(times), 0.8 * DAY, "not spread over the window")

    def test_active_and_hint(self) -> None:
        self.assertTrue(is_active(cert(last=0), 30 * DAY, 30))
        self.assertFalse(is_active(cert(last=0), 31 * DAY, 30))
        self.assertEqual(next_check_hint(cert(window=(10 * DAY, 11 * DAY)), 9 * DAY), DAY)
        self.assertEqual(next_check_hint(cert(), 70 * DAY), 60.0)


class SchedulerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.certs: list[Renewable] = []
        self.calls: list[str] = []
        self.result: Deferred[None] | None = None

    def renew(self, c: Renewable) -> Deferred[None]:
        self.calls.append(c.id)
        return self.result if self.result is not None else succeed(None)

    def scheduler(self, active_days: float = 30.0, max_parallel: int = 4) -> RenewalScheduler:
        s = RenewalScheduler(
            self.clock,
            lambda: self.certs,
            self.renew,
            interval=3600,
            rng=random.Random(1),
            active_days=active_days,
            max_parallel=max_parallel,
        )
        s.start()
        self.addCleanup(s.stop)
        return s

    def test_renews_when_due_and_not_before(self) -> None:
        self.certs = [Renewable("a", 0, 90 * DAY, last_requested=59 * DAY)]
        s = self.scheduler()
        self.clock.advance(59 * DAY)
        self.clock.advance(3600)
        self.assertEqual(self.calls, [])
        self.clock.pump([3600] * 24 * 9)  # up to day 68
        self.assertEqual(self.calls, ["a"])
        self.assertEqual(s.renewed, 1)

    def test_no_pass_while_paused(self) -> None:
        self.certs = [Renewable("a", 0, 90 * DAY, last_requested=59 * DAY)]
        s = self.scheduler()
        paused = [True]
        s.paused = lambda: paused[0]
        self.clock.pump([3600] * 24 * 70)  # past its due time, the CA failing all along
        self.assertEqual(self.calls, [])
        paused[0] = False
        self.clock.advance(3600)
        self.assertEqual(self.calls, ["a"])

    def test_inactive_installation_is_not_renewed(self) -> None:
        self.certs = [Renewable("dead", 0, 90 * DAY, last_requested=0)]
        s = self.scheduler(active_days=30)
        self.clock.pump([3600] * 24 * 80)
        self.assertEqual(self.calls, [])
        self.assertGreater(s.skipped_inactive, 0)

    def test_failure_is_retried_later_not_at_once(self) -> None:
        self.certs = [
            Renewable("a", 0, 90 * DAY, last_requested=60 * DAY, window=(60 * DAY, 60 * DAY))
        ]
        self.result = fail(RuntimeError("CA down"))
        self.scheduler()
        self.clock.advance(60 * DAY)
        self.clock.advance(3600)
        self.assertEqual(self.calls, ["a"])
        self.result = None
        self.clock.advance(3600)
        self.assertEqual(self.calls, ["a"], "retried at once")
        self.clock.pump([3600] * 12)
        self.assertEqual(self.calls, ["a", "a"])

    def test_parallel_renewals_are_bounded(self) -> None:
        self.certs = [
            Renewable(f"c{i}", 0, 90 * DAY, last_requested=60 * DAY, window=(60 * DAY, 60 * DAY))
            for i in range(10)
        ]
        self.result = Deferred()
        self.scheduler(max_parallel=3)
        self.clock.advance(60 * DAY + 3600)
        self.assertEqual(len(self.calls), 3)


class WindowTests(SynchronousTestCase):
    def test_fetched_once_then_after_retry_after(self) -> None:
        from csrproxy.issuance.renewal import RenewalWindows

        clock = Clock()
        calls: list[str] = []
        pending: list[Deferred[tuple[float, float, float | None] | None]] = []

        def fetch(pem: str) -> Deferred[tuple[float, float, float | None] | None]:
            calls.append(pem)
            d: Deferred[tuple[float, float, float | None] | None] = Deferred()
            pending.append(d)
            return d

        w = RenewalWindows(clock, fetch)
        self.assertIsNone(w.lookup("k", "PEM"))
        self.assertIsNone(w.lookup("k", "PEM"))
        self.assertEqual(len(calls), 1, "fetched twice while busy")
        pending.pop().callback((10.0, 20.0, 100.0))
        self.assertEqual(w.lookup("k", "PEM"), (10.0, 20.0))
        self.assertEqual(len(calls), 1)
        clock.advance(101)
        w.lookup("k", "PEM")
        self.assertEqual(len(calls), 2)
        pending.pop().errback(RuntimeError("CA down"))
        self.assertEqual(w.lookup("k", "PEM"), (10.0, 20.0), "a failure forgot the window")

    def test_scheduler_follows_a_new_window(self) -> None:
        clock = Clock()
        calls: list[str] = []
        certs = [Renewable("c", 0, 90 * DAY, last_requested=0)]

        def renew(c: Renewable) -> Deferred[None]:
            calls.append(c.key or c.id)
            return succeed(None)

        s = RenewalScheduler(clock, lambda: certs, renew, interval=3600, rng=random.Random(1))
        s.start()
        self.addCleanup(s.stop)
        clock.advance(3600)  # due computed from the lifetime (day 60+)
        certs[0] = Renewable("c", 0, 90 * DAY, 0, window=(2 * 3600, 2 * 3600), key="lineage")
        clock.advance(3600)
        clock.advance(3600)
        self.assertEqual(calls, ["lineage"])
