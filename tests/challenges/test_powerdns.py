"""PowerDNSPublisher against a fake PowerDNS API (Klein, in memory), time driven by a Clock."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, TypeVar

from klein import Klein
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestNotSent  # not re-exported by twisted.web.client
from twisted.web.client import Agent, RequestTransmissionFailed
from twisted.web.iweb import IAgent, IRequest
from zope.interface import implementer

from csrproxy.challenges.powerdns import PowerDNSPublisher
from csrproxy.challenges.powerdns_errors import PowerDNSAPIError
from csrproxy.config import PowerDNSConfig
from csrproxy.errors import PublishError
from csrproxy.http import client_over

T = TypeVar("T")

ZONE = "go.example.test"
API = "http://pdns.test:8081"
KEY = "k3y-that-must-never-be-logged"
NAME = "_acme-challenge.a.go.example.test."
V1 = "A" * 43
V2 = "B" * 43
V3 = "C" * 43


class FakePowerDNS:
    """The zone PATCH/GET endpoints of the PowerDNS API, keeping rrsets in memory."""

    app = Klein()

    def __init__(self, key: str = KEY, zones: tuple[str, ...] = (ZONE,)) -> None:
        self.key = key
        #: zone "x." -> {(name, type): rrset}
        self.zones: dict[str, dict[tuple[str, str], dict[str, Any]]] = {z + ".": {} for z in zones}
        #: Every PATCH body received, in order (also the refused ones).
        self.patches: list[dict[str, Any]] = []
        self.keys_seen: list[str | None] = []
        #: Statuses answered (without applying anything) to the next PATCHes.
        self.fail_next: list[int] = []
        #: Answer every PATCH with this status (and apply nothing) while set.
        self.fail_always: int | None = None
        #: Hold PATCHes until release() is called.
        self.hold = False
        self.held: list[Deferred[None]] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.max_total_in_flight = 0

    def client(self) -> tuple[HTTPClient, RequestTraversalAgent]:
        agent = RequestTraversalAgent(self.app.resource())
        return client_over(agent), agent

    def txt(self, name: str = NAME) -> list[str] | None:
        rrset = self.zones[ZONE + "."].get((name, "TXT"))
        return None if rrset is None else sorted(r["content"] for r in rrset["records"])

    def release(self) -> None:
        held, self.held = self.held, []
        for d in held:
            d.callback(None)

    def _error(self, request: IRequest, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"error": message}).encode()

    def _authorized(self, request: IRequest) -> bool:
        key: bytes | None = request.getHeader(b"x-api-key")
        self.keys_seen.append(key.decode() if key is not None else None)
        return key == self.key.encode()

    @app.route("/api/v1/servers/<server>/zones/<zone>", methods=["GET"])
    def get_zone(self, request: IRequest, server: str, zone: str) -> bytes:
        if not self._authorized(request):
            return self._error(request, 401, "Unauthorized")
        if server != "localhost" or zone not in self.zones:
            return self._error(request, 404, "Not Found")
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"name": zone, "rrsets": list(self.zones[zone].values())}).encode()

    @app.route("/api/v1/servers/<server>/zones/<zone>", methods=["PATCH"])
    async def patch_zone(self, request: IRequest, server: str, zone: str) -> bytes:
        body = json.loads(request.content.read())
        self.patches.append(body)
        if not self._authorized(request):
            return self._error(request, 401, "Unauthorized")
        names = [r["name"] for r in body["rrsets"]]
        for n in names:
            self.in_flight[n] += 1
            self.max_in_flight[n] = max(self.max_in_flight[n], self.in_flight[n])
        self.max_total_in_flight = max(self.max_total_in_flight, sum(self.in_flight.values()))
        try:
            if self.hold:
                d: Deferred[None] = Deferred()
                self.held.append(d)
                await d
            if self.fail_next or self.fail_always:
                status = self.fail_next.pop(0) if self.fail_next else self.fail_always
                assert status is not None
                return self._error(request, status, f"Injected failure {status}")
            if server != "localhost" or zone not in self.zones:
                return self._error(request, 404, f"Could not find domain '{zone}'")
            return self._apply(request, zone, body["rrsets"])
        finally:
            for n in names:
                self.in_flight[n] -= 1

    def _apply(self, request: IRequest, zone: str, rrsets: list[dict[str, Any]]) -> bytes:
        for rrset in rrsets:
            name = rrset["name"]
            if not (name == zone or name.endswith("." + zone)):
                return self._error(request, 422, f"RRset {name} IN TXT: Name is out of zone")
            for record in rrset.get("records", []):
                content = record["content"]
                if rrset["type"] == "CAA":
                    content = content.split(" ", 2)[-1]  # flags tag "value"
                if not (content.startswith('"') and content.endswith('"')) or "bad" in content:
                    return self._error(
                        request, 422, f"Record {name}/TXT '{content}': Parsing record content"
                    )
        for rrset in rrsets:
            key = (rrset["name"], rrset["type"])
            if rrset["changetype"] == "DELETE":
                self.zones[zone].pop(key, None)
            else:
                assert rrset["changetype"] == "REPLACE"
                contents = [r["content"] for r in rrset["records"]]
                if len(set(contents)) != len(contents):
                    return self._error(request, 422, "Duplicate record in RRset")
                self.zones[zone][key] = {
                    "name": rrset["name"],
                    "type": rrset["type"],
                    "ttl": rrset["ttl"],
                    "records": rrset["records"],
                }
        request.setResponseCode(204)
        return b""


@implementer(IAgent)
class RefusingAgent:
    """An agent for a PowerDNS that is not there (or never answers); ``error`` is how each
    request fails (connection refused unless given)."""

    def __init__(self, hang: bool = False, error: Exception | None = None) -> None:
        self.hang = hang
        self.error = error or ConnectionRefusedError("Connection refused")
        self.requests = 0
        self.cancelled = 0

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Any:
        self.requests += 1
        if self.hang:

            def cancel(d: Deferred[Any]) -> None:
                self.cancelled += 1

            return Deferred(cancel)
        return fail(self.error)


class NeverConnects:
    """Endpoints on a MemoryReactorClock: each connect stays pending until cancelled, as
    a TCP connect to a host that drops the SYN does."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", uri.port)


