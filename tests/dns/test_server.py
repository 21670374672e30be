"""The DNS listeners: listen specs, the UDP and TCP protocols, and real sockets on loopback."""

from __future__ import annotations

import random
import socket
import struct
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.names import client
from twisted.names import dns as tdns
from twisted.trial.unittest import SynchronousTestCase, TestCase

from csrproxy.dns.cookies import ServerCookies
from csrproxy.dns.protocols import DNSDatagramProtocol, DNSStreamProtocol
from csrproxy.dns.server import DNSServerService, parse_listen
from csrproxy.dns.zone import ChallengeZone
from csrproxy.errors import ConfigError, ListenError

ORIGIN = "go.example.test"
CHALLENGE = "_acme-challenge.demo.go.example.test"


def make_zone(challenges: int = 1) -> ChallengeZone:
    zone = ChallengeZone(ORIGIN, ["ns1." + ORIGIN], ["@ A 127.0.0.1", "* A 127.0.0.1"])
    for index in range(challenges):
        zone.add_txt(CHALLENGE, f"{index:03d}" + "t" * 40)
    return zone


def query_bytes(name: str, rdtype: str = "A", **kwargs: Any) -> bytes:
    wire: bytes = dns.message.make_query(name, rdtype, **kwargs).to_wire()
    return wire


def the_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class ParseListenTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertEqual(parse_listen("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parse_listen(" [::1]:53 "), ("::1", 53))
        self.assertEqual(parse_listen("0.0.0.0:0"), ("0.0.0.0", 0))
        self.assertEqual(parse_listen("[::]:53"), ("::", 53))

    def test_invalid(self) -> None:
        for spec in ["", "53", ":53", "localhost:53", "::1:53", "[::1]53", "1.2.3.4:x",
                     "1.2.3.4:70000", "[127.0.0.1:53", "1.2.3.4:-1"]:  # fmt: skip
            with self.assertRaises(ConfigError, msg=spec) as caught:
                parse_listen(spec)
            self.assertEqual(caught.exception.key, "dns.listen")

    def test_service_checks_specs_early(self) -> None:
        with self.assertRaises(ConfigError):
            DNSServerService(Clock(), make_zone(), ["nowhere"])


class FakeUDPTransport:
    socket = None

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


class DatagramTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rcodes: list[int] = []
        service = DNSServerService(Clock(), make_zone(), [], on_rcode=self.rcodes.append)
        self.protocol = DNSDatagramProtocol(service.factory)
        self.transport = FakeUDPTransport()
        self.protocol.makeConnection(self.transport)  # type: ignore[arg-type]

    def still_answers(self) -> None:
        self.transport.sent.clear()
        self.protocol.datagramReceived(query_bytes(ORIGIN, "SOA"), ("127.0.0.1", 4000))
        (reply, addr), = self.transport.sent  # fmt: skip
        self.assertEqual(addr, ("127.0.0.1", 4000))
        self.assertEqual(dns.message.from_wire(reply).rcode(), dns.rcode.NOERROR)

    def test_answers_and_counts(self) -> None:
        self.still_answers()
        self.protocol.datagramReceived(query_bytes("example.org"), ("127.0.0.1", 4000))
        self.assertEqual(self.rcodes, [0, 5])

    def test_port_zero_and_responses_dropped(self) -> None:
        self.protocol.datagramReceived(query_bytes(ORIGIN), ("127.0.0.1", 0))
        reply = bytearray(query_bytes(ORIGIN))
        reply[2] |= 0x80
        self.protocol.datagramReceived(bytes(reply), ("127.0.0.1", 53))
        self.assertEqual(self.transport.sent, [])

    def test_garbage_never_stops_the_server(self) -> None:
        rng = random.Random(4)
        good = query_bytes(CHALLENGE, "TXT", use_edns=0)
        packets = [
            bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 600))) for _ in range(2000)
        ]
        packets += [good[:cut] for cut in range(len(good))]
        header = b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        packets += [
            header + b"\xc0\x0c\x00\x01\x00\x01",
            header + b"\x03abc\xc0\x0c\x00\x01\x00\x01",
        ]
        for _ in range(2000):  # bit flips in a good query
            flipped = bytearray(good)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            packets.append(bytes(flipped))
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        for packet in packets:
            self.protocol.datagramReceived(packet, ("127.0.0.1", 4000))
        for reply, _ in self.transport.sent:
            self.assertTrue(reply[2] & 0x80)
            self.assertLessEqual(len(reply), 1232)
        self.assertEqual(len(events), 0, "nothing is logged for malformed packets")
        self.still_answers()


class StreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.service = DNSServerService(self.clock, make_zone(40), [], tcp_idle_timeout=5)
        self.protocol = DNSStreamProtocol(self.service.factory)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def replies(self) -> list[dns.message.Message]:
        data, out = self.transport.value(), []
        while data:
            (length,) = struct.unpack("!H", data[:2])
            out.append(dns.message.from_wire(data[2 : 2 + length]))
            data = data[2 + length :]
        return out

    def test_pipelined_and_split(self) -> None:
        first, second = query_bytes(CHALLENGE, "TXT"), query_bytes(ORIGIN, "NS")
        stream = struct.pack("!H", len(first)) + first + struct.pack("!H", len(second)) + second
        for index in range(len(stream)):
            self.protocol.dataReceived(stream[index : index + 1])
        replies = self.replies()
        self.assertEqual(len(replies), 2)
        self.assertFalse(replies[0].flags & dns.flags.TC)
        self.assertEqual(len(replies[0].answer[0]), 40)
        self.assertEqual(replies[1].answer[0].rdtype, tdns.NS)

    def test_idle_timeout(self) -> None:
        self.clock.advance(4)
        self.protocol.dataReceived(b"\x00")
        self.clock.advance(4)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnected or self.transport.disconnecting)
        self.protocol.connectionLost(None)
        self.assertEqual(self.service.connections, set())

    def test_connection_limit(self) -> None:
        service = DNSServerService(self.clock, make_zone(), [], max_tcp_connections=1)
        first, second = DNSStreamProtocol(service.factory), DNSStreamProtocol(service.factory)
        first.makeConnection(StringTransport())
        over = StringTransport()
        second.makeConnection(over)
        self.assertEqual(service.connections, {first})
        self.assertTrue(over.disconnecting)

    def test_stop_aborts_connections(self) -> None:
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.protocol.connectionLost(None)
        self.successResultOf(stopped)

    def test_garbage_keeps_connection_usable(self) -> None:
        self.protocol.dataReceived(b"\x00\x05hello\x00\x00")
        query = query_bytes(ORIGIN, "SOA")
        self.protocol.dataReceived(struct.pack("!H", len(query)) + query)
        self.assertEqual(self.replies()[-1].rcode(), dns.rcode.NOERROR)


class _OneReply(DatagramProtocol):
    def __init__(self) -> None:
        self.reply: defer.Deferred[bytes] = defer.Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if not self.reply.called:
            self.reply.callback(datagram)


