"""DNS over TCP under a hostile client: back-pressure, per-message deadlines, caps per
source and in total, and the refusal summary (``csrproxy.dns.limits``)."""

from __future__ import annotations

import struct
from typing import Any, cast

from twisted.internet import address
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.names import client
from twisted.names import dns as tdns
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyClass, verifyObject

from csrproxy.dns import limits
from csrproxy.dns.limits import (
    CONNECTION_BYTES,
    DNS_TCP_BUDGET,
    TCP_BUFFER,
    TCP_IDLE_TIMEOUT,
    TCP_MAX_CONNECTIONS,
    TCP_MAX_INPUT,
    TCP_MAX_PER_SOURCE,
    TCP_MAX_QUERY,
    TCP_MAX_REPLY,
    TCP_MESSAGE_TIMEOUT,
    RefusalSummary,
    memory_bound,
    source_of,
)
from csrproxy.dns.protocols import DNSStreamProtocol
from csrproxy.dns.server import DNSServerService
from csrproxy.testing.transports import BufferedTransport
from tests.dns.test_server import CHALLENGE, ORIGIN, make_zone, query_bytes, the_reactor

# 200 TXT values of 43 bytes: an answer of about 11 KB, so two pass TCP_BUFFER.
BIG = 200


def framed(packet: bytes) -> bytes:
    return struct.pack("!H", len(packet)) + packet


def reply_ids(data: bytes) -> list[int]:
    ids = []
    while data:
        (length,) = struct.unpack("!H", data[:2])
        ids.append(struct.unpack("!H", data[2:4])[0])
        data = data[2 + length :]
    return ids


def big_queries(count: int) -> bytes:
    wire = bytearray(query_bytes(CHALLENGE, "TXT"))
    out = []
    for index in range(count):
        wire[0:2] = struct.pack("!H", index)
        out.append(framed(bytes(wire)))
    return b"".join(out)


def peer(host: str, port: int = 40000) -> address.IPv4Address | address.IPv6Address:
    if ":" in host:
        return address.IPv6Address("TCP", host, port)
    return address.IPv4Address("TCP", host, port)


class Events:
    """The log events of one test."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.observer = EventLoggingObserver()
        globalLogPublisher.addObserver(self.observer)
        case.addCleanup(globalLogPublisher.removeObserver, self.observer)

    def summaries(self) -> list[dict[str, Any]]:
        return [e for e in self.observer if "DNS TCP" in e.get("log_format", "")]


class MemoryBoundTests(SynchronousTestCase):
    def test_arithmetic(self) -> None:
        self.assertEqual(TCP_MAX_INPUT, 16384 + 4096 + 1)
        self.assertEqual(CONNECTION_BYTES, TCP_MAX_INPUT + 16384 + 65537)
        self.assertEqual(memory_bound(), 256 * 102402)
        self.assertLessEqual(memory_bound(), DNS_TCP_BUDGET)
        self.assertEqual(TCP_MAX_REPLY, 2 + 65535)
        self.assertLessEqual(TCP_MAX_PER_SOURCE * CONNECTION_BYTES, 2 * 1024 * 1024)

    def test_fake_transport_is_a_transport(self) -> None:
        for interface in (ITransport, IConsumer, IPushProducer):
            self.assertTrue(verifyClass(interface, BufferedTransport))


class BackPressureTests(SynchronousTestCase):
    """A client pipelining queries with big answers and reading none of them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.rcodes: list[int] = []
        self.reasons: list[str] = []
        self.service = DNSServerService(
            self.clock, make_zone(BIG), [], on_rcode=self.rcodes.append,
            on_refusal=self.reasons.append,
        )  # fmt: skip
        self.protocol = DNSStreamProtocol(self.service.factory)
        self.transport = BufferedTransport()
        self.transport.connect(self.protocol)

    def assert_within_bounds(self) -> None:
        self.assertLessEqual(self.transport.most_unsent, TCP_BUFFER + TCP_MAX_REPLY)
        self.assertLessEqual(len(self.protocol._unprocessed), TCP_MAX_INPUT)

    def test_registers_as_streaming_producer(self) -> None:
        self.assertTrue(verifyObject(IPushProducer, self.protocol))
        self.assertIs(self.transport.producer, self.protocol)
        self.assertTrue(self.transport.streaming)
        self.assertEqual(self.transport.bufferSize, TCP_BUFFER)

    def test_stops_reading_while_answers_unsent(self) -> None:
        count = 1000
        stream = big_queries(count)
        self.transport.send(stream)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(len(self.rcodes), 2, "two answers pass TCP_BUFFER")
        self.assertEqual(len(self.transport.inbound), len(stream) - TCP_BUFFER, "one read")
        self.assert_within_bounds()
        # More from the client changes nothing while nothing is read.
        self.transport.send(big_queries(100))
        self.assertEqual(len(self.rcodes), 2)
        # A client that reads gets every answer, in order, the bounds held throughout.
        ids: list[int] = []
        for _ in range(10 * count):
            ids += reply_ids(self.transport.read())
            self.transport.pump()
            self.assert_within_bounds()
            if len(ids) == count + 100:
                break
        self.assertEqual(ids, list(range(count)) + list(range(100)))
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.reasons, [])

    def test_unread_answers_abort_after_idle_timeout(self) -> None:
        self.transport.send(big_queries(50))
        self.clock.advance(TCP_IDLE_TIMEOUT - 0.5)
        self.assertFalse(self.transport.disconnected)
        self.transport.send(framed(query_bytes(ORIGIN, "SOA")))  # sending does not help
        self.clock.advance(0.5)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.reasons, [limits.UNREAD])
        self.assertEqual(self.protocol._unprocessed, b"")

    def test_reads_past_a_pause_abort(self) -> None:
        # A transport that kept reading while paused: the input bound still holds.
        stream = big_queries(2000)
        for start in range(0, len(stream), 4096):
            self.protocol.dataReceived(stream[start : start + 4096])
            self.assertLessEqual(len(self.protocol._unprocessed), TCP_MAX_INPUT)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.reasons, [limits.OVERRUN])
        self.assertEqual(len(self.rcodes), 2)

    def test_query_length_bound(self) -> None:
        self.transport.send(framed(b"\x00" * TCP_MAX_QUERY))  # garbage, but within the bound
        self.assertFalse(self.transport.disconnecting)
        self.transport.send(struct.pack("!H", TCP_MAX_QUERY + 1))
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.reasons, [limits.TOO_LONG])


class DeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reasons: list[str] = []
        self.service = DNSServerService(self.clock, make_zone(), [], on_refusal=self.reasons.append)
        self.protocol = DNSStreamProtocol(self.service.factory)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def answers(self) -> int:
        return len(reply_ids(self.transport.value()))

    def test_drip_feed_closed_at_message_deadline(self) -> None:
        stream = framed(query_bytes(ORIGIN, "SOA"))
        self.assertGreater(len(stream), TCP_MESSAGE_TIMEOUT + 2)
        for second, byte in enumerate(stream):
            if second >= TCP_MESSAGE_TIMEOUT:
                break
            self.protocol.dataReceived(bytes([byte]))  # a byte every second
            self.assertFalse(self.transport.disconnecting, second)
            self.clock.advance(1)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.reasons, [limits.MESSAGE_TIMEOUT])
        self.assertEqual(self.answers(), 0)

    def test_each_query_has_its_own_deadline(self) -> None:
        first, second = framed(query_bytes(ORIGIN, "SOA")), framed(query_bytes(ORIGIN, "NS"))
        self.clock.advance(20)
        self.protocol.dataReceived(first + second[:1])  # the second's first byte: t=20
        self.clock.advance(3)
        self.protocol.dataReceived(second[1:5])
        self.clock.advance(TCP_MESSAGE_TIMEOUT - 3.1)
        self.protocol.dataReceived(second[5:])  # complete just before t=25
        self.assertEqual(self.answers(), 2)
        self.clock.advance(TCP_IDLE_TIMEOUT - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.reasons, [], "an idle close is not a refusal")

    def test_late_second_query_closed(self) -> None:
        first, second = framed(query_bytes(ORIGIN, "SOA")), framed(query_bytes(ORIGIN, "NS"))
        self.protocol.dataReceived(first + second[:3])
        self.clock.advance(TCP_MESSAGE_TIMEOUT - 0.1)
        self.protocol.dataReceived(second[3:-1])
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.reasons, [limits.MESSAGE_TIMEOUT])

    def test_queries_keep_connection_open(self) -> None:
        query = framed(query_bytes(ORIGIN, "SOA"))
        for _ in range(10):
            self.clock.advance(TCP_IDLE_TIMEOUT - 1)
            self.protocol.dataReceived(query)
        self.assertEqual(self.answers(), 10)
        self.assertFalse(self.transport.disconnecting)

    def test_silent_connection_closed_after_idle_timeout(self) -> None:
        self.clock.advance(TCP_IDLE_TIMEOUT - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnected)
        self.protocol.connectionLost(None)
        self.assertEqual(self.service.connections, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reasons: list[str] = []
        self.events = Events(self)

    def serve(self, **kwargs: Any) -> DNSServerService:
        return DNSServerService(
            self.clock, make_zone(), [], on_refusal=self.reasons.append, **kwargs
        )

    def connect(
        self, service: DNSServerService, host: str
    ) -> tuple[DNSStreamProtocol, StringTransport]:
        protocol, transport = (
            DNSStreamProtocol(service.factory),
            StringTransport(peerAddress=peer(host)),
        )
        protocol.makeConnection(transport)
        return protocol, transport

    def test_per_source_cap(self) -> None:
        service = self.serve()
        held = [self.connect(service, "192.0.2.1") for _ in range(TCP_MAX_PER_SOURCE)]
        self.assertFalse(any(t.disconnecting for _, t in held))
        protocol, over = self.connect(service, "192.0.2.1")
        self.assertTrue(over.disconnected)
        self.assertNotIn(protocol, service.connections)
        self.assertEqual(self.reasons, [limits.PER_SOURCE])
        _, transport = self.connect(service, "198.51.100.7")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(service.connections), TCP_MAX_PER_SOURCE + 1)
        # A closed connection frees its source's slot.
        held[0][0].connectionLost(None)
        _, again = self.connect(service, "192.0.2.1")
        self.assertFalse(again.disconnecting)

    def test_ipv6_sources_are_64s(self) -> None:
        service = self.serve()
        for index in range(TCP_MAX_PER_SOURCE):
            self.assertFalse(self.connect(service, f"2001:db8::{index + 1:x}")[1].disconnecting)
        self.assertTrue(self.connect(service, "2001:db8::ffff:1")[1].disconnected)
        self.assertFalse(self.connect(service, "2001:db8:0:1::1")[1].disconnecting)
        self.assertEqual(self.reasons, [limits.PER_SOURCE])

    def test_source_of(self) -> None:
        self.assertEqual(source_of(peer("192.0.2.1")), "192.0.2.1")
        self.assertEqual(source_of(peer("::ffff:192.0.2.1")), "192.0.2.1")
        self.assertEqual(source_of(peer("2001:db8::1%eth0")), "2001:db8::/64")
        self.assertEqual(source_of(peer("2001:db8:1:2:3:4:5:6")), "2001:db8:1:2::/64")

    def test_total_cap(self) -> None:
        service = self.serve(max_tcp_connections=8, max_tcp_per_source=6)
        first = [self.connect(service, "192.0.2.1") for _ in range(6)]
        for _ in range(2):
            self.connect(service, "198.51.100.7")
        self.assertEqual(self.reasons, [])
        # Full: a source with fewer gets in, and the oldest of the one holding most goes.
        newcomer, transport = self.connect(service, "198.51.100.7")
        self.assertFalse(transport.disconnecting)
        self.assertTrue(first[0][1].disconnected)
        self.assertFalse(any(t.disconnecting for _, t in first[1:]))
        self.assertEqual(self.reasons, [limits.EVICTED])
        self.assertEqual(len(service.factory.tcp), 8)
        first[0][0].connectionLost(None)
        self.assertEqual(len(service.connections), 8)
        self.assertIn(newcomer, service.connections)
        # The source holding most (5 against 3), under its own cap, is refused.
        _, refused = self.connect(service, "192.0.2.1")
        self.assertTrue(refused.disconnected)
        self.assertEqual(self.reasons, [limits.EVICTED, limits.TOTAL])
        self.assertEqual(len(service.factory.tcp), 8)

    def test_full_server_still_takes_new_sources(self) -> None:
        service = self.serve()
        sources = TCP_MAX_CONNECTIONS // TCP_MAX_PER_SOURCE
        held = {
            index: [self.connect(service, f"192.0.2.{index}") for _ in range(TCP_MAX_PER_SOURCE)]
            for index in range(sources)
        }
        self.assertEqual(len(service.connections), TCP_MAX_CONNECTIONS)
        for index in range(40):
            _, transport = self.connect(service, f"198.51.100.{index}")
            self.assertFalse(transport.disconnecting, index)
            self.assertEqual(len(service.factory.tcp), TCP_MAX_CONNECTIONS)
        # The full sources reconnecting evict only among themselves, or are refused.
        for _ in range(3):
            for index in range(sources):
                self.connect(service, f"192.0.2.{index}")
        for index in range(40):
            self.assertEqual(service.factory.tcp.count(f"198.51.100.{index}"), 1)
        evicted = sum(t.disconnected for group in held.values() for _, t in group)
        self.assertEqual(evicted, self.reasons.count(limits.EVICTED))
        self.assertEqual(len(service.factory.tcp), TCP_MAX_CONNECTIONS)
        self.assertLessEqual(set(self.reasons), {limits.EVICTED, limits.TOTAL})

    def test_refusals_logged_once_a_second_in_summary(self) -> None:
        service = self.serve(max_tcp_per_source=1)
        self.connect(service, "192.0.2.1")
        for index in range(500):
            self.connect(service, "192.0.2.1")
            self.connect(service, f"203.0.113.{index % 2}")
            self.clock.advance(0.001)
        self.assertEqual(self.events.summaries(), [], "nothing per connection")
        self.assertEqual(len(self.reasons), 500 + 498)
        self.clock.advance(1)
        (line,) = self.events.summaries()
        self.assertEqual(line["total"], 998)
        self.assertEqual(line["reasons"], "dns_tcp_per_source 998")
        self.assertTrue(line["top"].startswith("192.0.2.1 500"), line["top"])
        # Another burst: one more line, a second after its first refusal.
        for _ in range(100):
            self.connect(service, "192.0.2.1")
            self.clock.advance(0.009)
        self.assertEqual(len(self.events.summaries()), 1)
        self.clock.advance(0.2)
        self.assertEqual(len(self.events.summaries()), 2)
        self.assertEqual(self.events.summaries()[1]["total"], 100)

    def test_summary_names_few_sources(self) -> None:
        summary = RefusalSummary(self.clock)
        for index in range(5000):
            summary.refused(limits.PER_SOURCE, f"10.0.{index // 256}.{index % 256}")
        self.assertLessEqual(len(summary._sources), limits.SUMMARY_SOURCES * 4)
        self.clock.advance(1)
        (line,) = self.events.summaries()
        self.assertEqual(line["total"], 5000)
        self.assertEqual(line["top"].count(","), limits.SUMMARY_SOURCES - 1)

    def test_stop_flushes_summary(self) -> None:
        service = self.serve(max_tcp_per_source=1)
        self.connect(service, "192.0.2.1")
        self.connect(service, "192.0.2.1")
        self.assertEqual(self.events.summaries(), [])
        stopped = service.stopService()
        self.assertEqual(len(self.events.summaries()), 1)
        for connection in list(service.connections):
            connection.connectionLost(None)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Flooder(Protocol):
    """Pipelines ``count`` big-answer queries and never reads."""

    def __init__(self, count: int) -> None:
        self.count = count

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.pauseProducing()
        transport.write(big_queries(self.count))


