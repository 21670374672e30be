"""The issuer when the CA fails: orders end by order_timeout, new requests fail fast (503 and
Retry-After) while the CA is known to be down and recover on their own, and an account the
CA forgot is found or registered again once for every order that meets it."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.breaker import PROBE_RETRY_AFTER
from csrproxy.acme.client import ACMEClient
from csrproxy.challenges.zone import ZonePublisher, challenge_name
from csrproxy.dns.zone import ChallengeZone
from csrproxy.errors import CAUnavailable, IssuanceFailed
from csrproxy.issuance.admission import Admission, Budgets
from csrproxy.issuance.csr import CheckedCSR, check_csr
from csrproxy.issuance.issuer import Issuer
from tests.acme.test_client import ACCOUNT_KEY
from tests.support.driving import run_until_fired
from tests.support.fakeacme import BASE, FakeCA, FlakyHTTP
from tests.support.issuers import issue_now, make_issuer
from tests.support.keys import make_csr

ZONE = "go.example.test"
FOREVER = 10**9
STEP = 0.01


def csr(label: str) -> CheckedCSR:
    return check_csr(make_csr([f"{label}.{ZONE}"]))


class IssuerFaultTestCase(SynchronousTestCase):
    order_timeout = 60.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.ca = FakeCA()
        http, self.agent = self.ca.client()
        self.flaky = FlakyHTTP(http)
        zone = self.zone = ChallengeZone(ZONE, [f"ns1.{ZONE}"], ["@ A 127.0.0.1"])
        self.ca.published_check = lambda i, v: v in zone.txt_values(challenge_name(i))
        self.acme = ACMEClient(self.clock, self.flaky, BASE + "/dir", ACCOUNT_KEY)
        self.accounts: list[str] = []
        self.issuer = self.make()
        self.breaker = self.issuer.breaker
        self.drive(self.issuer.ensure_account())

    def make(self, **kwargs: Any) -> Issuer:
        return make_issuer(
            self.clock,
            self.acme,
            ZonePublisher(self.zone),
            order_timeout=self.order_timeout,
            on_account=self.accounts.append,
            **kwargs,
        )

    def step(self) -> None:
        self.agent.flush()
        self.clock.advance(STEP)

    def drive(self, d: Deferred[Any], limit: float = 600) -> Any:
        out = run_until_fired(d, self.agent.flush, self.clock, STEP, limit)
        self.assertTrue(out, "no result")
        return out[0]

    def until(self, condition: Any, limit: float = 600) -> None:
        elapsed = 0.0
        while not condition() and elapsed < limit:
            self.step()
            elapsed += STEP
        self.assertTrue(condition(), "condition not reached")

    def ca_down(self) -> None:
        self.flaky.rules.append(["*", "", "refuse", FOREVER])

    def ca_back(self) -> None:
        self.flaky.rules.clear()


class DeadlineTests(IssuerFaultTestCase):
    order_timeout = 20.0

    def test_an_order_fails_at_order_timeout_when_newnonce_is_refused(self) -> None:
        self.acme.transport._nonces.clear()  # spent by failed POSTs, as when the CA is away
        self.flaky.rules.append(["HEAD", "/nonce", "refuse", FOREVER])
        start = self.clock.seconds()
        failure = self.drive(issue_now(self.issuer, csr("a"), "client").chain)
        self.assertLessEqual(self.clock.seconds() - start, self.order_timeout + STEP)
        failure.trap(IssuanceFailed)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(self.ca.requests["newOrder"], 0)


class FailFastTests(IssuerFaultTestCase):
    def open_breaker(self) -> Any:
        """The CA goes down under one order; returns that order's chain Deferred."""
        self.ca_down()
        first = issue_now(self.issuer, csr("first"), "client").chain
        self.until(lambda: self.breaker.state == "open")
        return first

    def test_new_requests_fail_fast_with_retry_after_and_ask_nothing(self) -> None:
        first = self.open_breaker()
        self.clock.advance(2)
        tried, orders = self.flaky.tried, self.issuer.metrics.orders_in_flight._value.get()
        issuance = issue_now(self.issuer, csr("second"), "client")
        e = self.failureResultOf(issuance.chain, CAUnavailable).value
        self.assertIsNone(issuance.order_id)
        self.assertEqual(e.status, 503)
        # The cool-down left: it opened at most a step before until() saw it.
        self.assertLessEqual(e.retry_after, self.breaker.cooldown - 2 + 1e-6)
        self.assertGreaterEqual(e.retry_after, self.breaker.cooldown - 2 - STEP - 1e-6)
        self.assertEqual(self.flaky.tried, tried, "a request reached the CA while open")
        self.assertEqual(self.issuer.metrics.orders_in_flight._value.get(), orders)
        # The order that met the failure ends by its own deadline, not later.
        result = self.drive(first)
        result.trap(IssuanceFailed)
        self.assertEqual(result.value.status, 503)
        self.assertLessEqual(self.clock.seconds(), self.order_timeout + STEP)

    def test_fast_refusals_do_not_spend_the_client_budget(self) -> None:
        budgets = Budgets(0, 0, 0, client_requests_per_hour=3)
        self.issuer = self.make(admission=Admission(self.clock.seconds, budgets))
        self.ca_down()
        self.breaker.trip()
        for i in range(10):
            self.failureResultOf(
                issue_now(self.issuer, csr(f"r{i}"), "client").chain, CAUnavailable
            )
        self.ca_back()
        self.clock.advance(self.breaker.cooldown)
        self.agent.flush()
        chain = self.drive(issue_now(self.issuer, csr("after"), "client").chain)
        self.assertIsInstance(chain, str, chain)

    def test_recovers_on_its_own_when_the_ca_answers_again(self) -> None:
        first = self.open_breaker()
        self.ca_back()
        self.clock.advance(self.breaker.cooldown)
        self.agent.flush()  # the probe's answer
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.flaky.sent[f"HEAD {BASE}/nonce"], 1)
        self.assertEqual(self.breaker.last_success, self.clock.seconds())
        chain = self.drive(issue_now(self.issuer, csr("second"), "client").chain)
        self.assertIsInstance(chain, str, chain)
        # The order in flight while the CA was away finishes too.
        self.assertIsInstance(self.drive(first), str)

    def test_one_probe_per_cooldown_while_the_ca_stays_down(self) -> None:
        first = self.open_breaker()
        tried = self.flaky.tried
        for n in range(1, 4):
            self.clock.advance(self.breaker.cooldown)
            self.assertEqual(self.flaky.tried, tried + n)
            self.assertEqual(self.breaker.state, "open")
            self.failureResultOf(
                issue_now(self.issuer, csr(f"x{n}"), "client").chain, CAUnavailable
            )
        self.drive(first)

    def test_half_open_lets_one_probe_out_and_refuses_the_rest_briefly(self) -> None:
        first = self.open_breaker()
        self.ca_back()
        self.flaky.rules.append(["HEAD", "/nonce", "hold", 1])
        self.clock.advance(self.breaker.cooldown)  # the probe is out, no answer yet
        self.assertEqual(len(self.flaky.held), 1)
        self.assertEqual(self.breaker.state, "half-open")
        tried = self.flaky.tried
        e = self.failureResultOf(issue_now(self.issuer, csr("b"), "client").chain, CAUnavailable)
        self.assertEqual(e.value.retry_after, PROBE_RETRY_AFTER)
        self.clock.advance(0.5)  # the order in flight tries again: refused, not sent
        self.assertEqual(self.flaky.tried, tried)
        self.flaky.release()
        self.agent.flush()
        self.assertEqual(self.breaker.state, "closed")
        self.assertIsInstance(self.drive(issue_now(self.issuer, csr("b"), "client").chain), str)
        self.drive(first)

    def test_an_identical_order_in_flight_is_joined_not_refused(self) -> None:
        first = issue_now(self.issuer, csr("same"), "client")
        self.ca_down()
        self.until(lambda: self.breaker.state == "open")
        again = issue_now(self.issuer, csr("same"), "client")
        self.assertEqual(again.order_id, first.order_id)
        self.assertNoResult(again.chain)
        self.ca_back()
        self.assertIsInstance(self.drive(again.chain), str)