def config(**kw: Any) -> PowerDNSConfig:
    values: dict[str, Any] = {"api_url": API, "api_key": KEY, "zone": ZONE, "ttl": 10}
    values.update(kw)
    return PowerDNSConfig(**values)


class PowerDNSTestMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakePowerDNS()
        self.http, self.agent = self.fake.client()
        self.changes: list[frozenset[str]] = []
        self.publisher = self.make(self.http)

    def make(self, http: HTTPClient, **kw: Any) -> PowerDNSPublisher:
        return PowerDNSPublisher(self.clock, http, config(**kw), on_change=self.changes.append)

    def drive(self, *ds: Deferred[Any], step: float = 0.05, limit: float = 120) -> list[Any]:
        """Advance the clock until every ``d`` fired; return their results or Failures."""
        out: list[list[Any]] = [[] for _ in ds]
        for d, box in zip(ds, out, strict=True):
            d.addBoth(box.append)
        elapsed = 0.0
        while not all(out) and elapsed < limit:
            self.agent.flush()
            self.clock.advance(step)
            elapsed += step
        self.agent.flush()
        assert all(out), "not fired within the limit"
        return [box[0] for box in out]

    def ok(self, d: Deferred[Any]) -> None:
        [result] = self.drive(d)
        if isinstance(result, Failure):
            result.raiseException()

    def failed(self, d: Deferred[Any]) -> PowerDNSAPIError:
        [result] = self.drive(d)
        assert isinstance(result, Failure), f"expected a failure, got {result!r}"
        assert isinstance(result.value, PowerDNSAPIError), result
        return result.value


def quoted(value: str) -> str:
    return f'"{value}"'


