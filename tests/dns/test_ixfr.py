"""IXFR (RFC 1995) to configured secondaries, applied by dnspython's own IXFR client."""

from __future__ import annotations

import struct
import time
from typing import Any

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.xfr
import dns.zone
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from csrproxy.dns import transfer, tsig
from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.history import ZoneHistory
from csrproxy.dns.ixfr import up_to_date
from csrproxy.dns.server import DNSServerService
from csrproxy.dns.transfer import ZoneTransfers, keys_of
from csrproxy.dns.zone import ChallengeZone
from tests.dns.test_transfer import CHALLENGE, KEY_NAME, ORIGIN, FakeTCP, Secondary, keyring

NOW = 1_800_000_000
IN = dns.rdataclass.IN
KEY = dns.name.from_text(KEY_NAME)


def make_zone(clock: Any, history: ZoneHistory | None = None) -> ChallengeZone:
    zone = ChallengeZone(
        ORIGIN,
        ["ns1." + ORIGIN],
        ["@ A 127.0.0.1", "* 60 A 127.0.0.1", "www 60 CNAME @"],
        serial=NOW,
        clock=clock.seconds,
        history=history,
    )
    zone.add_txt(CHALLENGE, "first")
    return zone


def ixfr_query(
    serial: int, ring: Any = None, name: str = KEY_NAME, names: str = ". ."
) -> dns.message.Message:
    query = dns.message.make_query(ORIGIN, "IXFR")
    rdata = dns.rdata.from_text("IN", "SOA", f"{names} {serial} 0 0 0 0")
    query.find_rrset(
        query.authority, dns.name.from_text(ORIGIN), IN, dns.rdatatype.SOA, create=True
    ).add(rdata, 0)
    if ring is not None:
        query.use_tsig(ring, keyname=name)
    return query


def rcode_of(data: bytes) -> int:
    rcode: int = struct.unpack_from("!H", data, 2)[0] & 0xF
    return rcode


def values(copy: dns.zone.Zone) -> set[bytes]:
    rdataset = copy.get_rdataset(CHALLENGE + ".", "TXT")
    return set() if rdataset is None else {b"".join(rdata.strings) for rdata in rdataset}


class IXFRCase(SynchronousTestCase):
    """A factory with one secondary (127.0.0.1), fake TCP connections, a Clock, and the
    secondary's copy of the zone as dnspython keeps it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())  # dnspython signs with the real time
        self.zone = make_zone(self.clock)
        self.transfers = ZoneTransfers(self.clock, self.zone, keys_of([Secondary("127.0.0.1")]))
        self.factory = ZoneServerFactory(self.clock, self.zone, transfers=self.transfers)

    def send(
        self, query: dns.message.Message, host: str = "127.0.0.1", udp: bool = False
    ) -> list[bytes]:
        conn = FakeTCP(host)
        self.factory.packetReceived(query.to_wire(), conn, (host, 5353) if udp else None)
        return conn.sent

    def transfer(self, copy: dns.zone.Zone, query: dns.message.Message) -> list[Any]:
        """Send ``query``, apply the answer to ``copy`` as dnspython's IXFR client does,
        and return the answer's records, in order."""
        rdtype = query.question[0].rdtype
        serial = dns.xfr.extract_serial_from_query(query)
        sent = self.send(query)
        records: list[Any] = []
        with dns.xfr.Inbound(copy, rdtype, serial) as inbound:
            ctx = None
            for data in sent:
                reply = dns.message.from_wire(
                    data, keyring=query.keyring, request_mac=query.mac, xfr=True,
                    origin=copy.origin, tsig_ctx=ctx, multi=True, one_rr_per_rrset=True,
                )  # fmt: skip
                ctx = reply.tsig_ctx
                records.extend(reply.answer)
                done = inbound.process_message(reply)
            self.assertTrue(done)
        return records

    def fresh(self) -> dns.zone.Zone:
        copy = dns.zone.Zone(ORIGIN)
        query, _ = dns.xfr.make_query(copy, serial=None, keyring=keyring(), keyname=KEY)
        self.transfer(copy, query)
        return copy

    def ixfr(self, copy: dns.zone.Zone) -> list[Any]:
        query, _ = dns.xfr.make_query(copy, keyring=keyring(), keyname=KEY)
        self.assertEqual(query.question[0].rdtype, dns.rdatatype.IXFR)
        return self.transfer(copy, query)