class AccountGoneTests(IssuerFaultTestCase):
    def test_every_order_shares_one_registration(self) -> None:
        self.assertIsInstance(
            self.drive(issue_now(self.issuer, csr("before"), "client").chain), str
        )
        old = self.issuer.account_url
        self.ca.forget_accounts()
        before = self.ca.requests["newAccount"]
        chains = [issue_now(self.issuer, csr(f"c{i}"), "client").chain for i in range(4)]
        results = [self.drive(d) for d in chains]
        self.assertEqual([type(r) for r in results], [str] * 4, results)
        self.assertEqual(self.ca.requests["newAccount"] - before, 2)  # lookup, register
        new = self.issuer.account_url
        self.assertNotEqual(new, old)
        self.assertEqual(list(self.ca.accounts), [new])
        self.assertEqual(self.accounts, [old, new], "the new account was not recorded")
        self.assertTrue(self.issuer.ready)

    def test_after_a_ca_restart_an_order_succeeds(self) -> None:
        self.assertIsInstance(
            self.drive(issue_now(self.issuer, csr("before"), "client").chain), str
        )
        self.ca.restart()
        self.assertIsInstance(self.drive(issue_now(self.issuer, csr("after"), "client").chain), str)
        self.assertEqual(len(self.accounts), 2)

    def test_a_late_answer_for_the_old_account_does_not_register_again(self) -> None:
        old = self.issuer.account_url
        assert old is not None
        self.ca.forget_accounts()
        first = self.drive(self.issuer.ensure_account(old))
        self.assertNotEqual(first, old)
        lookups = self.ca.requests["newAccount"]
        # Another order's request signed for the old account comes back after that.
        self.assertEqual(self.drive(self.issuer.ensure_account(old)), first)
        self.assertEqual(self.ca.requests["newAccount"], lookups)

    def test_a_failed_lookup_keeps_trying_without_an_order(self) -> None:
        old = self.issuer.account_url
        self.ca.forget_accounts()
        self.flaky.rules.append(["POST", "/account", "refuse", FOREVER])
        failure = self.drive(issue_now(self.issuer, csr("a"), "client").chain)
        failure.trap(IssuanceFailed)
        self.assertFalse(self.issuer.ready)
        self.ca_back()
        self.until(lambda: self.issuer.ready, limit=200)
        self.assertNotEqual(self.issuer.account_url, old)
        self.assertEqual(self.accounts[-1], self.issuer.account_url)
        # One loop at a time, however often it is asked for.
        self.assertIs(type(self.issuer.keep_trying_account()), Deferred)
