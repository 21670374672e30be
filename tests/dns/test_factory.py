"""The server factory's own rules: one answer for both transports, the caches and their
bounds, the question as twisted decodes it, and a quiet log."""

from __future__ import annotations

import random
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.dns import factory as factory_module
from csrproxy.dns.factory import CACHE_ENTRIES, ZoneServerFactory
from csrproxy.dns.messages import QueryMessage
from csrproxy.dns.zone import ChallengeZone, Result
from csrproxy.testing.dns import reply_to

ORIGIN = "go.example.test"
CHALLENGE = "_acme-challenge.demo." + ORIGIN


def make_zone() -> ChallengeZone:
    zone = ChallengeZone(
        ORIGIN,
        ["ns1." + ORIGIN, "ns2." + ORIGIN],
        ["@ A 127.0.0.1", "* A 127.0.0.1", "www CNAME @", '@ CAA 0 issue "letsencrypt.org"'],
    )
    zone.add_txt(CHALLENGE, "token")
    return zone


def query(name: str, rdtype: str = "A", **kwargs: Any) -> bytes:
    wire: bytes = dns.message.make_query(name, rdtype, **kwargs).to_wire()
    return wire


def mixed_case(packet: bytes, rng: random.Random) -> bytes:
    out = bytearray(packet)
    end = packet.index(b"\x00", 12)
    for index in range(13, end):
        if 97 <= out[index] <= 122 and rng.random() < 0.5:
            out[index] -= 32
    return bytes(out)


class TransportTests(SynchronousTestCase):
    def test_udp_and_tcp_answers_identical(self) -> None:
        rng = random.Random(7)
        factory = ZoneServerFactory(Clock(), make_zone())
        for name, rdtype, kwargs in [
            (ORIGIN, "SOA", {}),
            (ORIGIN, "NS", {}),
            (ORIGIN, "CAA", {"use_edns": 0}),
            (CHALLENGE, "TXT", {}),
            (CHALLENGE, "TXT", {"use_edns": 0, "want_dnssec": True}),
            ("www." + ORIGIN, "A", {}),
            ("host1." + ORIGIN, "AAAA", {}),
            ("x." + CHALLENGE, "A", {}),
            ("example.org", "A", {}),
            (ORIGIN, "AXFR", {}),
            (ORIGIN, "ANY", {}),
        ]:
            packet = query(name, rdtype, **kwargs)
            for asked in (packet, mixed_case(packet, rng)):
                # Both orders: the first transport to ask fills the caches.
                for first_tcp in (False, True):
                    fresh = ZoneServerFactory(Clock(), make_zone()) if first_tcp else factory
                    first = reply_to(fresh, asked, tcp=first_tcp)
                    second = reply_to(fresh, asked, tcp=not first_tcp)
                    self.assertEqual(first, second, (name, rdtype, kwargs))
                    assert first is not None
                    self.assertFalse(first[2] & 0x02)  # TC clear: it fit

    def test_too_big_for_udp_is_whole_over_tcp(self) -> None:
        zone = make_zone()
        for index in range(30):
            zone.add_txt(CHALLENGE, f"{index:02d}" + "v" * 41)
        factory = ZoneServerFactory(Clock(), zone)
        packet = query(CHALLENGE, "TXT", use_edns=0, payload=1232)
        udp = dns.message.from_wire(reply_to(factory, packet) or b"")
        tcp = dns.message.from_wire(reply_to(factory, packet, tcp=True) or b"")
        self.assertTrue(udp.flags & dns.flags.TC)
        self.assertEqual((udp.answer, udp.authority, udp.edns), ([], [], 0))
        self.assertFalse(tcp.flags & dns.flags.TC)
        self.assertEqual(len(tcp.answer[0]), 31)


class CacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.zone = make_zone()
        self.rcodes: list[int] = []
        self.factory = ZoneServerFactory(Clock(), self.zone, on_rcode=self.rcodes.append)

    def test_repeat_differs_only_in_id(self) -> None:
        first = query(CHALLENGE, "TXT", id=1)
        again = b"\x12\x34" + first[2:]
        one, two = reply_to(self.factory, first), reply_to(self.factory, again)
        assert one is not None and two is not None
        self.assertEqual((one[:2], two[:2]), (b"\x00\x01", b"\x12\x34"))
        self.assertEqual(one[2:], two[2:])
        self.assertEqual(self.rcodes, [0, 0])

    def test_letter_case_patched_into_a_cached_answer(self) -> None:
        rng = random.Random(3)
        lower = query(CHALLENGE, "TXT", use_edns=0)
        reply_to(self.factory, lower)  # the answer cache holds it now
        for _ in range(20):
            asked = mixed_case(lower, rng)
            wire = reply_to(self.factory, asked)
            assert wire is not None
            end = asked.index(b"\x00", 12) + 5
            self.assertEqual(wire[12:end], asked[12:end])
            response = dns.message.from_wire(wire)
            self.assertEqual(response.answer[0][0].strings, (b"token",))
            # The owner is compressed against the question, so it comes back as asked.
            self.assertEqual(response.answer[0].name.to_wire(), asked[12 : end - 4])

    def test_rd_and_cd_patched(self) -> None:
        plain = dns.message.make_query(ORIGIN, "SOA")
        plain.flags = 0
        flagged = dns.message.make_query(ORIGIN, "SOA")
        flagged.flags = dns.flags.RD | dns.flags.CD
        for message, expected in [(plain, 0), (flagged, dns.flags.RD | dns.flags.CD), (plain, 0)]:
            wire = reply_to(self.factory, message.to_wire())
            response = dns.message.from_wire(wire or b"")
            self.assertEqual(response.flags & (dns.flags.RD | dns.flags.CD), expected)
            self.assertTrue(response.flags & dns.flags.AA)

    def test_a_zone_change_is_seen_at_once(self) -> None:
        packet = query(CHALLENGE, "TXT")
        reply_to(self.factory, packet)
        self.zone.add_txt(CHALLENGE, "second")
        response = dns.message.from_wire(reply_to(self.factory, packet) or b"")
        self.assertEqual(sorted(r.strings[0] for r in response.answer[0]), [b"second", b"token"])

    def test_flood_of_names_stays_within_the_bound(self) -> None:
        # Every name is answered by the wildcard and is a new entry in both caches.
        for index in range(CACHE_ENTRIES + 500):
            wire = reply_to(self.factory, query(f"h{index}.{ORIGIN}"))
            self.assertIsNotNone(wire)
            self.assertLessEqual(len(self.factory._answers), CACHE_ENTRIES)
            self.assertLessEqual(len(self.factory._udp_memo), CACHE_ENTRIES)
        response = dns.message.from_wire(reply_to(self.factory, query(CHALLENGE, "TXT")) or b"")
        self.assertEqual(response.answer[0][0].strings, (b"token",))

    def test_big_replies_not_cached(self) -> None:
        for index in range(60):
            self.zone.add_txt(CHALLENGE, f"{index:02d}" + "v" * 41)
        packet = query(CHALLENGE, "TXT")
        for _ in range(2):
            response = dns.message.from_wire(reply_to(self.factory, packet, tcp=True) or b"")
            self.assertEqual(len(response.answer[0]), 61)
        self.assertEqual(self.factory._tcp_memo, {})
        self.assertEqual(self.factory._answers, {})


