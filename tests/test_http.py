"""The lean HTTP/1.1 client (csrproxy.acme.fasthttp) and the CA's HTTPS client (csrproxy.http).

The answer parser is driven byte by byte over a StringTransport; the pool against a real
twisted.web HTTPS server on 127.0.0.1:0 (a throwaway CA made once per module), with request
timeouts on a Clock.
"""

from __future__ import annotations

import socket
import tempfile
from typing import Any, cast

from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from csrproxy.acme.fasthttp import (
    CONNECTING,
    Answer,
    ConnectionPool,
    RequestNotSent,
    ResponseNotReceived,
    _Connection,
    _Exchange,
    _Host,
    _socket_of,
)
from csrproxy.http import CAHTTPClient, VerifyingPolicy, ca_context, make_http_client
from csrproxy.testbed import make_tls_files

_TLS_DIR = tempfile.TemporaryDirectory(prefix="csrproxy-test-http-")
# The server's CA and certificate for 127.0.0.1; another CA nobody trusts; a certificate
# from the trusted CA for a name the client never asks for.
CA, _, CERT, KEY = make_tls_files(f"{_TLS_DIR.name}/good")
OTHER_CA, _, OTHER_CERT, OTHER_KEY = make_tls_files(f"{_TLS_DIR.name}/other")
_, _, _, _ = make_tls_files(f"{_TLS_DIR.name}/name", hosts=("elsewhere.example",))
NAME_CERT, NAME_KEY = f"{_TLS_DIR.name}/name/cert.pem", f"{_TLS_DIR.name}/name/key.pem"
NAME_CA = f"{_TLS_DIR.name}/name/ca.pem"


def the_reactor() -> Any:
    return _global_reactor


# ---- the answer parser, byte by byte


_NO_CONTEXT = ca_context(None)  # never used to connect; loading the store is slow


class _Pool(ConnectionPool):
    """A pool that never connects: the tests hand it a connection over a StringTransport."""

    def __init__(self) -> None:
        super().__init__(Clock(), _NO_CONTEXT, clock=Clock())
        self.asked: list[_Exchange] = []

    def _connect(self, host: _Host, exchange: _Exchange) -> None:
        exchange.state = CONNECTING
        self.asked.append(exchange)


def exchange_over(
    raw: bytes, method: str = "GET", step: int = 1, close: bool = False
) -> tuple[Answer | Failure | None, _Connection, StringTransport]:
    """Feed ``raw`` as the answer to one request, ``step`` bytes at a time."""
    pool = _Pool()
    host = _Host("example.test", 80, "example.test", None)
    host.total = 1
    ex = _Exchange(method, f"{method} / HTTP/1.1\r\n\r\n".encode(), host)
    ex.state = CONNECTING
    results: list[Answer | Failure] = []
    ex.d.addBoth(results.append)
    conn = _Connection(pool, host, ex)
    transport = StringTransport()
    conn.makeConnection(transport)
    for i in range(0, len(raw), step):
        conn.dataReceived(raw[i : i + step])
    if close:
        conn.connectionLost(Failure(ConnectionDone()))
    return (results[0] if results else None), conn, transport


