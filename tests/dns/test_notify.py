"""NOTIFY (RFC 1996) to the secondaries, TSIG checked with dnspython's own TSIG."""

from __future__ import annotations

import base64
import time
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rdatatype
import dns.tsigkeyring
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from csrproxy.dns import notify
from csrproxy.dns.notify import ZoneNotifier
from csrproxy.dns.zone import ChallengeZone
from tests.support.udp import UDPClock

ORIGIN = "go.example.test"
CHALLENGE = "_acme-challenge.demo.go.example.test"
SECRET = bytes(range(32))
KEY_NAME = "csrproxy-xfr"
START = float(int(time.time()))  # dnspython checks the TSIG time against its own clock


class Secondary:
    def __init__(self, address: str, port: int = 53, secret: bytes = SECRET) -> None:
        self.address = address
        self.notify_port = port
        self.tsig_name = KEY_NAME
        self.tsig_algorithm = "hmac-sha256"
        self.tsig_secret = secret


def keyring(secret: bytes = SECRET) -> dict[dns.name.Name, Any]:
    ring: dict[dns.name.Name, Any] = dns.tsigkeyring.from_text(
        {KEY_NAME: base64.b64encode(secret).decode()}
    )
    return ring


class FakeReactor(UDPClock):
    def __init__(self) -> None:
        super().__init__(START)


def make_zone(reactor: Clock) -> ChallengeZone:
    return ChallengeZone(
        ORIGIN, ["ns1." + ORIGIN], ["@ A 127.0.0.1"], serial=1_000, clock=reactor.seconds
    )


def answer(query: dns.message.Message) -> bytes:
    reply = dns.message.make_response(query)
    wire: bytes = reply.to_wire()
    return wire


class NotifierCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.zone = make_zone(self.reactor)
        self.secondaries = [Secondary("192.0.2.53", 5300), Secondary("2001:db8::53")]
        self.notifier = ZoneNotifier(self.reactor, self.zone, self.secondaries)
        self.notifier.startService()
        self.addCleanup(self.notifier.stopService)
        self.started = {host: self.sent(host) for host in ("192.0.2.53", "2001:db8::53")}
        # The NOTIFY of the serial at start, answered: the tests begin from a quiet state.
        for host, port in (("192.0.2.53", 5300), ("2001:db8::53", 53)):
            [message] = self.started[host]
            self.reply(host, port, message)
        for bound in self.reactor.udp:
            bound.written.clear()
        self.reactor.advance(notify.SPACING)  # past the spacing after that NOTIFY
        self.logged = EventLoggingObserver()
        globalLogPublisher.addObserver(self.logged)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged)

    def pump(self, seconds: float, step: float = 0.5) -> None:
        # Small steps: a call scheduled while Clock.advance runs counts from the new time.
        for _ in range(round(seconds / step)):
            self.reactor.advance(step)

    def sent(self, host: str) -> list[dns.message.Message]:
        # Each NOTIFY parsed by dnspython with the key: a bad TSIG raises here.
        return [
            dns.message.from_wire(data, keyring=keyring())
            for port in self.reactor.udp
            for data, addr in port.written
            if addr[0] == host
        ]

    def reply(self, host: str, port: int, message: dns.message.Message) -> None:
        for bound in self.reactor.udp:
            bound.protocol.datagramReceived(answer(message), (host, port))

    def test_start_notifies_the_serial_at_start(self) -> None:
        for host in ("192.0.2.53", "2001:db8::53"):
            [message] = self.started[host]
            self.assertTrue(message.had_tsig)
            self.assertEqual(message.opcode(), dns.opcode.NOTIFY)
            self.assertEqual(message.answer[0][0].serial, 1_000)
        self.pump(100)
        self.assertEqual(self.sent("192.0.2.53"), [])
        self.assertEqual(self.notifier.given_up, 0)

    def test_a_burst_of_changes_is_spaced_and_coalesced(self) -> None:
        self.zone.add_txt(CHALLENGE, "one")
        [first] = self.sent("192.0.2.53")
        self.reply("192.0.2.53", 5300, first)
        for value in ("two", "three", "four"):
            self.zone.add_txt(CHALLENGE, value)
        self.assertEqual(len(self.sent("192.0.2.53")), 1)  # the next waits for SPACING
        self.reactor.advance(notify.SPACING)
        messages = self.sent("192.0.2.53")
        self.assertEqual(len(messages), 2)
        self.assertEqual(messages[1].answer[0][0].serial, self.zone.serial)
        self.reply("192.0.2.53", 5300, messages[1])
        self.pump(10)
        self.assertEqual(len(self.sent("192.0.2.53")), 2)

    def test_change_sends_signed_notify_to_each_secondary(self) -> None:
        self.assertEqual(sorted(port.interface for port in self.reactor.udp), ["0.0.0.0", "::"])
        self.assertEqual(self.sent("192.0.2.53"), [])
        self.zone.add_txt(CHALLENGE, "value")
        for host, port in (("192.0.2.53", 5300), ("2001:db8::53", 53)):
            [message] = self.sent(host)
            self.assertTrue(message.had_tsig)
            self.assertEqual(message.opcode(), dns.opcode.NOTIFY)
            self.assertTrue(message.flags & dns.flags.AA)
            self.assertFalse(message.flags & dns.flags.QR)
            [question] = message.question
            self.assertEqual(question.name, dns.name.from_text(ORIGIN))
            self.assertEqual(question.rdtype, dns.rdatatype.SOA)
            [soa] = message.answer
            self.assertEqual(soa.rdtype, dns.rdatatype.SOA)
            self.assertEqual(soa[0].serial, self.zone.serial)
            addresses = [addr for bound in self.reactor.udp for _, addr in bound.written]
            self.assertIn((host, port), addresses)

    def test_retries_with_backoff_until_answered(self) -> None:
        self.zone.add_txt(CHALLENGE, "value")
        counts = []
        for step in (1.9, 0.1, 3.9, 0.1, 8.0):
            self.reactor.advance(step)
            counts.append(len(self.sent("192.0.2.53")))
        self.assertEqual(counts, [1, 2, 2, 3, 4])
        messages = self.sent("192.0.2.53")
        self.assertEqual({m.id for m in messages}, {messages[0].id})
        self.reply("192.0.2.53", 5300, messages[0])
        self.pump(100)
        self.assertEqual(len(self.sent("192.0.2.53")), 4)
        # Only the other secondary, never answered, went on to the end.
        self.assertEqual(self.notifier.given_up, 1)
        self.assertEqual(len(self.sent("2001:db8::53")), 5)

    def test_gives_up_after_the_last_try_with_one_log_line(self) -> None:
        self.zone.add_txt(CHALLENGE, "value")
        self.pump(2 + 4 + 8 + 16 + 31.5)
        self.assertEqual(len(self.sent("192.0.2.53")), 5)
        self.assertEqual(len(self.logged), 0)
        self.pump(0.5)
        self.assertEqual(self.notifier.given_up, 2)
        warned = [e for e in self.logged if "not answered" in e["log_format"]]
        self.assertEqual(len(warned), 2)
        self.assertEqual({e["host"] for e in warned}, {"192.0.2.53", "2001:db8::53"})
        self.pump(1000, step=10)
        self.assertEqual(len(self.sent("192.0.2.53")), 5)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_changes_while_outstanding_send_one_more_with_the_newest_serial(self) -> None:
        self.zone.add_txt(CHALLENGE, "one")
        first = self.zone.serial
        for value in ("two", "three", "four"):
            self.reactor.advance(0.5)
            self.zone.add_txt(CHALLENGE, value)
        newest = self.zone.serial
        self.assertNotEqual(first, newest)
        [message] = self.sent("192.0.2.53")
        self.assertEqual(message.answer[0][0].serial, first)
        self.reply("192.0.2.53", 5300, message)
        messages = self.sent("192.0.2.53")
        self.assertEqual(len(messages), 2)
        self.assertEqual(messages[1].answer[0][0].serial, newest)
        self.assertNotEqual(messages[1].id, message.id)
        self.reply("192.0.2.53", 5300, messages[1])
        self.pump(100)
        self.assertEqual(len(self.sent("192.0.2.53")), 2)

    def test_coalesced_change_is_sent_after_giving_up(self) -> None:
        self.zone.add_txt(CHALLENGE, "one")
        self.zone.add_txt(CHALLENGE, "two")
        self.pump(62)
        messages = self.sent("192.0.2.53")
        self.assertEqual(len(messages), 6)
        self.assertEqual(messages[-1].answer[0][0].serial, self.zone.serial)

    def test_hostile_datagrams_leave_no_state_and_stop_nothing(self) -> None:
        self.zone.add_txt(CHALLENGE, "value")
        [message] = self.sent("192.0.2.53")
        wrong_id = dns.message.make_response(message)
        wrong_id.id = (message.id + 1) % 65536
        query = dns.message.make_query(ORIGIN, "SOA")
        query.id = message.id
        for bound in self.reactor.udp:
            for _ in range(1000):
                bound.protocol.datagramReceived(b"\x00garbage", ("192.0.2.53", 5300))
                bound.protocol.datagramReceived(wrong_id.to_wire(), ("192.0.2.53", 5300))
                # Not a reply; and a reply from another port or address.
                bound.protocol.datagramReceived(query.to_wire(), ("192.0.2.53", 5300))
                bound.protocol.datagramReceived(answer(message), ("192.0.2.53", 5301))
                bound.protocol.datagramReceived(answer(message), ("192.0.2.99", 5300))
        self.assertEqual(len(self.notifier.targets), 2)
        self.reactor.advance(2)
        self.assertEqual(len(self.sent("192.0.2.53")), 2)

    def test_only_an_answer_signed_with_the_key_ends_the_retries(self) -> None:
        self.zone.add_txt(CHALLENGE, "value")
        [message] = self.sent("192.0.2.53")
        unsigned = dns.message.Message(id=message.id)
        unsigned.flags = dns.flags.QR | dns.flags.AA
        unsigned.set_opcode(dns.opcode.NOTIFY)
        unsigned.question = list(message.question)
        forged = dns.message.make_response(message)
        forged.use_tsig(keyring(b"another secret of 32 bytes......"), keyname=forged.keyname)
        for bound in self.reactor.udp:
            bound.protocol.datagramReceived(unsigned.to_wire(), ("192.0.2.53", 5300))
            bound.protocol.datagramReceived(forged.to_wire(), ("192.0.2.53", 5300))
        self.reactor.advance(2)
        self.assertEqual(len(self.sent("192.0.2.53")), 2, "a forged answer stopped the retries")
        # The answer to the first try (its MAC covers that try's MAC) still counts.
        self.reply("192.0.2.53", 5300, message)
        self.pump(100)
        self.assertEqual(len(self.sent("192.0.2.53")), 2)

    def test_stop_cancels_retries_and_closes_the_ports(self) -> None:
        self.zone.add_txt(CHALLENGE, "value")
        self.notifier.stopService()
        self.assertTrue(all(port.stopped for port in self.reactor.udp))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.zone.add_txt(CHALLENGE, "later")
        self.assertEqual(len(self.sent("192.0.2.53")), 1)

    def test_schedule(self) -> None:
        self.assertEqual((notify.RETRY_FIRST, notify.TRIES), (2.0, 5))


