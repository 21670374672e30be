"""Publishing into several zones: each identifier's record goes into its own zone."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.names import dns as tdns
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.challenges.watch import WatchedZone
from csrproxy.challenges.zone import ZonePublisher
from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.zones import Zones
from csrproxy.errors import PublishError
from csrproxy.testing.dns import reply_to

FIRST, SECOND = "go.example.test", "go-other.example.net"


def zones() -> Zones:
    ns = ["ns1." + FIRST]
    return Zones([WatchedZone(FIRST, ns, ["* A 127.0.0.1"]), WatchedZone(SECOND, ns, [])])


class PublishTests(SynchronousTestCase):
    def test_each_identifier_in_its_zone(self) -> None:
        both = zones()
        first, second = both
        publisher = ZonePublisher(both)
        self.successResultOf(publisher.publish("a." + SECOND, "v2"))
        self.successResultOf(publisher.publish("*.b." + FIRST, "v1"))
        self.assertEqual(second.txt_values("_acme-challenge.a." + SECOND), ("v2",))
        self.assertEqual(first.txt_values("_acme-challenge.b." + FIRST), ("v1",))
        self.assertEqual(first.challenge_names(), ("_acme-challenge.b." + FIRST,))
        self.successResultOf(publisher.unpublish("a." + SECOND, "v2"))
        self.assertEqual(second.challenge_names(), ())
        failure = self.failureResultOf(publisher.publish("a.example.org", "v"), PublishError)
        self.assertIn(SECOND, str(failure.value))

    def test_watch_fires_at_the_lookup_in_the_second_zone(self) -> None:
        both = zones()
        publisher = ZonePublisher(both)
        self.successResultOf(publisher.publish("*.a." + SECOND, "v"))
        seen = both.watch("*.a." + SECOND)
        elsewhere = both.watch("a.example.org")  # outside every zone: never fires
        factory = ZoneServerFactory(Clock(), both)
        query = tdns.Message(id=1)
        query.addQuery(("_acme-challenge.a." + SECOND).encode(), tdns.TXT)
        self.assertNoResult(seen)
        reply_to(factory, query.toStr())
        self.successResultOf(seen)
        self.assertNoResult(elsewhere)
        elsewhere.cancel()
        self.failureResultOf(elsewhere)