class ParserTests(SynchronousTestCase):
    def answer(self, raw: bytes, **kw: Any) -> tuple[Answer, _Connection]:
        answers = []
        for step in (1, 3, len(raw)):
            result, conn, transport = exchange_over(raw, step=step, **kw)
            self.assertEqual(
                transport.value(), f"{kw.get('method', 'GET')} / HTTP/1.1\r\n\r\n".encode()
            )
            if not isinstance(result, tuple):
                self.fail(f"no answer with step {step}: {result!r}")
            answers.append(result)
        self.assertEqual(answers[0], answers[-1])
        return answers[-1], conn

    def test_content_length(self) -> None:
        (status, headers, body), conn = self.answer(
            b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nReplay-Nonce:  abc \r\n"
            b'Link: <https://x/a>;rel="up"\r\nLINK: <https://x/b>;rel="alternate"\r\n\r\nhello'
        )
        self.assertEqual(status, 201)
        self.assertEqual(body, b"hello")
        self.assertEqual(headers["replay-nonce"], ["abc"])
        self.assertEqual(
            headers["link"], ['<https://x/a>;rel="up"', '<https://x/b>;rel="alternate"']
        )
        self.assertTrue(conn.reusable)
        self.assertIn(conn, conn.host.idle)

    def test_chunked_with_extensions_and_trailers(self) -> None:
        (status, _, body), conn = self.answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        self.assertEqual((status, body), (200, b"hello"))
        self.assertTrue(conn.reusable)

    def test_interim_answer_is_skipped(self) -> None:
        (status, _, body), _ = self.answer(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual((status, body), (200, b"ok"))

    def test_head_and_204_have_no_body(self) -> None:
        (status, headers, body), conn = self.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nReplay-Nonce: n\r\n\r\n", method="HEAD"
        )
        self.assertEqual((status, body, headers["replay-nonce"]), (200, b"", ["n"]))
        self.assertTrue(conn.reusable)
        (status, _, body), _ = self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual((status, body), (204, b""))

    def test_connection_close_is_not_reused(self) -> None:
        (_, _, body), conn = self.answer(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual(body, b"ok")
        self.assertFalse(conn.reusable)
        self.assertNotIn(conn, conn.host.idle)
        (_, _, body), conn = self.answer(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertFalse(conn.reusable)

    def test_body_until_close(self) -> None:
        result, conn, _ = exchange_over(b"HTTP/1.1 200 OK\r\n\r\nall of it", close=True)
        self.assertEqual(result, (200, {}, b"all of it"))
        self.assertFalse(conn.reusable)

    def test_body_until_a_reset_is_not_an_answer(self) -> None:
        result, _, _ = exchange_over(b"HTTP/1.1 200 OK\r\n\r\npart", step=4)
        self.assertIsNone(result)
        pool = _Pool()
        host = _Host("example.test", 80, "example.test", None)
        host.total = 1
        ex = _Exchange("GET", b"GET / HTTP/1.1\r\n\r\n", host)
        ex.state = CONNECTING
        failures: list[Failure] = []
        ex.d.addErrback(failures.append)
        conn = _Connection(pool, host, ex)
        conn.makeConnection(StringTransport())
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\npart")
        conn.connectionLost(Failure(ConnectionLost()))
        failures[0].trap(ResponseNotReceived)

    def test_truncated_body_fails_as_sent(self) -> None:
        result, _, _ = exchange_over(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", close=True
        )
        assert isinstance(result, Failure)
        result.trap(ResponseNotReceived)
        self.assertTrue(cast(ResponseNotReceived, result.value).sent)

    def test_garbage_fails_and_drops_the_connection(self) -> None:
        for raw in (
            b"SMTP ready\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
        ):
            result, conn, transport = exchange_over(raw)
            assert isinstance(result, Failure), raw
            result.trap(ResponseNotReceived)
            self.assertFalse(conn.reusable)
            self.assertTrue(transport.disconnecting or transport.disconnected, raw)

    def test_unasked_bytes_drop_the_connection(self) -> None:
        _, conn, transport = exchange_over(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(conn.reusable)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertFalse(conn.reusable)
        self.assertTrue(transport.disconnected)

    def test_request_bytes(self) -> None:
        pool = _Pool()
        d = pool.request(
            "POST",
            "http://example.test:8080/a b/é?q=1#frag",
            b"{}",
            {"User-Agent": "ua", "Content-Type": "application/jose+json"},
            5.0,
        )
        d.addErrback(lambda f: f.trap(CancelledError))
        self.assertEqual(
            pool.asked[0].data,
            b"POST /a%20b/%C3%A9?q=1 HTTP/1.1\r\nHost: example.test:8080\r\nUser-Agent: ua\r\n"
            b"Content-Type: application/jose+json\r\nContent-Length: 2\r\n\r\n{}",
        )
        with self.assertRaises(ValueError):
            pool.request("GET", "ftp://example.test/", None, {}, 5.0)
        with self.assertRaises(ValueError):
            pool.request("GET", "https://example.test/", None, {"X": "a\r\nB: c"}, 5.0)
        d.cancel()


# ---- the pool against a real HTTPS server


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
        if path == b"/drop" and self.drop > 0:
            self.drop -= 1
            cast(Any, request.channel).transport.abortConnection()
            return NOT_DONE_YET
        request.setHeader(b"Replay-Nonce", b"nonce-" + path[1:])
        return b"echo:" + request.method + b" " + path + b" " + body


class PoolTests(TestCase):
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

    def pool(self, cafile: str = CA, **kw: Any) -> ConnectionPool:
        pool = ConnectionPool(the_reactor(), ca_context(cafile), **kw)
        self.addCleanup(pool.close)
        return pool

    async def get(
        self, pool: ConnectionPool, url: str, method: str = "GET", body: bytes | None = None
    ) -> Answer:
        return await pool.request(method, url, body, {"User-Agent": "t"}, 10.0)

    async def test_keep_alive_reuse(self) -> None:
        server, base = self.serve()
        pool = self.pool()
        for i in range(3):
            status, headers, body = await self.get(pool, f"{base}/a{i}")
            self.assertEqual((status, body), (200, f"echo:GET /a{i} ".encode()))
            self.assertEqual(headers["replay-nonce"], [f"nonce-a{i}"])
        status, _, body = await self.get(pool, base + "/p", "POST", b"{}")
        self.assertEqual(body, b"echo:POST /p {}")
        self.assertEqual(server.connections(), 1)

    async def test_plain_http(self) -> None:
        behaviour = Behaviour()
        port = the_reactor().listenTCP(0, Site(behaviour), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = self.pool()
        base = f"http://127.0.0.1:{port.getHost().port}"
        self.assertEqual((await self.get(pool, base + "/a"))[2], b"echo:GET /a ")
        self.assertEqual((await self.get(pool, base + "/chunked"))[2], b"hello")
        self.assertEqual(behaviour.connections(), 1)

    async def test_chunked_and_content_length_bodies(self) -> None:
        _, base = self.serve()
        pool = self.pool()
        self.assertEqual((await self.get(pool, base + "/chunked"))[2], b"hello")
        self.assertEqual((await self.get(pool, base + "/x"))[2], b"echo:GET /x ")
        self.assertEqual((await self.get(pool, base + "/chunked"))[2], b"hello")

    async def test_bounded_connections_per_host(self) -> None:
        server, base = self.serve()
        pool = self.pool(max_per_host=2)
        answers = [pool.request("GET", f"{base}/c{i}", None, {}, 10.0) for i in range(6)]
        for d in answers:
            await d
        self.assertEqual(server.connections(), 2)

    async def test_server_closed_idle_connection_is_not_used(self) -> None:
        server, base = self.serve()
        pool = self.pool()
        await self.get(pool, base + "/first")
        # The server's FIN is in the client's socket but the reactor has not read it yet.
        sock = _socket_of(server.channels[-1].transport)
        assert sock is not None
        sock.shutdown(socket.SHUT_WR)
        status, _, body = await self.get(pool, base + "/new", "POST", b"{}")
        self.assertEqual((status, body), (200, b"echo:POST /new {}"))
        self.assertEqual(server.connections(), 2)

    async def test_server_closed_idle_connection_later(self) -> None:
        server, base = self.serve()
        pool = self.pool()
        await self.get(pool, base + "/first")
        server.channels[-1].loseConnection()  # TLS close_notify, then FIN
        host = pool._hosts[("https", base[8:])]
        for _ in range(200):
            if host.total == 0:
                break
            await deferLater(the_reactor(), 0.01, lambda: None)
        self.assertEqual((host.total, host.idle), (0, []))
        self.assertEqual((await self.get(pool, base + "/again"))[0], 200)

    async def test_safe_request_repeated_once_when_reused_connection_drops(self) -> None:
        server, base = self.serve()
        pool = self.pool()
        await self.get(pool, base + "/first")
        server.drop = 1
        status, _, body = await self.get(pool, base + "/drop")
        self.assertEqual((status, body), (200, b"echo:GET /drop "))
        self.assertEqual([p for _, p, _ in server.seen].count(b"/drop"), 2)

    async def test_post_dropped_after_it_was_written_is_ambiguous(self) -> None:
        server, base = self.serve()
        pool = self.pool()
        await self.get(pool, base + "/first")
        server.drop = 1
        with self.assertRaises(ResponseNotReceived) as cm:
            await self.get(pool, base + "/drop", "POST", b"{}")
        self.assertTrue(cm.exception.sent)
        self.assertEqual([p for _, p, _ in server.seen].count(b"/drop"), 1)
        self.assertEqual((await self.get(pool, base + "/after"))[0], 200)

    async def test_fresh_connection_dropped_is_not_repeated(self) -> None:
        server, base = self.serve()
        pool = self.pool()
        server.drop = 1
        with self.assertRaises(ResponseNotReceived):
            await self.get(pool, base + "/drop")
        self.assertEqual(len(server.seen), 1)

    async def test_timeout_after_sending(self) -> None:
        server, base = self.serve()
        clock = Clock()
        pool = self.pool(clock=clock)
        server.arrived = Deferred()
        d = pool.request("POST", base + "/hang", b"{}", {}, 5.0)
        await server.arrived
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        failure = self.failureResultOf(d, ResponseNotReceived)
        self.assertTrue(failure.value.timed_out)
        self.assertTrue(failure.value.sent)
        self.assertEqual((await self.get(pool, base + "/after"))[0], 200)
        self.assertEqual(server.connections(), 2)

    async def test_timeout_waiting_for_a_connection(self) -> None:
        server, base = self.serve()
        clock = Clock()
        pool = self.pool(clock=clock, max_per_host=1)
        server.arrived = Deferred()
        first = pool.request("GET", base + "/hang", None, {}, 60.0)
        await server.arrived
        second = pool.request("POST", base + "/queued", b"{}", {}, 5.0)
        clock.advance(5)
        failure = self.failureResultOf(second, RequestNotSent)
        self.assertTrue(failure.value.timed_out)
        self.assertFalse(failure.value.sent)
        first.cancel()
        self.failureResultOf(first)
        self.assertNotIn(b"/queued", [p for _, p, _ in server.seen])

    async def test_connection_refused_is_not_sent(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        pool = self.pool()
        with self.assertRaises(RequestNotSent) as cm:
            await self.get(pool, f"https://127.0.0.1:{port}/x", "POST", b"{}")
        self.assertFalse(cm.exception.sent)

    async def test_untrusted_ca_is_refused(self) -> None:
        server, base = self.serve(OTHER_CERT, OTHER_KEY)
        pool = self.pool(CA)
        with self.assertRaises(RequestNotSent) as cm:
            await self.get(pool, base + "/x", "POST", b"{}")
        self.assertIn("certificate verify failed", str(cm.exception))
        self.assertEqual(server.seen, [])

    async def test_host_name_mismatch_is_refused(self) -> None:
        server, base = self.serve(NAME_CERT, NAME_KEY)
        pool = self.pool(NAME_CA)
        with self.assertRaises(RequestNotSent) as cm:
            await self.get(pool, base + "/x", "POST", b"{}")
        self.assertIn("127.0.0.1", str(cm.exception))
        self.assertEqual(server.seen, [])

    async def test_one_tls_context_per_host(self) -> None:
        _, base = self.serve()
        policy = VerifyingPolicy(CA)
        port = int(base.rsplit(":", 1)[1])
        self.assertIs(policy.creator("127.0.0.1", port), policy.creator("127.0.0.1", port))
        self.assertIs(
            policy.creatorForNetloc(b"127.0.0.1", port), policy.creator("127.0.0.1", port)
        )

    async def test_made_client_speaks_treq_and_exchange(self) -> None:
        _, base = self.serve()
        client = make_http_client(the_reactor(), CA)
        self.assertIsInstance(client, CAHTTPClient)
        self.addCleanup(client.pool.close)
        status, _, body = await client.exchange("GET", base + "/fast", None, {}, 10.0)
        self.assertEqual((status, body), (200, b"echo:GET /fast "))
        response = await client.get(base + "/treq", reactor=the_reactor(), timeout=10)
        self.assertEqual(await response.content(), b"echo:GET /treq ")
        # treq's own pool keeps its connection: close it so the reactor is clean.
        await client._agent._pool.closeCachedConnections()  # type: ignore[attr-defined]
