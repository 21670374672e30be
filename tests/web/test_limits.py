"""Request limits on a real HTTPChannel over a StringTransport: body size before reading,
slow and idle connections."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from csrproxy.web.limits import LimitedSite


class Echo(Resource):
    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        return b"got %d" % len(request.content.read())


class LimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.refused: list[tuple[bytes, int]] = []
        self.site = LimitedSite(
            Echo(),
            max_body=1000,
            read_timeout=5,
            idle_timeout=30,
            reactor=self.clock,
            on_refused=lambda path, status: self.refused.append((path, status)),
        )

    def connect(self) -> tuple[Any, StringTransport]:
        addr = IPv4Address("TCP", "127.0.0.1", 4321)
        proto = self.site.buildProtocol(addr)
        assert proto is not None
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def assertProblem(self, transport: StringTransport, status: int, kind: str) -> None:
        raw = transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 %d " % status), raw[:80])
        self.assertNotIn(b"100 Continue", raw)
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Type: application/problem+json", head)
        doc = json.loads(body)
        self.assertEqual(doc["status"], status)
        self.assertEqual(doc["type"], "https://csrproxy.dev/problems/" + kind)
        self.assertTrue(transport.disconnecting)

    def test_small_body_passes(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
        self.assertIn(b"got 5", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_huge_content_length_with_expect_is_refused_before_100_continue(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(
            b"POST /v1/sign HTTP/1.1\r\nHost: a\r\nContent-Length: 1099511627776\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertProblem(transport, 413, "body-too-large")
        self.assertEqual(self.refused, [(b"/v1/sign", 413)])
        # Whatever the client sends next is ignored.
        proto.dataReceived(b"x" * 5000)
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)

    def test_ten_megabyte_body_refused_at_the_headers(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(
            b"POST /v1/sign HTTP/1.1\r\nHost: a\r\nContent-Length: 10485760\r\n\r\n" + b"x" * 65536
        )
        self.assertProblem(transport, 413, "body-too-large")

    def test_chunked_body_counted_as_it_arrives(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(
            b"POST /v1/sign HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        proto.dataReceived(b"258\r\n" + b"x" * 600 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(b"258\r\n" + b"x" * 600 + b"\r\n")
        self.assertProblem(transport, 413, "body-too-large")

    def test_chunked_body_within_limit(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        self.assertIn(b"got 3", transport.value())

    def test_slow_request_cut_after_read_timeout(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST /v1/sign HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        for _ in range(4):
            self.clock.advance(1)
            proto.dataReceived(b"x")  # trickling bytes keep the idle timer alive, not this one
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertProblem(transport, 408, "request-timeout")

    def test_slow_headers_cut_too(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST /v1/sign HTTP/1.1\r\n")
        self.clock.advance(5)
        self.assertProblem(transport, 408, "request-timeout")

    def test_deadline_stops_once_the_request_is_in(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nz")
        self.clock.advance(10)
        self.assertNotIn(b"408", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_idle_connection_closed(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nz")
        self.clock.advance(31)
        self.assertTrue(transport.disconnecting)

    def test_malformed_http_is_a_problem_document(self) -> None:
        for raw in (
            b"NONSENSE\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET /x HTTP/1.1\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n",
        ):
            proto, transport = self.connect()
            proto.dataReceived(raw)
            self.assertProblem(transport, 400, "bad-request")

    def test_path_or_host_not_utf8_is_a_problem_and_the_connection_lives(self) -> None:
        for raw in (
            b"GET /%FF%FE HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /v1/orders/%C0%AF HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: \xff\r\n\r\n",
        ):
            proto, transport = self.connect()
            proto.dataReceived(raw)
            head, _, body = transport.value().partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
            self.assertIn(b"Content-Type: application/problem+json", head)
            self.assertIn("not UTF-8", json.loads(body)["detail"])
            self.assertFalse(transport.disconnecting)
            transport.clear()
            proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok")
            self.assertIn(b"got 2", transport.value())
        self.assertEqual([status for _, status in self.refused], [400, 400, 400])
