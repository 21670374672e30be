"""Name patterns in several zones: which zone a pattern is in, and the one name offered."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.issuance.policy import NamePolicy
from csrproxy.names import NamePattern

ZONES = ("go.example.com", "go-example.net", "example.org")


class ZoneOfPatternTests(SynchronousTestCase):
    def test_zone_in(self) -> None:
        for text, zone in [
            ("{key}.go.example.com", "go.example.com"),
            ("*.{label}.go-example.net", "go-example.net"),
            ("example.org", "example.org"),
            ("a.go.example.org", "example.org"),
            ("{key}.example.com", None),
            ("{key}.go.example.com.evil", None),
        ]:
            self.assertEqual(NamePattern.parse(text).zone_in(ZONES), zone, text)
        # The longest zone wins when one would hold the other (config forbids it anyway).
        self.assertEqual(
            NamePattern.parse("a.b.c.test").zone_in(["c.test", "b.c.test"]), "b.c.test"
        )
        self.assertEqual(
            NamePattern.parse("*.{key}.go.example.com").relative_to("go.example.com"),
            ("*", "{key}"),
        )


class OfferTests(SynchronousTestCase):
    def policy(self) -> NamePolicy:
        return NamePolicy(
            [
                "{key}.go-example.net",
                "{key}.go.example.com",
                "www.example.org",
                "{key}.example.org",
            ],
            zones=ZONES,
        )

    def test_first_zone_in_config_order_not_pattern_order(self) -> None:
        self.assertEqual(self.policy().offer("k"), ["k.go.example.com", "www.example.org"])

    def test_room_decides(self) -> None:
        policy = self.policy()
        self.assertEqual(
            policy.offer("k", lambda z: z != "go.example.com"),
            ["k.go-example.net", "www.example.org"],
        )
        self.assertEqual(
            policy.offer("k", lambda z: z == "example.org"), ["k.example.org", "www.example.org"]
        )
        self.assertEqual(
            policy.offer("k", lambda z: False), ["k.go.example.com", "www.example.org"]
        )

    def test_without_zones_every_pattern(self) -> None:
        policy = NamePolicy(["{key}.go-example.net", "{key}.go.example.com"])
        self.assertEqual(
            policy.offer("k", lambda z: False), ["k.go-example.net", "k.go.example.com"]
        )