class IncrementalTests(IXFRCase):
    def setUp(self) -> None:
        super().setUp()
        self.patch(transfer, "TRANSFERS_PER_WINDOW", 100)

    def test_incremental_after_changes_equals_a_fresh_axfr(self) -> None:
        copy = self.fresh()
        old = self.zone.serial
        self.zone.add_txt(CHALLENGE, "second")
        self.zone.add_txt(f"_acme-challenge.other.{ORIGIN}", "third")
        self.zone.remove_txt(CHALLENGE, "first")
        self.zone.add_txt(CHALLENGE, "fourth")
        records = self.ixfr(copy)
        self.assertEqual(copy, self.fresh())
        self.assertEqual(values(copy), {b"second", b"fourth"})
        # The incremental form: SOA, then per change SOA(old) - SOA(new) +, then SOA.
        serials = [r[0].serial for r in records if r.rdtype == dns.rdatatype.SOA]
        current = self.zone.serial
        steps = [serial for step in range(old, current) for serial in (step, step + 1)]
        self.assertEqual(serials, [current, *steps, current])
        self.assertEqual(len(records), 2 + 2 * 4 + 4)

    def test_multiset_add_twice_remove_once_keeps_the_value(self) -> None:
        copy = self.fresh()
        self.zone.add_txt(CHALLENGE, "twice")
        self.zone.add_txt(CHALLENGE, "twice")
        self.zone.remove_txt(CHALLENGE, "twice")
        records = self.ixfr(copy)
        self.assertEqual(values(copy), {b"first", b"twice"})
        self.assertEqual(copy, self.fresh())
        # One change adds the value; the other two are empty (SOA, SOA).
        self.assertEqual([r.rdtype for r in records].count(dns.rdatatype.TXT), 1)
        self.zone.remove_txt(CHALLENGE, "twice")
        self.ixfr(copy)
        self.assertEqual(values(copy), {b"first"})
        self.assertEqual(copy, self.fresh())

    def test_current_serial_single_soa(self) -> None:
        copy = self.fresh()
        records = self.ixfr(copy)
        self.assertEqual(len(records), 1)
        self.assertEqual(records[0][0].serial, self.zone.serial)
        self.assertEqual(copy, self.fresh())

    def test_newer_serial_single_soa(self) -> None:
        query = ixfr_query(self.zone.serial + 10, keyring())
        (data,) = self.send(query)
        reply = dns.message.from_wire(data, keyring=keyring(), request_mac=query.mac, xfr=True)
        self.assertEqual([rrset.rdtype for rrset in reply.answer], [dns.rdatatype.SOA])
        self.assertTrue(up_to_date(5, 0xFFFFFFF0))  # RFC 1982: 5 follows 0xFFFFFFF0
        self.assertFalse(up_to_date(0xFFFFFFF0, 5))

    def test_unknown_serial_full_zone(self) -> None:
        copy = self.fresh()
        self.zone.add_txt(CHALLENGE, "second")
        # An older copy from before this process: its serial is not in the history.
        stale = dns.zone.Zone(ORIGIN)
        query = ixfr_query(NOW - 50, keyring())
        records = self.transfer(stale, query)
        self.assertNotEqual(records[1].rdtype, dns.rdatatype.SOA)  # AXFR form
        self.assertEqual(records[0], records[-1])
        self.assertEqual(stale, self.fresh())
        self.assertNotEqual(copy, stale)

    def test_a_new_zone_answers_the_full_zone(self) -> None:
        copy = self.fresh()
        # A restart: a new zone, its serial from the time, no history.
        self.zone = ChallengeZone(
            ORIGIN, ["ns1." + ORIGIN], ["@ A 127.0.0.1"], serial=self.zone.serial + 1000,
            clock=self.clock.seconds,
        )  # fmt: skip
        self.zone.add_txt(CHALLENGE, "after")
        soa = copy.get_rdataset("@", "SOA")
        assert soa is not None
        self.assertIsNone(self.zone.history.since(soa[0].serial))
        transfers = ZoneTransfers(self.clock, self.zone, self.transfers.keys)
        self.factory = ZoneServerFactory(self.clock, self.zone, transfers=transfers)
        records = self.ixfr(copy)
        self.assertNotEqual(records[1].rdtype, dns.rdatatype.SOA)
        self.assertEqual(copy, self.fresh())

    def test_history_bound_drops_the_oldest_then_full_zone(self) -> None:
        self.zone.history = ZoneHistory(max_changes=3)
        copy = self.fresh()
        self.zone.add_txt(CHALLENGE, "a")
        self.zone.add_txt(CHALLENGE, "b")
        self.zone.add_txt(CHALLENGE, "c")
        self.assertEqual(len(self.ixfr(copy)), 2 + 3 * 2 + 3)  # within the bound
        self.zone.add_txt(CHALLENGE, "d")
        self.zone.add_txt(CHALLENGE, "e")
        self.zone.add_txt(CHALLENGE, "f")
        self.zone.add_txt(CHALLENGE, "g")  # the change from copy's serial is dropped
        records = self.ixfr(copy)
        self.assertNotEqual(records[1].rdtype, dns.rdatatype.SOA)
        self.assertEqual(copy, self.fresh())

    def test_incremental_over_the_transfer_bound_sends_the_full_zone(self) -> None:
        copy = self.fresh()
        for index in range(30):
            self.zone.add_txt(CHALLENGE, f"v{index}")
            self.zone.remove_txt(CHALLENGE, f"v{index}")
        full = len(self.fresh().to_text())
        self.patch(transfer, "TRANSFER_BYTES", full + 1500)
        records = self.ixfr(copy)
        self.assertNotEqual(records[1].rdtype, dns.rdatatype.SOA)
        self.assertEqual(copy, self.fresh())


