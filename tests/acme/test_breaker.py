"""The circuit breaker on its own: states, Retry-After, probes, bounds; time by a Clock."""

from __future__ import annotations

import contextlib
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.breaker import COOLDOWN, PROBE_RETRY_AFTER, THRESHOLD, CircuitBreaker
from csrproxy.acme.transport import ACMETransport
from csrproxy.errors import CAUnavailable, IssuanceFailed


class BreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.breaker = CircuitBreaker(self.clock, threshold=3, cooldown=10.0)

    def fail_requests(self, n: int) -> None:
        for _ in range(n):
            self.breaker.failed(self.breaker.admit())

    def refusal(self) -> CAUnavailable:
        try:
            self.breaker.check()
        except CAUnavailable as e:
            return e
        self.fail("not refused")

    def test_defaults(self) -> None:
        b = CircuitBreaker(self.clock)
        self.assertEqual((b.threshold, b.cooldown), (THRESHOLD, COOLDOWN))
        self.assertEqual((THRESHOLD, COOLDOWN), (5, 10.0))
        self.assertEqual((b.state, b.last_success, b.retry_after), ("closed", None, None))

    def test_opens_after_threshold_consecutive_failures(self) -> None:
        self.fail_requests(2)
        self.breaker.succeeded()  # an answer in between: the count starts again
        self.fail_requests(2)
        self.assertEqual(self.breaker.state, "closed")
        self.breaker.check()
        self.fail_requests(1)
        self.assertEqual(self.breaker.state, "open")
        self.assertEqual(self.breaker.opened, 1)

    def test_refusal_is_a_503_with_the_cooldown_left(self) -> None:
        self.fail_requests(3)
        self.clock.advance(3.5)
        e = self.refusal()
        self.assertIsInstance(e, IssuanceFailed)
        self.assertEqual(e.status, 503)
        self.assertEqual(e.retry_after, 6.5)
        self.assertEqual(self.breaker.retry_after, 6.5)
        with self.assertRaises(CAUnavailable):
            self.breaker.admit()
        self.assertEqual(self.breaker.state, "open")

    def test_half_open_lets_one_probe_through(self) -> None:
        self.fail_requests(3)
        self.clock.advance(10)
        self.assertEqual(self.breaker.state, "half-open")
        self.breaker.check()  # a new order may go: its first request is the probe
        self.assertTrue(self.breaker.admit())
        self.assertEqual(self.breaker.state, "half-open")
        self.assertEqual(self.refusal().retry_after, PROBE_RETRY_AFTER)
        with self.assertRaises(CAUnavailable):
            self.breaker.admit()

    def test_probe_success_closes(self) -> None:
        self.fail_requests(3)
        self.clock.advance(10)
        self.breaker.admit()
        self.clock.advance(0.5)
        self.breaker.succeeded()
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.breaker.last_success, 10.5)
        self.assertEqual(self.breaker.failures, 0)
        self.assertFalse(self.breaker.admit())

    def test_probe_failure_opens_for_a_whole_cooldown(self) -> None:
        self.fail_requests(3)
        self.clock.advance(12)
        self.breaker.failed(self.breaker.admit())
        self.assertEqual(self.breaker.state, "open")
        self.assertEqual(self.refusal().retry_after, 10.0)
        self.assertEqual(self.breaker.opened, 2)

    def test_a_cancelled_probe_frees_the_probe(self) -> None:
        self.fail_requests(3)
        self.clock.advance(10)
        self.breaker.released(self.breaker.admit())
        self.assertTrue(self.breaker.admit())

    def test_late_failures_change_nothing_while_open(self) -> None:
        # Requests sent before the breaker opened fail later: no cool-down is extended.
        self.fail_requests(3)
        self.clock.advance(4)
        self.breaker.failed(False)
        self.breaker.trip()
        self.assertEqual(self.refusal().retry_after, 6.0)
        self.clock.advance(6)
        self.assertTrue(self.breaker.admit())
        self.breaker.failed(False)  # not the probe: the probe decides
        self.assertEqual(self.breaker.state, "half-open")

    def test_any_answer_closes(self) -> None:
        self.fail_requests(3)
        self.breaker.succeeded()  # a request sent before it opened got its answer after all
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trip_opens_at_once(self) -> None:
        self.breaker.trip()
        self.assertEqual(self.breaker.state, "open")
        self.assertEqual(self.refusal().retry_after, 10.0)

    def test_the_probe_runs_when_the_cooldown_ends(self) -> None:
        probes: list[float] = []

        def probe() -> Deferred[Any]:
            probes.append(self.clock.seconds())
            ok = self.breaker.admit()
            self.breaker.failed(ok) if len(probes) == 1 else self.breaker.succeeded()
            return succeed(None)

        self.breaker.probe = probe
        self.fail_requests(3)
        self.clock.advance(9.9)
        self.assertEqual(probes, [])
        self.clock.advance(0.1)
        self.assertEqual(probes, [10.0])
        self.assertEqual(self.breaker.state, "open")  # that probe failed
        self.clock.advance(10)
        self.assertEqual(probes, [10.0, 20.0])
        self.assertEqual(self.breaker.state, "closed")
        self.clock.advance(100)
        self.assertEqual(len(probes), 2, "a closed breaker does not probe")

    def test_no_probe_once_a_request_took_it(self) -> None:
        probes: list[float] = []

        def probe() -> Deferred[Any]:
            probes.append(self.clock.seconds())
            return succeed(None)

        self.breaker.probe = probe
        self.fail_requests(3)
        self.clock.advance(5)
        self.breaker.succeeded()
        self.clock.advance(10)
        self.assertEqual(probes, [])

    def test_a_failing_probe_callable_is_contained(self) -> None:
        def probe() -> Deferred[Any]:
            raise RuntimeError("no CA today")

        self.breaker.probe = probe
        self.fail_requests(3)
        self.clock.advance(10)  # logged, not raised into the reactor
        self.assertEqual(self.breaker.state, "half-open")

    def test_state_is_bounded_under_endless_failures(self) -> None:
        def probe() -> Deferred[Any]:
            self.breaker.failed(self.breaker.admit())
            return succeed(None)

        self.breaker.probe = probe
        for _ in range(2000):
            with contextlib.suppress(CAUnavailable):  # a hostile CA: every request fails
                self.breaker.failed(self.breaker.admit())
            self.clock.advance(0.1)
        self.assertEqual(self.breaker.failures, 3)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.breaker.opened, 1 + 200 // 10 - 1)

    def test_bad_settings_are_refused(self) -> None:
        with self.assertRaises(ValueError):
            CircuitBreaker(self.clock, threshold=0)
        with self.assertRaises(ValueError):
            CircuitBreaker(self.clock, cooldown=0)


