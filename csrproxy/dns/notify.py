"""NOTIFY (RFC 1996) to the configured secondaries when the zone's serial changes.

Each change sends every secondary a TSIG-signed NOTIFY (opcode NOTIFY, AA, the
question ``<zone> SOA IN`` and the new SOA in the answer section as a hint) over UDP
to ``address:notify_port``, from a port of our own (one per address family in use).
The NOTIFY is sent again, same id, after ``RETRY_FIRST`` seconds, doubling, until a
reply from that address and port with the same id and opcode NOTIFY arrives; after
``TRIES`` sends and one more wait it gives up with one log line.

Bounds: at most one NOTIFY outstanding per secondary, and a new one at most every
``SPACING`` seconds; changes meanwhile are coalesced into one more NOTIFY, sent when it
is answered or given up (and ``SPACING`` has passed), carrying the newest serial. A
datagram that matches no outstanding NOTIFY is dropped and leaves no state, so a hostile
sender can neither grow memory nor stop the retries.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.names import dns

from csrproxy.dns import tsig
from csrproxy.dns.zone import ChallengeZone

log = Logger()

RETRY_FIRST = 2.0
TRIES = 5
# Seconds at least between two new NOTIFYs to one secondary: each makes it transfer,
# so a burst of changes costs it at most five transfers a second (changes meanwhile
# are coalesced into the next NOTIFY).
SPACING = 0.2
# The reply to a NOTIFY is a header, a question and maybe a TSIG: small.
MAX_REPLY = 4096


@dataclass
class _Target:
    """One secondary: where its NOTIFY goes, its key, and its one outstanding NOTIFY."""

    host: str
    port: int
    key: tsig.TSIGKey
    family: int
    message_id: int | None = None
    serial: int = 0
    tries: int = 0
    message: bytes = b""  # the unsigned NOTIFY, re-signed on every try
    again: bool = False  # the serial changed while a NOTIFY was outstanding
    #: The MACs of this NOTIFY's tries (at most TRIES): its answer covers one of them.
    macs: list[bytes] = field(default_factory=list, repr=False)
    timer: Any = field(default=None, repr=False)
    started_at: float = float("-inf")  # when the latest new NOTIFY was first sent
    pacer: Any = field(default=None, repr=False)  # the next NOTIFY, waiting for SPACING


class _NotifyProtocol(DatagramProtocol):
    def __init__(self, received: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.received = received

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received(datagram, (addr[0], addr[1]))


class ZoneNotifier(Service):
    """Sends NOTIFY for ``zone`` to each of ``secondaries`` (``SecondaryConfig``s).

    ``startService`` binds the UDP ports (none when there are no secondaries), starts
    listening to the zone's serial and notifies every secondary of the serial at start;
    ``stopService`` stops both and cancels the retries. ``given_up`` counts the NOTIFYs
    never answered.
    """

    def __init__(self, reactor: Any, zone: ChallengeZone, secondaries: Sequence[Any]) -> None:
        self.reactor = reactor
        self.zone = zone
        self.targets: list[_Target] = []
        for secondary in secondaries:
            address = ipaddress.ip_address(secondary.address)
            self.targets.append(
                _Target(
                    str(address),
                    secondary.notify_port,
                    tsig.TSIGKey(
                        secondary.tsig_name, secondary.tsig_algorithm, secondary.tsig_secret
                    ),
                    address.version,
                )
            )
        self.ports: dict[int, IListeningPort] = {}
        self.given_up = 0
        self._stop_listening: Callable[[], None] | None = None

    def startService(self) -> None:
        cast(Any, super()).startService()
        if not self.targets:
            return
        protocol = _NotifyProtocol(self._received)
        for family in sorted({target.family for target in self.targets}):
            interface = "0.0.0.0" if family == 4 else "::"
            self.ports[family] = self.reactor.listenUDP(
                0, protocol, interface=interface, maxPacketSize=MAX_REPLY
            )
        self._stop_listening = self.zone.on_serial(self.serial_changed)
        # A restart may follow changes the secondaries missed (or new static records).
        self.serial_changed(self.zone.serial)

    def stopService(self) -> Deferred[None]:
        cast(Any, super()).stopService()
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        for target in self.targets:
            self._finish(target)
            target.again = False
            if target.pacer is not None and target.pacer.active():
                target.pacer.cancel()
            target.pacer = None
        closing = [maybeDeferred(cast(Any, port).stopListening) for port in self.ports.values()]
        self.ports = {}
        done: Deferred[None] = gatherResults(closing).addCallback(lambda _: None)
        return done

    def serial_changed(self, serial: int) -> None:
        """Notify every secondary of ``serial`` (or once more, after the outstanding one)."""
        for target in self.targets:
            if target.message_id is not None:
                target.again = True
            else:
                self._paced(target)

    def _paced(self, target: _Target) -> None:
        # Start a NOTIFY now, or SPACING after the previous one started.
        if target.pacer is not None:
            return  # one is waiting: it will carry the newest serial
        wait = target.started_at + SPACING - self.reactor.seconds()
        if wait > 0:
            target.pacer = self.reactor.callLater(wait, self._unpaced, target)
        else:
            self._start(target)

    def _unpaced(self, target: _Target) -> None:
        target.pacer = None
        if target.message_id is not None:
            target.again = True
        else:
            self._start(target)

    def _start(self, target: _Target) -> None:
        target.started_at = self.reactor.seconds()
        target.message_id = secrets.randbelow(1 << 16)
        target.serial = self.zone.serial
        target.tries = 0
        target.again = False
        message = dns.Message(id=target.message_id, opCode=dns.OP_NOTIFY, auth=True)
        message.queries = [dns.Query(self.zone.origin.encode("ascii"), dns.SOA, dns.IN)]
        message.answers = [self.zone.soa_header()]
        target.message = message.toStr()
        self._send(target)

    def _send(self, target: _Target) -> None:
        target.tries += 1
        data = tsig.sign_request(target.message, target.key, self.reactor.seconds())
        if target.tries <= 1:
            target.macs.clear()
        target.macs.append(tsig.mac_of(data))
        port = self.ports.get(target.family)
        if port is not None:
            try:
                cast(Any, port).write(data, (target.host, target.port))
            except OSError as e:
                log.debug("NOTIFY to {host}: {err}", host=target.host, err=e)
        delay = RETRY_FIRST * 2 ** (target.tries - 1)
        target.timer = self.reactor.callLater(delay, self._timed_out, target)

    def _timed_out(self, target: _Target) -> None:
        target.timer = None
        if target.tries < TRIES:
            self._send(target)
            return
        self.given_up += 1
        log.warn(
            "NOTIFY of serial {serial} to {host} port {port} not answered after {tries} tries",
            serial=target.serial,
            host=target.host,
            port=target.port,
            tries=target.tries,
        )
        self._next(target)

    def _received(self, datagram: bytes, source: tuple[str, int]) -> None:
        try:
            reply = dns.Message()
            reply.fromStr(datagram)
        except Exception:
            return
        if not reply.answer or reply.opCode != dns.OP_NOTIFY:
            return
        host = str(ipaddress.ip_address(source[0].split("%")[0]))
        for target in self.targets:
            if target.message_id == reply.id and target.host == host and target.port == source[1]:
                # Only an answer signed with its key to one of our tries ends the retries.
                if tsig.verify_response(datagram, target.key, target.macs, self.reactor.seconds()):
                    self._next(target)
                return

    def _finish(self, target: _Target) -> None:
        if target.timer is not None and target.timer.active():
            target.timer.cancel()
        target.timer = None
        target.message_id = None

    def _next(self, target: _Target) -> None:
        self._finish(target)
        if target.again and self._stop_listening is not None:
            target.again = False
            self._paced(target)