class MergeTests(PowerDNSTestMixin, SynchronousTestCase):
    def test_publish_replaces_with_quoted_value(self) -> None:
        self.ok(self.publisher.publish("a.go.example.test", V1))
        self.assertEqual(self.fake.txt(), [quoted(V1)])
        [body] = self.fake.patches
        self.assertEqual(
            body,
            {
                "rrsets": [
                    {
                        "name": NAME,
                        "type": "TXT",
                        "ttl": 10,
                        "changetype": "REPLACE",
                        "records": [{"content": quoted(V1), "disabled": False}],
                    }
                ]
            },
        )
        self.assertEqual(self.fake.keys_seen, [KEY])
        self.assertEqual(self.publisher.live_names, {NAME[:-1]})

    def test_wildcard_and_base_merge_on_one_name(self) -> None:
        self.ok(self.publisher.publish("a.go.example.test", V1))
        self.ok(self.publisher.publish("A.go.example.test.", V2))
        self.assertEqual(self.fake.txt(), [quoted(V1), quoted(V2)])
        last = self.fake.patches[-1]["rrsets"][0]
        self.assertEqual(last["changetype"], "REPLACE")
        self.assertEqual(sorted(r["content"] for r in last["records"]), [quoted(V1), quoted(V2)])

    def test_removing_one_keeps_the_other_and_last_deletes(self) -> None:
        self.ok(self.publisher.publish("a.go.example.test", V1))
        self.ok(self.publisher.publish("a.go.example.test", V2))
        self.ok(self.publisher.unpublish("a.go.example.test", V1))
        self.assertEqual(self.fake.txt(), [quoted(V2)])
        self.assertEqual(self.fake.patches[-1]["rrsets"][0]["changetype"], "REPLACE")
        self.ok(self.publisher.unpublish("a.go.example.test", V2))
        self.assertIsNone(self.fake.txt())
        last = self.fake.patches[-1]["rrsets"][0]
        self.assertEqual(last["changetype"], "DELETE")
        self.assertNotIn("records", last)
        self.assertEqual(self.publisher.live_names, frozenset())
        self.assertEqual(self.changes, [frozenset({NAME[:-1]}), frozenset()])

    def test_same_value_twice_is_counted(self) -> None:
        self.ok(self.publisher.publish("a.go.example.test", V1))
        self.ok(self.publisher.publish("a.go.example.test", V1))
        self.assertEqual(self.fake.txt(), [quoted(V1)])  # one record, no duplicate
        self.ok(self.publisher.unpublish("a.go.example.test", V1))
        self.assertEqual(self.fake.txt(), [quoted(V1)])  # the other order still needs it
        self.ok(self.publisher.unpublish("a.go.example.test", V1))
        self.assertIsNone(self.fake.txt())

    def test_unpublish_of_unknown_value_sends_nothing(self) -> None:
        self.ok(self.publisher.unpublish("a.go.example.test", V1))
        self.assertEqual(self.fake.patches, [])

    def test_outside_zone_refused_without_request(self) -> None:
        error = self.failed(self.publisher.publish("a.other.test", V1))
        self.assertEqual(error.reason, "outside-zone")
        self.assertIn("not inside the PowerDNS zone go.example.test.", error.detail)
        self.assertEqual(self.fake.patches, [])
        self.ok(self.publisher.unpublish("a.other.test", V1))  # the order's cleanup
        self.assertEqual(self.fake.patches, [])

    def test_zone_apex_is_inside(self) -> None:
        self.ok(self.publisher.publish("go.example.test", V1))
        self.assertEqual(self.fake.txt("_acme-challenge.go.example.test."), [quoted(V1)])


