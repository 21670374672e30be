"""CAA at the apex (RFC 8659, 8657): the record through twisted's Message and dnspython,
the zone's generated issue/issuewild, their changes in the serial, AXFR and IXFR, and
``dig`` against a real socket."""

from __future__ import annotations

import shutil
from io import BytesIO
from typing import Any

import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CAA
import dns.zone
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import dns as tdns
from twisted.trial.unittest import SynchronousTestCase, TestCase

from csrproxy.dns import records as rr
from csrproxy.dns import transfer
from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.ixfr import incremental_records
from csrproxy.dns.server import DNSServerService
from csrproxy.dns.zone import CAA_MAX_TTL, ChallengeZone
from tests.dns.test_ixfr import IXFRCase
from tests.dns.test_zone import ask, rcode, soa_in_authority

ORIGIN = "go.example.test"
ACCOUNT = "https://acme-v02.api.letsencrypt.org/acme/acct/123456789"
LOCKED = f"letsencrypt.org; accounturi={ACCOUNT}; validationmethods=dns-01"
RECORDS = ["@ A 127.0.0.1", "* A 127.0.0.1", "ns1 A 127.0.0.1", "deep.sub 30 A 10.0.0.1"]


def make_zone(records: list[str] = RECORDS, clock: Any = None) -> ChallengeZone:
    return ChallengeZone(
        ORIGIN,
        ["ns1." + ORIGIN],
        records,
        serial=100,
        clock=(clock or Clock()).seconds,
    )


def caa_texts(response: dns.message.Message) -> list[str]:
    return sorted(
        rdata.to_text()
        for rrset in response.answer
        if rrset.rdtype == dns.rdatatype.CAA
        for rdata in rrset
    )


def caa_of(header: tdns.RRHeader) -> rr.Record_CAA:
    assert isinstance(header.payload, rr.Record_CAA)
    return header.payload


def round_trip(message: tdns.Message) -> tdns.Message:
    decoded = tdns.Message()
    decoded.fromStr(message.toStr())
    return decoded


class RecordTests(SynchronousTestCase):
    """Record_CAA is RDATA only: the message around it is twisted's, and dnspython agrees."""

    def test_round_trip_through_twisted_message(self) -> None:
        record = rr.Record_CAA(0, b"issue", LOCKED.encode(), ttl=60)
        message = tdns.Message(answer=1, auth=True)
        message.answers = [tdns.RRHeader(ORIGIN.encode(), rr.CAA, tdns.IN, 60, record)]
        (answer,) = round_trip(message).answers
        self.assertEqual(answer.type, rr.CAA)
        self.assertIsInstance(answer.payload, rr.Record_CAA)
        self.assertEqual(answer.payload, record)

    def test_wire_is_rfc8659(self) -> None:
        out = BytesIO()
        rr.Record_CAA(128, b"issuewild", b"ca.example").encode(out)
        self.assertEqual(out.getvalue(), b"\x80\x09issuewildca.example")

    def test_dnspython_reads_ours_and_we_read_dnspythons(self) -> None:
        ours = BytesIO()
        rr.Record_CAA(0, b"issue", LOCKED.encode()).encode(ours)
        theirs = dns.rdata.from_wire(
            dns.rdataclass.IN, dns.rdatatype.CAA, ours.getvalue(), 0, len(ours.getvalue())
        )
        assert isinstance(theirs, dns.rdtypes.ANY.CAA.CAA)
        self.assertEqual(theirs.to_text(), f'0 issue "{LOCKED}"')
        wire = dns.rdata.from_text("IN", "CAA", '0 issuewild "pki.goog"').to_wire()
        assert wire is not None
        back = rr.Record_CAA()
        back.decode(BytesIO(wire), len(wire))
        self.assertEqual((back.flags, back.tag, back.value), (0, b"issuewild", b"pki.goog"))

    def test_tag_past_the_rdata_is_a_short_record(self) -> None:
        for rdata in (b"\x00", b"\x00\x09issue"):
            with self.assertRaises(EOFError):
                rr.Record_CAA().decode(BytesIO(rdata + b"more bytes after"), len(rdata))

    def test_issuer_values(self) -> None:
        self.assertEqual(rr.caa_issuer_value("letsencrypt.org", ACCOUNT), LOCKED.encode())
        self.assertEqual(
            rr.caa_issuer_value("sectigo.com", None), b"sectigo.com; validationmethods=dns-01"
        )
        for identity, url in [
            ("lets encrypt", None),
            ("letsencrypt.org\n", None),
            ("", None),
            ("letsencrypt.org", ""),
            ("letsencrypt.org", "https://ca.test/acct/1; validationmethods=http-01"),
            ("letsencrypt.org", "https://ca.test/acct/ 1"),
            ("letsencrypt.org", "https://ca.test/acct/\u00e9"),
        ]:
            with self.assertRaises(ValueError, msg=(identity, url)):
                rr.caa_issuer_value(identity, url)


