"""Polling that follows the CA's look-up of a challenge record: the nudge, the zone that
reports look-ups, and obtain_chain's use of both."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.names import dns as tdns
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.client import ACMEClient
from csrproxy.acme.order import OrderRun, PollSchedule, obtain_chain
from csrproxy.acme.response import ACMEResponse
from csrproxy.challenges.watch import WatchedZone
from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.testing.dns import reply_to
from tests.acme.test_client import ACCOUNT_KEY, ACMETestMixin, csr_der

URL = "https://ca.test/authz/1"


class PollNudgeTests(SynchronousTestCase):
    """ACMEClient.poll with a ``nudge``; the CA answers "valid" from poll number ``done_at``."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.client = ACMEClient(self.clock, None, "https://ca.test/dir", ACCOUNT_KEY)  # type: ignore[arg-type]
        self.polls: list[float] = []
        self.done_at = 1

        async def post(
            url: str, body: Any, kind: str, deadline: float | None = None
        ) -> ACMEResponse:
            self.polls.append(self.clock.seconds())
            status = "valid" if len(self.polls) >= self.done_at else "pending"
            return ACMEResponse(url, 200, {}, json.dumps({"status": status}).encode())

        self.client.post = post  # type: ignore[method-assign,assignment]

    def poll(self, nudge: Deferred[float] | None) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(
            self.client.poll(
                URL,
                lambda doc, url: doc,
                lambda d: d["status"] == "valid",
                PollSchedule(1.0, 8.0, 100.0),
                "authz-poll",
                nudge,
            )
        )

    def test_nudge_brings_the_first_poll_forward(self) -> None:
        nudge: Deferred[float] = Deferred()
        d = self.poll(nudge)
        self.clock.advance(0.2)
        nudge.callback(0.3)
        self.clock.advance(0.05)
        self.assertNoResult(d)
        self.clock.advance(0.05)
        self.assertEqual(self.successResultOf(d), {"status": "valid"})
        self.assertEqual(self.polls, [0.3])

    def test_too_early_poll_is_an_extra_one(self) -> None:
        self.done_at = 3
        nudge: Deferred[float] = Deferred()
        d = self.poll(nudge)
        nudge.callback(0.3)
        self.clock.pump([0.3, 0.7, 1.0])
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.successResultOf(d)
        # The schedule goes on as if nothing had happened: 1.0, then 1.0 + 2.0.
        self.assertEqual([round(t, 6) for t in self.polls], [0.3, 1.0, 3.0])

    def test_nudge_that_fired_before_the_wait(self) -> None:
        d = self.poll(succeed(0.0))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), {"status": "valid"})
        self.assertEqual(self.polls, [0.0])

    def test_later_nudge_changes_nothing(self) -> None:
        nudge: Deferred[float] = Deferred()
        d = self.poll(nudge)
        nudge.callback(5.0)
        self.clock.advance(1.0)
        self.successResultOf(d)
        self.assertEqual(self.polls, [1.0])

    def test_nudge_after_the_first_poll_is_ignored(self) -> None:
        self.done_at = 2
        nudge: Deferred[float] = Deferred()
        d = self.poll(nudge)
        self.clock.advance(1.0)
        nudge.callback(1.1)
        self.clock.pump([0.5, 1.0])
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.successResultOf(d)
        self.assertEqual(self.polls, [1.0, 3.0])


class WatchedZoneTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.zone = WatchedZone("go.example.test", ["ns1.go.example.test"], [], ttl=60)
        self.name = "_acme-challenge.a.go.example.test"
        self.key = self.name.encode()

    def test_fires_at_the_txt_lookup_and_answers_as_before(self) -> None:
        self.zone.add_txt(self.name, "v")
        seen = self.zone.watch("a.go.example.test")
        self.failureResultOf(self.zone.lookupText("_acme-challenge.b.go.example.test"))
        self.successResultOf(self.zone.lookupAddress(self.name))
        self.assertNoResult(seen)
        found = self.zone.lookupText(self.name.upper())
        self.assertIsNone(self.successResultOf(seen))
        answers, _, _ = self.successResultOf(found)
        self.assertEqual(len(answers), 1)
        self.assertEqual(self.zone._watches, {})

    def test_fires_for_a_query_through_the_server(self) -> None:
        factory = ZoneServerFactory(Clock(), self.zone)
        self.zone.add_txt(self.name, "v")
        query = tdns.Message(id=1)
        query.queries = [tdns.Query(self.name, tdns.TXT)]
        reply_to(factory, query.toStr())  # cached now
        seen = self.zone.watch("a.go.example.test")
        reply_to(factory, query.toStr())
        self.assertNoResult(seen)  # the answer cache served it, the zone saw nothing
        self.zone.add_txt(self.name, "w")
        reply_to(factory, query.toStr())
        self.assertIsNone(self.successResultOf(seen))

    def test_cancelled_watch_is_forgotten(self) -> None:
        seen = self.zone.watch("a.go.example.test")
        other = self.zone.watch("a.go.example.test")
        seen.cancel()
        self.failureResultOf(seen)
        self.assertEqual(len(self.zone._watches[self.key]), 1)
        other.cancel()
        self.failureResultOf(other)
        self.assertEqual(self.zone._watches, {})


class ObtainWithWatchTests(ACMETestMixin, SynchronousTestCase):
    def test_watch_per_identifier_and_cancelled_at_the_end(self) -> None:
        watched: list[tuple[str, Deferred[float]]] = []

        def watch(identifier: str) -> Deferred[float]:
            d: Deferred[float] = Deferred()
            watched.append((identifier, d))
            return d

        recorded: list[int] = []
        names = ["a.go.example.test", "b.go.example.test"]
        schedule = PollSchedule(0.05, 1.0, self.clock.seconds() + 300)
        run = OrderRun(
            self.make_client(),
            names,
            csr_der(names),
            self.responder,
            schedule,
            on_order=lambda url: recorded.append(len(self.responder.published)),
            watch=watch,
        )
        coro = obtain_chain(run)
        [chain] = self.drive(Deferred.fromCoroutine(coro))
        self.assertTrue(chain.pem)
        self.assertEqual(sorted(i for i, _ in watched), names)
        for _, d in watched:
            self.assertIsNone(self.successResultOf(d))  # cancelled (and swallowed) at the end
        self.assertEqual(recorded, [0], "the order URL is recorded before anything is published")
