"""HTTP limits that twisted.web lacks: connection caps, a body limit enforced before the
body is read, a deadline for each request to arrive, bounded read-ahead of pipelined
requests, and a problem document for a path that is not UTF-8.

Connections.  At most ``max_connections`` are open at once, and at most
``max_connections_per_address`` from one client address (an IPv4 address, or an IPv6
/64, which one host usually holds whole; trusted proxies, whose address every client
behind them shares, count only towards the total; UNIX-socket peers likewise).  One
more is closed as soon as it is accepted, before a byte is read or written.

Requests.  A too-large ``Content-Length`` is refused with 413 as soon as the headers are
in (no ``100 Continue`` is sent), a chunked body is counted as it arrives and refused
the moment it passes the limit, and a request whose headers and body have not all
arrived within ``read_timeout`` of its first byte gets 408, however the bytes trickle.
Each of these refusals closes the connection.  A path or ``Host`` that does not decode
as UTF-8 gets a 400 problem document (the connection stays usable).  Idle keep-alive
connections are cut after ``idle_timeout``.

Buffers, per connection.  While a request is being answered at most
:data:`PIPELINE_BUFFER` bytes of the requests pipelined after it are read ahead (plus
the one read that crossed it, at most 64 KiB); then reading stops until the answer is
sent.  When the transport cannot send (a client that does not read its answers),
reading stops and no further pipelined request is answered until the transport has
drained: unsent output stays within the transport's buffer (64 KiB) plus one answer.
With a request's body (``max_body``) and header lines (16 KiB), one connection holds
under 256 KiB with the defaults: ``max_connections_per_address`` of them 8 MiB, and
``max_connections`` (1,000) under 256 MiB.

Refusals are passed to ``on_refused`` (per request) and ``on_connection_refused`` (per
connection, with a reason) for the metrics, and logged in one summary line a second at
most, never a line per connection.
"""

from __future__ import annotations

import collections
import io
import ipaddress
import json
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from csrproxy.config import APIConfig, Network
from csrproxy.errors import PROBLEM_NAMESPACE
from csrproxy.web.connections import RefusalTally, source_of

log = Logger()

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Content Too Large"}

#: Bytes of pipelined requests read ahead while an earlier request is being answered.
PIPELINE_BUFFER = 16 * 1024

#: ``on_connection_refused`` reasons.
TOO_MANY_CONNECTIONS = "http-connections"
TOO_MANY_FROM_ADDRESS = "http-connections-per-address"
#: A connection of the heaviest source closed to let a new source in.
EVICTED = "http-connections-evicted"


def problem_body(status: int, problem: str, detail: str) -> bytes:
    """An RFC 9457 problem document."""
    return json.dumps(
        {
            "type": PROBLEM_NAMESPACE + problem,
            "title": _REASONS.get(status, b"Error").decode(),
            "status": status,
            "detail": detail,
        }
    ).encode()


def raw_problem(status: int, problem: str, detail: str) -> bytes:
    """A complete HTTP/1.1 response carrying a problem document, ending the connection."""
    body = problem_body(status, problem, detail)
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/problem+json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, _REASONS.get(status, b"Error"), len(body))
    )
    return head + body


class LimitedRequest(Request):
    """Counts body bytes as they arrive and keeps the body in memory (it is small)."""

    _received = 0

    def gotLength(self, length: int | None) -> None:
        # Never a temporary file: a body over max_body is refused anyway.
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        self._received += len(data)
        if isinstance(channel, LimitedChannel) and self._received > channel.site.max_body:
            channel.refuse(413, "body-too-large", channel.site.too_large_detail())
            return
        assert self.content is not None
        self.content.write(data)

    def process(self) -> None:
        # Klein answers a non-UTF-8 path or Host in plain text and logs a traceback for
        # every such request; answer here, before any resource sees it.
        what = self._undecodable()
        if what is None:
            super().process()  # type: ignore[no-untyped-call]
            return
        site = self.site = self.channel.site  # type: ignore[attr-defined]
        if isinstance(site, LimitedSite):
            site.refused(self.path, 400, "bad-request")
        body = problem_body(400, "bad-request", f"the request's {what} is not UTF-8")
        self.setResponseCode(400)
        self.setHeader(b"Content-Type", b"application/problem+json")  # type: ignore[no-untyped-call]
        self.setHeader(b"Content-Length", b"%d" % len(body))  # type: ignore[no-untyped-call]
        self.write(body)  # type: ignore[no-untyped-call]
        self.finish()  # type: ignore[no-untyped-call]

    def _undecodable(self) -> str | None:
        """``"path"`` or ``"Host header"`` when it does not decode as UTF-8, else None."""
        try:
            unquote_to_bytes(self.path).decode("utf-8")
        except UnicodeDecodeError:
            return "path"
        host = self.getHeader(b"host")
        if host is not None:
            try:
                host.decode("utf-8")
            except UnicodeDecodeError:
                return "Host header"
        return None


