"""The DNS listeners: UDP and TCP on every configured address, answering from a zone.

The protocols are twisted.names' (``csrproxy.dns.protocols``) and the answering
is a ``twisted.names.server.DNSServerFactory`` (``csrproxy.dns.factory``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort

from csrproxy.dns.answered import AnswerLog
from csrproxy.dns.cookies import ServerCookies
from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.limits import (
    TCP_IDLE_TIMEOUT,
    TCP_MAX_CONNECTIONS,
    TCP_MAX_PER_SOURCE,
    TCP_MESSAGE_TIMEOUT,
    TCPLimits,
)
from csrproxy.dns.protocols import DNSDatagramProtocol, DNSStreamProtocol
from csrproxy.dns.rrl import ResponseRateLimiter
from csrproxy.dns.transfer import Keys, ZoneTransfers
from csrproxy.dns.zone import ChallengeZone
from csrproxy.dns.zones import Zones
from csrproxy.errors import ConfigError, ListenError

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


class DNSServerService(Service):
    """Serves ``zone`` (a :class:`ChallengeZone`, or :class:`Zones`) over UDP and TCP on
    every ``listen`` address.

    Ports are bound in ``privilegedStartService`` (so port 53 binds before privileges
    drop); a failure raises ``ListenError(<listen string>, <reason>)``. ``ports``
    holds the listening ports once started; ``factory`` (one
    :class:`ZoneServerFactory` for every address and both transports) answers the
    queries. ``stopService`` closes them all and returns a Deferred that fires when
    they are closed.

    TCP connections are held to ``max_tcp_connections`` in all, ``max_tcp_per_source``
    per client address (IPv6: per /64), ``tcp_message_timeout`` seconds for a query to
    arrive from its first byte and ``tcp_idle_timeout`` seconds between queries (see
    ``csrproxy.dns.limits``, which states the memory this bounds). ``on_refusal(reason)``
    is called for every connection refused or cut (reasons: the ``dns_tcp_*``
    constants of ``csrproxy.dns.limits``); they are logged in one line a second at most.

    UDP replies pass ``rrl`` when given (``csrproxy.dns.rrl``: response rate limiting).
    ``nsid`` and ``cookies`` answer those EDNS options (``csrproxy.dns.cookies``);
    ``require_cookies``: BADCOOKIE to UDP queries with a COOKIE but no valid server cookie.
    AXFR and IXFR are answered to the secondaries in ``transfer_keys``
    (``csrproxy.dns.transfer``).
    """

    def __init__(
        self,
        reactor: Any,
        zone: ChallengeZone | Zones,
        listen: Sequence[str],
        on_rcode: Callable[[int], None] | None = None,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
        max_tcp_connections: int = TCP_MAX_CONNECTIONS,
        *,
        max_tcp_per_source: int = TCP_MAX_PER_SOURCE,
        tcp_message_timeout: float = TCP_MESSAGE_TIMEOUT,
        on_refusal: Callable[[str], None] | None = None,
        rrl: ResponseRateLimiter | None = None,
        nsid: bytes | None = None,
        cookies: ServerCookies | None = None,
        require_cookies: bool = False,
        transfer_keys: Keys | None = None,
    ) -> None:
        self.reactor = reactor
        #: Every zone served (one zone given is served as the :class:`Zones` of one).
        self.zone = Zones.of(zone)
        self.listen = list(listen)
        self._addresses = [parse_listen(spec) for spec in self.listen]
        tcp = TCPLimits(
            reactor,
            max_connections=max_tcp_connections,
            max_per_source=max_tcp_per_source,
            idle_timeout=tcp_idle_timeout,
            message_timeout=tcp_message_timeout,
            on_refusal=on_refusal,
        )
        #: When each challenge name's answers leave the caches that took them.
        self.answers = AnswerLog(reactor.seconds, lambda: zone.challenge_ttl)
        self.factory = ZoneServerFactory(
            reactor,
            zone,
            on_rcode,
            tcp=tcp,
            rrl=rrl,
            nsid=nsid,
            cookies=cookies,
            require_cookies=require_cookies,
            transfers=ZoneTransfers(reactor, zone, transfer_keys or {}),
            answer_log=self.answers,
        )
        self.ports: list[IListeningPort] = []
        #: ``(host, port)`` of each UDP listener once bound.
        self.udp_addresses: list[tuple[str, int]] = []
        self._bound = False

    @property
    def connections(self) -> set[DNSStreamProtocol]:
        """The open TCP connections."""
        return self.factory.connections

    def served_at(self) -> list[tuple[str, int]]:
        """Where a client reaches the zone: each UDP listener, a wildcard address as the
        loopback address of its family."""
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
        return [(wildcard.get(host, host), port) for host, port in self.udp_addresses]

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
            self.udp_addresses = []
            raise
        self._bound = True

    def _bind_one(self, spec: str, host: str, port: int) -> list[IListeningPort]:
        attempts = _PORT_ZERO_ATTEMPTS if port == 0 else 1
        for attempt in range(attempts):
            try:
                udp = self.reactor.listenUDP(
                    port,
                    DNSDatagramProtocol(self.factory),
                    interface=host,
                    maxPacketSize=65535,
                )
            except CannotListenError as e:
                raise ListenError(spec, f"UDP: {e.socketError}") from e
            _grow_receive_buffer(udp)
            bound = udp.getHost().port
            try:
                # Port 0: TCP takes the port number the kernel gave UDP.
                tcp = self.reactor.listenTCP(bound, self.factory, backlog=128, interface=host)
            except CannotListenError as e:
                udp.stopListening()
                if attempt + 1 < attempts:
                    continue
                raise ListenError(spec, f"TCP: {e.socketError}") from e
            self.udp_addresses.append((host, bound))
            return [udp, tcp]
        raise AssertionError("unreachable")  # pragma: no cover

    def stopService(self) -> Deferred[None]:
        cast(Any, super()).stopService()
        closing = [maybeDeferred(cast(Any, port).stopListening) for port in self.ports]
        self.ports = []
        self.udp_addresses = []
        self._bound = False
        for connection in list(self.connections):
            closing.append(connection.closed)
            if connection.transport is not None:
                cast(Any, connection.transport).abortConnection()
        self.factory.tcp.stop()
        if self.factory.rrl is not None:
            self.factory.rrl.stop()
        done: Deferred[None] = gatherResults(closing).addCallback(lambda _: None)
        return done


def _grow_receive_buffer(port: Any) -> None:
    # Bursts of queries should queue in the kernel rather than be dropped.
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