class NoSecondariesCase(SynchronousTestCase):
    def test_nothing_sent_and_no_socket(self) -> None:
        reactor = FakeReactor()
        zone = make_zone(reactor)
        notifier = ZoneNotifier(reactor, zone, [])
        notifier.startService()
        zone.add_txt(CHALLENGE, "value")
        self.assertEqual(reactor.udp, [])
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.successResultOf(notifier.stopService())


class ListeningSecondary(DatagramProtocol):
    """A secondary on loopback: verifies each NOTIFY's TSIG with dnspython and answers
    (signed) only from the second one on, so the first must be retried."""

    def __init__(self) -> None:
        self.received: list[dns.message.Message] = []
        self.answered: Deferred[dns.message.Message] = Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        message = dns.message.from_wire(datagram, keyring=keyring())
        self.received.append(message)
        if len(self.received) < 2:
            return
        reply = dns.message.make_response(message)
        assert self.transport is not None
        self.transport.write(reply.to_wire(), addr)
        self.answered.callback(message)


class LoopbackCase(TestCase):
    def test_real_udp_notify_answered_by_a_dnspython_secondary(self) -> Deferred[None]:
        secondary = ListeningSecondary()
        port = global_reactor.listenUDP(0, secondary, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        zone = ChallengeZone(ORIGIN, ["ns1." + ORIGIN], ["@ A 127.0.0.1"], serial=1_000)
        self.patch(notify, "RETRY_FIRST", 0.05)
        notifier = ZoneNotifier(global_reactor, zone, [Secondary("127.0.0.1", port.getHost().port)])
        acknowledged: Deferred[None] = Deferred()
        received = notifier._received

        def seen(datagram: bytes, source: tuple[str, int]) -> None:
            received(datagram, source)
            if notifier.targets[0].message_id is None and not acknowledged.called:
                acknowledged.callback(None)

        self.patch(notifier, "_received", seen)
        zone.add_txt(CHALLENGE, "value")  # before the start: its NOTIFY carries the change
        notifier.startService()
        self.addCleanup(notifier.stopService)

        def check(_: None) -> None:
            self.assertEqual(len(secondary.received), 2)
            first, second = secondary.received
            self.assertTrue(second.had_tsig)
            self.assertEqual(first.id, second.id)
            self.assertEqual(second.answer[0][0].serial, zone.serial)
            self.assertEqual(notifier.given_up, 0)

        checked: Deferred[None] = acknowledged.addCallback(check)
        return checked