class MemoTests(SynchronousTestCase):
    """The memo is keyed on the lowercased bytes and checked byte for byte before use."""

    def setUp(self) -> None:
        self.zone = make_zone()
        self.rcodes: list[int] = []
        self.factory = ZoneServerFactory(Clock(), self.zone, on_rcode=self.rcodes.append)
        self.parses = 0
        test = self

        class CountingQueryMessage(QueryMessage):
            def fromStr(self, str: bytes) -> None:
                test.parses += 1
                super().fromStr(str)

        self.patch(factory_module, "QueryMessage", CountingQueryMessage)

    def fresh_reply(self, packet: bytes, tcp: bool = False) -> bytes | None:
        # What a server with empty caches answers: a memo hit must send the same bytes.
        return reply_to(ZoneServerFactory(Clock(), self.zone), packet, tcp=tcp)

    def test_letter_case_variants_hit_the_memo(self) -> None:
        rng = random.Random(11)
        for name, rdtype, kwargs in [
            (CHALLENGE, "TXT", {"use_edns": 0}),
            (CHALLENGE, "TXT", {}),
            ("host7." + ORIGIN, "A", {"use_edns": 0, "want_dnssec": True}),
            ("www." + ORIGIN, "A", {}),
            ("nothing." + CHALLENGE, "A", {}),  # NXDOMAIN
            ("host7." + ORIGIN, "MX", {}),  # NODATA
            ("Example.ORG", "A", {}),  # REFUSED
            (ORIGIN, "SOA", {}),
        ]:
            for tcp in (False, True):
                lower = query(name.lower(), rdtype, **kwargs)
                reply_to(self.factory, lower, tcp=tcp)
                parsed, rcodes = self.parses, len(self.rcodes)
                for index in range(20):
                    asked = b"%c%c" % (index, 7) + mixed_case(lower, rng)[2:]
                    wire = reply_to(self.factory, asked, tcp=tcp)
                    self.assertEqual(wire, self.fresh_reply(asked, tcp), (name, rdtype, kwargs))
                    assert wire is not None
                    end = asked.index(b"\x00", 12) + 5
                    self.assertEqual(wire[:2] + wire[12:end], asked[:2] + asked[12:end])
                self.parses -= 20  # the fresh servers' parses
                self.assertEqual(self.parses, parsed, (name, rdtype, tcp))
                self.assertEqual(len(self.rcodes), rcodes + 20)

    def test_owner_names_take_the_case_asked(self) -> None:
        lower = query(CHALLENGE, "TXT", use_edns=0)
        reply_to(self.factory, lower)
        asked = mixed_case(lower, random.Random(1))
        response = dns.message.from_wire(reply_to(self.factory, asked) or b"")
        self.assertEqual(response.answer[0][0].strings, (b"token",))
        name_end = asked.index(b"\x00", 12) + 1
        self.assertEqual(response.answer[0].name.to_wire(), asked[12:name_end])
        self.assertEqual(self.parses, 1)

    def test_colliding_queries_are_each_parsed(self) -> None:
        # Lowercased, each pair is the same bytes: qtype 0x0041 (HTTPS) and 0x0061; opcodes
        # 8 and 12 (flags byte 0x41 and 0x61, both NOTIMP); an EDNS option's data.
        https = query("host1." + ORIGIN, "HTTPS")
        opcode = bytearray(query("host1." + ORIGIN, "A"))
        opcode[2] = 0x41
        option = dns.edns.GenericOption(dns.edns.OptionType.make(65001), b"A")
        with_option = query("host1." + ORIGIN, "A", use_edns=0, options=[option])
        pairs = [
            (https, https[:-4] + b"\x00\x61" + https[-2:], True),
            (bytes(opcode), bytes(opcode[:2]) + b"\x61" + bytes(opcode[3:]), True),
            (with_option, with_option[:-1] + b"a", False),  # the same answer, parsed anyway
        ]
        for one, other, answers_differ in pairs:
            self.assertNotEqual(one, other)
            self.assertEqual(one[2:].lower(), other[2:].lower())
            expected = {packet: self.fresh_reply(packet) for packet in (one, other)}
            self.assertEqual(expected[one] != expected[other], answers_differ)
            self.parses = 0
            for packet in (one, other, one, one, other, other):
                self.assertEqual(reply_to(self.factory, packet), expected[packet])
            # Each switch is a miss; a repeat of the last query is a hit.
            self.assertEqual(self.parses, 4)
            self.assertLessEqual(len(self.factory._udp_memo), CACHE_ENTRIES)

    def test_reply_without_the_question_never_memoized(self) -> None:
        # Two OPT records: FORMERR with no question, which a hit could not patch.
        packet = query(ORIGIN, "SOA", use_edns=0)
        two_opts = packet[:10] + b"\x00\x02" + packet[12:] + packet[-11:]
        for asked in (two_opts, mixed_case(two_opts, random.Random(2)), two_opts):
            wire = reply_to(self.factory, asked)
            assert wire is not None
            self.assertEqual(wire[2:], b"\x81\x01" + bytes(8))  # RD, FORMERR, no records
        self.assertEqual(self.factory._udp_memo, {})

    def test_a_zone_change_drops_every_case(self) -> None:
        lower = query(CHALLENGE, "TXT")
        reply_to(self.factory, lower)
        self.zone.add_txt(CHALLENGE, "second")
        asked = mixed_case(lower, random.Random(4))
        response = dns.message.from_wire(reply_to(self.factory, asked) or b"")
        self.assertEqual(sorted(r.strings[0] for r in response.answer[0]), [b"second", b"token"])

    def test_flood_of_names_in_random_case_stays_within_the_bound(self) -> None:
        rng = random.Random(9)
        for index in range(CACHE_ENTRIES + 500):
            asked = mixed_case(query(f"h{index % (CACHE_ENTRIES + 7)}x.{ORIGIN}"), rng)
            for tcp in (False, True):
                wire = reply_to(self.factory, asked, tcp=tcp)
                assert wire is not None
                self.assertEqual(wire[12 : len(asked) - 11], asked[12 : len(asked) - 11])
            self.assertLessEqual(len(self.factory._udp_memo), CACHE_ENTRIES)
            self.assertLessEqual(len(self.factory._tcp_memo), CACHE_ENTRIES)
        response = dns.message.from_wire(reply_to(self.factory, query(CHALLENGE, "TXT")) or b"")
        self.assertEqual(response.answer[0][0].strings, (b"token",))