class DecisionTests(IXFRCase):
    """IXFR is held to AXFR's rules."""

    def test_client_soa_with_compressed_names(self) -> None:
        # A secondary sends its own SOA: mname and rname point into the question name.
        self.patch(transfer, "TRANSFERS_PER_WINDOW", 100)
        copy = self.fresh()
        self.zone.add_txt(CHALLENGE, "second")
        soa = copy.get_rdataset("@", "SOA")
        assert soa is not None
        serial = soa[0].serial
        query = ixfr_query(serial, keyring(), names=f"ns1.{ORIGIN}. hostmaster.{ORIGIN}.")
        self.assertEqual(query.to_wire().count(b"\x02go\x07example\x04test"), 1)  # compressed
        records = self.transfer(copy, query)
        self.assertEqual(records[1][0].serial, serial)  # incremental
        self.assertEqual(copy, self.fresh())

    def test_wrong_secret_notauth(self) -> None:
        ring = keyring(secret=b"x" * 32)
        query = ixfr_query(NOW, ring)
        (data,) = self.send(query)
        self.assertEqual(rcode_of(data), tsig.NOTAUTH)
        with self.assertRaises(dns.tsig.PeerBadSignature):
            dns.message.from_wire(data, keyring=ring, request_mac=query.mac)

    def test_unknown_key_notauth(self) -> None:
        (data,) = self.send(ixfr_query(NOW, keyring("other-key"), "other-key"))
        self.assertEqual(rcode_of(data), tsig.NOTAUTH)

    def test_unsigned_refused(self) -> None:
        (data,) = self.send(ixfr_query(NOW))
        self.assertEqual(rcode_of(data), dns.rcode.REFUSED)
        self.assertEqual(self.transfers.refused, 1)

    def test_not_a_secondary_refused(self) -> None:
        for udp in (False, True):
            (data,) = self.send(ixfr_query(NOW, keyring()), host="127.0.0.2", udp=udp)
            self.assertEqual(rcode_of(data), dns.rcode.REFUSED)

    def test_udp_single_soa_signed(self) -> None:
        self.zone.add_txt(CHALLENGE, "second")
        query = ixfr_query(NOW, keyring())
        (data,) = self.send(query, udp=True)
        reply = dns.message.from_wire(data, keyring=keyring(), request_mac=query.mac)
        self.assertEqual(reply.rcode(), dns.rcode.NOERROR)
        self.assertEqual(len(reply.answer), 1)
        self.assertEqual(reply.answer[0][0].serial, self.zone.serial)
        self.assertTrue(reply.had_tsig)

    def test_udp_unsigned_refused(self) -> None:
        (data,) = self.send(ixfr_query(NOW), udp=True)
        self.assertEqual(rcode_of(data), dns.rcode.REFUSED)

    def test_no_soa_in_authority_formerr(self) -> None:
        query = dns.message.make_query(ORIGIN, "IXFR")
        query.use_tsig(keyring(), keyname=KEY_NAME)
        (data,) = self.send(query)
        reply = dns.message.from_wire(data, keyring=keyring(), request_mac=query.mac)
        self.assertEqual(reply.rcode(), dns.rcode.FORMERR)

    def test_other_record_in_authority_formerr(self) -> None:
        query = dns.message.make_query(ORIGIN, "IXFR")
        rrset = dns.rrset.from_text(ORIGIN + ".", 0, "IN", "NS", "ns1." + ORIGIN + ".")
        query.authority.append(rrset)
        query.use_tsig(keyring(), keyname=KEY_NAME)
        (data,) = self.send(query)
        self.assertEqual(rcode_of(data), dns.rcode.FORMERR)

    def test_other_zone_refused(self) -> None:
        query = dns.message.make_query("other.test", "IXFR")
        query.use_tsig(keyring(), keyname=KEY_NAME)
        (data,) = self.send(query)
        self.assertEqual(rcode_of(data), dns.rcode.REFUSED)

    def axfr(self) -> int:
        query = dns.message.make_query(ORIGIN, "AXFR")
        query.use_tsig(keyring(), keyname=KEY_NAME)
        return rcode_of(self.send(query)[0])

    def test_full_zone_answers_share_the_axfr_window(self) -> None:
        for _ in range(transfer.TRANSFERS_PER_WINDOW - 1):
            self.assertEqual(self.axfr(), 0)
        unknown = ixfr_query(NOW - 50, keyring())  # answered in AXFR form
        self.assertEqual(rcode_of(self.send(unknown)[0]), 0)
        self.assertEqual(self.axfr(), dns.rcode.REFUSED)
        self.assertEqual(rcode_of(self.send(unknown)[0]), dns.rcode.REFUSED)
        # Incremental answers have their own window.
        self.assertEqual(rcode_of(self.send(ixfr_query(NOW, keyring()))[0]), 0)
        self.clock.advance(transfer.WINDOW)
        self.assertEqual(self.axfr(), 0)

    def test_incremental_answers_have_a_window_of_their_own(self) -> None:
        self.patch(transfer, "INCREMENTAL_PER_WINDOW", 3)
        current = ixfr_query(self.zone.serial, keyring())  # the SOA alone counts too
        for query in (ixfr_query(NOW, keyring()), current, current):
            self.assertEqual(rcode_of(self.send(query)[0]), 0)
        (data,) = self.send(ixfr_query(NOW, keyring()))
        self.assertEqual(rcode_of(data), dns.rcode.REFUSED)
        self.assertEqual(self.transfers.refused, 1)
        self.assertEqual(self.axfr(), 0)  # full transfers are counted apart
        # UDP answers are one SOA, not transfers: not held to either window.
        (data,) = self.send(ixfr_query(NOW, keyring()), udp=True)
        self.assertEqual(rcode_of(data), 0)
        self.clock.advance(transfer.WINDOW)
        self.assertEqual(rcode_of(self.send(ixfr_query(NOW, keyring()))[0]), 0)

    def test_a_secondary_following_every_change_is_not_refused(self) -> None:
        # As Knot does after each NOTIFY: one IXFR a change, many a minute.
        copy = self.fresh()
        for index in range(transfer.TRANSFERS_PER_WINDOW * 5):
            self.zone.add_txt(CHALLENGE, f"v{index}")
            self.assertEqual(len(self.ixfr(copy)), 2 + 2 + 1)
        self.assertEqual(self.transfers.refused, 0)
        self.assertEqual(copy, self.fresh())


