"""A second CA: an order the first one refuses for a reason of its own goes to the next."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.client import ACMEClient
from csrproxy.acme.problems import ACMEProblem, AuthorizationFailed, OrderFailed
from csrproxy.challenges.zone import ZonePublisher, challenge_name
from csrproxy.dns.zone import ChallengeZone
from csrproxy.errors import CAUnavailable, RateLimited
from csrproxy.issuance.admission import Admission, Budgets
from csrproxy.issuance.csr import check_csr
from csrproxy.issuance.fallback import another_ca_may_issue
from csrproxy.issuance.issuer import Issuer
from csrproxy.service import link_fallbacks
from tests.acme.test_client import ACCOUNT_KEY
from tests.support.driving import run_until_fired
from tests.support.fakeacme import BASE, FakeCA
from tests.support.issuers import NO_BUDGETS, make_issuer
from tests.support.keys import make_csr

ZONE = "go.example.test"
SECOND = BASE + "/dir?second"


class FallbackTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        zone = ChallengeZone(ZONE, [f"ns1.{ZONE}"], ["@ A 127.0.0.1"])
        self.first, self.second = FakeCA(), FakeCA()
        agents = []
        clients = []
        for ca, url in ((self.first, BASE + "/dir"), (self.second, SECOND)):
            ca.published_check = lambda i, v: v in zone.txt_values(challenge_name(i))
            http, agent = ca.client()
            agents.append(agent)
            clients.append(ACMEClient(self.clock, http, url, ACCOUNT_KEY, retry_first=1.0))
        self.agents = agents
        responder = ZonePublisher(zone)
        self.primary = make_issuer(self.clock, clients[0], responder)
        self.fallback_budgets = Admission(self.clock.seconds, NO_BUDGETS)
        self.fallback = Issuer(
            self.clock,
            clients[1],
            responder,
            ledger=self.primary.ledger,
            cache=self.primary.cache,
            admission=self.fallback_budgets,
            metrics=self.primary.metrics,
            poll_interval=0.05,
            poll_max=1.0,
            order_timeout=60,
            inflight=self.primary._inflight,
        )
        link_fallbacks([self.primary, self.fallback])

    def flush(self) -> None:
        for agent in self.agents:
            agent.flush()

    def drive(self, d: Deferred[Any]) -> Any:
        return run_until_fired(d, self.flush, self.clock)[0]

    def sign(self, name: str) -> Any:
        csr = check_csr(make_csr([name]))
        return csr, self.drive(self.primary.issue(csr, "c").addCallback(lambda i: i.chain))

    def test_a_rate_limited_first_ca_hands_the_order_to_the_second(self) -> None:
        self.first.faults.rate_limited = 10
        self.first.faults.retry_after = "3600"  # past the order's deadline: reported at once
        csr, chain = self.sign(f"a.{ZONE}")
        self.assertIsInstance(chain, str, chain)
        self.assertEqual((self.first.requests["cert"], self.second.requests["cert"]), (0, 1))
        row = self.successResultOf(self.primary.ledger.current(csr.request_key))
        assert row is not None
        self.assertEqual(row.ca, SECOND, "the certificate records its CA")
        # The renewal asks the CA that issued it first.
        self.first.faults.rate_limited = 0
        self.assertIsInstance(self.drive(self.primary.renew(row).chain), str)
        self.assertEqual((self.first.requests["newOrder"], self.second.requests["cert"]), (1, 2))

    def test_an_open_breaker_asks_the_second_ca_and_not_the_first(self) -> None:
        self.primary.breaker.trip()
        _, chain = self.sign(f"b.{ZONE}")
        self.assertIsInstance(chain, str, chain)
        self.assertEqual(self.first.requests["newOrder"], 0)
        self.assertEqual(self.second.requests["cert"], 1)

    def test_a_spent_budget_of_the_first_ca_goes_to_the_second(self) -> None:
        self.primary.admission = Admission(self.clock.seconds, Budgets(0, 1, 0, 0))
        for name in ("c1", "c2"):
            _, chain = self.sign(f"{name}.{ZONE}")
            self.assertIsInstance(chain, str, chain)
        self.assertEqual((self.first.requests["cert"], self.second.requests["cert"]), (1, 1))

    def test_a_refusal_every_ca_would_share_is_not_handed_on(self) -> None:
        self.first.faults.reject_orders = "rejectedIdentifier"
        _, failure = self.sign(f"d.{ZONE}")
        self.assertIn("rejectedIdentifier", failure.value.acme_type)
        self.assertEqual(self.second.requests["newOrder"], 0)

    def test_when_every_ca_refuses_the_first_refusal_is_the_answer(self) -> None:
        self.first.faults.rate_limited = 10
        self.first.faults.retry_after = "3600"
        self.fallback.admission = Admission(self.clock.seconds, Budgets(0, 1, 0, 0))
        self.assertIsInstance(self.sign(f"e1.{ZONE}")[1], str)
        self.first.faults.rate_limited = 10
        _, failure = self.sign(f"e2.{ZONE}")
        self.assertEqual(failure.value.status, 429, failure)  # the first CA's rateLimited
        self.assertEqual(self.second.requests["newOrder"], 1)

    def test_an_order_past_finalize_stays_with_its_ca_even_when_its_breaker_opens(self) -> None:
        # The first CA is issuing: its breaker opening must not hand the order on (a second
        # certificate) nor refund what the first CA will count.
        self.first.faults.processing_polls = 10_000
        csr = check_csr(make_csr([f"f.{ZONE}"]))
        d = self.primary.issue(csr, "c").addCallback(lambda i: i.chain)
        for _ in range(300):
            self.flush()
            self.clock.advance(0.05)
        self.assertEqual(self.first.requests["finalize"], 1)
        self.primary.breaker.trip()
        failure = self.drive(d)
        self.assertEqual(self.second.requests["newOrder"], 0, failure)

    def test_an_account_the_first_ca_cannot_find_goes_to_the_second(self) -> None:
        self.first.faults.service_unavailable = 1_000  # the first CA is down from the start
        _, chain = self.sign(f"g.{ZONE}")
        self.assertIsInstance(chain, str, chain)
        self.assertEqual(self.second.requests["cert"], 1)

    def test_a_fallback_whose_account_fails_ends_the_order_row(self) -> None:
        self.first.faults.rate_limited = 10
        self.first.faults.retry_after = "3600"
        self.second.faults.service_unavailable = 1_000
        ended: list[str] = []
        self.primary.ledger.order_failed = lambda oid, err: ended.append(oid)  # type: ignore[method-assign,assignment]
        _, failure = self.sign(f"h.{ZONE}")
        self.assertEqual(failure.value.status, 429, failure)  # the first CA's refusal
        self.assertEqual(len(ended), 1, "the order's row ends")

    def test_which_failures_another_ca_may_not_share(self) -> None:
        def problem(kind: str, status: int = 400) -> ACMEProblem:
            return ACMEProblem(f"urn:ietf:params:acme:error:{kind}", "x", status)

        yes = [
            problem("rateLimited", 429),
            problem("serverInternal", 500),
            problem("malformed", 503),
            RateLimited("spent", "orders", 10),
            CAUnavailable("down", 10),
            OrderFailed("u", problem("serverInternal", 500)),
        ]
        no = [
            problem("rejectedIdentifier"),
            problem("caa", 403),
            AuthorizationFailed("a", problem("unauthorized", 403)),
            AuthorizationFailed("a", None),
            ValueError("bad CSR"),
        ]
        self.assertEqual([another_ca_may_issue(e) for e in yes], [True] * len(yes))
        self.assertEqual([another_ca_may_issue(e) for e in no], [False] * len(no))
