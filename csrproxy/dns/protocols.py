"""twisted.names' DNS protocols, as the transports of an authoritative server.

The stock protocols are written for a client that also answers: they parse each
message themselves, log every malformed packet and drop it, and hand responses
(QR set) to the server like queries. Here every packet goes to the factory's
``packetReceived`` as bytes (it parses, with ``dns.Message``, and answers
FORMERR where the header is readable); replies come back as bytes through
``writeReply``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure
from zope.interface import implementer

from csrproxy.dns.limits import (
    MESSAGE_TIMEOUT,
    OVERRUN,
    TCP_BUFFER,
    TCP_MAX_INPUT,
    TCP_MAX_QUERY,
    TOO_LONG,
    UNREAD,
    TCPLimits,
)

log = Logger()

# A full send buffer or an ICMP error: drop the reply, as UDP may.
_DROPPED_SEND_ERRORS = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNREFUSED, errno.ENOBUFS)


class ReplyWriter(Protocol):
    """What the factory needs of a protocol: send one reply (``address`` None for TCP)."""

    def writeReply(self, data: bytes, address: Any) -> None: ...


class Controller(Protocol):
    """What the protocols ask of the server factory that owns them."""

    reactor: Any
    connections: set[Any]
    tcp: TCPLimits

    def packetReceived(self, data: bytes, protocol: Any, address: Any) -> None: ...

    def connectionMade(self, protocol: Any) -> None: ...

    def connectionLost(self, protocol: Any) -> None: ...


class DNSDatagramProtocol(dns.DNSDatagramProtocol):
    """DNS over UDP: each datagram is answered with at most one datagram.

    Datagrams from port 0 are dropped (nobody can receive there).
    """

    controller: Controller

    def __init__(self, controller: Controller) -> None:
        super().__init__(controller, reactor=controller.reactor)
        self._sendto: Callable[[bytes, Any], object] | None = None
        #: errno values already logged (a handful at most: the kernel's send errors).
        self._logged_errors: set[int | None] = set()

    def startProtocol(self) -> None:
        super().startProtocol()
        # Port.write re-validates the address on every call; the socket needs no such
        # care for addresses that recvfrom just gave us.
        sock = getattr(self.transport, "socket", None)
        self._sendto = sock.sendto if sock is not None else None

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if addr[1] == 0:
            return
        self.controller.packetReceived(data, self, addr)

    def writeReply(self, data: bytes, address: Any) -> None:
        """Send one reply datagram; a send the kernel refuses is dropped."""
        try:
            if self._sendto is not None:
                self._sendto(data, address)
            else:
                cast(Any, self.transport).write(data, address)
        except OSError as e:
            # Dropped, as UDP may.  A kind of failure is logged once per listener, not once
            # per datagram (a spoofed flood can make every send fail the same way).
            if e.errno not in _DROPPED_SEND_ERRORS and e.errno not in self._logged_errors:
                self._logged_errors.add(e.errno)
                log.warn(
                    "DNS replies failing ({error}); further replies failing so are dropped"
                    " without a line",
                    addr=address,
                    error=e,
                )

    def writeMessage(self, message: dns.Message, address: Any) -> None:
        self.writeReply(message.toStr(), address)


@implementer(IPushProducer)
class DNSStreamProtocol(dns.DNSProtocol):
    """DNS over TCP (RFC 7766): length-prefixed queries, pipelined, within the
    controller's ``tcp`` limits (:class:`csrproxy.dns.limits.TCPLimits`).

    A connection the limits do not admit is aborted at once. It is the transport's
    streaming producer: while more than ``TCP_BUFFER`` bytes of answers are unsent it
    reads nothing (queries already read wait), and it is aborted if they stay unsent
    for ``idle_timeout`` seconds. A query must arrive whole within ``message_timeout``
    seconds of its first byte; a connection waiting for a query is aborted after
    ``idle_timeout`` seconds (more bytes of an unfinished query reset neither). A
    length prefix over ``TCP_MAX_QUERY`` aborts. ``closed`` fires when the
    connection is gone.
    """

    controller: Controller
    MAX_LENGTH = TCP_MAX_QUERY

    def __init__(self, controller: Controller, reactor: Any = None) -> None:
        super().__init__(controller, reactor=reactor or controller.reactor)
        self.closed: Deferred[None] = Deferred()
        self.source: str | None = None
        self._closing = False
        self._completed = False
        self._deadline: IDelayedCall | None = None
        # What the deadline waits for: a query ("idle"), the rest of one ("message"),
        # or the client to read our answers ("unread").
        self._waiting = ""

    def connectionMade(self) -> None:
        transport = cast(Any, self.transport)
        self.source = self.controller.tcp.admit(self, transport.getPeer())
        if self.source is None:
            transport.abortConnection()  # keep file descriptors for others
            return
        super().connectionMade()
        if hasattr(transport, "bufferSize"):
            # FileDescriptor pauses its producer past bufferSize and reads that much.
            transport.bufferSize = TCP_BUFFER
        transport.registerProducer(self, True)
        self._wait("idle")

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._completed = False
        super().dataReceived(data)
        if self._closing:
            return
        if self.paused:
            if len(self._unprocessed) > TCP_MAX_INPUT:
                self._abort(OVERRUN)
            return
        # A query read ends its deadline: the next one's first byte came with it.
        waiting = "message" if self._unprocessed else "idle"
        if self._completed or waiting != self._waiting:
            self._wait(waiting)

    def stringReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._completed = True
        self.controller.packetReceived(data, self, None)

    def lengthLimitExceeded(self, length: int) -> None:
        self._abort(TOO_LONG)

    def writeReply(self, data: bytes, address: Any) -> None:
        """Send one length-prefixed reply."""
        self.sendString(data)

    def writeMessage(self, message: dns.Message) -> None:
        self.writeReply(message.toStr(), None)

    # -- IPushProducer: the transport's say on our reading ---------------------

    def pauseProducing(self) -> None:
        if self.paused or self._closing:
            return
        self.paused = True
        cast(Any, self.transport).pauseProducing()
        self._wait("unread")

    def resumeProducing(self) -> None:
        if not self.paused or self._closing:
            return
        self.paused = False
        cast(Any, self.transport).resumeProducing()
        self.dataReceived(b"")  # the queries read before the pause

    def stopProducing(self) -> None:
        self.paused = True

    # -- closing -----------------------------------------------------------------

    def evict(self) -> None:
        """Abort: the limits gave this connection's slot to another source."""
        self._abort(None)

    def _wait(self, what: str) -> None:
        self._cancel()
        limits = self.controller.tcp
        seconds = limits.message_timeout if what == "message" else limits.idle_timeout
        self._waiting = what
        self._deadline = self._reactor.callLater(seconds, self._expired)

    def _cancel(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        reason = {"message": MESSAGE_TIMEOUT, "unread": UNREAD}.get(self._waiting)
        self._abort(reason)

    def _abort(self, reason: str | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._cancel()
        self._unprocessed = b""
        if reason is not None:
            self.controller.tcp.refused(reason, self.source or "?")
        cast(Any, self.transport).abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closing = True
        self._cancel()
        self._unprocessed = b""
        if self.source is not None:
            self.controller.tcp.release(self)
            super().connectionLost(reason)
        if not self.closed.called:
            self.closed.callback(None)


def peer_host(protocol: Any, address: Any) -> str:
    """The client's address: the UDP peer ``address``, else the TCP connection's peer."""
    if address is not None:
        return str(address[0])
    transport = getattr(protocol, "transport", None)
    peer = transport.getPeer() if transport is not None else None
    return str(getattr(peer, "host", ""))
