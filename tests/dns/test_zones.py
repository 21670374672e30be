"""Several zones behind one server: routing by name, answers, caches and transfers per zone."""

from __future__ import annotations

import time
from typing import Any

import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.transfer import TRANSFERS_PER_WINDOW, ZoneTransfers, keys_of
from csrproxy.dns.zone import ChallengeZone
from csrproxy.dns.zones import Zones
from csrproxy.testing.dns import reply_to
from tests.dns.test_transfer import FakeTCP, Secondary, keyring

FIRST, SECOND = "go.example.test", "go-other.example.net"
NS = ["ns1.go.example.test", "ns2.go.example.test"]
RECORDS = ["ns1 A 192.0.2.1", "* A 127.0.0.1"]


def make_zone(origin: str, clock: Any = None) -> ChallengeZone:
    return ChallengeZone(
        origin, NS, RECORDS, clock=clock.seconds if clock is not None else time.time
    )


def make_zones(clock: Any = None) -> Zones:
    return Zones([make_zone(FIRST, clock), make_zone(SECOND, clock)])


def ask(factory: ZoneServerFactory, name: str, rdtype: str = "A") -> dns.message.Message:
    data = reply_to(factory, dns.message.make_query(name, rdtype).to_wire())
    assert data is not None
    return dns.message.from_wire(data)


class ZonesTests(SynchronousTestCase):
    def test_find_by_longest_suffix(self) -> None:
        zones = Zones([make_zone("example.test"), make_zone("go.example.net")])
        self.assertEqual(zones.origins, ("example.test", "go.example.net"))
        self.assertEqual(zones.origin, "example.test")
        cases: list[tuple[str | bytes, str]] = [
            ("example.test", "example.test"),
            ("A.B.Example.Test.", "example.test"),
            (b"x.go.example.net", "go.example.net"),
            ("go.example.net", "go.example.net"),
        ]
        for name, origin in cases:
            found = zones.find(name)
            assert found is not None, name
            self.assertEqual(found.origin, origin)
        for name in ("example.net", "ago.example.net", "test", "", "example.test.evil"):
            self.assertIsNone(zones.find(name), name)
        self.assertIs(zones.at("GO.example.net."), list(zones)[1])
        self.assertIsNone(zones.at("x.go.example.net"))

    def test_nested_or_empty_refused(self) -> None:
        with self.assertRaises(ValueError):
            Zones([make_zone("example.test"), make_zone("go.example.test")])
        with self.assertRaises(ValueError):
            Zones([make_zone("go.example.test"), make_zone("example.test")])
        with self.assertRaises(ValueError):
            Zones([])

    def test_records_go_to_their_zone(self) -> None:
        zones = make_zones()
        first, second = list(zones)
        zones.add_txt("_acme-challenge.a." + SECOND, "v")
        self.assertEqual(second.txt_values("_acme-challenge.a." + SECOND), ("v",))
        self.assertEqual(first.challenge_names(), ())
        self.assertEqual(zones.challenge_names(), ("_acme-challenge.a." + SECOND,))
        self.assertEqual(zones.txt_values("_acme-challenge.a." + SECOND), ("v",))
        with self.assertRaises(ValueError):
            zones.add_txt("_acme-challenge.a.example.org", "v")
        zones.remove_txt("_acme-challenge.a.example.org", "v")  # outside: nothing to do
        zones.remove_txt("_acme-challenge.a." + SECOND, "v")
        self.assertEqual(zones.challenge_names(), ())

    def test_version_and_serial_listeners(self) -> None:
        zones = make_zones()
        seen: list[tuple[str, int]] = []
        stop = zones.on_serial(lambda origin, serial: seen.append((origin, serial)))
        before = zones.version
        zones.add_txt("_acme-challenge.a." + SECOND, "v")
        self.assertGreater(zones.version, before)
        self.assertEqual([origin for origin, _ in seen], [SECOND])
        stop()
        zones.add_txt("_acme-challenge.a." + FIRST, "v")
        self.assertEqual(len(seen), 1)


class TwoZoneFactoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.zones = make_zones()
        self.factory = ZoneServerFactory(Clock(), self.zones)

    def test_soa_and_ns_of_each_zone(self) -> None:
        for origin in (FIRST, SECOND):
            reply = ask(self.factory, origin, "SOA")
            self.assertEqual(reply.rcode(), dns.rcode.NOERROR)
            self.assertTrue(reply.flags & dns.flags.AA)
            self.assertEqual(reply.answer[0].name.to_text(), origin + ".")
            soa = reply.answer[0][0]
            self.assertEqual(soa.rname.to_text(), f"hostmaster.{origin}.")
            self.assertEqual(soa.mname.to_text(), NS[0] + ".")
            ns = ask(self.factory, origin, "NS")
            self.assertEqual(
                sorted(r.target.to_text() for r in ns.answer[0]), [n + "." for n in NS]
            )
            # The relative records are in each zone.
            self.assertEqual(ask(self.factory, "ns1." + origin).answer[0][0].address, "192.0.2.1")

    def test_nxdomain_and_nodata_carry_their_zones_soa(self) -> None:
        self.factory = ZoneServerFactory(
            Clock(),
            Zones(
                [
                    ChallengeZone(FIRST, NS, ["www A 127.0.0.1"]),
                    ChallengeZone(SECOND, NS, ["www A 127.0.0.1"]),
                ]
            ),
        )
        for origin in (FIRST, SECOND):
            missing = ask(self.factory, "nope." + origin)
            self.assertEqual(missing.rcode(), dns.rcode.NXDOMAIN)
            self.assertEqual(missing.authority[0].name.to_text(), origin + ".")
            nodata = ask(self.factory, "www." + origin, "TXT")
            self.assertEqual(nodata.rcode(), dns.rcode.NOERROR)
            self.assertEqual(nodata.answer, [])
            self.assertEqual(nodata.authority[0].name.to_text(), origin + ".")

    def test_outside_every_zone_refused(self) -> None:
        for name in ("example.test", "example.net", "other-example.net", "x.example.org"):
            self.assertEqual(ask(self.factory, name).rcode(), dns.rcode.REFUSED, name)

    def test_a_change_in_either_zone_drops_the_caches(self) -> None:
        name = "_acme-challenge.a." + SECOND
        self.assertEqual(ask(self.factory, name, "TXT").answer, [])
        self.zones.add_txt(name, "v1")
        self.assertEqual(ask(self.factory, name, "TXT").answer[0][0].strings, (b"v1",))
        self.assertEqual(ask(self.factory, FIRST, "SOA").rcode(), dns.rcode.NOERROR)
        self.zones.remove_txt(name, "v1")
        self.assertEqual(ask(self.factory, name, "TXT").answer, [])

    def test_one_zone_still_accepted(self) -> None:
        zone = make_zone(FIRST)
        factory = ZoneServerFactory(Clock(), zone)
        self.assertIs(factory.zone, zone)
        self.assertEqual(ask(factory, SECOND).rcode(), dns.rcode.REFUSED)
        self.assertEqual(ask(factory, FIRST, "SOA").rcode(), dns.rcode.NOERROR)


class TwoZoneTransferTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())  # dnspython signs with the real time
        self.zones = make_zones(self.clock)
        self.zones.add_txt("_acme-challenge.a." + SECOND, "second-value")
        keys = keys_of([Secondary("127.0.0.1")])
        self.factory = ZoneServerFactory(
            self.clock, self.zones, transfers=ZoneTransfers(self.clock, self.zones, keys)
        )

    def transfer(self, origin: str, rdtype: str = "AXFR") -> dns.message.Message:
        query = dns.message.make_query(origin, rdtype)
        query.use_tsig(keyring())
        conn = FakeTCP()
        self.factory.packetReceived(query.to_wire(), conn, None)
        (sent,) = conn.sent
        return dns.message.from_wire(
            sent, keyring=keyring(), request_mac=query.mac, xfr=rdtype == "AXFR", multi=True
        )

    def test_axfr_of_each_zone(self) -> None:
        for origin in (FIRST, SECOND):
            reply = self.transfer(origin)
            self.assertEqual(reply.rcode(), dns.rcode.NOERROR)
            names = {rrset.name.to_text() for rrset in reply.answer}
            self.assertTrue(all(n.endswith(origin + ".") for n in names), names)
            self.assertEqual(reply.answer[0].rdtype, dns.rdatatype.SOA)
            self.assertEqual(reply.answer[-1].rdtype, dns.rdatatype.SOA)
            txt = [r for r in reply.answer if r.rdtype == dns.rdatatype.TXT]
            self.assertEqual(bool(txt), origin == SECOND)

    def test_signed_soa_of_each_zone(self) -> None:
        for origin, zone in zip((FIRST, SECOND), self.zones, strict=True):
            reply = self.transfer(origin, "SOA")
            self.assertEqual(reply.answer[0].name.to_text(), origin + ".")
            self.assertEqual(reply.answer[0][0].serial, zone.serial)

    def test_other_names_refused(self) -> None:
        query = dns.message.make_query("a." + SECOND, "AXFR")
        query.use_tsig(keyring())
        conn = FakeTCP()
        self.factory.packetReceived(query.to_wire(), conn, None)
        self.assertEqual(
            dns.message.from_wire(conn.sent[0], keyring=False).rcode(), dns.rcode.REFUSED
        )

    def test_full_transfers_bounded_per_zone(self) -> None:
        for _ in range(TRANSFERS_PER_WINDOW):
            for origin in (FIRST, SECOND):
                self.assertEqual(self.transfer(origin).rcode(), dns.rcode.NOERROR)
        query = dns.message.make_query(FIRST, "AXFR")
        query.use_tsig(keyring())
        conn = FakeTCP()
        self.factory.packetReceived(query.to_wire(), conn, None)
        self.assertEqual(
            dns.message.from_wire(conn.sent[0], keyring=False).rcode(), dns.rcode.REFUSED
        )

    def test_ixfr_of_the_second_zone_is_its_own_changes(self) -> None:
        second = list(self.zones)[1]
        before = second.serial
        self.clock.advance(5)
        self.zones.add_txt("_acme-challenge.b." + SECOND, "new-value")
        self.zones.add_txt("_acme-challenge.b." + FIRST, "first-zone-value")
        query = dns.message.make_query(SECOND, "IXFR")
        rdata = dns.rdata.from_text("IN", "SOA", f". . {before} 0 0 0 0")
        query.find_rrset(
            query.authority,
            dns.name.from_text(SECOND),
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            create=True,
        ).add(rdata, 0)
        query.use_tsig(keyring())
        conn = FakeTCP()
        self.factory.packetReceived(query.to_wire(), conn, None)
        (sent,) = conn.sent
        reply = dns.message.from_wire(
            sent, keyring=keyring(), request_mac=query.mac, one_rr_per_rrset=True
        )
        self.assertEqual(reply.rcode(), dns.rcode.NOERROR)
        soas = [r[0].serial for r in reply.answer if r.rdtype == dns.rdatatype.SOA]
        self.assertEqual(soas, [second.serial, before, second.serial, second.serial])
        txt = [r for r in reply.answer if r.rdtype == dns.rdatatype.TXT]
        self.assertEqual([r.name.to_text() for r in txt], ["_acme-challenge.b." + SECOND + "."])