class SerialisationTests(PowerDNSTestMixin, SynchronousTestCase):
    def test_concurrent_publishes_on_one_name_both_end_up_served(self) -> None:
        self.fake.hold = True
        d1 = self.publisher.publish("a.go.example.test", V1)
        self.agent.flush()
        d2 = self.publisher.publish("a.go.example.test", V2)
        d3 = self.publisher.publish("a.go.example.test", V3)
        for _ in range(5):
            self.agent.flush()
            self.clock.advance(0.1)
        self.assertEqual(len(self.fake.patches), 1, "second write started before the first ended")
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        self.fake.hold = False
        self.fake.release()
        self.drive(d1, d2, d3)
        self.assertEqual(self.fake.max_in_flight[NAME], 1)
        self.assertEqual(self.fake.txt(), [quoted(V1), quoted(V2), quoted(V3)])
        # The two waiting writes were coalesced into one with the whole set.
        self.assertEqual(len(self.fake.patches), 2)

    def test_publish_then_unpublish_in_flight(self) -> None:
        self.fake.hold = True
        d1 = self.publisher.publish("a.go.example.test", V1)
        self.agent.flush()
        d2 = self.publisher.unpublish("a.go.example.test", V1)
        self.fake.hold = False
        self.fake.release()
        self.drive(d1, d2)
        self.assertIsNone(self.fake.txt())
        self.assertEqual(
            [p["rrsets"][0]["changetype"] for p in self.fake.patches], ["REPLACE", "DELETE"]
        )

    def test_different_names_run_in_parallel(self) -> None:
        self.fake.hold = True
        d1 = self.publisher.publish("a.go.example.test", V1)
        d2 = self.publisher.publish("b.go.example.test", V2)
        self.agent.flush()
        self.assertEqual(len(self.fake.patches), 2)
        self.assertEqual(self.fake.max_total_in_flight, 2)
        self.fake.hold = False
        self.fake.release()
        self.drive(d1, d2)
        self.assertEqual(self.fake.txt("_acme-challenge.b.go.example.test."), [quoted(V2)])

    def test_a_cancelled_wait_does_not_break_the_queue(self) -> None:
        self.fake.hold = True
        d1 = self.publisher.publish("a.go.example.test", V1)
        self.agent.flush()
        d2 = self.publisher.publish("a.go.example.test", V2)
        d2.cancel()
        self.failureResultOf(d2)
        self.fake.hold = False
        self.fake.release()
        d3 = self.publisher.publish("a.go.example.test", V3)
        self.drive(d1, d3)
        self.assertEqual(self.fake.txt(), [quoted(V1), quoted(V2), quoted(V3)])