class HangingAgent:
    """An agent whose requests never get an answer (cancelling them is all they do)."""

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        return Deferred()


class OwnDeadlineTests(SynchronousTestCase):
    def transport(self) -> tuple[Clock, ACMETransport, CircuitBreaker]:
        from csrproxy.acme.jws import AccountKey
        from csrproxy.http import client_over

        clock = Clock()
        breaker = CircuitBreaker(clock, threshold=1, cooldown=10)
        t = ACMETransport(
            clock,
            client_over(cast(Any, HangingAgent())),
            AccountKey.generate("ec256"),
            request_timeout=30,
            breaker=breaker,
        )
        return clock, t, breaker

    def test_a_request_cut_by_the_callers_deadline_is_no_news_of_the_ca(self) -> None:
        clock, t, breaker = self.transport()
        d = Deferred.fromCoroutine(t.send("GET", "https://ca.test/dir", deadline=1.0))
        clock.advance(1)
        self.failureResultOf(d)
        self.assertEqual((breaker.state, breaker.failures), ("closed", 0))

    def test_a_whole_request_timeout_is_a_failure_of_the_ca(self) -> None:
        clock, t, breaker = self.transport()
        d = Deferred.fromCoroutine(t.send("GET", "https://ca.test/dir"))
        clock.advance(30)
        self.failureResultOf(d)
        self.assertEqual(breaker.state, "open")