class RealSocketBackPressureTests(TestCase):
    """The same over a real loopback connection, with twisted's own TCP transport."""

    async def test_non_reading_client_is_paused_and_bounded(self) -> None:
        reactor = the_reactor()
        answers: list[int] = []
        service = DNSServerService(
            reactor, make_zone(BIG), ["127.0.0.1:0"], on_rcode=answers.append
        )
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        port = service.ports[0].getHost().port  # type: ignore[attr-defined]
        count = 3000  # 33 MB of answers if all were buffered
        factory = ClientFactory.forProtocol(lambda: _Flooder(count))
        connector = reactor.connectTCP("127.0.0.1", port, factory)
        self.addCleanup(connector.disconnect)

        async def settle() -> None:
            # Until the server has paused and answered nothing for a few turns (10 s at most).
            seen, still = -1, 0
            for _ in range(500):
                await deferLater(reactor, 0.02, lambda: None)
                paused = [c for c in service.connections if c.paused]
                still = still + 1 if paused and len(answers) == seen else 0
                seen = len(answers)
                if still >= 5:
                    return
            self.fail(f"the server never stopped reading ({len(answers)} answers)")

        await settle()
        self.assertLess(len(answers), count)
        (server,) = service.connections
        transport: Any = server.transport
        # twisted's FileDescriptor buffer: what it holds, sent part included.
        held = len(transport.dataBuffer) + transport._tempDataLen
        self.assertLessEqual(held, TCP_BUFFER + TCP_MAX_REPLY)
        self.assertLessEqual(len(server._unprocessed), TCP_MAX_INPUT)
        # Another client still gets TCP answers meanwhile.
        resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        message = await resolver.queryTCP([tdns.Query(ORIGIN, tdns.SOA)])
        self.assertEqual(message.answers[0].type, tdns.SOA)
        for connection in resolver.connections:
            connection.transport.loseConnection()


class UDPSendErrorTests(SynchronousTestCase):
    def test_a_failing_send_is_logged_once_not_per_datagram(self) -> None:
        import errno as errnos

        from twisted.logger import ILogObserver, globalLogPublisher

        from csrproxy.dns.protocols import DNSDatagramProtocol

        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

        class Controller:
            reactor = Clock()

        proto = DNSDatagramProtocol(cast(Any, Controller()))

        def refuse(data: bytes, addr: Any) -> None:
            raise OSError(errnos.EPERM, "Operation not permitted")

        proto._sendto = refuse
        for port in range(1, 101):
            proto.writeReply(b"reply", ("192.0.2.1", port))
        failing = [e for e in events if "DNS replies failing" in str(e.get("log_format"))]
        self.assertEqual(len(failing), 1)
