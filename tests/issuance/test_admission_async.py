"""The issuer over an admission that decides later (a shared database's), on a Clock."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.client import ACMEClient
from csrproxy.challenges.zone import ZonePublisher, challenge_name
from csrproxy.dns.zone import ChallengeZone
from csrproxy.errors import RateLimited
from csrproxy.issuance.admission import Refund
from csrproxy.issuance.csr import check_csr
from csrproxy.issuance.results import Issuance
from tests.acme.test_client import ACCOUNT_KEY
from tests.support.driving import run_until_fired
from tests.support.fakeacme import BASE, FakeCA
from tests.support.issuers import make_issuer
from tests.support.keys import make_csr

ZONE = "go.example.test"
CSR = check_csr(make_csr([f"a.{ZONE}"]))


class PendingGate:
    """An admission whose every decision waits until the test gives it; counts refunds."""

    def __init__(self) -> None:
        self.clients: list[Deferred[None]] = []
        self.orders: list[Deferred[Refund]] = []
        self.refunds = 0
        self.failed: list[str] = []
        self.valid: list[str] = []

    def decide_client(self, client: str) -> Deferred[None]:
        self.clients.append(Deferred())
        return self.clients[-1]

    def decide_order(
        self, names: Iterable[str], new_names: bool, replaces: str | None = None
    ) -> Deferred[Refund]:
        self.orders.append(Deferred())
        return self.orders[-1]

    def authorization_failed(self, identifier: str) -> None:
        self.failed.append(identifier)

    def authorizations_valid(self, names: Iterable[str]) -> None:
        self.valid.extend(names)

    def refund(self) -> None:
        self.refunds += 1


class LaterAdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ca = FakeCA()
        http, self.agent = self.ca.client()
        zone = ChallengeZone(ZONE, [f"ns1.{ZONE}"], ["@ A 127.0.0.1"])
        self.ca.published_check = lambda i, v: v in zone.txt_values(challenge_name(i))
        acme = ACMEClient(self.clock, http, BASE + "/dir", ACCOUNT_KEY)
        self.gate = PendingGate()
        self.issuer = make_issuer(self.clock, acme, ZonePublisher(zone), admission=self.gate)

    def drive(self, d: Deferred[Any]) -> Any:
        return run_until_fired(d, self.agent.flush, self.clock)[0]

    def test_identical_requests_decided_together_make_one_order(self) -> None:
        first, second = self.issuer.issue(CSR, "c1"), self.issuer.issue(CSR, "c2")
        self.assertNoResult(first)
        for d in self.gate.clients:
            d.callback(None)
        self.assertEqual(len(self.gate.orders), 2)  # neither had started when asked
        self.gate.orders[0].callback(self.gate.refund)
        one: Issuance = self.successResultOf(first)
        self.assertNoResult(second)
        self.gate.orders[1].callback(self.gate.refund)
        other: Issuance = self.successResultOf(second)
        self.assertIsNotNone(one.order_id)
        self.assertEqual(other.order_id, one.order_id)
        self.assertEqual(self.gate.refunds, 1, "the order not placed gives back its tokens")
        chain = self.drive(one.chain)
        self.assertIsInstance(chain, str, chain)
        self.assertEqual(self.successResultOf(other.chain), chain)
        self.assertEqual(self.ca.requests["newOrder"], 1)

    def test_a_refusal_is_the_chain_failing(self) -> None:
        decided = self.issuer.issue(CSR, "c1")
        self.gate.clients[0].callback(None)
        self.gate.orders[0].errback(RateLimited("more than 1 orders in 3 h", "orders", 60.0))
        issuance: Issuance = self.successResultOf(decided)
        self.assertIsNone(issuance.order_id)
        e = self.failureResultOf(issuance.chain, RateLimited).value
        self.assertEqual((e.reason, e.retry_after), ("orders", 60.0))
        self.assertEqual(self.ca.requests["newOrder"], 0)

    def test_a_client_giving_up_while_decided_is_cancelled_alone(self) -> None:
        decided = self.issuer.issue(CSR, "c1")
        decided.cancel()
        self.failureResultOf(decided, CancelledError)
        self.assertEqual(self.ca.requests["newOrder"], 0)

    def test_a_renewal_waits_for_its_decision(self) -> None:
        row_chain = self.issuer.issue(CSR, "c1")
        self.gate.clients[0].callback(None)
        self.gate.orders[0].callback(self.gate.refund)
        self.drive(self.successResultOf(row_chain).chain)
        row = self.successResultOf(self.issuer.ledger.current(CSR.request_key))
        assert row is not None
        renewal = self.issuer.renew(row)
        self.assertIsNone(renewal.order_id)
        self.assertNoResult(renewal.chain)
        self.gate.orders[1].callback(self.gate.refund)
        chain = self.drive(renewal.chain)
        self.assertIsInstance(chain, str, chain)
        self.assertEqual(self.ca.requests["newOrder"], 2)
        self.assertEqual(self.gate.refunds, 0)
