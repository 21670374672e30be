"""AXFR to configured secondaries, TSIG-signed, checked with dnspython's own TSIG."""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from csrproxy.dns import transfer, tsig
from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.server import DNSServerService
from csrproxy.dns.transfer import ZoneTransfers, keys_of
from csrproxy.dns.zone import ChallengeZone, next_serial

ORIGIN = "go.example.test"
CHALLENGE = "_acme-challenge.demo.go.example.test"
SECRET = bytes(range(32))
KEY_NAME = "csrproxy-xfr"
NOW = 1_800_000_000


class Secondary:
    def __init__(self, address: str, name: str = KEY_NAME, secret: bytes = SECRET) -> None:
        self.address = address
        self.tsig_name = name
        self.tsig_algorithm = "hmac-sha256"
        self.tsig_secret = secret


def keyring(name: str = KEY_NAME, secret: bytes = SECRET) -> dict[dns.name.Name, Any]:
    ring: dict[dns.name.Name, Any] = dns.tsigkeyring.from_text(
        {name: base64.b64encode(secret).decode()}
    )
    return ring


def make_zone(challenges: int = 1, clock: Any = None) -> ChallengeZone:
    zone = ChallengeZone(
        ORIGIN,
        ["ns1." + ORIGIN],
        ["@ A 127.0.0.1", "* 60 A 127.0.0.1", "www 60 CNAME @"],
        serial=NOW,
        clock=clock.seconds if clock is not None else (lambda: NOW),
    )
    for index in range(challenges):
        zone.add_txt(CHALLENGE, f"value-{index:04d}")
    return zone


class FakeTCP:
    """A TCP connection from ``host``, recording the replies written to it."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.transport = self
        self.host = host
        self.sent: list[bytes] = []

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, 40000)

    def writeReply(self, data: bytes, address: Any) -> None:
        self.sent.append(data)


class FactoryCase(SynchronousTestCase):
    """A factory with one secondary (127.0.0.1), fake TCP connections and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        # dnspython signs with the real time.
        self.clock.advance(time.time())
        self.zone = make_zone(clock=self.clock)
        self.factory = ZoneServerFactory(
            self.clock,
            self.zone,
            transfers=ZoneTransfers(self.clock, self.zone, keys_of([Secondary("127.0.0.1")])),
        )

    def ask(self, query: dns.message.Message, host: str = "127.0.0.1") -> list[bytes]:
        conn = FakeTCP(host)
        self.factory.packetReceived(query.to_wire(), conn, None)
        return conn.sent

    def axfr(self, ring: Any = None, **kwargs: Any) -> dns.message.Message:
        query = dns.message.make_query(ORIGIN, "AXFR")
        if ring is not None:
            query.use_tsig(ring, **kwargs)
        return query


