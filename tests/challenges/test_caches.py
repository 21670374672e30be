"""Waiting out resolvers' copies of older challenge answers before answering."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.challenges.caches import CacheWait


class CacheWaitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.until: dict[str, float] = {}
        self.waits: list[float] = []

    def wait(self, **kwargs: object) -> CacheWait:
        return CacheWait(self.clock, on_wait=self.waits.append, **kwargs)  # type: ignore[arg-type]

    def answered(self, name: str) -> float:
        return self.until.get(name, 0.0)

    def test_names_never_answered_are_answered_at_once(self) -> None:
        d = self.wait(answered=self.answered).settle(["a.go.example.test"])
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.waits, [])

    def test_a_copy_still_cached_is_waited_out_with_the_margin(self) -> None:
        self.until["_acme-challenge.a.go.example.test"] = 103.0
        # A wildcard's value sits on its base name.
        d = self.wait(answered=self.answered).settle(["*.a.go.example.test", "b.go.example.test"])
        self.assertEqual(self.waits, [4.0])
        self.clock.advance(3.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.successResultOf(d)

    def test_an_expired_copy_costs_nothing(self) -> None:
        self.until["_acme-challenge.a.go.example.test"] = 98.5
        self.successResultOf(self.wait(answered=self.answered).settle(["a.go.example.test"]))
        self.assertEqual(self.waits, [])

    def test_servers_we_do_not_see_cost_one_ttl(self) -> None:
        d = self.wait(unobserved_ttl=1).settle(["a.go.example.test"])
        self.assertEqual(self.waits, [2.0])
        self.clock.advance(2)
        self.successResultOf(d)

    def test_the_longer_of_both_waits(self) -> None:
        self.until["_acme-challenge.a.go.example.test"] = 104.0
        waiter = self.wait(answered=self.answered, unobserved_ttl=1)
        self.assertEqual(waiter.ready_at(["a.go.example.test"]), 105.0)
        self.assertEqual(waiter.ready_at(["c.go.example.test"]), 102.0)
