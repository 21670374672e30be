"""The ACME client when the CA fails: deadlines on every request (newNonce too), the circuit
breaker seen from the client, and an account the CA forgot; fake CA, time by a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.breaker import CircuitBreaker
from csrproxy.acme.client import ACMEClient
from csrproxy.acme.order import IssuedChain
from csrproxy.acme.problems import ACMEProblem, ACMETransportError, DeadlineExceeded
from csrproxy.errors import CAUnavailable
from tests.acme.test_client import ACCOUNT_KEY, ACMETestMixin
from tests.support.fakeacme import BASE, FlakyHTTP

FOREVER = 10**9
#: One step of drive(): a failure at the deadline is seen by the end of that step.
STEP = 0.01


class FaultTestCase(ACMETestMixin, SynchronousTestCase):
    def flaky_client(self, breaker: CircuitBreaker | None = None) -> tuple[ACMEClient, FlakyHTTP]:
        flaky = FlakyHTTP(self.http)
        client = ACMEClient(self.clock, flaky, BASE + "/dir", ACCOUNT_KEY, breaker=breaker)
        [url] = self.drive(Deferred.fromCoroutine(client.account()))
        self.assertIsInstance(url, str)
        return client, flaky

    def until(self, condition: Any, limit: float = 600) -> None:
        elapsed = 0.0
        while not condition() and elapsed < limit:
            self.agent.flush()
            self.clock.advance(0.01)
            elapsed += 0.01
        self.assertTrue(condition(), "condition not reached")


class DeadlineTests(FaultTestCase):
    def test_nonce_fetch_obeys_the_order_deadline(self) -> None:
        # The CA takes no HEAD newNonce; the pool is empty (its nonces went with failed POSTs).
        client, flaky = self.flaky_client()
        client.transport._nonces.clear()
        flaky.rules.append(["HEAD", "/nonce", "refuse", FOREVER])
        start = self.clock.seconds()
        [failure] = self.obtain(client, ["a.go.example.test"], deadline=20)
        self.assertLessEqual(self.clock.seconds() - start, 20.0 + STEP, "past the order's deadline")
        failure.trap(ACMETransportError, CAUnavailable, DeadlineExceeded)
        self.assertEqual(self.ca.requests["newOrder"], 0)

    def test_nonce_fetch_obeys_the_deadline_without_the_breaker(self) -> None:
        # The deadline alone, the breaker out of the way: retried up to it, never past it.
        client, flaky = self.flaky_client(CircuitBreaker(self.clock, threshold=FOREVER))
        client.transport._nonces.clear()
        flaky.rules.append(["HEAD", "/nonce", "refuse", FOREVER])
        start = self.clock.seconds()
        [failure] = self.obtain(client, ["a.go.example.test"], deadline=20)
        elapsed = self.clock.seconds() - start
        self.assertLessEqual(elapsed, 20.0 + STEP)
        self.assertGreaterEqual(elapsed, 15.0)  # retried at 1, 3, 7 and 15 s
        # Giving up on an unreachable CA trips the breaker: the last wait is its refusal.
        failure.trap(ACMETransportError, CAUnavailable)
        self.assertEqual(flaky.tried - sum(flaky.sent.values()), 5)

    def test_every_request_of_an_order_ends_by_its_deadline(self) -> None:
        client, flaky = self.flaky_client(CircuitBreaker(self.clock, threshold=FOREVER))
        flaky.rules.append(["*", "", "refuse", FOREVER])
        start = self.clock.seconds()
        [failure] = self.obtain(client, ["a.go.example.test"], deadline=45)
        self.assertLessEqual(self.clock.seconds() - start, 45.0 + STEP)
        failure.trap(ACMETransportError, CAUnavailable)

    def test_the_directory_fetch_obeys_the_deadline(self) -> None:
        flaky = FlakyHTTP(self.http)
        flaky.rules.append(["GET", "/dir", "refuse", FOREVER])
        client = ACMEClient(
            self.clock,
            flaky,
            BASE + "/dir",
            ACCOUNT_KEY,
            breaker=CircuitBreaker(self.clock, threshold=FOREVER),
        )
        d = Deferred.fromCoroutine(client.order(BASE + "/orders/1", self.clock.seconds() + 10))
        [failure] = self.drive(d)
        failure.trap(ACMETransportError)
        self.assertLessEqual(self.clock.seconds(), 10.0 + STEP)


class BreakerTests(FaultTestCase):
    def test_nothing_is_sent_while_open(self) -> None:
        client, flaky = self.flaky_client()
        flaky.rules.append(["*", "", "refuse", FOREVER])
        order = Deferred.fromCoroutine(
            client.new_order(["a.go.example.test"], deadline=self.clock.seconds() + 300)
        )
        self.until(lambda: client.breaker.state == "open")
        tried = flaky.tried
        self.assertEqual(client.breaker.failures, 5)
        d = Deferred.fromCoroutine(
            client.post(BASE + "/orders/1", None, "order", self.clock.seconds() + 5)
        )
        failure = self.failureResultOf(d, CAUnavailable)
        self.assertEqual(failure.value.status, 503)
        self.assertGreater(failure.value.retry_after, 5)
        self.assertEqual(flaky.tried, tried, "a request went out while the breaker was open")
        # The order in flight waits without asking either, until the cool-down ends.
        self.clock.advance(client.breaker.cooldown - 0.5)
        self.assertEqual(flaky.tried, tried)
        self.assertNoResult(order)
        self.clock.advance(0.5)
        self.assertEqual(flaky.tried, tried + 1, "one probe per cool-down")
        order.cancel()
        self.drive(order)

    def test_an_order_in_flight_waits_out_the_breaker_and_finishes(self) -> None:
        client, flaky = self.flaky_client()
        flaky.rules.append(["*", "", "refuse", 7])
        [chain] = self.obtain(client, ["a.go.example.test"], deadline=300)
        self.assertIsInstance(chain, IssuedChain)
        self.assertEqual(client.breaker.state, "closed")
        self.assertGreaterEqual(client.breaker.opened, 1)
        self.assertIsNotNone(client.breaker.last_success)

    def test_the_probe_asks_for_a_nonce_and_closes(self) -> None:
        client, flaky = self.flaky_client()
        flaky.rules.append(["*", "", "refuse", 5])
        d = Deferred.fromCoroutine(client.post(BASE + "/orders/x", None, "order"))
        self.until(lambda: client.breaker.state == "open")
        self.clock.advance(client.breaker.cooldown)
        self.agent.flush()
        self.assertEqual(client.breaker.state, "closed")
        self.assertEqual(flaky.sent[f"HEAD {BASE}/nonce"], 1)
        self.drive(d)

    def test_a_5xx_counts_as_a_failure(self) -> None:
        client, _ = self.flaky_client()
        self.ca.faults.service_unavailable = 5
        client._directory = None  # the directory route is the one that answers 503
        d = Deferred.fromCoroutine(client.directory())
        self.until(lambda: client.breaker.state == "open")
        self.assertEqual(self.ca.requests["directory"], 1 + 5)
        [directory] = self.drive(d)
        self.assertEqual(directory.new_nonce, BASE + "/nonce")
        self.assertEqual(client.breaker.state, "closed")

    def test_a_request_that_gives_up_on_an_unreachable_ca_trips_it(self) -> None:
        client, flaky = self.flaky_client()
        flaky.rules.append(["*", "", "refuse", 2])
        d = Deferred.fromCoroutine(
            client.post(BASE + "/orders/x", None, "order", self.clock.seconds() + 1.5)
        )
        [failure] = self.drive(d)
        failure.trap(ACMETransportError)
        self.assertEqual(client.breaker.failures, 2)
        self.assertEqual(client.breaker.state, "open")


class AccountGoneTests(FaultTestCase):
    def test_a_forgotten_account_is_registered_again_and_the_request_sent_again(self) -> None:
        client = self.make_client()
        [old] = self.drive(Deferred.fromCoroutine(client.account()))
        self.ca.forget_accounts()
        before = self.ca.requests["newAccount"]
        [chain] = self.obtain(client, ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        self.assertNotEqual(client.account_url, old)
        self.assertEqual(list(self.ca.accounts), [client.account_url])
        self.assertEqual(self.ca.requests["newAccount"] - before, 2)  # lookup, register
        self.assertEqual(self.ca.requests["newOrder"], 2)  # refused, then sent again

    def test_after_a_ca_restart(self) -> None:
        client = self.make_client()
        self.obtain(client, ["a.go.example.test"])
        self.ca.restart()  # accounts, orders and nonces gone
        [chain] = self.obtain(client, ["b.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)

    def test_sent_again_once_only(self) -> None:
        client = self.make_client()
        self.drive(Deferred.fromCoroutine(client.account()))
        found: list[str] = []

        def again(stale: str) -> Deferred[str]:
            client.forget_account(stale)
            d = Deferred.fromCoroutine(client.account())

            def forget_at_once(url: str) -> str:
                found.append(url)
                self.ca.forget_accounts()  # a CA that forgets every account at once
                return url

            return d.addCallback(forget_at_once)

        client.find_account_again = again
        self.ca.forget_accounts()
        [failure] = self.obtain(client, ["a.go.example.test"])
        failure.trap(ACMEProblem)
        self.assertEqual(failure.value.short_type, "accountDoesNotExist")
        self.assertEqual(len(found), 1)
        self.assertEqual(self.ca.requests["newOrder"], 2)

    def test_waiting_for_the_account_obeys_the_deadline(self) -> None:
        client = self.make_client()
        self.drive(Deferred.fromCoroutine(client.account()))
        hanging: list[Deferred[str]] = []

        def never(stale: str) -> Deferred[str]:
            hanging.append(Deferred())
            return hanging[-1]

        client.find_account_again = never
        self.ca.forget_accounts()
        start = self.clock.seconds()
        [failure] = self.obtain(client, ["a.go.example.test"], deadline=30)
        failure.trap(DeadlineExceeded)
        self.assertLessEqual(self.clock.seconds() - start, 30.0 + STEP)
        self.assertTrue(hanging[0].called, "the wait was not cancelled")

    def test_an_unknown_kid_is_account_does_not_exist(self) -> None:
        client = self.make_client()
        self.drive(Deferred.fromCoroutine(client.account()))
        client.transport.on_account_gone = None  # see the CA's own answer
        self.ca.forget_accounts()
        d = Deferred.fromCoroutine(client.post(BASE + "/orders/1", None, "order"))
        [failure] = self.drive(d)
        failure.trap(ACMEProblem)
        self.assertEqual(
            (failure.value.short_type, failure.value.status), ("accountDoesNotExist", 400)
        )
