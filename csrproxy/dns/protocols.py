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
from twisted.logger import Logger
from twisted.names import dns
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

log = Logger()

# A full send buffer or an ICMP error: drop the reply, as UDP may.
_DROPPED_SEND_ERRORS = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNREFUSED, errno.ENOBUFS)


class Controller(Protocol):
    """What the protocols ask of the server factory that owns them."""

    reactor: Any
    connections: set[Any]
    max_tcp_connections: int
    tcp_idle_timeout: float

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
            if e.errno not in _DROPPED_SEND_ERRORS:
                log.warn("DNS reply to {addr} failed: {error}", addr=address, error=e)

    def writeMessage(self, message: dns.Message, address: Any) -> None:
        self.writeReply(message.toStr(), address)


class DNSStreamProtocol(dns.DNSProtocol, TimeoutMixin):
    """DNS over TCP (RFC 7766): length-prefixed queries, pipelined, with an idle timeout.

    A connection beyond the factory's ``max_tcp_connections`` is aborted at once;
    one idle for ``tcp_idle_timeout`` seconds is aborted. ``closed`` fires when
    the connection is gone.
    """

    controller: Controller

    def __init__(self, controller: Controller, reactor: Any = None) -> None:
        super().__init__(controller, reactor=reactor or controller.reactor)
        self.closed: Deferred[None] = Deferred()
        self._admitted = False

    def connectionMade(self) -> None:
        factory = self.controller
        if len(factory.connections) >= factory.max_tcp_connections:
            cast(Any, self.transport).abortConnection()  # keep file descriptors for others
            return
        self._admitted = True
        super().connectionMade()
        self.setTimeout(factory.tcp_idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)

    def stringReceived(self, data: bytes) -> None:
        self.controller.packetReceived(data, self, None)

    def writeReply(self, data: bytes, address: Any) -> None:
        """Send one length-prefixed reply."""
        self.sendString(data)

    def writeMessage(self, message: dns.Message) -> None:
        self.writeReply(message.toStr(), None)

    def timeoutConnection(self) -> None:
        cast(Any, self.transport).abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        if self._admitted:
            super().connectionLost(reason)
        if not self.closed.called:
            self.closed.callback(None)