class ApexCAATests(SynchronousTestCase):
    def setUp(self) -> None:
        self.zone = make_zone()
        self.server = ZoneServerFactory(Clock(), self.zone)

    def test_none_until_set(self) -> None:
        response = ask(self.server, ORIGIN, "CAA")
        self.assertEqual((rcode(response), response.answer), (dns.rcode.NOERROR, []))
        self.assertTrue(soa_in_authority(response))

    def test_issue_and_issuewild_without_then_with_the_account(self) -> None:
        self.zone.set_caa([("letsencrypt.org", None)])
        open_to_any = '"letsencrypt.org; validationmethods=dns-01"'
        self.assertEqual(
            caa_texts(ask(self.server, ORIGIN, "CAA")),
            [f"0 issue {open_to_any}", f"0 issuewild {open_to_any}"],
        )
        self.zone.set_caa([("letsencrypt.org", ACCOUNT)])
        response = ask(self.server, ORIGIN.upper(), "CAA")  # the answer cache was dropped
        self.assertEqual(caa_texts(response), [f'0 issue "{LOCKED}"', f'0 issuewild "{LOCKED}"'])
        self.assertEqual(response.answer[0].ttl, CAA_MAX_TTL)
        self.assertTrue(response.flags & dns.flags.AA)

    def test_one_pair_per_ca(self) -> None:
        self.zone.set_caa([("letsencrypt.org", ACCOUNT), ("sectigo.com", None)])
        texts = caa_texts(ask(self.server, ORIGIN, "CAA"))
        self.assertEqual(len(texts), 4)
        self.assertIn('0 issuewild "sectigo.com; validationmethods=dns-01"', texts)
        self.zone.set_caa([])
        self.assertEqual(ask(self.server, ORIGIN, "CAA").answer, [])

    def test_ttl_is_the_zones_up_to_a_minute(self) -> None:
        zone = ChallengeZone(ORIGIN, ["ns1." + ORIGIN], [], ttl=30)
        zone.set_caa([("letsencrypt.org", None)])
        self.assertEqual({r.ttl for r in zone.caa_records()}, {30})

    def test_nodata_below_the_apex_nxdomain_where_nothing_is(self) -> None:
        # A resolver climbs from the name to the apex (RFC 8659 3): every step that
        # exists must be NOERROR/NODATA, not NXDOMAIN, or the climb stops short.
        self.zone.set_caa([("letsencrypt.org", ACCOUNT)])
        self.zone.add_txt(f"_acme-challenge.demo.{ORIGIN}", "value")
        for name in (
            f"ns1.{ORIGIN}",  # a name with records
            f"demo.{ORIGIN}",  # covered by the wildcard
            f"sub.{ORIGIN}",  # an empty non-terminal
            f"_acme-challenge.demo.{ORIGIN}",
        ):
            response = ask(self.server, name, "CAA")
            self.assertEqual((rcode(response), response.answer), (dns.rcode.NOERROR, []), name)
            self.assertTrue(soa_in_authority(response), name)
        # Below a name that exists, without a wildcard of its own: NXDOMAIN, as for any type.
        self.assertEqual(rcode(ask(self.server, f"x.deep.sub.{ORIGIN}", "CAA")), dns.rcode.NXDOMAIN)

    def test_static_iodef_kept_static_issue_refused(self) -> None:
        zone = make_zone([*RECORDS, '@ CAA 0 iodef "mailto:ops@example.test"'])
        zone.set_caa([("letsencrypt.org", ACCOUNT)])
        texts = caa_texts(ask(ZoneServerFactory(Clock(), zone), ORIGIN, "CAA"))
        self.assertEqual(texts[0], '0 iodef "mailto:ops@example.test"')
        self.assertEqual(len(texts), 3)
        for line in ['@ CAA 0 issue "letsencrypt.org"', '@ CAA 128 issuewild ";"']:
            zone = make_zone([*RECORDS, line])
            with self.assertRaises(ValueError) as e:
                zone.set_caa([("letsencrypt.org", None)])
            self.assertIn("caa = false", str(e.exception))
            zone.set_caa([])  # nothing generated: nothing to undo

    def test_bad_values_and_bound(self) -> None:
        before = self.zone.serial
        for issuers in (
            [("letsencrypt.org", "https://ca.test/a b")],
            [(f"ca{i}.example", None) for i in range(9)],
        ):
            with self.assertRaises(ValueError):
                self.zone.set_caa(issuers)
        self.assertEqual((self.zone.serial, self.zone.caa_records()), (before, ()))

    def test_apex_txt_keeps_the_caa(self) -> None:
        self.zone.set_caa([("letsencrypt.org", ACCOUNT)])
        self.zone.add_txt(ORIGIN, "at the apex")
        self.zone.remove_txt(ORIGIN, "at the apex")
        self.assertEqual(len(caa_texts(ask(self.server, ORIGIN, "CAA"))), 2)


class CAAChangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.zone = make_zone(clock=self.clock)
        self.serials: list[int] = []
        self.zone.on_serial(self.serials.append)

    def test_serial_rises_on_change_only(self) -> None:
        self.zone.set_caa([("letsencrypt.org", None)])
        first = self.zone.serial
        self.assertGreater(first, 100)
        self.zone.set_caa([("letsencrypt.org", None)])
        self.assertEqual(self.serials, [first])
        self.zone.set_caa([("letsencrypt.org", ACCOUNT)])
        self.zone.set_caa([("letsencrypt.org", ACCOUNT + "0")])  # registered again
        self.assertEqual(len(self.serials), 3)
        self.assertEqual(self.serials, sorted(set(self.serials)))
        self.assertEqual(self.zone.serial, self.serials[-1])

    def test_axfr_holds_the_apex_caa(self) -> None:
        self.zone.set_caa([("letsencrypt.org", ACCOUNT)])
        records = self.zone.transfer_records()
        caa = [r for r in records if r.type == rr.CAA]
        self.assertEqual({caa_of(r).tag for r in caa}, {b"issue", b"issuewild"})
        self.assertEqual({r.name.name for r in caa}, {ORIGIN.encode()})

    def test_ixfr_deletes_the_old_account_and_adds_the_new(self) -> None:
        self.zone.set_caa([("letsencrypt.org", None)])
        before = self.zone.serial
        self.zone.set_caa([("letsencrypt.org", ACCOUNT)])
        records = incremental_records(self.zone, before)
        assert records is not None
        types = [r.type for r in records]
        self.assertEqual(
            types, [tdns.SOA, tdns.SOA, rr.CAA, rr.CAA, tdns.SOA, rr.CAA, rr.CAA, tdns.SOA]
        )
        deleted, added = records[2:4], records[5:7]
        self.assertTrue(all(b"accounturi" not in caa_of(r).value for r in deleted))
        self.assertTrue(all(ACCOUNT.encode() in caa_of(r).value for r in added))


class CAATransferTests(IXFRCase):
    """dnspython as the secondary: its copy after IXFR equals a fresh AXFR."""

    def test_secondary_follows_an_account_change(self) -> None:
        self.patch(transfer, "TRANSFERS_PER_WINDOW", 100)
        self.zone.set_caa([("letsencrypt.org", None)])
        copy = self.fresh()
        self.zone.set_caa([("letsencrypt.org", ACCOUNT)])
        self.ixfr(copy)
        self.assertEqual(copy, self.fresh())
        rdataset = copy.get_rdataset(ORIGIN + ".", "CAA")
        assert rdataset is not None
        self.assertEqual(
            sorted(r.to_text() for r in rdataset),
            [f'0 issue "{LOCKED}"', f'0 issuewild "{LOCKED}"'],
        )


class DigTests(TestCase):
    """``dig`` against the server on a real socket (127.0.0.1, port 0)."""

    async def test_dig_shows_the_locked_apex(self) -> None:
        from twisted.internet import reactor

        dig = shutil.which("dig")
        if dig is None:
            self.fail("dig is not installed: run `make system-deps`")
        zone = make_zone()
        zone.set_caa([("letsencrypt.org", ACCOUNT)])
        service = DNSServerService(reactor, zone, ["127.0.0.1:0"])
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        port = service.ports[0].getHost().port  # type: ignore[attr-defined]
        argv = ["+norec", "+short", "-p", str(port), "@127.0.0.1", ORIGIN, "CAA"]
        out, err, code = await getProcessOutputAndValue(dig, argv, reactor=reactor)
        self.assertEqual(code, 0, err)
        self.assertEqual(
            sorted(out.decode().splitlines()),
            [f'0 issue "{LOCKED}"', f'0 issuewild "{LOCKED}"'],
        )
        argv = ["+norec", "+tcp", "-p", str(port), "@127.0.0.1", "demo." + ORIGIN, "CAA"]
        out, err, code = await getProcessOutputAndValue(dig, argv, reactor=reactor)
        self.assertIn("status: NOERROR", out.decode())
        self.assertIn("ANSWER: 0", out.decode())