class RealSocketTests(TestCase):
    """Real UDP and TCP sockets on loopback, port 0."""

    def start(
        self, zone: ChallengeZone, host: str = "127.0.0.1", **options: Any
    ) -> tuple[str, int]:
        reactor = the_reactor()

        listen = [f"[{host}]:0" if ":" in host else f"{host}:0"]
        service = DNSServerService(reactor, zone, listen, **options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        udp, tcp = service.ports
        self.assertEqual(udp.getHost().port, tcp.getHost().port)  # type: ignore[attr-defined]
        return host, udp.getHost().port  # type: ignore[attr-defined]

    def resolver(self, address: tuple[str, int]) -> client.Resolver:
        reactor = the_reactor()

        resolver = client.Resolver(servers=[address], reactor=reactor)

        def close() -> None:
            for connection in resolver.connections:
                connection.transport.loseConnection()

        self.addCleanup(close)
        return resolver

    async def exchange(self, address: tuple[str, int], packet: bytes) -> dns.message.Message:
        reactor = the_reactor()

        protocol = _OneReply()
        port = reactor.listenUDP(0, protocol, interface=address[0])
        self.addCleanup(port.stopListening)
        port.write(packet, address)
        protocol.reply.addTimeout(10, reactor)
        return dns.message.from_wire(await protocol.reply)

    async def test_udp_and_tcp_v4(self) -> None:
        address = self.start(make_zone())
        resolver = self.resolver(address)
        answers, _, _ = await resolver.lookupText(CHALLENGE.upper())
        self.assertEqual(len(answers), 1)
        self.assertEqual(answers[0].payload.data[0], b"000" + b"t" * 40)
        message = await resolver.queryTCP([tdns.Query(ORIGIN, tdns.SOA)])
        self.assertTrue(message.auth)
        self.assertEqual(message.answers[0].type, tdns.SOA)

    async def test_udp_and_tcp_v6(self) -> None:
        if not ipv6_available():
            self.skipTest("no IPv6 loopback")
        address = self.start(make_zone(), "::1")
        resolver = self.resolver(address)
        answers, _, _ = await resolver.lookupAddress("install.go.example.test")
        self.assertEqual(answers[0].payload.dottedQuad(), "127.0.0.1")
        message = await resolver.queryTCP([tdns.Query(ORIGIN, tdns.NS)])
        self.assertEqual(message.answers[0].type, tdns.NS)

    async def test_truncation_then_tcp(self) -> None:
        address = self.start(make_zone(40))
        raw = await self.exchange(address, query_bytes(CHALLENGE, "TXT"))
        self.assertTrue(raw.flags & dns.flags.TC)
        # twisted.names' client retries a truncated answer over TCP on its own.
        answers, _, _ = await self.resolver(address).lookupText(CHALLENGE)
        self.assertEqual(len(answers), 40)

    async def test_edns_and_badvers(self) -> None:
        address = self.start(make_zone())
        plain = await self.exchange(
            address, query_bytes(ORIGIN, "SOA", use_edns=0, want_dnssec=True)
        )
        self.assertEqual((plain.edns, plain.rcode()), (0, dns.rcode.NOERROR))
        self.assertTrue(plain.ednsflags & dns.flags.DO)
        bad = await self.exchange(address, query_bytes(ORIGIN, "SOA", use_edns=1))
        self.assertEqual((bad.edns, bad.rcode()), (0, dns.rcode.BADVERS))

    async def test_badcookie_then_the_retry(self) -> None:
        cookies = ServerCookies(bytes(range(16)), the_reactor().seconds)
        address = self.start(make_zone(), cookies=cookies, require_cookies=True)

        def asked(cookie: bytes) -> bytes:
            option = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, cookie)
            return query_bytes(CHALLENGE, "TXT", use_edns=0, options=[option])

        def cookie_of(message: dns.message.Message) -> bytes:
            (option,) = message.options
            data: bytes = option.to_wire()
            return data

        first = await self.exchange(address, asked(b"c" * 8))
        self.assertEqual(first.rcode(), dns.rcode.BADCOOKIE)
        self.assertEqual((len(first.question), first.answer), (1, []))
        server_cookie = cookie_of(first)
        self.assertEqual(server_cookie[:8], b"c" * 8)
        retry = await self.exchange(address, asked(server_cookie))
        self.assertEqual(retry.rcode(), dns.rcode.NOERROR)
        self.assertEqual(len(retry.answer), 1)
        self.assertEqual(cookie_of(retry), server_cookie)

    async def test_refused_and_nxdomain(self) -> None:
        address = self.start(make_zone())
        refused = await self.exchange(address, query_bytes("example.org", "A"))
        self.assertEqual(refused.rcode(), dns.rcode.REFUSED)
        missing = await self.exchange(address, query_bytes("x." + CHALLENGE, "A"))
        self.assertEqual(missing.rcode(), dns.rcode.NXDOMAIN)
        self.assertEqual(missing.authority[0].rdtype, tdns.SOA)

    async def test_garbage_then_answer(self) -> None:
        address = self.start(make_zone())
        reactor = the_reactor()

        sender = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)
        for packet in [b"", b"\x00", b"\xff" * 11, b"\x00\x01\x00\x00\x00\x01" + b"\xc0" * 20]:
            sender.write(packet, address)
        answer = await self.exchange(address, query_bytes(ORIGIN, "SOA"))
        self.assertEqual(answer.rcode(), dns.rcode.NOERROR)

    def test_busy_port_is_listen_error(self) -> None:
        reactor = the_reactor()

        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        spec = f"127.0.0.1:{holder.getsockname()[1]}"
        service = DNSServerService(reactor, make_zone(), [spec])
        with self.assertRaises(ListenError) as caught:
            service.privilegedStartService()
        self.assertEqual(caught.exception.endpoint, spec)
        self.assertEqual(service.ports, [])

    async def test_stop_closes_ports(self) -> None:
        reactor = the_reactor()

        service = DNSServerService(reactor, make_zone(), ["127.0.0.1:0"])
        service.privilegedStartService()
        service.startService()
        port = service.ports[0].getHost().port  # type: ignore[attr-defined]
        await service.stopService()
        self.assertEqual(service.ports, [])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", port))