class LimitedChannel(HTTPChannel):
    """An HTTPChannel with the limits of this module."""

    site: LimitedSite
    _refused = False
    _deadline: IDelayedCall | None = None
    #: The source this connection is counted under, once counted.
    _source: str | None = None
    _counted = False
    #: A request was answered while the transport could not send: the requests
    #: pipelined after it wait for the transport to drain.
    _held = False

    def dataReceived(self, data: bytes) -> None:
        # The deadline starts with the first byte of a request, not while idle.
        self._start_deadline()
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def _start_deadline(self) -> None:
        if self._deadline is None and not self._handlingRequest and self.site.read_timeout:
            self._deadline = self.callLater(self.site.read_timeout, self._too_slow)  # type: ignore[no-untyped-call]

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._counted:
            self._counted = False
            self.site.connection_closed(self._source, self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.refuse(
            408,
            "request-timeout",
            f"the request did not arrive within {self.site.read_timeout:g} seconds",
        )

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.site.max_body:
            self.refuse(413, "body-too-large", self.site.too_large_detail())
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def refuse(self, status: int, problem: str, detail: str) -> None:
        """Answer ``status`` with a problem document and close; ignore whatever follows."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        path = getattr(self, "_path", b"")
        self.site.refused(path, status, problem)
        assert self.transport is not None
        self.transport.write(raw_problem(status, problem, detail))
        self.loseConnection()  # type: ignore[no-untyped-call]

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's bare "400 Bad Request" (bad request line, headers, framing): as a
        # problem document like every other error.
        self.refuse(400, "bad-request", "the HTTP request is malformed")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(400, "bad-request", "a request or header line is too long")

    def lineReceived(self, line: bytes) -> None:
        if not self._refused:
            super().lineReceived(line)  # type: ignore[no-untyped-call]

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().rawDataReceived(data)
        if self._handlingRequest and self._buffered() > self.site.pipeline_buffer:
            self._networkProducer.pauseProducing()

    def _buffered(self) -> int:
        return sum(map(len, self._dataBuffer))

    def timeoutConnection(self) -> None:
        # As twisted.web's, without its log line per idle connection.
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)  # type: ignore[no-untyped-call]
        self.loseConnection()  # type: ignore[no-untyped-call]

    def forceAbortClient(self) -> None:
        # As twisted.web's (a client that did not take its last answer in abortTimeout),
        # counted in the summary instead of a log line each.
        self._abortingCall = None
        cast(Any, self.site).tally.add("http-forced-close")
        cast(Any, self.transport).abortConnection()

    # -- back-pressure ------------------------------------------------------------
    # twisted.web stops reading when the transport cannot send only between requests;
    # a client pipelining small requests and never reading kept it answering (and
    # buffering answers) without end.

    def pauseProducing(self) -> None:
        super().pauseProducing()  # type: ignore[no-untyped-call]
        if self._handlingRequest:
            self._networkProducer.pauseProducing()

    def requestDone(self, request: Request) -> None:
        if not (self.persistent and self._waitingForTransport):
            super().requestDone(request)  # type: ignore[no-untyped-call]
            # A request pipelined in the same read as this one is parsed from the line
            # buffer, never through dataReceived: its deadline starts now.
            if self.persistent and self._buffer:
                self._start_deadline()
            return
        # Hold the pipelined requests (still buffered, still not read) until the transport
        # drains; the idle timer runs meanwhile, so a client that never reads is cut.
        if request is not self.requests[0]:
            raise TypeError(request)
        del self.requests[0]
        self._held = True
        if self._savedTimeOut:
            self.setTimeout(self._savedTimeOut)  # type: ignore[no-untyped-call]

    def resumeProducing(self) -> None:
        super().resumeProducing()  # type: ignore[no-untyped-call]
        if self._held and not self._refused:
            self._held = False
            self._handlingRequest = False
            self._networkProducer.resumeProducing()
            data = b"".join(self._dataBuffer)
            self._dataBuffer = []
            self.setLineMode(data)  # type: ignore[no-untyped-call]


class LimitedSite(Site):
    """A Site whose connections are :class:`LimitedChannel` and requests
    :class:`LimitedRequest`; ``timeout`` cuts idle connections.

    ``max_connections`` open at once and ``max_connections_per_address`` from one
    client address (``proxies``, the trusted reverse proxies, count only towards the
    total); a connection over either is closed at once and passed to
    ``on_connection_refused`` with :data:`TOO_MANY_CONNECTIONS` or
    :data:`TOO_MANY_FROM_ADDRESS`.
    """

    protocol = LimitedChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        *,
        max_body: int,
        read_timeout: float,
        idle_timeout: float,
        reactor: Any = None,
        on_refused: Callable[[bytes, int], None] | None = None,
        access_log: bool = False,
        max_connections: int = APIConfig.max_connections,
        max_connections_per_address: int = APIConfig.max_connections_per_address,
        proxies: Sequence[Network] = (),
        on_connection_refused: Callable[[str], None] | None = None,
        pipeline_buffer: int = PIPELINE_BUFFER,
    ) -> None:
        kwargs: dict[str, Any] = {"timeout": idle_timeout}
        if reactor is not None:
            kwargs["reactor"] = reactor
        # Bodies are CSRs, never HTML forms: skip twisted.web's form parsing.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(resource, requestFactory=LimitedRequest, **kwargs)  # type: ignore[no-untyped-call]
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.proxies = tuple(proxies)
        self.pipeline_buffer = pipeline_buffer
        self.displayTracebacks = False
        self._on_refused = on_refused
        self._on_connection_refused = on_connection_refused
        self._access_log = access_log
        self.tally = RefusalTally(self.reactor)
        #: Open connections, in all and by source (oldest first; dicts keep their order).
        self.open_connections = 0
        self.open_by_source: collections.Counter[str] = collections.Counter()
        self._by_source: dict[str, dict[LimitedChannel, None]] = {}

    def buildProtocol(self, addr: IAddress) -> LimitedChannel | None:  # type: ignore[override]
        source, ip = source_of(addr)
        if source is not None and ip is not None and _within(ip, self.proxies):
            source = None
        if self.open_connections >= self.max_connections and not self._evict_for(source):
            self._refuse_connection(TOO_MANY_CONNECTIONS)
            return None  # the listening port closes the socket at once
        if source is not None and self.open_by_source[source] >= self.max_connections_per_address:
            self._refuse_connection(TOO_MANY_FROM_ADDRESS)
            return None
        channel: LimitedChannel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        channel._source = source
        channel._counted = True
        self.open_connections += 1
        if source is not None:
            self.open_by_source[source] += 1
            self._by_source.setdefault(source, {})[channel] = None
        return channel

    def _evict_for(self, source: str | None) -> bool:
        """When full, a source holding fewer connections than the heaviest one takes that
        one's oldest (so that a few sources cannot keep every other client out); the
        newcomer is refused when it is among the heaviest itself."""
        if source is None or not self.open_by_source:
            return False
        heaviest, held = self.open_by_source.most_common(1)[0]
        if held <= self.open_by_source[source] + 1:
            return False
        oldest = next(iter(self._by_source[heaviest]))
        oldest._counted = False
        self.connection_closed(heaviest, oldest)
        self._refuse_connection(EVICTED)
        if oldest.transport is not None:
            cast(Any, oldest.transport).abortConnection()
        return True

    def _refuse_connection(self, reason: str) -> None:
        self.tally.add(reason)
        if self._on_connection_refused is not None:
            self._on_connection_refused(reason)

    def connection_closed(self, source: str | None, channel: LimitedChannel | None = None) -> None:
        self.open_connections -= 1
        if source is not None:
            self.open_by_source[source] -= 1
            channels = self._by_source.get(source)
            if channels is not None and channel is not None:
                channels.pop(channel, None)
            if self.open_by_source[source] <= 0:
                del self.open_by_source[source]
                self._by_source.pop(source, None)

    def stopFactory(self) -> None:
        self.tally.flush()
        super().stopFactory()

    def too_large_detail(self) -> str:
        return f"the request body is larger than {self.max_body} bytes"

    def refused(self, path: bytes, status: int, problem: str = "") -> None:
        self.tally.add(problem or str(status))
        if self._on_refused is not None:
            self._on_refused(path, status)

    def log(self, request: Any) -> None:
        # One access-log line per request costs more than the rest of a cache hit.
        if self._access_log:
            super().log(request)


def _within(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Sequence[Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)
