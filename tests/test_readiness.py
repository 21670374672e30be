"""The parts of readiness the wiring assembles: account, CA, listeners, store."""

from __future__ import annotations

import tempfile
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.breaker import QUIET, STALE, CircuitBreaker
from csrproxy.service import readiness


class FakeIssuer:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.account_url: str | None = None
        self.breaker = CircuitBreaker(clock, threshold=2, cooldown=10)


class FakeListener:
    def __init__(self) -> None:
        self.description = "tcp:8000"
        self.port: object | None = None


class FakeDNS:
    def __init__(self) -> None:
        self.ports: list[object] = []


class FakeStore:
    healthy = True


class ReadinessTests(SynchronousTestCase):
    def test_each_part_reports(self) -> None:
        clock = Clock()
        issuer, listener, dns, store = FakeIssuer(clock), FakeListener(), FakeDNS(), FakeStore()
        with tempfile.TemporaryDirectory() as state:
            health = readiness(
                cast(Any, issuer), cast(Any, [listener]), cast(Any, dns), cast(Any, store), state
            )

            def parts() -> dict[str, bool]:
                return {c.name: c.ok for c in health.checks()}

            self.assertEqual(
                parts(), {"account": False, "ca": False, "api": False, "dns": False, "store": True}
            )
            issuer.breaker.succeeded()  # the CA answered
            issuer.account_url = "https://ca.test/acct/1"
            listener.port = object()
            dns.ports = [object(), object()]
            self.assertTrue(health.ready())
            # The CA fails: the breaker opens and readiness says so until it closes again.
            issuer.breaker.failed(probe=False)
            issuer.breaker.failed(probe=False)
            self.assertEqual(issuer.breaker.state, "open")
            self.assertFalse(parts()["ca"])
            self.assertFalse(health.ready())
            issuer.breaker.succeeded()
            self.assertTrue(parts()["ca"])
            # Quiet for longer than STALE: not known to answer any more.
            clock.advance(STALE + 1)
            self.assertFalse(parts()["ca"])
            issuer.breaker.succeeded()
            store.healthy = False
            self.assertFalse(parts()["store"])


class QuietProbeTests(SynchronousTestCase):
    def test_a_quiet_ca_is_asked_once_a_quiet_period(self) -> None:
        clock = Clock()
        breaker = CircuitBreaker(clock)
        asked: list[float] = []

        def probe() -> Deferred[None]:
            asked.append(clock.seconds())
            breaker.succeeded()
            return succeed(None)

        breaker.probe = probe
        breaker.look_if_quiet(QUIET)
        self.assertEqual(asked, [], "never answered yet: the account look-up is asking")
        breaker.succeeded()
        breaker.look_if_quiet(QUIET)
        self.assertEqual(asked, [], "answered just now")
        clock.advance(QUIET)
        breaker.look_if_quiet(QUIET)
        self.assertEqual(asked, [QUIET])