class TransferDecisionTests(FactoryCase):
    """The factory's AXFR decisions."""

    def test_signed_transfer_from_the_secondary(self) -> None:
        query = self.axfr(keyring())
        sent = self.ask(query)
        self.assertEqual(len(sent), 1)
        reply = dns.message.from_wire(
            sent[0], keyring=keyring(), request_mac=query.mac, xfr=True, multi=True
        )
        self.assertEqual(reply.rcode(), dns.rcode.NOERROR)
        types = [rrset.rdtype for rrset in reply.answer]
        self.assertEqual(types[0], dns.rdatatype.SOA)
        self.assertEqual(types[-1], dns.rdatatype.SOA)
        self.assertIn(dns.rdatatype.TXT, types)

    def test_unsigned_refused_and_logged_once_per_interval(self) -> None:
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        for _ in range(5):
            (data,) = self.ask(self.axfr())
            self.assertEqual(dns.message.from_wire(data).rcode(), dns.rcode.REFUSED)
        self.assertEqual(len(events), 1)
        self.clock.advance(transfer.LOG_INTERVAL)
        self.ask(self.axfr())
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1]["count"], 5)
        self.assertEqual(self.factory.transfers.refused, 6)

    def test_other_address_refused_even_when_signed(self) -> None:
        (data,) = self.ask(self.axfr(keyring()), host="127.0.0.2")
        self.assertEqual(struct.unpack_from("!H", data, 2)[0] & 0xF, dns.rcode.REFUSED)

    def test_udp_refused_even_when_signed(self) -> None:
        conn = FakeTCP()
        self.factory.packetReceived(self.axfr(keyring()).to_wire(), conn, ("127.0.0.1", 5353))
        self.assertEqual(dns.message.from_wire(conn.sent[0]).rcode(), dns.rcode.REFUSED)

    def test_unknown_key_badkey(self) -> None:
        query = self.axfr(keyring("other-key"))
        (data,) = self.ask(query)
        with self.assertRaises(dns.tsig.PeerBadKey):
            dns.message.from_wire(data, keyring=keyring("other-key"), request_mac=query.mac)
        self.assertEqual(struct.unpack_from("!H", data, 2)[0] & 0xF, tsig.NOTAUTH)

    def test_wrong_secret_badsig(self) -> None:
        query = self.axfr(keyring(secret=b"x" * 32))
        (data,) = self.ask(query)
        with self.assertRaises(dns.tsig.PeerBadSignature):
            dns.message.from_wire(data, keyring=keyring(secret=b"x" * 32), request_mac=query.mac)

    def test_tampered_query_badsig(self) -> None:
        wire = bytearray(self.axfr(keyring()).to_wire())
        wire[2] ^= 0x01  # RD flipped after signing
        conn = FakeTCP()
        self.factory.packetReceived(bytes(wire), conn, None)
        self.assertEqual(struct.unpack_from("!H", conn.sent[0], 2)[0] & 0xF, tsig.NOTAUTH)

    def test_clock_skew_badtime_signed(self) -> None:
        query = self.axfr(keyring())
        self.clock.advance(tsig.FUDGE + 5)
        (data,) = self.ask(query)
        with self.assertRaises(dns.tsig.PeerBadTime):
            dns.message.from_wire(data, keyring=keyring(), request_mac=query.mac)

    def test_transfers_per_window_bounded(self) -> None:
        for _ in range(transfer.TRANSFERS_PER_WINDOW):
            (data,) = self.ask(self.axfr(keyring()))
            self.assertEqual(struct.unpack_from("!H", data, 2)[0] & 0xF, 0)
        (data,) = self.ask(self.axfr(keyring()))
        self.assertEqual(struct.unpack_from("!H", data, 2)[0] & 0xF, dns.rcode.REFUSED)
        self.clock.advance(transfer.WINDOW)
        (data,) = self.ask(self.axfr(keyring()))
        self.assertEqual(struct.unpack_from("!H", data, 2)[0] & 0xF, 0)

    def test_other_zone_and_ixfr_refused(self) -> None:
        query = dns.message.make_query("other.test", "AXFR")
        query.use_tsig(keyring())
        (data,) = self.ask(query)
        self.assertEqual(struct.unpack_from("!H", data, 2)[0] & 0xF, dns.rcode.REFUSED)
        (data,) = self.ask(dns.message.make_query(ORIGIN, "IXFR"))
        self.assertEqual(struct.unpack_from("!H", data, 2)[0] & 0xF, dns.rcode.REFUSED)

    def test_big_zone_split_and_each_message_bounded(self) -> None:
        for index in range(1000):
            self.zone.add_txt(f"_acme-challenge.n{index}.{ORIGIN}", "v" * 200)
        query = self.axfr(keyring())
        sent = self.ask(query)
        self.assertGreater(len(sent), 10)
        self.assertTrue(all(len(data) <= transfer.MESSAGE_BYTES + 200 for data in sent))
        ctx = None
        mac = query.mac
        count = 0
        for index, data in enumerate(sent):
            reply = dns.message.from_wire(
                data, keyring=keyring(), request_mac=mac, xfr=True, tsig_ctx=ctx, multi=True,
                one_rr_per_rrset=True,
            )  # fmt: skip
            ctx, mac = reply.tsig_ctx, reply.mac
            self.assertEqual(len(reply.question), 1 if index == 0 else 0)
            count += len(reply.answer)
        self.assertEqual(count, len(self.zone.transfer_records()) + 1)

    def test_zone_over_the_transfer_bound_servfail(self) -> None:
        self.patch(transfer, "TRANSFER_BYTES", 1000)
        for index in range(20):
            self.zone.add_txt(f"_acme-challenge.n{index}.{ORIGIN}", "v" * 100)
        (data,) = self.ask(self.axfr(keyring()))
        self.assertEqual(struct.unpack_from("!H", data, 2)[0] & 0xF, dns.rcode.SERVFAIL)


class SignedSOATests(FactoryCase):
    """A secondary's refresh check (a signed SOA query) gets a signed SOA, over UDP too."""

    def test_signed_soa_signed(self) -> None:
        query = dns.message.make_query(ORIGIN, "SOA")
        query.use_tsig(keyring())
        for address in (None, ("127.0.0.1", 5353)):
            conn = FakeTCP()
            self.factory.packetReceived(query.to_wire(), conn, address)
            reply = dns.message.from_wire(conn.sent[0], keyring=keyring(), request_mac=query.mac)
            self.assertEqual(reply.answer[0][0].serial, self.zone.serial)
            self.assertTrue(reply.had_tsig)

    def test_signed_soa_with_a_bad_key_notauth(self) -> None:
        query = dns.message.make_query(ORIGIN, "SOA")
        query.use_tsig(keyring(secret=b"z" * 32))
        (data,) = self.ask(query)
        self.assertEqual(struct.unpack_from("!H", data, 2)[0] & 0xF, tsig.NOTAUTH)

    def test_signed_soa_from_anyone_else_answered_as_usual(self) -> None:
        query = dns.message.make_query(ORIGIN, "SOA")
        query.use_tsig(keyring())
        (data,) = self.ask(query, host="127.0.0.9")
        self.assertEqual(struct.unpack_from("!H", data, 2)[0] & 0xF, 0)
        self.assertEqual(struct.unpack_from("!H", data, 10)[0], 0)  # no TSIG