class ErrorTests(PowerDNSTestMixin, SynchronousTestCase):
    def test_bad_key(self) -> None:
        publisher = self.make(self.http, api_key="wrong")
        error = self.failed(publisher.publish("a.go.example.test", V1))
        self.assertIsInstance(error, PublishError)
        self.assertEqual(
            (error.backend, error.reason, error.http_status), ("powerdns", "bad-key", 401)
        )
        self.assertEqual(error.status, 503)  # what the API answers the client
        self.assertIn("refused the API key", error.detail)
        self.assertIn("api_key", error.detail)
        self.assertNotIn("wrong", error.detail)
        self.assertEqual(len(self.fake.patches), 1, "4xx must not be retried")

    def test_forbidden_is_bad_key(self) -> None:
        self.fake.fail_next = [403]
        error = self.failed(self.publisher.publish("a.go.example.test", V1))
        self.assertEqual((error.reason, error.http_status), ("bad-key", 403))

    def test_no_such_zone(self) -> None:
        self.fake.zones = {"other.test.": {}}
        error = self.failed(self.publisher.publish("a.go.example.test", V1))
        self.assertEqual((error.reason, error.http_status), ("no-zone", 404))
        self.assertIn("has no zone go.example.test.", error.detail)
        self.assertEqual(len(self.fake.patches), 1)

    def test_rejected_record(self) -> None:
        error = self.failed(self.publisher.publish("a.go.example.test", "bad" + V1[3:]))
        self.assertEqual((error.reason, error.http_status), ("rejected", 422))
        self.assertIn(f"rejected the TXT record {NAME}", error.detail)
        self.assertIn("Parsing record content", error.detail)
        self.assertEqual(len(self.fake.patches), 1)

    def test_unusable_value_refused_locally(self) -> None:
        error = self.failed(self.publisher.publish("a.go.example.test", "x" * 300))
        self.assertEqual(error.reason, "rejected")
        self.assertEqual(self.fake.patches, [])

    def test_5xx_retried_then_success(self) -> None:
        self.fake.fail_next = [500, 503]
        start = self.clock.seconds()
        self.ok(self.publisher.publish("a.go.example.test", V1))
        self.assertEqual(len(self.fake.patches), 3)
        self.assertEqual(self.fake.txt(), [quoted(V1)])
        # Backed off 0.25 then 0.5 seconds.
        self.assertGreaterEqual(self.clock.seconds() - start, 0.75)

    def test_5xx_until_deadline(self) -> None:
        self.fake.fail_always = 500
        publisher = self.make(self.http, api_timeout=10.0)
        start = self.clock.seconds()
        error = self.failed(publisher.publish("a.go.example.test", V1))
        self.assertEqual((error.reason, error.http_status), ("server", 500))
        self.assertIn("HTTP 500: Injected failure 500", error.detail)
        self.assertIn("gave up after", error.detail)
        self.assertLessEqual(self.clock.seconds() - start, 10.0)
        # 0, .25, .75, 1.75, 3.75, 7.75 — capped exponential back-off.
        self.assertEqual(len(self.fake.patches), 6)

    def test_connection_refused_until_deadline(self) -> None:
        agent = RefusingAgent()
        publisher = self.make(client_over(agent), api_timeout=5.0)
        start = self.clock.seconds()
        error = self.failed(publisher.publish("a.go.example.test", V1))
        self.assertEqual((error.reason, error.http_status), ("unreachable", None))
        self.assertIn(f"PowerDNS API at {API} unreachable", error.detail)
        self.assertIn("refused", error.detail)
        self.assertLessEqual(self.clock.seconds() - start, 5.0)
        self.assertGreater(agent.requests, 3)

    def test_no_answer_times_out_within_deadline(self) -> None:
        agent = RefusingAgent(hang=True)
        publisher = PowerDNSPublisher(
            self.clock, client_over(agent), config(api_timeout=6.0), request_timeout=2.0
        )
        start = self.clock.seconds()
        error = self.failed(publisher.publish("a.go.example.test", V1))
        self.assertEqual(error.reason, "unreachable")
        self.assertRegex(error.detail, r"no answer within [0-9.]+s")
        self.assertLessEqual(self.clock.seconds() - start, 6.0 + 0.05)  # one drive step
        self.assertEqual(agent.cancelled, agent.requests)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_connect_that_never_completes_is_unreachable(self) -> None:
        # twisted's Agent fails a request whose connect is cancelled (our request timeout)
        # with ConnectingCancelledError, not CancelledError.
        self.clock = reactor = MemoryReactorClock()
        agent = Agent.usingEndpointFactory(reactor, NeverConnects(reactor))
        publisher = PowerDNSPublisher(
            reactor, client_over(agent), config(api_timeout=6.0), request_timeout=2.0
        )
        start = reactor.seconds()
        error = self.failed(publisher.publish("a.go.example.test", V1))
        self.assertEqual((error.reason, error.http_status), ("unreachable", None))
        self.assertRegex(error.detail, r"no answer within [0-9.]+s")
        self.assertIn("gave up after", error.detail)
        self.assertLessEqual(reactor.seconds() - start, 6.0 + 0.05)  # one drive step
        self.assertGreater(len(reactor.tcpClients), 1)
        self.assertTrue(all(c.stoppedConnecting for c in reactor.connectors))

    def test_request_not_sent_or_broken_off_is_unreachable(self) -> None:
        for failure in (
            ConnectingCancelledError(None),
            RequestNotSent(),
            RequestTransmissionFailed([Failure(ConnectionRefusedError())]),
        ):
            agent = RefusingAgent(error=failure)
            publisher = self.make(client_over(agent), api_timeout=3.0)
            error = self.failed(publisher.publish("a.go.example.test", V1))
            self.assertEqual((error.reason, error.http_status), ("unreachable", None), failure)
            self.assertIn(f"PowerDNS API at {API} unreachable", error.detail)
            self.assertNotIn("<twisted.python.failure", error.detail)
            self.assertGreater(agent.requests, 1, failure)

    def test_unpublish_failure_reported_and_name_stays_live(self) -> None:
        publisher = self.make(self.http, api_timeout=3.0)
        self.ok(publisher.publish("a.go.example.test", V1))
        self.fake.fail_always = 502
        error = self.failed(publisher.unpublish("a.go.example.test", V1))
        self.assertEqual((error.reason, error.http_status), ("server", 502))
        self.assertEqual(publisher.live_names, {NAME[:-1]})
        self.assertEqual(self.changes, [frozenset({NAME[:-1]})])
        # Start-up clean-up of a later run removes it.
        self.fake.fail_always = None
        self.ok(self.make(self.http).remove_names(publisher.live_names))
        self.assertIsNone(self.fake.txt())

    def test_failed_publish_is_still_removed_by_unpublish(self) -> None:
        publisher = self.make(self.http, api_timeout=2.0)
        self.fake.fail_always = 500
        self.failed(publisher.publish("a.go.example.test", V1))
        self.fake.fail_always = None
        self.ok(publisher.unpublish("a.go.example.test", V1))
        self.assertEqual(self.fake.patches[-1]["rrsets"][0]["changetype"], "DELETE")
        self.assertEqual(publisher.live_names, frozenset())


