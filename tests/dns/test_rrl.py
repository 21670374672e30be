"""Response rate limiting: buckets per source prefix and kind of reply, slip, exempt
sources, log-only, the table's bound, and TCP left alone."""

from __future__ import annotations

import random
from typing import Any

import dns.flags
import dns.message
import dns.rcode
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.rrl import (
    ANSWER,
    DROP,
    SLIP,
    Prefixer,
    ResponseRateLimiter,
    prefix_text,
    slipped,
)
from csrproxy.dns.zone import ChallengeZone
from csrproxy.metrics import Metrics
from csrproxy.testing.dns import ReplyRecorder

ORIGIN = "go.example.test"
CHALLENGE = "_acme-challenge.demo." + ORIGIN
NXNAME = "x." + CHALLENGE  # below an existing name without a wildcard: NXDOMAIN


def make_zone() -> ChallengeZone:
    zone = ChallengeZone(
        ORIGIN, ["ns1." + ORIGIN], ["@ A 127.0.0.1", "* A 127.0.0.1", "www CNAME @"]
    )
    zone.add_txt(CHALLENGE, "token")
    return zone


def query(name: str, rdtype: str = "A", **kwargs: Any) -> bytes:
    wire: bytes = dns.message.make_query(name, rdtype, **kwargs).to_wire()
    return wire


class Server:
    """A factory with a limiter on a clock, and what each query got back."""

    def __init__(self, **limits: Any) -> None:
        self.clock = Clock()
        self.limited: list[tuple[str, str]] = []
        limits.setdefault("slip", 0)
        self.rrl = ResponseRateLimiter(
            self.clock, on_limit=lambda *a: self.limited.append(a), **limits
        )
        self.factory = ZoneServerFactory(self.clock, make_zone(), rrl=self.rrl)

    def ask(self, packet: bytes, host: str = "192.0.2.1", tcp: bool = False) -> bytes | None:
        recorder = ReplyRecorder()
        self.factory.packetReceived(packet, recorder, None if tcp else (host, 5353))
        if not recorder.replies:
            return None
        ((data, _),) = recorder.replies
        return data

    def answered(self, packet: bytes, times: int, host: str = "192.0.2.1", **kw: Any) -> int:
        return sum(self.ask(packet, host, **kw) is not None for _ in range(times))


class BucketTests(SynchronousTestCase):
    def test_budget_then_limit(self) -> None:
        server = Server(responses_per_second=5)
        packet = query(CHALLENGE, "TXT")
        self.assertEqual(server.answered(packet, 5), 5)
        self.assertIsNone(server.ask(packet))
        self.assertEqual(server.limited, [("dropped", "responses")])

    def test_letter_case_and_id_do_not_open_buckets(self) -> None:
        # 0x20 and new ids reach the answer cache and the memo: the same account.
        server = Server(responses_per_second=3)
        rng = random.Random(1)
        names = [
            "".join(c.upper() if rng.random() < 0.5 else c for c in CHALLENGE) for _ in range(6)
        ]
        got = [server.ask(query(name, "TXT", id=i)) for i, name in enumerate(names)]
        self.assertEqual([g is not None for g in got], [True] * 3 + [False] * 3)

    def test_refill_over_time(self) -> None:
        server = Server(responses_per_second=5, window=15)
        packet = query(CHALLENGE, "TXT")
        self.assertEqual(server.answered(packet, 6), 5)  # balance -1
        server.clock.advance(1)
        self.assertEqual(server.answered(packet, 10), 4)  # min(5, -1 + 5)

    def test_debt_lasts_the_window(self) -> None:
        server = Server(responses_per_second=5, window=15)
        packet = query(CHALLENGE, "TXT")
        server.answered(packet, 1000)  # debt at its floor: -15 * 5
        server.clock.advance(14.9)
        self.assertIsNone(server.ask(packet))
        server.clock.advance(1.3)
        self.assertIsNotNone(server.ask(packet))

    def test_a_quiet_second_refills_at_most_one_second(self) -> None:
        server = Server(responses_per_second=5)
        packet = query(CHALLENGE, "TXT")
        server.ask(packet)
        server.clock.advance(3600)
        self.assertEqual(server.answered(packet, 10), 5)

    def test_a_clock_stepped_back_still_refills(self) -> None:
        # reactor.seconds() is the wall clock: an NTP step back must not freeze buckets.
        server = Server(responses_per_second=5)
        packet = query(CHALLENGE, "TXT")
        server.clock.advance(7200)
        self.assertEqual(server.answered(packet, 5), 5)  # a source within its budget
        server.clock.rightNow -= 3600
        server.clock.advance(1)
        server.answered(packet, 5)  # the second of the step earns nothing
        server.clock.advance(2)
        self.assertEqual(server.answered(packet, 5), 5)  # then it refills as ever

    def test_zero_rate_is_unlimited(self) -> None:
        server = Server(responses_per_second=0)
        self.assertEqual(server.answered(query(CHALLENGE, "TXT"), 500), 500)
        self.assertEqual(len(server.rrl), 0)


