"""TXT look-ups for the propagation check (csrproxy.challenges.txtquery)."""

from __future__ import annotations

from twisted.internet.error import TimeoutError
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.challenges import txtquery
from csrproxy.challenges.txtquery import TooManyQueries, TXTQuerier
from tests.support.udp import UDPClock

NAME = "_acme-challenge.a.go.example.test"
SERVER = ("192.0.2.53", 5300)


def answer_to(query: bytes, *values: bytes, name: str = NAME, rcode: int = dns.OK) -> bytes:
    asked = dns.Message()
    asked.fromStr(query)
    reply = dns.Message(id=asked.id, answer=True, auth=True, rCode=rcode)
    reply.queries = [dns.Query(name, dns.TXT, dns.IN)]
    reply.answers = [
        dns.RRHeader(name, dns.TXT, dns.IN, 10, dns.Record_TXT(value)) for value in values
    ]
    return reply.toStr()


class QuerierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = UDPClock()
        self.query = TXTQuerier(self.reactor)

    def test_one_port_for_every_query_and_the_values_answered(self) -> None:
        first = self.query(SERVER, NAME, 1.0)
        second = self.query(("192.0.2.54", 53), NAME, 1.0)
        self.assertEqual(len(self.reactor.udp), 1)
        port = self.reactor.udp[0]
        self.assertEqual(port.interface, "0.0.0.0")
        (q1, to1), (q2, to2) = port.written
        self.assertEqual((to1, to2), (SERVER, ("192.0.2.54", 53)))
        port.protocol.datagramReceived(answer_to(q1, b"v1", b"v2"), SERVER)
        self.assertEqual(self.successResultOf(first), ["v1", "v2"])
        port.protocol.datagramReceived(answer_to(q2, rcode=dns.ENAME), ("192.0.2.54", 53))
        self.assertEqual(self.successResultOf(second), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_only_the_asked_server_with_the_id_and_question_answers(self) -> None:
        d = self.query(SERVER, NAME, 1.0)
        port = self.reactor.udp[0]
        [(sent, _)] = port.written
        forged = answer_to(sent, b"forged")
        port.protocol.datagramReceived(forged, ("192.0.2.99", 5300))
        port.protocol.datagramReceived(forged, ("192.0.2.53", 53))
        port.protocol.datagramReceived(answer_to(sent, b"x", name="other.test"), SERVER)
        wrong_id = bytes([sent[0] ^ 1]) + forged[1:]
        port.protocol.datagramReceived(wrong_id, SERVER)
        port.protocol.datagramReceived(b"\x00" * 5, SERVER)
        self.assertNoResult(d)
        port.protocol.datagramReceived(answer_to(sent, b"real"), SERVER)
        self.assertEqual(self.successResultOf(d), ["real"])

    def test_times_out_and_forgets(self) -> None:
        d = self.query(("2001:db8::53", 53), NAME, 0.5)
        self.assertEqual(self.reactor.udp[0].interface, "::")
        self.reactor.advance(0.5)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(self.query._waiting, {})

    def test_bounded_and_closed(self) -> None:
        self.patch(txtquery, "MAX_OUTSTANDING", 3)
        waiting = [self.query(SERVER, NAME, 5.0) for _ in range(3)]
        self.failureResultOf(self.query(SERVER, NAME, 5.0), TooManyQueries)
        self.query.close()
        for d in waiting:
            self.failureResultOf(d, TimeoutError)
        self.assertTrue(self.reactor.udp[0].stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
