"""``[dns] zones``: several zones, each with the same records and nameservers."""

from __future__ import annotations

from typing import Any

from csrproxy.config import parse_config
from csrproxy.config.dns import MAX_ZONES
from tests.config.test_config import ConfigTestCase, minimal


def several(*zones: str) -> dict[str, Any]:
    data = minimal()
    data["dns"] = {"zones": list(zones)}
    data["policy"]["names"] = [f"{{key}}.{z.rstrip('.').lower()}" for z in zones if z]
    return data


class ZonesTests(ConfigTestCase):
    def test_one_zone_is_zones_of_one(self) -> None:
        config = parse_config(minimal())
        self.assertEqual(config.dns.zone, "go.example.test")
        self.assertEqual(config.dns.zones, ("go.example.test",))

    def test_zones_in_order_first_is_zone(self) -> None:
        config = parse_config(several("Go.Example.com.", "go-example.net", "x.example.org"))
        self.assertEqual(config.dns.zones, ("go.example.com", "go-example.net", "x.example.org"))
        self.assertEqual(config.dns.zone, "go.example.com")
        # The same NS set in every zone: the first zone's ns1 by default.
        self.assertEqual(config.dns.nameservers, ("ns1.go.example.com",))

    def test_zone_and_zones(self) -> None:
        data = several("a.example.com", "b.example.net")
        data["dns"]["zone"] = "a.example.com."
        self.assertEqual(parse_config(data).dns.zones, ("a.example.com", "b.example.net"))
        data["dns"]["zone"] = "b.example.net"
        self.assertKey(data, "dns.zone")

    def test_neither(self) -> None:
        data = minimal()
        del data["dns"]["zone"]
        self.assertKey(data, "dns.zone")

    def test_bad_zones(self) -> None:
        for zones in (["com"], ["a.example.com", ""], ["a..example.com"]):
            self.assertKey(several(*zones), "dns.zones")
        self.assertKey(several("a.example.com", "A.example.com."), "dns.zones")
        self.assertKey(several(*(f"z{i}.example.com" for i in range(MAX_ZONES + 1))), "dns.zones")

    def test_zones_must_not_nest(self) -> None:
        for zones in (
            ("go.example.com", "a.go.example.com"),
            ("a.go.example.com", "go.example.com"),
        ):
            data = several(*zones)
            with self.assertRaises(Exception) as e:
                parse_config(data)
            self.assertIn("nest", str(e.exception))
            self.assertKey(data, "dns.zones")
        # A common suffix is not nesting.
        parse_config(several("go.example.com", "ago.example.com"))

    def test_powerdns_with_zones_is_not_supported(self) -> None:
        data = several("a.example.com", "b.example.net")
        data["dns"]["backend"] = "powerdns"
        data["dns"]["powerdns"] = {"api_url": "http://127.0.0.1:8081", "api_key": "k"}
        self.assertKey(data, "dns.zones")

    def test_names_in_any_zone(self) -> None:
        data = several("a.example.com", "b.example.net")
        data["policy"]["names"] = [
            "{key}.b.example.net",
            "*.{label}.a.example.com",
            "a.example.com",
        ]
        parse_config(data)
        data["policy"]["names"] = ["{key}.example.net"]
        self.assertKey(data, "policy.names")
        data["policy"]["names"] = ["{key}.a.example.com.evil"]
        self.assertKey(data, "policy.names")

    def test_names_outside_the_one_zone(self) -> None:
        data = minimal()
        data["policy"]["names"] = ["{label}.elsewhere.test"]
        self.assertKey(data, "policy.names")