class SlipTests(SynchronousTestCase):
    def pattern(self, slip: int) -> list[str]:
        server = Server(responses_per_second=1, slip=slip)
        packet = query(CHALLENGE, "TXT", id=77)
        server.ask(packet)
        out = []
        for _ in range(6):
            reply = server.ask(packet)
            out.append("-" if reply is None else "t")
            if reply is not None:
                message = dns.message.from_wire(reply)
                self.assertTrue(message.flags & dns.flags.TC)
                self.assertTrue(message.flags & dns.flags.QR)
                self.assertEqual(message.id, 77)
                self.assertEqual(message.question[0].name.to_text(), CHALLENGE + ".")
                self.assertEqual(
                    (message.answer, message.authority, message.additional), ([], [], [])
                )
        return out

    def test_slip_one_two_zero(self) -> None:
        self.assertEqual(self.pattern(1), ["t"] * 6)
        self.assertEqual(self.pattern(2), ["-", "t"] * 3)
        self.assertEqual(self.pattern(0), ["-"] * 6)

    def test_slipped_counted(self) -> None:
        server = Server(responses_per_second=1, slip=2)
        server.answered(query(CHALLENGE, "TXT"), 5)
        self.assertEqual(server.limited, [("dropped", "responses"), ("slipped", "responses")] * 2)

    def test_slipped_without_a_question(self) -> None:
        reply = bytes.fromhex("1234 8001 0000 0000 0000 0000")
        self.assertEqual(slipped(reply, 0), bytes.fromhex("1234 8201 0000 0000 0000 0000"))


class AccountTests(SynchronousTestCase):
    def test_nxdomain_and_errors_apart_from_answers(self) -> None:
        server = Server(responses_per_second=2, nxdomains_per_second=3, errors_per_second=4)
        self.assertEqual(server.answered(query(CHALLENGE, "TXT"), 10), 2)
        # NXDOMAIN for any name in the zone shares one bucket: random names do not help.
        nx = [server.ask(query(f"r{i}." + NXNAME)) for i in range(10)]
        self.assertEqual(sum(r is not None for r in nx), 3)
        reply = next(r for r in nx if r is not None)
        self.assertEqual(dns.message.from_wire(reply).rcode(), dns.rcode.NXDOMAIN)
        # So do errors: REFUSED (outside the zone) and NOTIMP alike.
        errors = [server.ask(query(f"n{i}.example.org")) for i in range(3)]
        errors += [server.ask(query(ORIGIN, "MAILB")) for _ in range(3)]
        self.assertEqual(sum(r is not None for r in errors), 4)
        kinds = sorted({kind for _, kind in server.limited})
        self.assertEqual(kinds, ["errors", "nxdomains", "responses"])

    def test_each_name_and_type_its_own_bucket(self) -> None:
        server = Server(responses_per_second=2)
        self.assertEqual(server.answered(query(ORIGIN, "A"), 5), 2)
        self.assertEqual(server.answered(query(ORIGIN, "SOA"), 5), 2)
        self.assertEqual(server.answered(query(CHALLENGE, "TXT"), 5), 2)

    def test_random_types_of_one_name_share_a_bucket(self) -> None:
        # NODATA (type 0) and a CNAME answer (the CNAME's type) whatever was asked.
        server = Server(responses_per_second=3)
        for name in (ORIGIN, "www." + ORIGIN):
            got = [
                server.ask(query(name, rdtype)) for rdtype in ("MX", "TXT", "SRV", "HINFO", "NAPTR")
            ]
            self.assertEqual(sum(g is not None for g in got), 3, name)

    def test_wildcard_names_share_the_wildcards_bucket(self) -> None:
        # Every installation's name is the wildcard's: a resolver fronting many of them
        # gets the (large) wildcard budget, random names and types no new buckets.
        server = Server(responses_per_second=2, wildcards_per_second=50)
        got = [
            server.ask(query(f"host{i}.{ORIGIN}", rdtype))
            for i in range(40)
            for rdtype in ("A", "AAAA")
        ]
        self.assertEqual(sum(g is not None for g in got), 50)
        self.assertEqual({kind for _, kind in server.limited}, {"wildcards"})
        self.assertEqual(server.answered(query(CHALLENGE, "TXT"), 2), 2)  # not the wildcard

    def test_a_resolver_fronting_many_installations_is_not_limited(self) -> None:
        # Defaults: 400 installation names a second, A and AAAA, for 5 seconds.
        server = Server()
        for second in range(5):
            for i in range(400):
                name = f"i{second}-{i}.{ORIGIN}"
                self.assertIsNotNone(server.ask(query(name, "A"), "198.51.100.7"))
                self.assertIsNotNone(server.ask(query(name, "AAAA"), "198.51.100.9"))
            server.clock.advance(1)
        self.assertEqual(server.limited, [])

    def test_a_ca_validating_a_burst_is_not_limited(self) -> None:
        # Defaults: 600 orders in a minute, each validated from 5 perspectives (one /24
        # each, no resolver cache at all): TXT and CAA at the name, CAA at the apex.
        server = Server()
        perspectives = [f"203.0.{113 + p}.10" for p in range(5)]
        for order in range(600):
            name = f"a{order}.{ORIGIN}"
            server.factory.zone.add_txt("_acme-challenge." + name, "v")
            for host in perspectives:
                for packet in (
                    query("_acme-challenge." + name, "TXT"),
                    query(name, "CAA"),
                    query(ORIGIN, "CAA"),
                ):
                    self.assertIsNotNone(server.ask(packet, host))
            server.clock.advance(0.1)
        self.assertEqual(server.limited, [])


