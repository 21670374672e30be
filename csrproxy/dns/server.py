"""The DNS listeners: UDP and TCP on every configured address, answering from a zone."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.dns.wire import UDP_MAX, Responder
from csrproxy.dns.zone import ChallengeZone
from csrproxy.errors import ConfigError, ListenError

log = Logger()

TCP_IDLE_TIMEOUT = 30.0
MAX_TCP_CONNECTIONS = 512
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
_PORT_ZERO_ATTEMPTS = 8


def parse_listen(spec: str) -> tuple[str, int]:
    """Split ``"127.0.0.1:53"`` or ``"[::1]:53"`` into an IP literal and a port.

    Raises ``ConfigError("dns.listen", ...)`` for anything else.
    """
    text = spec.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ConfigError("dns.listen", f"{spec!r}: write IPv6 addresses as [addr]:port")
    if not sep or not host:
        raise ConfigError("dns.listen", f"{spec!r}: expected host:port or [v6]:port")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError("dns.listen", f"{spec!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError("dns.listen", f"{spec!r}: bad port {port!r}")
    return host, int(port)


class DNSDatagramProtocol(DatagramProtocol):
    """Answers each UDP query with one datagram, or drops it."""

    def __init__(self, responder: Responder) -> None:
        self._respond = responder.respond
        self._sendto: Callable[[bytes, Any], object] | None = None

    def startProtocol(self) -> None:
        # Port.write re-validates the address on every call; the socket needs no such care
        # for addresses that recvfrom just gave us.
        sock = getattr(self.transport, "socket", None)
        self._sendto = sock.sendto if sock is not None else None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if addr[1] == 0:
            return  # nobody can receive on port 0
        try:
            response = self._respond(datagram, UDP_MAX)
        except Exception:
            log.failure("DNS query from {addr} crashed the responder", addr=addr)
            return
        if response is None:
            return
        try:
            if self._sendto is not None:
                self._sendto(response, addr)
            else:
                transport: Any = self.transport
                transport.write(response, addr)
        except OSError as e:
            # A full send buffer or an ICMP error: drop, as UDP may.
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNREFUSED, errno.ENOBUFS):
                log.warn("DNS reply to {addr} failed: {error}", addr=addr, error=e)


class DNSStreamProtocol(Protocol):
    """DNS over TCP (RFC 7766): length-prefixed queries, pipelined, with an idle timeout."""

    def __init__(self, server: DNSServerService) -> None:
        self._server = server
        self._buffer = bytearray()
        self._timer: Any = None  # an IDelayedCall
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if len(self._server.connections) >= self._server.max_tcp_connections:
            cast(Any, self.transport).abortConnection()  # keep file descriptors for others
            return
        self._server.connections.add(self)
        self._timer = self._server.reactor.callLater(self._server.tcp_idle_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        transport: Any = self.transport
        transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        transport: Any = self.transport
        while len(buffer) >= 2:
            length = buffer[0] << 8 | buffer[1]
            if len(buffer) < 2 + length:
                break
            packet = bytes(buffer[2 : 2 + length])
            del buffer[: 2 + length]
            try:
                response = self._server.responder.respond(packet, None)
            except Exception:
                log.failure("DNS query over TCP crashed the responder")
                transport.abortConnection()
                return
            if response is not None:
                transport.write(struct.pack("!H", len(response)) + response)
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._server.tcp_idle_timeout)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._server.connections.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.closed.called:
            self.closed.callback(None)


class DNSServerService(Service):
    """Serves ``zone`` over UDP and TCP on every ``listen`` address.

    Ports are bound in ``privilegedStartService`` (so port 53 binds before privileges
    drop); a failure raises ``ListenError(<listen string>, <reason>)``. ``ports``
    holds the listening ports once started. ``stopService`` closes them all and
    returns a Deferred that fires when they are closed.
    """

    def __init__(
        self,
        reactor: Any,
        zone: ChallengeZone,
        listen: Sequence[str],
        on_rcode: Callable[[int], None] | None = None,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
        max_tcp_connections: int = MAX_TCP_CONNECTIONS,
    ) -> None:
        self.reactor = reactor
        self.zone = zone
        self.listen = list(listen)
        self._addresses = [parse_listen(spec) for spec in self.listen]
        self.responder = Responder(zone, on_rcode)
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.ports: list[IListeningPort] = []
        self.connections: set[DNSStreamProtocol] = set()
        self._bound = False

    def privilegedStartService(self) -> None:
        cast(Any, super()).privilegedStartService()
        self._bind()

    def startService(self) -> None:
        cast(Any, super()).startService()
        self._bind()

    def _bind(self) -> None:
        if self._bound:
            return
        try:
            for spec, (host, port) in zip(self.listen, self._addresses, strict=True):
                self.ports.extend(self._bind_one(spec, host, port))
        except ListenError:
            for opened in self.ports:
                cast(Any, opened).stopListening()
            self.ports = []
            raise
        self._bound = True

    def _bind_one(self, spec: str, host: str, port: int) -> list[IListeningPort]:
        factory = Factory.forProtocol(lambda: DNSStreamProtocol(self))
        attempts = _PORT_ZERO_ATTEMPTS if port == 0 else 1
        for attempt in range(attempts):
            try:
                udp = self.reactor.listenUDP(
                    port, DNSDatagramProtocol(self.responder), interface=host, maxPacketSize=65535
                )
            except CannotListenError as e:
                raise ListenError(spec, f"UDP: {e.socketError}") from e
            _grow_receive_buffer(udp)
            try:
                # Port 0: TCP takes the port number the kernel gave UDP.
                tcp = self.reactor.listenTCP(
                    udp.getHost().port, factory, backlog=128, interface=host
                )
            except CannotListenError as e:
                udp.stopListening()
                if attempt + 1 < attempts:
                    continue
                raise ListenError(spec, f"TCP: {e.socketError}") from e
            return [udp, tcp]
        raise AssertionError("unreachable")  # pragma: no cover

    def stopService(self) -> Deferred[None]:
        cast(Any, super()).stopService()
        closing = [maybeDeferred(cast(Any, port).stopListening) for port in self.ports]
        self.ports = []
        self._bound = False
        for connection in list(self.connections):
            closing.append(connection.closed)
            if connection.transport is not None:
                cast(Any, connection.transport).abortConnection()
        done: Deferred[None] = gatherResults(closing).addCallback(lambda _: None)
        return done


def _grow_receive_buffer(port: Any) -> None:
    # Bursts of queries should queue in the kernel rather than be dropped.
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
