"""PropagationChecker and CheckedPublisher with a fake TXT query function and a Clock."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names.error import DNSQueryTimeoutError
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.challenges.propagation import (
    CheckedPublisher,
    PropagationChecker,
    Server,
    parse_server,
    resolve_check_servers,
    system_resolver,
)
from csrproxy.challenges.txtquery import txt_values
from csrproxy.errors import ConfigError, PublishError

NAME = "_acme-challenge.a.go.example.test"
VALUE = "v" * 43
S1: Server = ("127.0.0.1", 5301)
S2: Server = ("127.0.0.2", 5302)


class FakeDNS:
    """Answers ``VALUE`` from each server once it has been asked ``ready_after[server]`` times."""

    def __init__(self, ready_after: dict[Server, int | None]) -> None:
        self.ready_after = ready_after
        self.asked: Counter[Server] = Counter()
        self.times: dict[Server, list[float]] = {s: [] for s in ready_after}
        self.clock: Clock | None = None
        self.errors: dict[Server, int] = {}
        self.timeouts: list[float] = []

    def query(self, server: Server, name: str, timeout: float) -> Deferred[list[str]]:
        assert name == NAME
        self.asked[server] += 1
        self.timeouts.append(timeout)
        if self.clock is not None:
            self.times[server].append(self.clock.seconds())
        if self.errors.get(server, 0) > 0:
            self.errors[server] -= 1
            return fail(DNSQueryTimeoutError(0))
        after = self.ready_after[server]
        if after is not None and self.asked[server] >= after:
            return succeed(["other", VALUE])
        return succeed(["other"] if self.asked[server] > 1 else [])


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def checker(self, fake: FakeDNS, servers: list[Server], **kw: Any) -> PropagationChecker:
        fake.clock = self.clock
        kw.setdefault("timeout", 10.0)
        return PropagationChecker(self.clock, fake.query, servers, **kw)

    def test_served_at_once(self) -> None:
        fake = FakeDNS({S1: 1})
        d = self.checker(fake, [S1]).wait_served(NAME, VALUE)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(fake.asked[S1], 1)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_appears_after_n_tries_with_backoff(self) -> None:
        fake = FakeDNS({S1: 6})
        d = self.checker(fake, [S1], first_delay=0.05, max_delay=0.4).wait_served(NAME, VALUE)
        while not d.called:  # jump from one scheduled call to the next
            self.clock.advance(
                min(c.getTime() for c in self.clock.getDelayedCalls()) - self.clock.seconds()
            )
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(fake.asked[S1], 6)
        gaps = [round(b - a, 2) for a, b in zip(fake.times[S1], fake.times[S1][1:], strict=False)]
        self.assertEqual(gaps, [0.05, 0.1, 0.2, 0.4, 0.4])
        self.assertFalse(self.clock.getDelayedCalls())

    def test_never_served_fails_at_deadline(self) -> None:
        fake = FakeDNS({S1: None})
        d = self.checker(fake, [S1], timeout=5.0).wait_served(NAME, VALUE)
        self.clock.advance(4.99)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        error = self.failureResultOf(d, PublishError).value
        self.assertEqual(error.backend, "powerdns")
        self.assertEqual(error.status, 503)
        self.assertIn("not served by 127.0.0.1:5301 after 5s", error.detail)
        self.assertIn("1 other values", error.detail)
        self.assertFalse(self.clock.getDelayedCalls())
        asked = fake.asked[S1]
        self.clock.advance(60)
        self.assertEqual(fake.asked[S1], asked, "kept querying after the deadline")
        # Queries never outlive the deadline.
        self.assertTrue(all(t <= 1.0 for t in fake.timeouts))

    def test_two_servers_one_lagging(self) -> None:
        fake = FakeDNS({S1: 1, S2: 4})
        d = self.checker(fake, [S1, S2]).wait_served(NAME, VALUE)
        self.assertNoResult(d)
        self.clock.pump([0.05] * 10)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(fake.asked, Counter({S1: 1, S2: 4}))

    def test_two_servers_one_never_names_it(self) -> None:
        fake = FakeDNS({S1: 1, S2: None})
        d = self.checker(fake, [S1, S2], timeout=3.0).wait_served(NAME, VALUE)
        self.clock.pump([0.1] * 30)
        error = self.failureResultOf(d, PublishError).value
        self.assertIn("not served by 127.0.0.2:5302 after 3s", error.detail)
        self.assertNotIn("127.0.0.1:5301", error.detail)

    def test_query_errors_are_retried(self) -> None:
        fake = FakeDNS({S1: 1})
        fake.errors[S1] = 2
        d = self.checker(fake, [S1]).wait_served(NAME, VALUE)
        self.clock.pump([0.05] * 10)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(fake.asked[S1], 3)

    def test_query_errors_reported_at_deadline(self) -> None:
        fake = FakeDNS({S1: 1})
        fake.errors[S1] = 10_000
        d = self.checker(fake, [S1], timeout=2.0).wait_served(NAME, VALUE)
        self.clock.pump([0.1] * 25)
        self.assertIn("error:", self.failureResultOf(d, PublishError).value.detail)

    def test_query_timeout_clamped_to_remaining(self) -> None:
        fake = FakeDNS({S1: None})
        d = self.checker(fake, [S1], timeout=1.5, max_delay=0.5).wait_served(NAME, VALUE)
        self.clock.pump([0.05] * 40)
        self.failureResultOf(d, PublishError)
        self.assertLess(min(fake.timeouts), 1.0)

    def test_cancel_stops_querying(self) -> None:
        fake = FakeDNS({S1: None})
        d = self.checker(fake, [S1]).wait_served(NAME, VALUE)
        self.clock.advance(0.2)
        d.cancel()
        self.failureResultOf(d)
        asked = fake.asked[S1]
        self.clock.advance(30)
        self.assertEqual(fake.asked[S1], asked)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_servers_found_lazily_once(self) -> None:
        fake = FakeDNS({S1: 1})
        calls: list[int] = []

        def find() -> Deferred[list[Server]]:
            calls.append(1)
            if len(calls) == 1:
                return fail(ConfigError("dns.powerdns.check_servers", "no NS"))
            return succeed([S1])

        checker = PropagationChecker(self.clock, fake.query, find, timeout=5.0)
        error = self.failureResultOf(checker.wait_served(NAME, VALUE), PublishError).value
        self.assertIn("cannot find the servers to check", error.detail)
        self.assertIn("no NS", error.detail)
        self.successResultOf(checker.wait_served(NAME, VALUE))
        self.successResultOf(checker.wait_served(NAME, VALUE))
        self.assertEqual((len(calls), checker.servers), (2, [S1]))

    def test_no_servers_is_served(self) -> None:
        fake = FakeDNS({})
        self.successResultOf(self.checker(fake, []).wait_served(NAME, VALUE))


class RecordingPublisher:
    backend = "powerdns"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def publish(self, identifier: str, value: str) -> Deferred[None]:
        self.calls.append(("publish", identifier, value))
        return succeed(None)

    def unpublish(self, identifier: str, value: str) -> Deferred[None]:
        self.calls.append(("unpublish", identifier, value))
        return succeed(None)


class CheckedPublisherTests(SynchronousTestCase):
    def test_publish_waits_for_the_check(self) -> None:
        clock = Clock()
        fake = FakeDNS({S1: 3})
        inner = RecordingPublisher()
        publisher = CheckedPublisher(inner, PropagationChecker(clock, fake.query, [S1], timeout=5))
        self.assertEqual(publisher.backend, "powerdns")
        d = publisher.publish("a.go.example.test", VALUE)
        self.assertEqual(inner.calls, [("publish", "a.go.example.test", VALUE)])
        self.assertNoResult(d)
        clock.pump([0.05] * 10)
        self.successResultOf(d)
        self.successResultOf(publisher.unpublish("a.go.example.test", VALUE))
        self.assertEqual(inner.calls[-1], ("unpublish", "a.go.example.test", VALUE))

    def test_check_failure_fails_publish(self) -> None:
        clock = Clock()
        fake = FakeDNS({S1: None})
        publisher = CheckedPublisher(
            RecordingPublisher(), PropagationChecker(clock, fake.query, [S1], timeout=2)
        )
        d = publisher.publish("a.go.example.test", VALUE)
        clock.advance(2)
        self.failureResultOf(d, PublishError)

    def test_inner_failure_skips_the_check(self) -> None:
        clock = Clock()
        fake = FakeDNS({S1: 1})
        inner = RecordingPublisher()

        def refuse(identifier: str, value: str) -> Deferred[None]:
            return fail(PublishError("powerdns", "boom"))

        inner.publish = refuse  # type: ignore[method-assign]
        publisher = CheckedPublisher(inner, PropagationChecker(clock, fake.query, [S1], timeout=2))
        self.failureResultOf(publisher.publish("a.go.example.test", VALUE), PublishError)
        self.assertEqual(fake.asked[S1], 0)


class ServersTests(SynchronousTestCase):
    def test_parse_server(self) -> None:
        self.assertEqual(parse_server("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parse_server("ns1.example.test"), ("ns1.example.test", 53))
        self.assertEqual(parse_server("[::1]:5353"), ("::1", 5353))
        self.assertEqual(parse_server("[::1]"), ("::1", 53))
        self.assertEqual(parse_server("::1"), ("::1", 53))
        for bad in ("", "host:", "host:0", "host:99999", "[::1", "[::1]x", "h:p"):
            with self.assertRaises(ConfigError, msg=bad):
                parse_server(bad)

    def test_configured_servers_need_no_resolver_for_addresses(self) -> None:
        d = resolve_check_servers(["127.0.0.1:5300", "[::1]:5300", "127.0.0.1:5300"], "z.test")
        self.assertEqual(self.successResultOf(d), [("127.0.0.1", 5300), ("::1", 5300)])

    def test_configured_host_names_resolved(self) -> None:
        d = resolve_check_servers(["ns1.z.test:5300"], "z.test", FakeResolver())
        self.assertEqual(self.successResultOf(d), [("192.0.2.1", 5300)])

    def test_default_is_the_zones_ns_on_53(self) -> None:
        d = resolve_check_servers([], "z.test.", FakeResolver())
        self.assertEqual(self.successResultOf(d), [("192.0.2.1", 53), ("192.0.2.2", 53)])

    def test_unresolvable(self) -> None:
        d = resolve_check_servers(["nowhere.z.test:53"], "z.test", FakeResolver())
        self.assertIn(
            "cannot resolve nowhere.z.test", self.failureResultOf(d, ConfigError).value.detail
        )
        self.failureResultOf(resolve_check_servers([], "z.test"), ConfigError)
        self.failureResultOf(resolve_check_servers([], "empty.test", FakeResolver()), ConfigError)

    def test_system_resolver_runs_on_the_given_reactor(self) -> None:
        reactor = MemoryReactorClock()
        chain = system_resolver(reactor)
        # The resolv.conf re-read and the cache's clock are ours, not the global reactor's.
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        timed = [r for r in chain.resolvers if hasattr(r, "_reactor")]
        self.assertEqual([r._reactor for r in timed], [reactor, reactor])


class FakeResolver:
    hosts = {"ns1.z.test": "192.0.2.1", "ns2.z.test": "192.0.2.2"}

    def lookupNameservers(self, name: str) -> Deferred[Any]:
        if name != "z.test":
            return succeed(([], [], []))
        answers = [
            dns.RRHeader(name, dns.NS, payload=dns.Record_NS(ns))
            for ns in ("ns2.z.test", "ns1.z.test")
        ]
        return succeed((answers, [], []))

    def getHostByName(self, name: str) -> Deferred[str]:
        if name in self.hosts:
            return succeed(self.hosts[name])
        return fail(DNSLookupError(name))


class WireTests(SynchronousTestCase):
    def test_txt_values_from_a_message(self) -> None:
        m = dns.Message(rCode=dns.OK)
        m.answers = [
            dns.RRHeader(NAME.upper(), dns.TXT, payload=dns.Record_TXT(b"ab", b"cd")),
            dns.RRHeader("other.test", dns.TXT, payload=dns.Record_TXT(b"zz")),
            dns.RRHeader(NAME, dns.A, payload=dns.Record_A("192.0.2.1")),
        ]
        self.assertEqual(txt_values(m, NAME + "."), ["abcd"])
        self.assertEqual(txt_values(dns.Message(rCode=dns.ENAME), NAME), [])
