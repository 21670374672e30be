"""The challenge zone and the server factory: every answering rule, without sockets."""

from __future__ import annotations

import struct
from typing import Any, cast

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
from twisted.internet.task import Clock
from twisted.names import dns as tdns
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.zone import ChallengeZone
from csrproxy.errors import ConfigError
from csrproxy.testing.dns import reply_to

ORIGIN = "go.example.test"
RECORDS = [
    "@ A 127.0.0.1",
    "@ AAAA ::1",
    "* A 127.0.0.1",
    "ns1 A 127.0.0.1",
    "www CNAME @",
    '@ CAA 0 issue "letsencrypt.org"',
    "@ 60 MX 10 mail",
    'txt TXT "hello" "world"',
    "deep.sub 30 A 10.0.0.1",
]
CHALLENGE = "_acme-challenge.demo.go.example.test"


def make_zone() -> ChallengeZone:
    return ChallengeZone(
        ORIGIN + ".", ["ns1.go.example.test", "ns2.go.example.test"], RECORDS, serial=100
    )


def make_factory(zone: ChallengeZone) -> ZoneServerFactory:
    return ZoneServerFactory(Clock(), zone)


def respond(server: ZoneServerFactory, packet: bytes, udp: int | None = 1232) -> bytes | None:
    """The reply over UDP (``udp`` is our EDNS size, always 1232 here) or TCP (None)."""
    assert udp in (1232, None)
    return reply_to(server, packet, tcp=udp is None)


def ask(
    server: ZoneServerFactory,
    name: str,
    rdtype: str | int = "A",
    udp: int | None = 1232,
    **kwargs: object,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    wire = respond(server, query.to_wire(), udp)
    assert wire is not None
    return dns.message.from_wire(wire)


def rcode(response: dns.message.Message) -> int:
    return int(response.rcode())


def soa_in_authority(response: dns.message.Message) -> bool:
    return any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority)


class ZoneConfigTests(SynchronousTestCase):
    def test_origin_normalised(self) -> None:
        zone = ChallengeZone("Go.Example.TEST.", ["ns1.go.example.test"], [])
        self.assertEqual(zone.origin, "go.example.test")

    def test_bad_records_raise_config_error(self) -> None:
        for line in [
            "@ A 300.1.1.1",
            "@ AAAA 127.0.0.1",
            "@ FOO bar",
            "@ MX ten mail",
            "@ CAA 0 is-sue x",
            "@ TXT",
            'x TXT "unterminated',
            "outside.example. A 127.0.0.1",
            "@",
            "sub NS ns.elsewhere.",
            "@ CNAME elsewhere.",
            "a..b A 127.0.0.1",
        ]:
            with self.assertRaises(ConfigError, msg=line) as caught:
                ChallengeZone(ORIGIN, ["ns1.go.example.test"], [line])
            self.assertEqual(caught.exception.key, "dns.records")
            self.assertIn(line, caught.exception.detail)

    def test_cname_must_be_alone(self) -> None:
        with self.assertRaises(ConfigError):
            ChallengeZone(ORIGIN, ["ns1." + ORIGIN], ["x CNAME @", "x A 127.0.0.1"])

    def test_needs_a_nameserver(self) -> None:
        with self.assertRaises(ConfigError):
            ChallengeZone(ORIGIN, [], [])

    def test_hostmaster_mailbox(self) -> None:
        zone = ChallengeZone(ORIGIN, ["ns1." + ORIGIN], [], hostmaster="ops.team@example.org")
        response = ask(make_factory(zone), ORIGIN, "SOA")
        soa = response.answer[0][0]
        self.assertEqual(soa.rname.labels[0], b"ops.team")
        self.assertEqual(soa.rname.labels[1:], (b"example", b"org", b""))


