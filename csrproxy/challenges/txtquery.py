"""TXT look-ups straight at one authoritative server, for the propagation check.

:class:`TXTQuerier` keeps one UDP port per address family for every look-up (a port
per query, as ``twisted.names.client.Resolver`` makes them, logs two lines per query
and costs a descriptor each). Each query gets a random id; an answer counts only from
the address and port it was sent to, with that id and the same question, so a forged
datagram must guess all three. Messages are ``twisted.names.dns.Message``.

Bounds: at most ``MAX_OUTSTANDING`` queries wait for an answer at once (more fail at
once with :class:`TooManyQueries`); each waits at most its timeout; datagrams are read
up to ``MAX_ANSWER`` bytes.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import TimeoutError
from twisted.internet.protocol import DatagramProtocol
from twisted.names import dns

Server = tuple[str, int]

MAX_OUTSTANDING = 256
MAX_ANSWER = 65535


class TooManyQueries(Exception):
    """Over ``MAX_OUTSTANDING`` look-ups at once."""


class _Port(DatagramProtocol):
    noisy = False

    def __init__(self, received: Callable[[bytes, Server], None]) -> None:
        self.received = received

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received(datagram, (addr[0], addr[1]))


def txt_values(message: dns.Message, name: str) -> list[str]:
    """The TXT values (each record's strings joined) for ``name`` in ``message``'s answer;
    empty unless NOERROR."""
    if message.rCode != dns.OK:
        return []
    wanted = dns.Name(name.rstrip(".")).name.lower()
    out: list[str] = []
    for rr in message.answers:
        payload = rr.payload
        if isinstance(payload, dns.Record_TXT) and rr.name.name.lower() == wanted:
            out.append(b"".join(payload.data).decode("ascii", "replace"))
    return out


class TXTQuerier:
    """``query(server, name, timeout)``: the TXT values ``server`` answers for ``name``
    (a :data:`csrproxy.challenges.propagation.TXTQuery`). Ports are bound on first use and
    closed by ``close()``."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._ports: dict[int, Any] = {}
        # (id, server) -> (question name lowercase, the Deferred, the timeout call)
        self._waiting: dict[tuple[int, Server], tuple[bytes, Deferred[list[str]], Any]] = {}

    def __call__(self, server: Server, name: str, timeout: float) -> Deferred[list[str]]:
        if len(self._waiting) >= MAX_OUTSTANDING:
            return fail(TooManyQueries(f"{MAX_OUTSTANDING} DNS look-ups already waiting"))
        host = str(ipaddress.ip_address(server[0]))
        server = (host, server[1])
        family = 6 if ":" in host else 4
        port = self._ports.get(family)
        if port is None:
            interface = "::" if family == 6 else "0.0.0.0"
            port = self._ports[family] = self.reactor.listenUDP(
                0, _Port(self._received), interface=interface, maxPacketSize=MAX_ANSWER
            )
        qname = name.rstrip(".")
        for _ in range(8):
            message_id = secrets.randbelow(1 << 16)
            if (message_id, server) not in self._waiting:
                break
        message = dns.Message(id=message_id, recDes=False)
        message.queries = [dns.Query(qname, dns.TXT, dns.IN)]
        d: Deferred[list[str]] = Deferred()
        key = (message_id, server)
        timer = self.reactor.callLater(timeout, self._expire, key)
        self._waiting[key] = (qname.encode("ascii").lower(), d, timer)
        try:
            port.write(message.toStr(), server)
        except OSError as e:
            self._finish(key)
            d.errback(e)
        return d

    def _expire(self, key: tuple[int, Server]) -> None:
        entry = self._waiting.pop(key, None)
        if entry is not None:
            entry[1].errback(TimeoutError(f"no answer from {key[1][0]} port {key[1][1]}"))

    def _finish(self, key: tuple[int, Server]) -> None:
        entry = self._waiting.pop(key, None)
        if entry is not None and entry[2].active():
            entry[2].cancel()

    def _received(self, datagram: bytes, source: Server) -> None:
        if len(datagram) < 12:
            return
        try:
            host = str(ipaddress.ip_address(source[0].split("%")[0]))
        except ValueError:
            return
        key = (int.from_bytes(datagram[:2], "big"), (host, source[1]))
        entry = self._waiting.get(key)
        if entry is None:
            return
        try:
            message = dns.Message()
            message.fromStr(datagram)
        except Exception:
            return
        if (
            not message.answer
            or len(message.queries) != 1
            or message.queries[0].name.name.lower() != entry[0]
        ):
            return
        self._finish(key)
        entry[1].callback(txt_values(message, entry[0].decode("ascii")))

    def close(self) -> None:
        """Fail what waits and close the ports."""
        for key in list(self._waiting):
            timer = self._waiting[key][2]
            if timer.active():
                timer.cancel()
            self._expire(key)
        for port in self._ports.values():
            port.stopListening()
        self._ports = {}