class RealIXFRTests(TestCase):
    """dnspython's ``dns.query.inbound_xfr`` against the real server on loopback."""

    def start(self, zone: ChallengeZone) -> int:
        from twisted.internet import reactor

        service = DNSServerService(
            reactor, zone, ["127.0.0.1:0"], transfer_keys=keys_of([Secondary("127.0.0.1")])
        )
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return int(service.ports[1].getHost().port)  # type: ignore[attr-defined]

    def inbound(self, port: int, copy: dns.zone.Zone, **kwargs: Any) -> Any:
        def run() -> None:
            query, _ = dns.xfr.make_query(copy, keyring=keyring(), keyname=KEY, **kwargs)
            dns.query.inbound_xfr(
                "127.0.0.1", copy, query, port=port, lifetime=10, timeout=10,
                udp_mode=dns.query.UDPMode.TRY_FIRST,
            )  # fmt: skip

        return deferToThread(run)

    async def test_incremental_over_udp_then_tcp(self) -> None:
        zone = ChallengeZone(ORIGIN, ["ns1." + ORIGIN], ["@ A 127.0.0.1", "* 60 A 127.0.0.1"])
        for index in range(50):
            zone.add_txt(f"_acme-challenge.n{index}.{ORIGIN}", f"value-{index}")
        port = self.start(zone)
        copy = dns.zone.Zone(ORIGIN)
        await self.inbound(port, copy, serial=None)  # AXFR
        zone.add_txt(CHALLENGE, "new")
        zone.add_txt(CHALLENGE, "new")
        zone.remove_txt(CHALLENGE, "new")
        zone.remove_txt(f"_acme-challenge.n0.{ORIGIN}", "value-0")
        await self.inbound(port, copy)  # IXFR: the single SOA over UDP, then TCP
        soa = copy.get_rdataset("@", "SOA")
        assert soa is not None
        self.assertEqual(soa[0].serial, zone.serial)
        self.assertEqual(values(copy), {b"new"})
        fresh = dns.zone.Zone(ORIGIN)
        await self.inbound(port, fresh, serial=None)
        self.assertEqual(copy, fresh)
        self.assertIsNone(copy.get_node(f"_acme-challenge.n0.{ORIGIN}."))
