"""The answer log: until when a cache may hold what we answered for a challenge name."""

from __future__ import annotations

import dns.message
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.dns.answered import AnswerLog, wire_name
from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.zone import ChallengeZone
from csrproxy.testing.dns import reply_to

ORIGIN = "go.example.test"
NAME = "_acme-challenge.a.go.example.test"


def query(name: str, rdtype: str = "TXT") -> bytes:
    return dns.message.make_query(name, rdtype).to_wire()


class AnswerLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.ttl = 5.0
        self.log = AnswerLog(self.clock.seconds, lambda: self.ttl, max_names=3)

    def test_a_name_never_answered_is_free(self) -> None:
        self.assertEqual(self.log.until(NAME), 0.0)

    def test_an_answer_lives_for_the_ttl_from_the_last_one(self) -> None:
        self.log.answered(wire_name(NAME))
        self.clock.advance(3)
        self.log.answered(wire_name(NAME))
        self.assertEqual(self.log.until(NAME), 1008.0)
        self.assertEqual(self.log.until(NAME.upper() + "."), 1008.0)

    def test_a_shorter_ttl_later_does_not_shorten_an_earlier_copy(self) -> None:
        self.log.answered(wire_name(NAME))
        self.ttl = 1.0
        self.log.answered(wire_name(NAME))
        self.assertEqual(self.log.until(NAME), 1005.0)

    def test_a_full_log_folds_into_one_horizon_for_every_name(self) -> None:
        for i in range(3):
            self.log.answered(wire_name(f"_acme-challenge.n{i}.go.example.test"))
            self.clock.advance(1)
        self.assertEqual(len(self.log), 3)
        self.log.answered(wire_name("_acme-challenge.n3.go.example.test"))
        # The three kept were folded: any name now waits for the latest of them.
        self.assertEqual(len(self.log), 1)
        self.assertEqual(self.log.until("_acme-challenge.unseen.go.example.test"), 1007.0)
        self.assertEqual(self.log.until("_acme-challenge.n3.go.example.test"), 1008.0)

    def test_replies_are_read_for_challenge_names_only(self) -> None:
        zone = ChallengeZone(ORIGIN, ["ns1.go.example.test"], ["* A 127.0.0.1"])
        factory = ZoneServerFactory(self.clock, zone, answer_log=self.log)
        reply_to(factory, query("www.go.example.test", "A"))
        self.assertEqual(len(self.log), 0)
        # 0x20 letter case, NXDOMAIN/NODATA (nothing published yet), UDP and TCP alike.
        reply_to(factory, query("_ACME-challenge.A.go.example.TEST"))
        self.assertEqual(self.log.until(NAME), 1005.0)
        zone.add_txt(NAME, "value")
        self.clock.advance(2)
        reply_to(factory, query(NAME), tcp=True)
        self.assertEqual(self.log.until(NAME), 1007.0)

    def test_memo_hits_are_noted_too(self) -> None:
        zone = ChallengeZone(ORIGIN, ["ns1.go.example.test"], [])
        zone.add_txt(NAME, "value")
        factory = ZoneServerFactory(self.clock, zone, answer_log=self.log)
        packet = query(NAME)
        reply_to(factory, packet)
        self.clock.advance(4)
        reply_to(factory, packet)  # the same bytes: answered from the memo
        self.assertEqual(self.log.until(NAME), 1009.0)

    def test_a_reply_that_is_not_a_name_is_ignored(self) -> None:
        for bad in (
            b"\x0f_acme-challenge\x3f",
            b"\x0f_acme-challenge\xc0\x0c",
            b"\x0f_acme-challenge",
        ):
            self.log.answered_reply(b"\0" * 12 + bad)
        self.assertEqual(len(self.log), 0)
