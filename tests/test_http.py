"""The daemon's HTTP client (csrproxy.http): treq over one keep-alive Agent, verified TLS.

Driven through ACMETransport.send, the way the daemon uses it, against a real twisted.web
HTTPS server on 127.0.0.1:0 (a throwaway CA made once per module), and against a raw TCP
server that answers with hostile bytes.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from csrproxy.acme.jws import AccountKey
from csrproxy.acme.problems import ACMETransportError
from csrproxy.acme.response import ACMEResponse
from csrproxy.acme.transport import MAX_CONNECTIONS, ACMETransport
from csrproxy.http import MAX_PER_HOST, VerifyingPolicy, make_http_client, make_pool
from tests.support.tls import CA, CERT, KEY, NAME_CA, NAME_CERT, NAME_KEY, OTHER_CERT, OTHER_KEY

ACCOUNT_KEY = AccountKey.generate("ec256")


def the_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Behaviour(Resource):
    """What the test server does, by path; remembers each request and its connection."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bytes]] = []
        self.channels: list[Any] = []
        self.hanging: list[Request] = []
        self.arrived: Deferred[None] | None = None
        self.drop = 0
        self.huge = 0

    def connections(self) -> int:
        return len({id(c) for c in self.channels})

    def render(self, request: Request) -> Any:
        assert request.method is not None and request.path is not None
        body = request.content.read() if request.content is not None else b""
        self.seen.append((request.method, request.path, body))
        self.channels.append(request.channel)
        if self.arrived is not None and not self.arrived.called:
            self.arrived.callback(None)
        path = request.path
        if path == b"/chunked":
            request.write(b"hel")
            request.write(b"lo")
            request.finish()
            return NOT_DONE_YET
        if path == b"/hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if path == b"/stall":  # the head and part of the body, then nothing
            request.setHeader(b"Content-Length", b"100")
            request.write(b"x" * 10)
            self.hanging.append(request)
            return NOT_DONE_YET
        if path == b"/huge":
            request.setHeader(b"Content-Length", str(self.huge).encode())
            request.write(b"x" * self.huge)
            request.finish()
            return NOT_DONE_YET
        if path == b"/tls-break":  # the request arrived; now the TLS stream breaks
            tls: Any = request.channel.transport
            tls.transport.write(b"\x17\x03\x03\x00\x10" + b"x" * 16)
            self.hanging.append(request)
            return NOT_DONE_YET
        if path == b"/drop" and self.drop > 0:
            self.drop -= 1
            cast(Any, request.channel).transport.abortConnection()
            return NOT_DONE_YET
        request.setHeader(b"Replay-Nonce", b"nonce-" + path[1:])
        return b"echo:" + request.method + b" " + path + b" " + body