class SerialTests(SynchronousTestCase):
    def test_every_change_raises_the_serial(self) -> None:
        zone = make_zone(challenges=0)
        seen = [zone.serial]
        zone.add_txt(CHALLENGE, "a")
        seen.append(zone.serial)
        zone.add_txt(CHALLENGE, "b")
        seen.append(zone.serial)
        zone.remove_txt(CHALLENGE, "a")
        seen.append(zone.serial)
        self.assertEqual(seen, [NOW, NOW + 1, NOW + 2, NOW + 3])

    def test_serial_follows_the_clock(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        zone = make_zone(challenges=0, clock=clock)
        clock.advance(3600)
        zone.add_txt(CHALLENGE, "a")
        self.assertEqual(zone.serial, NOW + 3600)

    def test_rfc1982_wraps(self) -> None:
        self.assertEqual(next_serial(0xFFFFFFFF, 5), 5)
        self.assertEqual(next_serial(0xFFFFFFFF, 0xFFFFFFF0), 0)
        self.assertEqual(next_serial(10, 3), 11)
        self.assertEqual(next_serial(10, 10), 11)


class RealTransferTests(TestCase):
    """dnspython's ``dns.query.xfr`` against the real server on a loopback TCP port."""

    def start(self, zone: ChallengeZone, secondaries: list[Secondary]) -> int:
        from twisted.internet import reactor

        service = DNSServerService(
            reactor, zone, ["127.0.0.1:0"], transfer_keys=keys_of(secondaries)
        )
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return int(service.ports[1].getHost().port)  # type: ignore[attr-defined]

    def xfr(self, port: int, **kwargs: Any) -> Any:
        def run() -> list[dns.message.Message]:
            return list(
                dns.query.xfr("127.0.0.1", ORIGIN, port=port, lifetime=10, timeout=10, **kwargs)
            )

        return deferToThread(run)

    async def test_full_zone_with_tsig(self) -> None:
        zone = ChallengeZone(ORIGIN, ["ns1." + ORIGIN], ["@ A 127.0.0.1", "* 60 A 127.0.0.1"])
        for index in range(300):
            zone.add_txt(f"_acme-challenge.n{index}.{ORIGIN}", f"value-{index}")
        port = self.start(zone, [Secondary("127.0.0.1")])
        messages = await self.xfr(port, keyring=keyring(), keyname=KEY_NAME)
        self.assertGreater(len(messages), 1)
        records = [rr for m in messages for rrset in m.answer for rr in rrset]
        first = messages[0].answer[0]
        last = messages[-1].answer[-1]
        self.assertEqual((first.rdtype, last.rdtype), (dns.rdatatype.SOA, dns.rdatatype.SOA))
        self.assertEqual(first[0].serial, zone.serial)
        texts = {
            rr.strings[0] for m in messages for rrset in m.answer
            if rrset.rdtype == dns.rdatatype.TXT for rr in rrset
        }  # fmt: skip
        self.assertEqual(texts, {f"value-{index}".encode() for index in range(300)})
        self.assertEqual(len(records), len(zone.transfer_records()) + 1)

        # A change is a new serial in the next transfer.
        before = zone.serial
        zone.remove_txt(f"_acme-challenge.n0.{ORIGIN}", "value-0")
        messages = await self.xfr(port, keyring=keyring(), keyname=KEY_NAME)
        self.assertGreater(messages[0].answer[0][0].serial, before)

    async def test_wrong_key_and_no_key_refused(self) -> None:
        port = self.start(make_zone(), [Secondary("127.0.0.1")])
        with self.assertRaises(dns.tsig.PeerBadSignature):
            await self.xfr(port, keyring=keyring(secret=b"y" * 32), keyname=KEY_NAME)
        with self.assertRaises(dns.tsig.PeerBadKey):
            await self.xfr(port, keyring=keyring("nope"), keyname="nope")
        with self.assertRaises(dns.query.TransferError) as caught:
            await self.xfr(port)
        self.assertEqual(caught.exception.rcode, dns.rcode.REFUSED)

    async def test_address_not_configured_refused(self) -> None:
        port = self.start(make_zone(), [Secondary("192.0.2.53")])
        with self.assertRaises(dns.query.TransferError) as caught:
            await self.xfr(port, keyring=keyring(), keyname=KEY_NAME)
        self.assertEqual(caught.exception.rcode, dns.rcode.REFUSED)