class PrefixTests(SynchronousTestCase):
    def test_ipv4_24_and_ipv6_56_by_default(self) -> None:
        server = Server(responses_per_second=4)
        packet = query(CHALLENGE, "TXT")
        self.assertEqual(server.answered(packet, 2, "192.0.2.1"), 2)
        self.assertEqual(server.answered(packet, 4, "192.0.2.254"), 2)  # the same /24
        self.assertEqual(server.answered(packet, 4, "192.0.3.1"), 4)
        self.assertEqual(server.answered(packet, 2, "2001:db8:0:1::1"), 2)
        self.assertEqual(server.answered(packet, 4, "2001:db8:0:ff::2"), 2)  # same /56
        self.assertEqual(server.answered(packet, 4, "2001:db8:0:100::1"), 4)
        # An IPv4-mapped address is its IPv4 address.
        self.assertEqual(server.answered(packet, 4, "::ffff:192.0.3.9"), 0)

    def test_prefix_lengths_configurable(self) -> None:
        server = Server(responses_per_second=2, ipv4_prefix_length=32, ipv6_prefix_length=64)
        packet = query(CHALLENGE, "TXT")
        self.assertEqual(server.answered(packet, 3, "192.0.2.1"), 2)
        self.assertEqual(server.answered(packet, 3, "192.0.2.2"), 2)
        self.assertEqual(server.answered(packet, 3, "2001:db8:0:1::1"), 2)
        self.assertEqual(server.answered(packet, 3, "2001:db8:0:2::1"), 2)

    def test_prefix_bytes(self) -> None:
        prefix = Prefixer(20, 52)
        self.assertEqual(prefix("192.0.31.200"), prefix("192.0.16.1"))
        self.assertNotEqual(prefix("192.0.32.1"), prefix("192.0.16.1"))
        self.assertEqual(prefix_text(prefix("192.0.31.200") or b"", 20, 52), "192.0.16.0/20")
        self.assertEqual(prefix_text(prefix("2001:db8:fff::1") or b"", 20, 52), "2001:db8:fff::/52")
        self.assertEqual(prefix("not an address"), b"?")
        self.assertEqual(prefix("fe80::1%eth0"), prefix("fe80::2"))

    def test_exempt(self) -> None:
        server = Server(responses_per_second=1, exempt=["192.0.2.128/25", "2001:db8::53/128"])
        packet = query(CHALLENGE, "TXT")
        self.assertEqual(server.answered(packet, 50, "192.0.2.200"), 50)
        self.assertEqual(server.answered(packet, 50, "2001:db8::53"), 50)
        self.assertEqual(server.answered(packet, 3, "192.0.2.1"), 1)  # its /24, not exempt
        self.assertEqual(server.answered(packet, 3, "2001:db8::54"), 1)