class Hostile(Protocol):
    """Answers the first bytes of a request with a fixed reply, then hangs up."""

    reply = b""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.reply)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class ClientTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def serve(self, cert: str = CERT, key: str = KEY) -> tuple[Behaviour, str]:
        behaviour = Behaviour()
        site = Site(behaviour)
        site.noisy = False
        with open(cert, "rb") as c, open(key, "rb") as k:
            options = PrivateCertificate.loadPEM(k.read() + c.read()).options()
        port = the_reactor().listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def hang_up() -> None:
            for request in behaviour.hanging:
                if not request.finished and not request._disconnected:
                    cast(Any, request.channel).transport.abortConnection()

        self.addCleanup(hang_up)
        return behaviour, f"https://127.0.0.1:{port.getHost().port}"

    def transport(
        self, cafile: str = CA, request_timeout: float = 10.0, max_per_host: int = MAX_PER_HOST
    ) -> tuple[ACMETransport, HTTPConnectionPool]:
        pool = make_pool(the_reactor(), max_per_host)
        self.addCleanup(pool.closeCachedConnections)
        http = make_http_client(the_reactor(), cafile, pool)
        t = ACMETransport(self.clock, http, ACCOUNT_KEY, request_timeout=request_timeout)
        return t, pool

    async def get(
        self, t: ACMETransport, url: str, method: str = "GET", body: bytes | None = None
    ) -> ACMEResponse:
        return await t.send(method, url, body)

    async def test_keep_alive_reuse(self) -> None:
        server, base = self.serve()
        t, _ = self.transport()
        for i in range(3):
            resp = await self.get(t, f"{base}/a{i}")
            self.assertEqual((resp.status, resp.body), (200, f"echo:GET /a{i} ".encode()))
            self.assertEqual(resp.header("Replay-Nonce"), f"nonce-a{i}")
        resp = await self.get(t, base + "/p", "POST", b"{}")
        self.assertEqual(resp.body, b"echo:POST /p {}")
        self.assertEqual(server.connections(), 1)

    async def test_no_log_line_per_connection(self) -> None:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        server, base = self.serve()
        t, pool = self.transport()
        for i in range(3):
            await self.get(t, f"{base}/n{i}")
        server.channels[-1].loseConnection()
        await pool.closeCachedConnections()
        self.assertEqual([e for e in events if "factory" in str(e.get("log_format", ""))], [])

    async def test_plain_http_and_chunked_bodies(self) -> None:
        behaviour = Behaviour()
        port = the_reactor().listenTCP(0, Site(behaviour), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        t, _ = self.transport()
        base = f"http://127.0.0.1:{port.getHost().port}"
        self.assertEqual((await self.get(t, base + "/a")).body, b"echo:GET /a ")
        self.assertEqual((await self.get(t, base + "/chunked")).body, b"hello")
        self.assertEqual(behaviour.connections(), 1)

    async def test_idle_connections_kept_per_host_are_bounded(self) -> None:
        server, base = self.serve()
        t, pool = self.transport(max_per_host=2)
        server.arrived = None
        answers = [
            Deferred.fromCoroutine(self.get(t, f"{base}/c{i}", "POST", b"{}")) for i in range(6)
        ]
        for d in answers:
            await d
        for _ in range(100):  # the pool takes a connection back once its answer is read
            if sum(len(v) for v in pool._connections.values()) <= 2:
                break
            await deferLater(the_reactor(), 0.01, lambda: None)
        self.assertLessEqual(sum(len(v) for v in pool._connections.values()), 2)
        self.assertEqual(len(server.seen), 6)

    async def test_server_closed_idle_connection(self) -> None:
        server, base = self.serve()
        t, pool = self.transport()
        await self.get(t, base + "/first")
        server.channels[-1].loseConnection()  # TLS close_notify, then FIN

        def live() -> int:
            return sum(c.state == "QUIESCENT" for cs in pool._connections.values() for c in cs)

        for _ in range(100):
            if not live():
                break
            await deferLater(the_reactor(), 0.01, lambda: None)
        self.assertEqual(live(), 0)
        resp = await self.get(t, base + "/again", "POST", b"{}")
        self.assertEqual((resp.status, resp.body), (200, b"echo:POST /again {}"))
        self.assertEqual(server.connections(), 2)

    async def test_post_dropped_after_it_was_written_is_ambiguous(self) -> None:
        server, base = self.serve()
        t, _ = self.transport()
        await self.get(t, base + "/first")
        server.drop = 1
        with self.assertRaises(ACMETransportError) as cm:
            await self.get(t, base + "/drop", "POST", b"{}")
        self.assertTrue(cm.exception.sent)
        self.assertEqual([p for _, p, _ in server.seen].count(b"/drop"), 1)
        self.assertEqual((await self.get(t, base + "/after")).status, 200)

    async def test_timeout_after_sending(self) -> None:
        server, base = self.serve()
        t, _ = self.transport(request_timeout=5.0)
        server.arrived = Deferred()
        d = Deferred.fromCoroutine(self.get(t, base + "/hang", "POST", b"{}"))
        await server.arrived
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, ACMETransportError)
        self.assertIn("timed out", str(failure.value))
        self.assertTrue(cast(ACMETransportError, failure.value).sent)
        self.assertEqual((await self.get(t, base + "/after")).status, 200)

    async def wait_for(self, condition: Any) -> None:
        for _ in range(200):
            if condition():
                return
            await deferLater(the_reactor(), 0.01, lambda: None)
        self.fail("condition not reached")

    async def test_a_body_that_stalls_times_out(self) -> None:
        # treq's own timeout ends with the answer's head; ours covers the body too.
        server, base = self.serve()
        t, _ = self.transport(request_timeout=5.0)
        d = Deferred.fromCoroutine(self.get(t, base + "/stall", "POST", b"{}"))
        await self.wait_for(lambda: server.hanging)
        await deferLater(the_reactor(), 0.1, lambda: None)  # the head reaches the client
        self.assertNoResult(d)
        self.clock.advance(5)
        failure = self.failureResultOf(d, ACMETransportError)
        self.assertIn("timed out", str(failure.value))
        self.assertTrue(cast(ACMETransportError, failure.value).sent)

    async def test_a_huge_body_is_refused(self) -> None:
        server, base = self.serve()
        server.huge = 200_000
        t, _ = self.transport()
        t.max_body = 100_000
        with self.assertRaises(ACMETransportError) as cm:
            await self.get(t, base + "/huge")
        self.assertIn("over 100000 bytes", str(cm.exception))
        server.huge = 50_000
        self.assertEqual(len((await self.get(t, base + "/huge")).body), 50_000)

    async def test_tls_broken_after_the_request_arrived_is_ambiguous(self) -> None:
        server, base = self.serve()
        t, _ = self.transport()
        with self.assertRaises(ACMETransportError) as cm:
            await self.get(t, base + "/tls-break", "POST", b"{}")
        self.assertTrue(cm.exception.sent, str(cm.exception))
        self.assertEqual([p for _, p, _ in server.seen], [b"/tls-break"])

    def test_a_connection_that_never_completes_was_not_sent(self) -> None:
        reactor = MemoryReactorClock()
        pool = make_pool(reactor)
        t = ACMETransport(
            reactor, make_http_client(reactor, CA, pool), ACCOUNT_KEY, request_timeout=5.0
        )
        d = Deferred.fromCoroutine(t.send("POST", "https://127.0.0.1:1/order", b"{}"))
        self.assertEqual(len(reactor.tcpClients), 1)
        reactor.advance(5)
        failure = self.failureResultOf(d, ACMETransportError)
        self.assertFalse(cast(ACMETransportError, failure.value).sent)
        self.assertIn("timed out connecting", str(failure.value))

    async def test_requests_beyond_the_slots_wait(self) -> None:
        server, base = self.serve()
        t, _ = self.transport()
        waiting = [
            Deferred.fromCoroutine(self.get(t, f"{base}/hang", "POST", b"{}"))
            for _ in range(MAX_CONNECTIONS + 3)
        ]
        await self.wait_for(lambda: len(server.hanging) == MAX_CONNECTIONS)
        await deferLater(the_reactor(), 0.1, lambda: None)
        self.assertEqual(len(server.hanging), MAX_CONNECTIONS)
        self.clock.advance(10)  # every request times out, those that waited as not sent
        failures = [self.failureResultOf(d, ACMETransportError).value for d in waiting]
        sent = [cast(ACMETransportError, f).sent for f in failures]
        self.assertEqual(sent.count(True), MAX_CONNECTIONS)
        self.assertEqual(sent.count(False), 3)

    async def test_connection_refused_is_not_sent(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        t, _ = self.transport()
        with self.assertRaises(ACMETransportError) as cm:
            await self.get(t, f"https://127.0.0.1:{port}/x", "POST", b"{}")
        self.assertFalse(cm.exception.sent)
        self.assertIn("cannot connect", str(cm.exception))

    async def test_untrusted_ca_is_refused_before_sending(self) -> None:
        server, base = self.serve(OTHER_CERT, OTHER_KEY)
        t, _ = self.transport(CA)
        with self.assertRaises(ACMETransportError) as cm:
            await self.get(t, base + "/x", "POST", b"{}")
        self.assertIn("certificate verify failed", str(cm.exception))
        self.assertFalse(cm.exception.sent)
        self.assertEqual(server.seen, [])

    async def test_host_name_mismatch_is_refused_before_sending(self) -> None:
        server, base = self.serve(NAME_CERT, NAME_KEY)
        t, _ = self.transport(NAME_CA)
        with self.assertRaises(ACMETransportError) as cm:
            await self.get(t, base + "/x", "POST", b"{}")
        self.assertIn("127.0.0.1", str(cm.exception))
        self.assertFalse(cm.exception.sent)
        self.assertEqual(server.seen, [])

    async def test_one_tls_context_per_host(self) -> None:
        _, base = self.serve()
        policy = VerifyingPolicy(CA)
        port = int(base.rsplit(":", 1)[1])
        self.assertIs(policy.creator("127.0.0.1", port), policy.creator("127.0.0.1", port))
        self.assertIs(
            policy.creatorForNetloc(b"127.0.0.1", port), policy.creator("127.0.0.1", port)
        )

    async def test_hostile_answers_are_transport_errors(self) -> None:
        # Each of these was accepted by the hand-written client csrproxy used to have.
        replies = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5_0\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-0\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.9 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"SMTP ready\r\n\r\n",
        ]
        factory = Factory.forProtocol(Hostile)
        port = the_reactor().listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/x"
        t, _ = self.transport()
        for reply in replies:
            Hostile.reply = reply
            with self.assertRaises(ACMETransportError, msg=repr(reply)):
                await self.get(t, url, "POST", b"{}")
        self.assertEqual(t.requests[("other", 0)], len(replies))
        # RFC 9112 6.3: Transfer-Encoding overrides Content-Length; the body is the chunks.
        Hostile.reply = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        self.assertEqual((await self.get(t, url, "POST", b"{}")).body, b"hello")

    async def test_unasked_bytes_are_not_the_next_answer(self) -> None:
        class Early(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(  # type: ignore[union-attr]
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate"
                )
                # Bytes nobody asked for, on the kept-alive connection.
                self.transport.write(  # type: ignore[union-attr]
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly"
                )

        port = the_reactor().listenTCP(0, Factory.forProtocol(Early), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        t, _ = self.transport()
        url = f"http://127.0.0.1:{port.getHost().port}/x"
        for _ in range(3):
            self.assertEqual((await self.get(t, url, "POST", b"{}")).body, b"late")
