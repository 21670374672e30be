"""Configuration loading: every mistake names its key."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.config import load_config, parse_config
from csrproxy.errors import ConfigError

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "csrproxy.toml"


def minimal() -> dict[str, Any]:
    return {
        "acme": {"directory": "https://ca.test/dir"},
        "dns": {"zone": "go.example.test"},
        "policy": {"names": ["{label}.go.example.test"]},
        "state": {"dir": "/tmp/x"},
    }


class ConfigTests(SynchronousTestCase):
    def test_sample_config_loads(self) -> None:
        config = load_config(SAMPLE)
        self.assertEqual(config.dns.zone, "go.example.com")
        self.assertEqual(config.api.listen, ("tcp:8000:interface=127.0.0.1",))

    def test_defaults(self) -> None:
        config = parse_config(minimal())
        self.assertEqual(config.dns.nameservers, ("ns1.go.example.test",))
        self.assertEqual(config.acme.poll_interval, 1.0)
        self.assertEqual(config.api.max_body, 65536)

    def assertKey(self, data: dict[str, Any], key: str) -> None:
        with self.assertRaises(ConfigError) as e:
            parse_config(data)
        self.assertEqual(e.exception.key, key)
        self.assertIn(key, str(e.exception))

    def test_missing_key(self) -> None:
        data = minimal()
        del data["acme"]["directory"]
        self.assertKey(data, "acme.directory")

    def test_missing_section(self) -> None:
        data = minimal()
        del data["policy"]
        self.assertKey(data, "policy")

    def test_wrong_type(self) -> None:
        data = minimal()
        data["api"] = {"listen": "tcp:8000"}
        self.assertKey(data, "api.listen")
        data = minimal()
        data["acme"]["poll_interval"] = "fast"
        self.assertKey(data, "acme.poll_interval")
        data = minimal()
        data["api"] = {"max_body": True}
        self.assertKey(data, "api.max_body")

    def test_unknown_key(self) -> None:
        data = minimal()
        data["dns"]["zones"] = ["x"]
        self.assertKey(data, "dns.zones")
        data = minimal()
        data["extra"] = {}
        self.assertKey(data, "extra")

    def test_bad_values(self) -> None:
        data = minimal()
        data["acme"]["contact"] = ["admin@example.test"]
        self.assertKey(data, "acme.contact")
        data = minimal()
        data["policy"]["names"] = ["{nope}.go.example.test"]
        self.assertKey(data, "policy.names")
        data = minimal()
        data["acme"]["ca_certs"] = "/nonexistent/ca.pem"
        self.assertKey(data, "acme.ca_certs")
        data = minimal()
        data["acme"]["order_timeout"] = 0
        self.assertKey(data, "acme.order_timeout")

    def test_unreadable_and_invalid_file(self) -> None:
        with self.assertRaises(ConfigError) as e:
            load_config("/nonexistent/csrproxy.toml")
        self.assertIn("cannot read", str(e.exception))
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write("[acme\n")
            f.flush()
            with self.assertRaises(ConfigError) as e:
                load_config(f.name)
            self.assertIn("not valid TOML", str(e.exception))


class APIAndPolicyKeyTests(SynchronousTestCase):
    def test_new_defaults(self) -> None:
        config = parse_config(minimal())
        self.assertEqual(config.api.sync_timeout, 50.0)
        self.assertEqual(config.api.allow_from, ())
        self.assertIsNone(config.api.tokens_file)
        self.assertEqual(config.policy.max_names, 100)
        self.assertEqual(config.policy.registered_domain, "example.test")
        self.assertEqual(config.policy.new_names_per_week, 45)
        self.assertEqual(config.policy.orders_per_3h, 250)
        self.assertIn("ec256", config.policy.key_types)

    def test_seed_mode_names_default_to_the_cn(self) -> None:
        data = minimal()
        data["policy"] = {"subject": "CN=go.example.test"}
        config = parse_config(data)
        self.assertEqual(config.policy.names, ("go.example.test",))
        self.assertEqual(config.policy.subject, "CN=go.example.test")

    def test_bad_values_name_their_key(self) -> None:
        cases: list[tuple[str, str, Any]] = [
            ("api", "allow_from", ["10.0.0.0/33"]),
            ("api", "trusted_proxies", ["proxy"]),
            ("api", "tokens_file", "/nonexistent/tokens"),
            ("api", "sync_timeout", 0),
            ("api", "read_timeout", "10"),
            ("api", "access_log", "yes"),
            ("policy", "subject", "O=no cn"),
            ("policy", "key_types", ["ec521"]),
            ("policy", "key_types", []),
            ("policy", "max_names", 0),
            ("policy", "orders_per_3h", -1),
            ("policy", "client_requests_per_hour", 1.5),
        ]
        for section, key, value in cases:
            data = minimal()
            data.setdefault(section, {})[key] = value
            with self.assertRaises(ConfigError, msg=(key, value)) as e:
                parse_config(data)
            self.assertEqual(e.exception.key, f"{section}.{key}", (key, value))