class ChallengeRecordTests(SynchronousTestCase):
    def test_multiset(self) -> None:
        zone = make_zone()
        zone.add_txt(CHALLENGE, "a")
        zone.add_txt(CHALLENGE.upper() + ".", "b")
        zone.add_txt(CHALLENGE, "a")
        self.assertEqual(zone.txt_values(CHALLENGE), ("a", "b", "a"))
        self.assertEqual(zone.challenge_names(), (CHALLENGE,))
        zone.remove_txt(CHALLENGE, "a")
        self.assertEqual(zone.txt_values(CHALLENGE), ("b", "a"))
        zone.remove_txt(CHALLENGE, "missing")
        zone.remove_txt(CHALLENGE, "a")
        zone.remove_txt(CHALLENGE, "b")
        self.assertEqual(zone.txt_values(CHALLENGE), ())
        self.assertEqual(zone.challenge_names(), ())
        zone.remove_txt(CHALLENGE, "b")

    def test_outside_zone(self) -> None:
        zone = make_zone()
        with self.assertRaises(ValueError):
            zone.add_txt("_acme-challenge.example.test", "x")
        with self.assertRaises(ValueError):
            zone.add_txt("_acme-challenge.ago.example.test", "x")

    def test_serial_increases(self) -> None:
        zone = make_zone()
        server = make_factory(zone)
        first = ask(server, ORIGIN, "SOA").answer[0][0].serial
        zone.add_txt(CHALLENGE, "a")
        second = ask(server, ORIGIN, "SOA").answer[0][0].serial
        zone.remove_txt(CHALLENGE, "a")
        self.assertEqual(first, 100)
        self.assertGreater(second, first)
        self.assertGreater(zone.serial, second)

    def test_serial_listeners_told_of_every_change_until_stopped(self) -> None:
        zone = make_zone()
        heard: list[int] = []
        stop = zone.on_serial(heard.append)
        zone.add_txt(CHALLENGE, "a")
        zone.remove_txt(CHALLENGE, "missing")  # no change, no call
        zone.remove_txt(CHALLENGE, "a")
        self.assertEqual(len(heard), 2)
        self.assertEqual(heard[-1], zone.serial)
        self.assertEqual(cast(Any, zone.soa_header().payload).serial, zone.serial)
        stop()
        stop()
        zone.add_txt(CHALLENGE, "b")
        self.assertEqual(len(heard), 2)

    def test_values_served_and_withdrawn(self) -> None:
        zone = make_zone()
        server = make_factory(zone)
        # Before and after: the apex wildcard covers the name, and it has no TXT.
        self.assertEqual(ask(server, CHALLENGE, "TXT").answer, [])
        zone.add_txt(CHALLENGE, "first")
        zone.add_txt(CHALLENGE, "second")
        response = ask(server, CHALLENGE, "TXT")
        self.assertEqual(sorted(r.strings[0] for r in response.answer[0]), [b"first", b"second"])
        self.assertEqual(response.answer[0].ttl, 1)
        zone.remove_txt(CHALLENGE, "first")
        response = ask(server, CHALLENGE, "TXT")
        self.assertEqual([r.strings[0] for r in response.answer[0]], [b"second"])
        zone.remove_txt(CHALLENGE, "second")
        response = ask(server, CHALLENGE, "TXT")
        self.assertEqual((rcode(response), response.answer), (dns.rcode.NOERROR, []))
        self.assertTrue(soa_in_authority(response))

    def test_long_value_split(self) -> None:
        zone = make_zone()
        zone.add_txt(CHALLENGE, "x" * 300)
        txt = ask(make_factory(zone), CHALLENGE, "TXT").answer[0][0]
        self.assertEqual(b"".join(txt.strings), b"x" * 300)


class AnswerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.zone = make_zone()
        self.zone.add_txt(CHALLENGE, "token")
        self.server = make_factory(self.zone)

    def test_positive_answer_is_authoritative(self) -> None:
        response = ask(self.server, ORIGIN, "A")
        self.assertEqual(rcode(response), dns.rcode.NOERROR)
        self.assertTrue(response.flags & dns.flags.AA)
        self.assertFalse(response.flags & dns.flags.RA)
        self.assertEqual(response.answer[0][0].address, "127.0.0.1")
        self.assertEqual(response.answer[0].ttl, 300)

    def test_apex_soa_and_ns(self) -> None:
        soa = ask(self.server, ORIGIN, "SOA")
        self.assertEqual(soa.answer[0].rdtype, dns.rdatatype.SOA)
        self.assertEqual(str(soa.answer[0][0].mname), "ns1.go.example.test.")
        ns = ask(self.server, ORIGIN, "NS")
        self.assertEqual(
            sorted(str(r.target) for r in ns.answer[0]),
            ["ns1.go.example.test.", "ns2.go.example.test."],
        )
        self.assertTrue(ns.flags & dns.flags.AA)

    def test_nxdomain_has_soa(self) -> None:
        response = ask(self.server, "nothing.sub.go.example.test", "A")
        self.assertEqual(rcode(response), dns.rcode.NXDOMAIN)
        self.assertTrue(response.flags & dns.flags.AA)
        self.assertTrue(soa_in_authority(response))
        self.assertEqual(response.authority[0].ttl, 1)  # min(SOA TTL, challenge_ttl)

    def test_nodata_has_soa(self) -> None:
        response = ask(self.server, "ns1.go.example.test", "TXT")
        self.assertEqual(rcode(response), dns.rcode.NOERROR)
        self.assertEqual(response.answer, [])
        self.assertTrue(response.flags & dns.flags.AA)
        self.assertTrue(soa_in_authority(response))

    def test_empty_non_terminal_is_nodata(self) -> None:
        for name in ["demo.go.example.test", "sub.go.example.test"]:
            response = ask(self.server, name, "A")
            self.assertEqual(rcode(response), dns.rcode.NOERROR, name)
            self.assertEqual(response.answer, [], name)
            self.assertTrue(soa_in_authority(response), name)

    def test_out_of_zone_refused(self) -> None:
        for name in ["example.test", "ago.example.test", "other.org", "."]:
            response = ask(self.server, name, "A")
            self.assertEqual(rcode(response), dns.rcode.REFUSED, name)
            self.assertFalse(response.flags & (dns.flags.AA | dns.flags.RA), name)

    def test_other_class_refused(self) -> None:
        response = ask(self.server, ORIGIN, "A", rdclass="CH")
        self.assertEqual(rcode(response), dns.rcode.REFUSED)

    def test_case_preserved_byte_for_byte(self) -> None:
        query = dns.message.make_query("_AcMe-ChAlLeNgE.DeMo.gO.ExAmPlE.tEsT", "TXT")
        wire = query.to_wire()
        response = respond(self.server, wire, 1232)
        assert response is not None
        question_end = 12 + len(query.question[0].name.to_wire() or b"") + 4
        self.assertEqual(response[12:question_end], wire[12:question_end])
        self.assertEqual(dns.message.from_wire(response).answer[0][0].strings, (b"token",))

    def test_wildcard(self) -> None:
        for name in ["install1.go.example.test", "a.b.c.go.example.test"]:
            response = ask(self.server, name, "A")
            self.assertEqual(response.answer[0][0].address, "127.0.0.1", name)
            self.assertEqual(str(response.answer[0].name), name + ".")
            self.assertTrue(response.flags & dns.flags.AA)
        nodata = ask(self.server, "install1.go.example.test", "AAAA")
        self.assertEqual((rcode(nodata), nodata.answer), (dns.rcode.NOERROR, []))
        self.assertTrue(soa_in_authority(nodata))

    def test_wildcard_not_for_existing_names(self) -> None:
        # RFC 4592: names that exist, even empty non-terminals, get no wildcard data.
        for name in ["ns1.go.example.test", CHALLENGE, "demo.go.example.test"]:
            response = ask(self.server, name, "AAAA" if name.startswith("ns1") else "A")
            self.assertEqual(response.answer, [], name)
        below = ask(self.server, "x.demo.go.example.test", "A")
        self.assertEqual(rcode(below), dns.rcode.NXDOMAIN)

    def test_cname_followed_in_zone(self) -> None:
        response = ask(self.server, "www.go.example.test", "A")
        self.assertEqual(
            [rrset.rdtype for rrset in response.answer],
            [dns.rdatatype.CNAME, dns.rdatatype.A],
        )

    def test_caa_mx_aaaa_txt(self) -> None:
        caa = ask(self.server, ORIGIN, "CAA").answer[0][0]
        self.assertEqual((caa.flags, caa.tag, caa.value), (0, b"issue", b"letsencrypt.org"))
        mx = ask(self.server, ORIGIN, "MX").answer[0]
        self.assertEqual(
            (mx.ttl, mx[0].preference, str(mx[0].exchange)), (60, 10, "mail." + ORIGIN + ".")
        )
        self.assertEqual(ask(self.server, ORIGIN, "AAAA").answer[0][0].address, "::1")
        txt = ask(self.server, "txt." + ORIGIN, "TXT").answer[0][0]
        self.assertEqual(txt.strings, (b"hello", b"world"))

    def test_any_is_minimal(self) -> None:
        response = ask(self.server, ORIGIN, "ANY")
        self.assertEqual(len(response.answer), 1)
        self.assertEqual(response.answer[0].rdtype, dns.rdatatype.HINFO)
        self.assertEqual(response.answer[0][0].cpu, b"RFC8482")

    def test_zone_transfers_refused(self) -> None:
        for rdtype in ["AXFR", "IXFR"]:
            for udp in (1232, None):
                response = ask(self.server, ORIGIN, rdtype, udp=udp)
                self.assertEqual(rcode(response), dns.rcode.REFUSED)
                self.assertEqual(response.answer, [])

    def test_ixfr_with_its_soa_refused(self) -> None:
        # RFC 1995: an IXFR query carries the client's SOA in the authority section.
        for name in [ORIGIN, "other.org"]:
            query = dns.message.make_query(name, "IXFR")
            query.authority.append(
                dns.rrset.from_text(
                    name + ".", 0, "IN", "SOA", "ns1.x. hostmaster.x. 99 3600 600 604800 10"
                )
            )
            for udp in (1232, None):
                wire = respond(self.server, query.to_wire(), udp)
                assert wire is not None
                response = dns.message.from_wire(wire)
                self.assertEqual(rcode(response), dns.rcode.REFUSED, (name, udp))
                self.assertEqual((response.answer, response.authority), ([], []))
                self.assertEqual(response.question[0].rdtype, dns.rdatatype.IXFR)

    def test_unknown_opcode_notimp(self) -> None:
        query = dns.message.make_query(ORIGIN, "SOA")
        query.set_opcode(dns.opcode.NOTIFY)
        wire = respond(self.server, query.to_wire(), 1232)
        assert wire is not None
        response = dns.message.from_wire(wire)
        self.assertTrue(response.flags & dns.flags.QR)
        self.assertEqual(rcode(response), dns.rcode.NOTIMP)
        self.assertEqual(response.opcode(), dns.opcode.NOTIFY)

    def test_rd_copied_never_ra(self) -> None:
        query = dns.message.make_query(ORIGIN, "A")
        query.flags &= ~dns.flags.RD
        wire = respond(self.server, query.to_wire(), 1232)
        assert wire is not None
        self.assertFalse(dns.message.from_wire(wire).flags & (dns.flags.RD | dns.flags.RA))
        self.assertTrue(ask(self.server, ORIGIN, "A").flags & dns.flags.RD)

    def test_twisted_message_api(self) -> None:
        query = tdns.Message(id=7, recDes=True)
        query.queries = [tdns.Query(b"Go.Example.Test", tdns.SOA, tdns.IN)]
        response = tdns.Message()
        response.fromStr(respond(self.server, query.toStr()) or b"")
        self.assertEqual((response.id, response.auth, response.rCode), (7, True, 0))
        self.assertEqual(response.queries[0].name.name, b"Go.Example.Test")


class SizeAndEDNSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.zone = make_zone()
        for index in range(30):
            self.zone.add_txt(CHALLENGE, f"{index:02d}" + "v" * 41)  # ~55 bytes per record
        self.server = make_factory(self.zone)

    def test_udp_limit_512_without_edns(self) -> None:
        query = dns.message.make_query(CHALLENGE, "TXT").to_wire()
        wire = respond(self.server, query, 1232)
        assert wire is not None
        self.assertLessEqual(len(wire), 512)
        response = dns.message.from_wire(wire)
        self.assertTrue(response.flags & dns.flags.TC)
        self.assertEqual(response.answer, [])

    def test_edns_size_respected_and_capped(self) -> None:
        for size, fits in [(512, False), (1000, False), (4096, False), (65535, False)]:
            response = ask(self.server, CHALLENGE, "TXT", use_edns=0, payload=size)
            self.assertTrue(response.flags & dns.flags.TC, size)
            self.assertEqual(response.edns, 0)
            del fits
        self.zone.remove_txt(CHALLENGE, "00" + "v" * 41)
        for index in range(1, 12):
            self.zone.remove_txt(CHALLENGE, f"{index:02d}" + "v" * 41)
        query = dns.message.make_query(CHALLENGE, "TXT", use_edns=0, payload=4096).to_wire()
        wire = respond(self.server, query, 1232)
        assert wire is not None
        self.assertLessEqual(len(wire), 1232)
        self.assertEqual(len(dns.message.from_wire(wire).answer[0]), 18)

    def test_tcp_gets_everything(self) -> None:
        response = ask(self.server, CHALLENGE, "TXT", udp=None)
        self.assertFalse(response.flags & dns.flags.TC)
        self.assertEqual(len(response.answer[0]), 30)

    def test_opt_echoed_with_do(self) -> None:
        response = ask(self.server, ORIGIN, "SOA", use_edns=0, want_dnssec=True)
        self.assertEqual(response.edns, 0)
        self.assertTrue(response.ednsflags & dns.flags.DO)
        self.assertEqual(response.payload, 1232)
        plain = ask(self.server, ORIGIN, "SOA", use_edns=0)
        self.assertFalse(plain.ednsflags & dns.flags.DO)
        self.assertEqual(ask(self.server, ORIGIN, "SOA").edns, -1)

    def test_unknown_options_and_flags_ignored(self) -> None:
        option = dns.edns.GenericOption(cast(Any, 65001), b"abc")
        response = ask(self.server, ORIGIN, "SOA", use_edns=0, options=[option], ednsflags=0x4000)
        self.assertEqual(rcode(response), dns.rcode.NOERROR)
        self.assertEqual((tuple(response.options), response.ednsflags), ((), 0))

    def test_badvers(self) -> None:
        response = ask(self.server, ORIGIN, "SOA", use_edns=1)
        self.assertEqual(response.rcode(), dns.rcode.BADVERS)
        self.assertEqual(response.edns, 0)
        self.assertEqual(response.answer, [])


class MalformedInputTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = make_factory(make_zone())
        self.query = dns.message.make_query(ORIGIN, "SOA", id=0x4242).to_wire()

    def rcode_of(self, packet: bytes) -> int | None:
        wire = respond(self.server, packet, 1232)
        if wire is None:
            return None
        self.assertTrue(wire[2] & 0x80)
        self.assertLessEqual(len(wire), max(len(packet), 512))
        return wire[3] & 0x0F

    def test_responses_never_answered(self) -> None:
        self.assertIsNone(self.rcode_of(bytes([0x42, 0x42, 0x80 | self.query[2]]) + self.query[3:]))

    def test_short_header_dropped(self) -> None:
        for length in range(12):
            self.assertIsNone(self.rcode_of(self.query[:length]))

    def test_truncated_question_formerr(self) -> None:
        for length in range(12, len(self.query)):
            self.assertEqual(self.rcode_of(self.query[:length]), 1, length)

    def test_trailing_bytes_formerr(self) -> None:
        self.assertEqual(self.rcode_of(self.query + b"\x00"), 1)

    def test_compression_loop_formerr(self) -> None:
        header = b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        self.assertEqual(self.rcode_of(header + b"\xc0\x0c\x00\x01\x00\x01"), 1)
        # A loop in an additional record's owner: twisted's decoder sees it (and bounds
        # pointer jumps per message), so the query is malformed.
        looped = header[:11] + b"\x01" + self.query[12:] + b"\xc0\x21\x00\x10\x00\x01" + bytes(6)
        self.assertEqual(self.rcode_of(looped), 1)
        # A pointer in an additional record's owner to the question is fine.
        pointing = header[:11] + b"\x01" + self.query[12:] + b"\xc0\x0c\x00\x10\x00\x01" + bytes(6)
        self.assertEqual(self.rcode_of(pointing), 0)

    def test_two_questions_formerr(self) -> None:
        packet = self.query[:4] + b"\x00\x02" + self.query[6:] + self.query[12:]
        self.assertEqual(self.rcode_of(packet), 1)

    def test_answer_records_in_query_formerr(self) -> None:
        record = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x7f\x00\x00\x01"
        packet = self.query[:6] + b"\x00\x01" + self.query[8:] + record
        self.assertEqual(self.rcode_of(packet), 1)

    def test_two_opts_formerr(self) -> None:
        opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
        packet = self.query[:10] + b"\x00\x02" + self.query[12:] + opt + opt
        self.assertEqual(self.rcode_of(packet), 1)

    def test_bad_option_lengths_formerr(self) -> None:
        opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x05\x00\x0a\x00\x09\x00"
        packet = self.query[:10] + b"\x00\x01" + self.query[12:] + opt
        self.assertEqual(self.rcode_of(packet), 1)

    def test_meta_types(self) -> None:
        for meta in (0, 41, 249, 250):
            packet = self.query[:-4] + struct.pack("!HH", meta, 1)
            self.assertEqual(self.rcode_of(packet), 1, meta)
        for mail in (253, 254):
            packet = self.query[:-4] + struct.pack("!HH", mail, 1)
            self.assertEqual(self.rcode_of(packet), 4, mail)
