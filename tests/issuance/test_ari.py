"""ARI look-ups: bounded, paced, kept in the database, moving the renewal time."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.issuance.ari import AriPoller, AriRow, Window
from csrproxy.state.database import StateDB
from tests.support.renewals import DAY, SyncRenewals, add_certificates

HOUR = 3600.0


class AriPollerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(10 * DAY)
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.db = StateDB(Path(tmp.name) / "s.sqlite3")
        self.addCleanup(self.db.close)
        self.source = SyncRenewals(self.db)
        self.pending: list[Deferred[Window | None]] = []
        self.asked: list[float] = []
        self.answer: Window | Exception | str | None = "hold"

    def fetch(self, chain: str, ca: str | None = None) -> Deferred[Window | None]:
        self.asked.append(self.clock.seconds())
        if isinstance(self.answer, Exception):
            return fail(self.answer)
        if self.answer == "hold":
            d: Deferred[Window | None] = Deferred()
            self.pending.append(d)
            return d
        assert not isinstance(self.answer, str)
        return succeed(self.answer)

    def poller(self, **kwargs: float) -> AriPoller:
        p = AriPoller(
            self.clock,
            self.source,
            self.fetch,
            parallel=int(kwargs.pop("parallel", 4)),
            per_second=kwargs.pop("per_second", 20.0),
            recheck=kwargs.pop("recheck", 6 * HOUR),
            idle=kwargs.pop("idle", 60.0),
            rng=random.Random(3),
        )
        p.start()
        self.addCleanup(p.stop)
        return p

    def row(self, cid: str) -> tuple[float | None, float | None, float | None, float | None]:
        r = self.db.certificate(cid)
        assert r is not None
        return r.ari_start, r.ari_end, r.ari_next, r.renew_at

    def test_never_more_than_parallel_look_ups_at_once(self) -> None:
        add_certificates(self.db, 100, ari_next=0.0, last_requested=10 * DAY)
        self.poller(parallel=3, per_second=1000)
        self.clock.pump([0.01] * 500)
        self.assertEqual(len(self.pending), 3)
        self.pending.pop(0).callback((20 * DAY, 21 * DAY, None))
        self.clock.pump([0.01] * 10)
        self.assertEqual(len(self.asked), 4)
        self.assertEqual(len(self.pending), 3)

    def test_paced_a_million_certificates_never_ask_at_once(self) -> None:
        add_certificates(self.db, 500, ari_next=0.0, last_requested=10 * DAY)
        self.answer = (20 * DAY, 21 * DAY, None)
        self.poller(parallel=4, per_second=10)
        start = self.clock.seconds()
        self.clock.pump([0.05] * 200)  # 10 s
        self.assertTrue(95 <= len(self.asked) <= 105, len(self.asked))
        gaps = [b - a for a, b in zip(self.asked, self.asked[1:], strict=False)]
        self.assertGreaterEqual(min(gaps), 0.1 - 1e-9)
        self.assertLessEqual(self.asked[0] - start, 0.1)

    def test_a_new_window_moves_the_renewal_time_into_it_and_is_kept(self) -> None:
        [cid] = add_certificates(self.db, 1, ari_next=0.0, renew_at=60 * DAY, last_requested=0)
        self.answer = (20 * DAY, 21 * DAY, 2 * HOUR)
        self.poller(recheck=6 * HOUR)
        self.clock.advance(1)
        start, end, next_look, renew_at = self.row(cid)
        self.assertEqual((start, end), (20 * DAY, 21 * DAY))
        assert renew_at is not None and next_look is not None
        self.assertTrue(20 * DAY <= renew_at <= 21 * DAY, renew_at / DAY)
        # At least ari_recheck (6 h) away, though Retry-After said 2 h; jittered by 10%.
        wait = next_look - self.clock.seconds()
        self.assertTrue(0.9 * 6 * HOUR - 1 <= wait <= 1.1 * 6 * HOUR, wait / HOUR)
        self.assertEqual(len(self.asked), 1)
        self.clock.pump([60.0] * 60 * 5)  # five hours: not asked again
        self.assertEqual(len(self.asked), 1)
        self.clock.pump([60.0] * 60 * 2)
        self.assertEqual(len(self.asked), 2)
        # The same window again: the renewal time stays where it was.
        self.assertEqual(self.row(cid)[3], renew_at)

    def test_a_longer_retry_after_is_followed(self) -> None:
        [cid] = add_certificates(self.db, 1, ari_next=0.0, last_requested=0)
        self.answer = (20 * DAY, 21 * DAY, 24 * HOUR)
        self.poller(recheck=6 * HOUR)
        self.clock.advance(1)
        next_look = self.row(cid)[2]
        assert next_look is not None
        self.assertGreater(next_look - self.clock.seconds(), 0.9 * 24 * HOUR - 2)

    def test_failures_keep_the_window_and_look_again_sooner(self) -> None:
        [cid] = add_certificates(self.db, 1, ari_next=0.0, renew_at=60 * DAY, last_requested=0)
        self.answer = RuntimeError("CA down")
        p = self.poller(recheck=4 * HOUR)
        self.clock.advance(1)
        self.assertEqual(p.failures, 1)
        start, end, next_look, renew_at = self.row(cid)
        self.assertEqual((start, end, renew_at), (None, None, 60 * DAY))
        assert next_look is not None
        self.assertTrue(0.8 * HOUR < next_look - self.clock.seconds() < 1.2 * HOUR)

    def test_without_ari_nobody_asks_until_the_recheck(self) -> None:
        add_certificates(self.db, 50, ari_next=0.0, last_requested=0)
        self.answer = None
        self.poller(recheck=6 * HOUR, per_second=1000)
        self.clock.pump([1.0] * 600)
        self.assertLessEqual(len(self.asked), 4, "one per worker, then they wait")

    def test_nothing_due_means_one_query_a_minute_not_a_busy_loop(self) -> None:
        add_certificates(self.db, 5, ari_next=20 * DAY, last_requested=0)
        calls = [0]
        due = self.source.ari_due

        def counted(now: float, limit: int) -> Deferred[list[AriRow]]:
            calls[0] += 1
            return due(now, limit)

        self.source.ari_due = counted  # type: ignore[method-assign]
        self.poller(parallel=4, idle=60)
        self.clock.pump([1.0] * 600)
        self.assertLessEqual(calls[0], 4 * 11)
        self.assertEqual(self.asked, [])

    def test_parked_superseded_and_revoked_certificates_are_not_asked_about(self) -> None:
        ids = add_certificates(self.db, 3, ari_next=0.0, last_requested=0)
        self.db.park([ids[0]])
        with self.db.transaction() as conn:
            conn.execute("UPDATE certificates SET superseded = 1 WHERE id = ?", (ids[1],))
            conn.execute("UPDATE certificates SET revoked = 1 WHERE id = ?", (ids[2],))
        self.answer = (1.0, 2.0, None)
        self.poller()
        self.clock.pump([1.0] * 10)
        self.assertEqual(self.asked, [])

    def test_paused_while_the_ca_is_failing(self) -> None:
        add_certificates(self.db, 5, ari_next=0.0, last_requested=0)
        self.answer = (1.0, 2.0, None)
        failing = [True]
        p = AriPoller(self.clock, self.source, self.fetch, idle=30.0, paused=lambda: failing[0])
        p.start()
        self.addCleanup(p.stop)
        self.clock.pump([1.0] * 100)
        self.assertEqual(self.asked, [])
        failing[0] = False
        self.clock.pump([1.0] * 40)
        self.assertEqual(len(self.asked), 5)