class QuestionTests(SynchronousTestCase):
    """The question as dns.Message decodes it must be the bytes received."""

    def setUp(self) -> None:
        self.factory = ZoneServerFactory(Clock(), make_zone())
        self.header = b"\x42\x42\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"

    def rcode_of(self, question: bytes) -> int:
        wire = reply_to(self.factory, self.header + question + b"\x00\x01\x00\x01")
        assert wire is not None
        self.assertEqual(wire[:2], b"\x42\x42")
        return wire[3] & 0x0F

    def test_plain_question_answered(self) -> None:
        self.assertEqual(self.rcode_of(b"\x02go\x07example\x04test\x00"), 0)

    def test_compressed_question_formerr(self) -> None:
        # A pointer into the header, read as labels.
        self.assertEqual(self.rcode_of(b"\x02go\xc0\x04"), 1)

    def test_dot_inside_a_label_formerr(self) -> None:
        # "go.example" as one label: dns.Name would read it as two.
        self.assertEqual(self.rcode_of(b"\x0ago.example\x04test\x00"), 1)

    def test_label_over_63_bytes_formerr(self) -> None:
        self.assertEqual(self.rcode_of(b"\x40" + b"a" * 64 + b"\x02go\x07example\x04test\x00"), 1)


class QuietLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def test_garbage_and_odd_types_log_nothing(self) -> None:
        factory = ZoneServerFactory(Clock(), make_zone())
        rng = random.Random(5)
        good = query(CHALLENGE, "TXT", use_edns=0)
        for _ in range(500):
            flipped = bytearray(good)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            reply_to(factory, bytes(flipped))
        # A TXT record with a bad length, types twisted has no lookup method for.
        record = b"\x00\x00\x10\x00\x01" + bytes(4) + b"\x00\x03\x09ab"
        bad_txt = good[:10] + b"\x00\x02" + good[12:] + record
        self.assertEqual(reply_to(factory, bad_txt), reply_to(factory, bad_txt))
        for rdtype in ("CAA", "HTTPS", "SVCB", "TLSA", "DS"):
            reply_to(factory, query(f"x{rdtype}.{ORIGIN}", rdtype))
        self.assertEqual(len(self.events), 0)

    def test_a_failing_zone_logs_a_bounded_number_of_times(self) -> None:
        class BrokenZone(ChallengeZone):
            def _lookup(
                self, name: bytes, cls: int, type: int, timeout: object = None
            ) -> Deferred[Result]:
                raise RuntimeError("bug")

        zone = BrokenZone(ORIGIN, ["ns1." + ORIGIN], [])
        factory = ZoneServerFactory(Clock(), zone)
        for index in range(100):
            wire = reply_to(factory, query(f"h{index}.{ORIGIN}"))
            self.assertEqual(dns.message.from_wire(wire or b"").rcode(), dns.rcode.SERVFAIL)
        # Logged at the 1st, 2nd, 4th ... 64th failure.
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 7)
        self.assertEqual(factory._crashes, 100)
