"""ACMETransport over the daemon's HTTP client, against a real twisted.web server on 127.0.0.1:0.

Checks what the transport promises on the production path (csrproxy.http's treq client):
nonces harvested from every answer, Location/Link/Retry-After read, failures classified
(not sent / sent), timeouts on the transport's clock.
"""

from __future__ import annotations

import json
import socket
from typing import Any, cast

from josepy.b64 import b64decode
from twisted.internet.defer import Deferred
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from csrproxy.acme.jws import AccountKey
from csrproxy.acme.problems import ACMEProblem, ACMETransportError, DeadlineExceeded
from csrproxy.acme.transport import ACMETransport
from csrproxy.http import make_http_client, make_pool
from tests.support.tls import CA, CERT, KEY

ACCOUNT_KEY = AccountKey.generate("ec256")


def the_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class MiniCA(Resource):
    """Just enough of an ACME server: nonces, a resource with Location and Link, a 429."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.base = ""
        self.count = 0
        self.nonces_used: list[str] = []
        self.seen: list[bytes] = []
        self.hanging: list[Request] = []
        self.arrived: Deferred[None] | None = None

    def render(self, request: Request) -> Any:
        assert request.path is not None
        self.seen.append(request.path)
        if self.arrived is not None and not self.arrived.called:
            self.arrived.callback(None)
        self.count += 1
        request.setHeader(b"Replay-Nonce", f"n{self.count}".encode())
        request.setHeader(b"Cache-Control", b"no-store")
        if request.method == b"POST":
            assert request.content is not None
            jws = json.loads(request.content.read())
            if "protected" in jws:
                self.nonces_used.append(json.loads(b64decode(jws["protected"]))["nonce"])
            if request.getHeader(b"content-type") != b"application/jose+json":
                request.setResponseCode(415)
                return b""
        if request.path == b"/acct":
            request.setResponseCode(201)
            request.setHeader(b"Location", f"{self.base}/acct/1".encode())
            request.responseHeaders.addRawHeader(b"Link", f'<{self.base}/dir>;rel="index"'.encode())
            request.responseHeaders.addRawHeader(
                b"Link", f'<{self.base}/tos>; rel="terms"'.encode()
            )
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"status": "valid"}'
        if request.path == b"/limited":
            request.setResponseCode(429)
            request.setHeader(b"Retry-After", b"7")
            request.setHeader(b"Content-Type", b"application/problem+json")
            return b'{"type": "urn:ietf:params:acme:error:rateLimited", "detail": "slow down"}'
        if request.path == b"/drop":
            cast(Any, request.channel).transport.abortConnection()
            return NOT_DONE_YET
        if request.path == b"/hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        return b""


class TransportTests(TestCase):
    def setUp(self) -> None:
        self.ca = MiniCA()
        site = Site(self.ca)
        with open(CERT, "rb") as c, open(KEY, "rb") as k:
            options = PrivateCertificate.loadPEM(k.read() + c.read()).options()
        port = the_reactor().listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = self.ca.base = f"https://127.0.0.1:{port.getHost().port}"
        self.clock = Clock()

        def hang_up() -> None:
            for request in self.ca.hanging:
                if not request.finished and not request._disconnected:
                    cast(Any, request.channel).transport.abortConnection()

        self.addCleanup(hang_up)

    def transport(self, **kw: Any) -> ACMETransport:
        pool = make_pool(the_reactor())
        self.addCleanup(pool.closeCachedConnections)
        t = ACMETransport(self.clock, make_http_client(the_reactor(), CA, pool), ACCOUNT_KEY, **kw)
        t.new_nonce_url = self.base + "/nonce"
        t.account_url = self.base + "/acct/1"
        return t

    async def test_nonces_location_and_links(self) -> None:
        t = self.transport()
        first = await t.post(self.base + "/acct", {"x": 1}, "account")
        second = await t.post(self.base + "/acct", None, "account")
        # The first POST used newNonce's; the second the nonce of the first answer.
        self.assertEqual(self.ca.nonces_used[1], first.header("replay-nonce"))
        self.assertEqual(first.status, 201)
        self.assertEqual(first.location, self.base + "/acct/1")
        self.assertEqual(first.links("index"), [self.base + "/dir"])
        self.assertEqual(first.links("terms"), [self.base + "/tos"])
        self.assertEqual(first.json(), {"status": "valid"})
        self.assertEqual(second.header("Cache-Control"), "no-store")
        self.assertEqual(t.requests[("account", 201)], 2)
        self.assertEqual(t.requests[("newNonce", 200)], 1)
        self.assertEqual(len(t._nonces), 1)

    async def test_retry_after_reaches_the_problem(self) -> None:
        t = self.transport()
        with self.assertRaises(ACMEProblem) as cm:
            # One attempt: Retry-After (7 s) would end past the deadline.
            deadline = self.clock.seconds() + 1
            await t.post(self.base + "/limited", {}, "newOrder", deadline=deadline)
        self.assertEqual(cm.exception.short_type, "rateLimited")
        self.assertEqual(cm.exception.retry_after, 7.0)
        self.assertEqual(cm.exception.status, 429)

    async def test_post_dropped_after_sending_is_ambiguous(self) -> None:
        t = self.transport()
        await t.post(self.base + "/acct", None, "account")  # a kept-alive connection
        with self.assertRaises(ACMETransportError) as cm:
            await t.post(self.base + "/drop", {"csr": "x"}, "finalize")
        self.assertTrue(cm.exception.sent)
        self.assertEqual(self.ca.seen.count(b"/drop"), 1)
        self.assertEqual(t.requests[("finalize", 0)], 1)

    async def test_refused_connection_was_not_sent(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        t = self.transport()
        with self.assertRaises(ACMETransportError) as cm:
            await t.send("POST", f"https://127.0.0.1:{port}/order", b"{}", kind="newOrder")
        self.assertFalse(cm.exception.sent)
        self.assertIn("cannot connect", str(cm.exception))

    async def test_timeout_on_the_transport_clock(self) -> None:
        t = self.transport(request_timeout=5.0)
        self.ca.arrived = Deferred()
        d = Deferred.fromCoroutine(t.send("POST", self.base + "/hang", b"{}", kind="finalize"))
        await self.ca.arrived
        self.clock.advance(5)
        failure = self.failureResultOf(d, ACMETransportError)
        self.assertIn("timed out", str(failure.value))
        self.assertTrue(cast(ACMETransportError, failure.value).sent)

    async def test_a_request_ends_by_the_deadline(self) -> None:
        t = self.transport(request_timeout=30.0)
        self.ca.arrived = Deferred()
        d = Deferred.fromCoroutine(
            t.send(
                "POST", self.base + "/hang", b"{}", "finalize", deadline=self.clock.seconds() + 5
            )
        )
        await self.ca.arrived
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)  # the deadline, long before the request timeout
        failure = self.failureResultOf(d, ACMETransportError)
        self.assertIn("timed out", str(failure.value))

    async def test_nothing_is_sent_past_the_deadline(self) -> None:
        t = self.transport()
        self.clock.advance(10)
        with self.assertRaises(DeadlineExceeded):
            await t.post(self.base + "/acct", None, "account", deadline=self.clock.seconds())
        self.assertEqual(self.ca.seen, [])