class ModeTests(SynchronousTestCase):
    def observe(self) -> EventLoggingObserver:
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        return events

    def test_log_only_answers_and_counts(self) -> None:
        logged = self.observe()
        server = Server(responses_per_second=2, log_only=True)
        self.assertEqual(server.answered(query(CHALLENGE, "TXT"), 10), 10)
        self.assertEqual(server.limited, [("log_only", "responses")] * 8)
        server.clock.advance(10)
        self.assertEqual(len(logged), 1)
        self.assertIn("8 UDP replies", logged[0]["log_format"].format(**logged[0]))

    def test_tcp_never_limited(self) -> None:
        server = Server(responses_per_second=1, errors_per_second=1)
        self.assertEqual(server.answered(query(CHALLENGE, "TXT"), 100, tcp=True), 100)
        self.assertEqual(server.answered(query("example.org"), 100, tcp=True), 100)
        self.assertEqual((server.limited, len(server.rrl)), ([], 0))
        self.assertIsNotNone(server.ask(query(CHALLENGE, "TXT")))  # UDP still has its budget

    def test_one_summary_line_per_interval(self) -> None:
        logged = self.observe()
        server = Server(responses_per_second=1, slip=2)
        for second in range(30):
            for i in range(200):
                server.ask(query(CHALLENGE, "TXT"), f"10.{second}.{i % 8}.1")
            server.clock.advance(1)
        server.rrl.stop()
        self.assertEqual(len(logged), 3)
        text = logged[0]["log_format"].format(**logged[0])
        self.assertIn("responses dropped", text)
        self.assertIn("responses slipped", text)
        self.assertIn("10.0.0.0/24", text)
        self.assertEqual(server.clock.getDelayedCalls(), [])


class TableTests(SynchronousTestCase):
    def test_bounded_under_spoofed_sources(self) -> None:
        server = Server(responses_per_second=5, max_table_size=500)
        legit = query(CHALLENGE, "TXT")
        rng = random.Random(5)
        for _ in range(10):
            self.assertIsNotNone(server.ask(legit, "198.51.100.1"))
            for _ in range(400):
                host = ".".join(str(rng.randrange(256)) for _ in range(4))
                name = f"r{rng.randrange(10**9)}.{ORIGIN}"
                server.ask(query(name, "A"), host)
                server.ask(query("example.org", "TXT"), host)
            self.assertLessEqual(len(server.rrl), 500)
            server.clock.advance(0.05)
        self.assertIsNotNone(server.ask(legit, "198.51.100.1"))
        # One bucket per (prefix, kind): the random names opened none of their own.
        self.assertEqual(len(server.rrl), 500)

    def test_a_flooded_prefix_stays_limited_while_others_churn(self) -> None:
        # Least recently used goes first: the flooded prefix's debt is kept.
        server = Server(responses_per_second=2, max_table_size=50)
        packet = query(CHALLENGE, "TXT")
        server.answered(packet, 100, "192.0.2.1")
        for i in range(1000):
            server.ask(packet, f"10.{i // 256}.{i % 256}.1")
            if i % 10 == 0:
                self.assertIsNone(server.ask(packet, "192.0.2.1"))
            server.clock.advance(0.01)

    def test_idle_first_evicted(self) -> None:
        rrl = ResponseRateLimiter(Clock(), max_table_size=2)
        rrl.check("192.0.2.1", b"E")
        rrl.clock.advance(5)
        rrl.check("192.0.3.1", b"E")
        rrl.clock.advance(5)
        rrl.check("192.0.2.1", b"E")  # used again: now the most recent
        rrl.check("192.0.4.1", b"E")  # evicts 192.0.3.0/24
        self.assertEqual(
            sorted(k[:4] for k in rrl._table), [b"\x04\xc0\x00\x02", b"\x04\xc0\x00\x04"]
        )

    def test_decisions(self) -> None:
        rrl = ResponseRateLimiter(Clock(), errors_per_second=1, slip=2)
        self.assertEqual(
            [rrl.check("192.0.2.1", b"E") for _ in range(5)], [ANSWER, DROP, SLIP, DROP, SLIP]
        )


class MetricsTests(SynchronousTestCase):
    def test_exported_by_action_and_kind(self) -> None:
        metrics = Metrics()
        server = Server(responses_per_second=1, nxdomains_per_second=1, slip=2)
        server.rrl.on_limit = metrics.dns_rrl
        server.answered(query(CHALLENGE, "TXT"), 4)
        server.answered(query(NXNAME), 2)
        text = metrics.render().decode()
        self.assertIn('csrproxy_dns_rrl_total{action="dropped",kind="responses"} 2.0', text)
        self.assertIn('csrproxy_dns_rrl_total{action="slipped",kind="responses"} 1.0', text)
        self.assertIn('csrproxy_dns_rrl_total{action="dropped",kind="nxdomains"} 1.0', text)