class RemoveNamesTests(PowerDNSTestMixin, SynchronousTestCase):
    def test_removes_leftovers(self) -> None:
        for n in ("_acme-challenge.x.go.example.test.", "_acme-challenge.y.go.example.test."):
            self.fake.zones[ZONE + "."][(n, "TXT")] = {
                "name": n,
                "type": "TXT",
                "ttl": 10,
                "records": [{"content": quoted(V1), "disabled": False}],
            }
        self.ok(
            self.publisher.remove_names(
                ["_acme-challenge.x.go.example.test", "_acme-challenge.Y.go.example.test."]
            )
        )
        self.assertEqual(self.fake.zones[ZONE + "."], {})
        self.assertEqual(
            sorted(p["rrsets"][0]["changetype"] for p in self.fake.patches), ["DELETE", "DELETE"]
        )

    def test_keeps_values_in_use(self) -> None:
        self.ok(self.publisher.publish("a.go.example.test", V1))
        self.ok(self.publisher.remove_names([NAME]))
        self.assertEqual(self.fake.txt(), [quoted(V1)])

    def test_refuses_other_names(self) -> None:
        for name in ("www.go.example.test", "_acme-challenge.x.other.test"):
            error = self.failed(self.publisher.remove_names([name]))
            self.assertEqual(error.reason, "outside-zone")
        self.assertEqual(self.fake.patches, [])

    def test_reports_failure(self) -> None:
        self.fake.fail_next = [404]
        error = self.failed(self.publisher.remove_names(["_acme-challenge.x.go.example.test"]))
        self.assertEqual(error.reason, "no-zone")


class LoggingTests(PowerDNSTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[LogEvent] = []
        observer = implementer(ILogObserver)(lambda e: self.events.append(e))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_key_never_logged(self) -> None:
        self.ok(self.publisher.publish("a.go.example.test", V1))
        self.fake.fail_next = [500]
        self.ok(self.publisher.publish("a.go.example.test", V2))
        self.failed(self.make(self.http, api_key=KEY + "-bad").publish("b.go.example.test", V1))
        self.failed(
            self.make(client_over(RefusingAgent()), api_timeout=1.0).publish(
                "c.go.example.test", V1
            )
        )
        self.ok(self.publisher.unpublish("a.go.example.test", V1))
        mine = [e for e in self.events if e.get("backend") == "powerdns"]
        self.assertGreaterEqual(len(mine), 5)
        for event in self.events:
            self.assertNotIn(KEY, repr(event))
            self.assertNotIn(KEY, formatEvent(event))
        self.assertNotIn(KEY, repr(self.publisher))
        statuses = {e.get("status") for e in mine}
        self.assertTrue({204, 500, 401} <= statuses, statuses)
        self.assertTrue(all(e.get("name", "").startswith("_acme-challenge.") for e in mine))
