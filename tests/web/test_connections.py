"""Connection caps, back-pressure on pipelined requests and the refusal summary, on real
LimitedChannels over StringTransports (no sockets)."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from csrproxy.config.api import parse_api
from csrproxy.config.model import APIConfig
from csrproxy.config.reader import Table
from csrproxy.errors import ConfigError
from csrproxy.web.connections import source_of
from csrproxy.web.limits import (
    EVICTED,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_ADDRESS,
    LimitedChannel,
    LimitedSite,
)

ANSWER = b"a" * 1000


class Answers(Resource):
    """Answers every GET with 1,000 bytes; ``/slow`` is never answered (until asked)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        if request.path == b"/slow":
            self.pending.append(request)
            return NOT_DONE_YET
        return ANSWER


class NonReadingPeer(StringTransport):
    """A transport whose peer never reads: like twisted's FileDescriptor it tells its
    producer to pause once more than ``buffer_size`` bytes are unsent, and to resume
    when :meth:`drain` empties it."""

    def __init__(self, buffer_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.buffer_size = buffer_size
        self.told = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.told and len(self.io.getvalue()) > self.buffer_size and self.producer:
            self.told = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        out: bytes = self.value()
        self.clear()
        if self.told and self.producer is not None:
            self.told = False
            self.producer.resumeProducing()
        return out


def capture_log(case: SynchronousTestCase) -> list[LogEvent]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class SiteCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Answers()
        self.connection_refusals: list[str] = []
        self.site = self.make_site()
        self.events = capture_log(self)

    def make_site(self, **kwargs: Any) -> LimitedSite:
        options: dict[str, Any] = {
            "max_body": 1000,
            "read_timeout": 5,
            "idle_timeout": 30,
            "reactor": self.clock,
            "on_connection_refused": self.connection_refusals.append,
        }
        options.update(kwargs)
        return LimitedSite(self.resource, **options)

    def connect(
        self, addr: Any = None, transport: StringTransport | None = None
    ) -> tuple[LimitedChannel | None, StringTransport]:
        addr = addr or IPv4Address("TCP", "127.0.0.1", 4321)
        proto = self.site.buildProtocol(addr)
        transport = transport or StringTransport(peerAddress=addr)
        if proto is not None:
            proto.makeConnection(transport)
        return proto, transport

    def warnings(self) -> list[LogEvent]:
        return [e for e in self.events if e["log_level"].name in ("warn", "error", "critical")]


class ConnectionCapTests(SiteCase):
    def test_per_address_cap_closes_the_next_one_and_frees_on_close(self) -> None:
        addr = IPv4Address("TCP", "192.0.2.1", 1)
        open_ = [self.connect(addr)[0] for _ in range(32)]
        self.assertNotIn(None, open_)
        self.assertIsNone(self.site.buildProtocol(addr))
        self.assertEqual(self.connection_refusals, [TOO_MANY_FROM_ADDRESS])
        # Another address is not affected.
        self.assertIsNotNone(self.connect(IPv4Address("TCP", "192.0.2.2", 1))[0])
        first = open_[0]
        assert first is not None
        first.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(self.site.buildProtocol(addr))

    def test_total_cap(self) -> None:
        self.site = self.make_site(max_connections=5)
        for i in range(5):
            self.assertIsNotNone(self.connect(IPv4Address("TCP", f"192.0.2.{i}", 1))[0])
        self.assertIsNone(self.site.buildProtocol(IPv4Address("TCP", "198.51.100.1", 1)))
        self.assertEqual(self.connection_refusals, [TOO_MANY_CONNECTIONS])
        self.assertEqual(self.site.open_connections, 5)

    def test_a_full_site_takes_a_new_source_from_the_heaviest(self) -> None:
        # A few sources holding every slot cannot keep everyone else out.
        self.site = self.make_site(max_connections=6, max_connections_per_address=4)
        heavy = [self.connect(IPv4Address("TCP", "192.0.2.1", 1)) for _ in range(4)]
        light = [self.connect(IPv4Address("TCP", "192.0.2.2", 1)) for _ in range(2)]
        self.assertEqual(self.site.open_connections, 6)
        proto, _ = self.connect(IPv4Address("TCP", "198.51.100.1", 1))
        self.assertIsNotNone(proto)
        self.assertTrue(heavy[0][1].disconnected or heavy[0][1].disconnecting)
        self.assertFalse(any(t.disconnected for _, t in heavy[1:] + light))
        self.assertEqual(self.site.open_connections, 6)
        self.assertEqual(self.site.open_by_source["192.0.2.1"], 3)
        self.assertEqual(self.connection_refusals, [EVICTED])
        # A source already among the heaviest is refused, not served by evicting.
        self.connect(IPv4Address("TCP", "198.51.100.1", 1))
        self.connect(IPv4Address("TCP", "198.51.100.1", 1))
        self.assertIsNone(self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)))
        self.assertEqual(self.connection_refusals[-1], TOO_MANY_CONNECTIONS)
        self.assertLessEqual(self.site.open_connections, 6)
        # The evicted connection's own close does not count twice.
        evicted = heavy[0][0]
        assert evicted is not None
        before = self.site.open_connections
        evicted.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.site.open_connections, before)

    def test_ipv6_counts_per_slash_64_and_mapped_ipv4_as_ipv4(self) -> None:
        self.site = self.make_site(max_connections_per_address=2)
        a = [IPv6Address("TCP", f"2001:db8:0:1::{i}", 1) for i in (1, 2, 3)]
        self.assertIsNotNone(self.connect(a[0])[0])
        self.assertIsNotNone(self.connect(a[1])[0])
        self.assertIsNone(self.site.buildProtocol(a[2]))  # same /64, other host
        self.assertIsNotNone(self.connect(IPv6Address("TCP", "2001:db8:0:2::1", 1))[0])
        self.connect(IPv4Address("TCP", "192.0.2.9", 1))
        self.connect(IPv4Address("TCP", "192.0.2.9", 2))
        self.assertIsNone(self.site.buildProtocol(IPv6Address("TCP", "::ffff:192.0.2.9", 1)))
        self.assertEqual(source_of(IPv6Address("TCP", "fe80::1%eth0", 1))[0], "fe80::/64")

    def test_trusted_proxies_and_unix_peers_count_only_towards_the_total(self) -> None:
        self.site = self.make_site(
            max_connections=40, max_connections_per_address=2, proxies=[ip_network("10.0.0.0/8")]
        )
        for _ in range(20):
            self.assertIsNotNone(self.connect(IPv4Address("TCP", "10.1.1.1", 1))[0])
            self.assertIsNotNone(self.connect(UNIXAddress(b"/run/csrproxy.sock"))[0])
        self.assertIsNone(self.site.buildProtocol(IPv4Address("TCP", "10.1.1.1", 1)))
        self.assertEqual(self.connection_refusals, [TOO_MANY_CONNECTIONS])

    def test_a_flood_of_refusals_logs_one_summary_line_a_second(self) -> None:
        addr = IPv4Address("TCP", "192.0.2.1", 1)
        for _ in range(32):
            self.connect(addr)
        for _ in range(2000):
            self.assertIsNone(self.site.buildProtocol(addr))
        self.assertEqual(self.warnings(), [])
        self.clock.advance(1)
        lines = self.warnings()
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["counts"], {TOO_MANY_FROM_ADDRESS: 2000})
        for _ in range(10):
            for _ in range(100):
                self.site.buildProtocol(addr)
            self.clock.advance(0.1)
        self.clock.advance(1)
        self.assertEqual(len(self.warnings()), 2)
        self.assertEqual(len(self.connection_refusals), 3000)

    def test_request_refusals_are_summarised_too(self) -> None:
        for i in range(100):
            proto, _ = self.connect(IPv4Address("TCP", f"192.0.2.{i}", 1))
            assert proto is not None
            proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999\r\n\r\n")
        self.clock.advance(1)
        lines = self.warnings()
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["counts"], {"body-too-large": 100})

    def test_idle_connections_time_out_without_a_line_each(self) -> None:
        transports = [self.connect(IPv4Address("TCP", f"192.0.2.{i}", 1))[1] for i in range(20)]
        self.clock.advance(31)
        self.assertTrue(all(t.disconnecting for t in transports))
        self.assertEqual([e for e in self.events if "Timing out" in str(e)], [])

    def test_a_client_that_will_not_close_is_aborted_without_a_line_each(self) -> None:
        transports = []
        for port in range(50):
            proto, transport = self.connect(IPv4Address("TCP", f"192.0.2.{port}", 1))
            assert proto is not None
            transport.loseConnection = lambda: None  # type: ignore[method-assign]
            transports.append(transport)
        self.clock.advance(30)  # idle timeout: close asked, the peer ignores it
        self.clock.advance(15)  # abortTimeout: forced
        self.assertTrue(all(t.disconnecting or t.disconnected for t in transports))
        self.assertEqual([e for e in self.events if "Forcibly" in str(e.get("log_format"))], [])
        self.clock.advance(1)
        self.assertEqual(len(self.warnings()), 1, self.warnings())

    def test_config_keys(self) -> None:
        self.assertEqual(
            (APIConfig.max_connections, APIConfig.max_connections_per_address), (1000, 32)
        )
        config = parse_api(Table({"max_connections": 50, "max_connections_per_address": 4}, "api"))
        self.assertEqual((config.max_connections, config.max_connections_per_address), (50, 4))
        with self.assertRaises(ConfigError):
            parse_api(Table({"max_connections": 0}, "api"))


GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


class BackPressureTests(SiteCase):
    buffer_size = 4096
    read_size = 4096

    def peer(self) -> tuple[LimitedChannel, NonReadingPeer]:
        addr = IPv4Address("TCP", "127.0.0.1", 4321)
        proto, transport = self.connect(addr, NonReadingPeer(self.buffer_size, peerAddress=addr))
        assert proto is not None and isinstance(transport, NonReadingPeer)
        return proto, transport

    def feed(self, proto: LimitedChannel, transport: StringTransport, data: bytes) -> bytes:
        """Deliver ``data`` in reads of ``read_size`` while the transport reads; the rest."""
        while data and transport.producerState == "producing":
            proto.dataReceived(data[: self.read_size])
            data = data[self.read_size :]
        return data

    def test_client_that_never_reads_stops_being_read_and_answered(self) -> None:
        proto, transport = self.peer()
        rest = self.feed(proto, transport, GET * 25_000)  # 650 KB of pipelined requests
        self.assertEqual(transport.producerState, "paused")
        unsent = len(transport.value())
        self.assertLessEqual(unsent, self.buffer_size + len(ANSWER) + 200)
        self.assertLessEqual(proto._buffered(), self.read_size)
        self.assertGreater(len(rest), 600_000)
        # Whatever it sends, nothing more is answered until it reads.
        self.clock.advance(10)
        self.assertEqual(len(transport.value()), unsent)

    def test_answers_resume_in_order_as_the_client_reads(self) -> None:
        proto, transport = self.peer()
        count, answered, most = 2000, 0, 0
        rest = self.feed(proto, transport, GET * count)
        while answered < count:
            most = max(most, len(transport.value()) + proto._buffered())
            answered += transport.drain().count(b"HTTP/1.1 200 OK")
            rest = self.feed(proto, transport, rest)
        self.assertEqual(answered, count)
        self.assertEqual(rest, b"")
        self.assertLessEqual(most, self.buffer_size + len(ANSWER) + 200 + self.read_size)
        self.assertFalse(transport.disconnecting)

    def test_held_client_is_cut_by_the_idle_timer(self) -> None:
        proto, transport = self.peer()
        self.feed(proto, transport, GET * 1000)
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(31)
        self.assertTrue(transport.disconnecting)

    def test_read_ahead_while_a_request_is_answered_is_bounded(self) -> None:
        self.site = self.make_site(pipeline_buffer=2048)
        self.buffer_size = 10**7  # this client reads its answers
        proto, transport = self.peer()
        self.read_size = 512
        rest = self.feed(proto, transport, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n" + GET * 4000)
        self.assertEqual(len(self.resource.pending), 1)
        self.assertEqual(transport.producerState, "paused")
        self.assertLessEqual(proto._buffered(), 2048 + 512)
        self.assertGreater(len(rest), 90_000)
        # Answering it lets the buffered requests through and reading resume.
        pending = self.resource.pending.pop()
        pending.write(b"done")
        pending.finish()
        self.assertEqual(transport.producerState, "producing")
        self.assertGreater(transport.value().count(b"HTTP/1.1 200 OK"), 2)


class DeadlineTests(SiteCase):
    def test_a_pipelined_request_has_its_own_deadline(self) -> None:
        proto, transport = self.connect()
        assert proto is not None
        proto.dataReceived(GET + b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
        self.assertEqual(transport.value().count(b"200 OK"), 1)
        for _ in range(4):
            self.clock.advance(1)
            proto.dataReceived(b"c" if _ < 2 else b"")
        self.assertNotIn(b"408", transport.value())
        self.clock.advance(1)
        self.assertIn(b"HTTP/1.1 408 ", transport.value())

    def test_each_request_on_a_kept_alive_connection_has_the_full_deadline(self) -> None:
        proto, transport = self.connect()
        assert proto is not None
        proto.dataReceived(GET)
        self.clock.advance(20)  # idle, within idle_timeout
        proto.dataReceived(b"GET /x HTTP/1.1\r\n")
        for _ in range(4):
            self.clock.advance(1)
            proto.dataReceived(b"X-A: b\r\n")  # every byte resets the idle timer, not this
        self.assertNotIn(b"408", transport.value())
        self.clock.advance(1)
        self.assertIn(b"HTTP/1.1 408 ", transport.value())
        self.assertTrue(transport.disconnecting)
