"""Configuration loading: every mistake names its key."""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
import tomllib
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.config import load_config, parse_config
from csrproxy.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[2] / "etc" / "csrproxy.toml"


def minimal() -> dict[str, Any]:
    return {
        "acme": {"directory": "https://ca.test/dir"},
        "dns": {"zone": "go.example.test"},
        "policy": {"names": ["{label}.go.example.test"]},
        "state": {"dir": "/tmp/x"},
    }


class ConfigTestCase(SynchronousTestCase):
    def assertKey(self, data: dict[str, Any], key: str) -> None:
        with self.assertRaises(ConfigError) as e:
            parse_config(data)
        self.assertEqual(e.exception.key, key)
        self.assertIn(key, str(e.exception))


class ConfigTests(ConfigTestCase):
    def test_sample_config_loads(self) -> None:
        config = load_config(SAMPLE)
        self.assertEqual(config.dns.zone, "go.example.com")
        self.assertEqual(config.api.listen, ("tcp:8000:interface=127.0.0.1",))

    def test_defaults(self) -> None:
        config = parse_config(minimal())
        self.assertEqual(config.dns.nameservers, ("ns1.go.example.test",))
        self.assertEqual(config.acme.poll_interval, 1.0)
        self.assertEqual(config.api.max_body, 65536)

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
        data["dns"]["zonez"] = ["x"]
        self.assertKey(data, "dns.zonez")
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
        self.assertEqual(config.policy.registered_domain, "")  # the Public Suffix List's
        self.assertEqual(config.policy.new_names_per_week, 45)
        self.assertEqual(config.policy.orders_per_3h, 250)
        self.assertEqual(config.policy.same_names_per_week, 5)
        self.assertEqual(config.policy.failed_authorizations_per_hour, 5)
        self.assertEqual(config.policy.consecutive_failed_authorizations, 1152)
        self.assertIn("ec256", config.policy.key_types)

    def test_budget_keys(self) -> None:
        data = minimal()
        data["policy"]["registered_domain"] = "Example.TEST."
        data["policy"]["failed_authorizations_per_hour"] = 0
        data["policy"]["consecutive_failed_authorizations"] = 10
        policy = parse_config(data).policy
        self.assertEqual(policy.registered_domain, "example.test")
        self.assertEqual(policy.failed_authorizations_per_hour, 0)
        self.assertEqual(policy.consecutive_failed_authorizations, 10)

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
            ("policy", "failed_authorizations_per_hour", -1),
            ("policy", "consecutive_failed_authorizations", "many"),
        ]
        for section, key, value in cases:
            data = minimal()
            data.setdefault(section, {})[key] = value
            with self.assertRaises(ConfigError, msg=(key, value)) as e:
                parse_config(data)
            self.assertEqual(e.exception.key, f"{section}.{key}", (key, value))

    def test_networks_are_parsed_once_here(self) -> None:
        data = minimal()
        data["api"] = {"allow_from": [" 10.1.2.3/8", "2001:db8::1"], "trusted_proxies": ["::1"]}
        api = parse_config(data).api
        self.assertEqual(api.allow_from, (ip_network("10.0.0.0/8"), ip_network("2001:db8::1/128")))
        self.assertEqual(api.trusted_proxies, (ip_network("::1"),))
        data["api"] = {"allow_from": ["10.0.0.0/8", "10.0.0.0/33"]}
        with self.assertRaises(ConfigError) as e:
            parse_config(data)
        self.assertEqual(e.exception.key, "api.allow_from")
        self.assertIn("'10.0.0.0/33' is not an address or CIDR", str(e.exception))


class ReaderTests(ConfigTestCase):
    def test_unknown_key_lists_the_keys_read(self) -> None:
        data = minimal()
        data["renewal"] = {"enabled": True, "intervall": 60}
        with self.assertRaises(ConfigError) as e:
            parse_config(data)
        self.assertEqual(e.exception.key, "renewal.intervall")
        self.assertIn(
            "unknown key (known: active_days, ari_parallel, ari_per_second, ari_recheck, "
            "enabled, interval, max_parallel)",
            str(e.exception),
        )

    def test_nested_table(self) -> None:
        data = minimal()
        data["dns"]["powerdns"] = {"api_url": "http://127.0.0.1:8081", "api_key": "k", "tll": 5}
        self.assertKey(data, "dns.powerdns.tll")
        data["dns"]["powerdns"] = "http://127.0.0.1:8081"
        self.assertKey(data, "dns.powerdns")
        data = minimal()
        data["dns"]["backend"] = "powerdns"
        self.assertKey(data, "dns.powerdns")

    def test_misspelt_required_key_is_named(self) -> None:
        data = minimal()
        data["acme"] = {"directroy": "https://ca.test/dir"}
        with self.assertRaises(ConfigError) as e:
            parse_config(data)
        self.assertEqual(e.exception.key, "acme.directory")
        self.assertIn("missing required key", str(e.exception))
        self.assertIn("'directroy'", str(e.exception))
        data = minimal()
        data["polcy"] = data.pop("policy")
        with self.assertRaises(ConfigError) as e:
            parse_config(data)
        self.assertEqual(e.exception.key, "policy")
        self.assertIn("'polcy'", str(e.exception))

    def test_every_sample_key_is_read(self) -> None:
        # The sample lists every key: each one must be known to its section parser,
        # including those of its commented-out [dns.powerdns] example.
        text = SAMPLE.read_text("utf-8")
        block = text.split("# [dns.powerdns]\n", 1)[1].split("\n\n", 1)[0]
        data = tomllib.loads(text)
        data["dns"]["powerdns"] = tomllib.loads("\n".join(x[2:] for x in block.splitlines()))
        self.assertEqual(len(data["dns"]["powerdns"]), 9)
        parse_config(data)


class PackageTests(SynchronousTestCase):
    def test_no_twisted(self) -> None:
        code = (
            "import sys, csrproxy.config; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'twisted', 'zope'}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(out.strip(), "[]")

    def test_no_cycle_and_no_private_imports(self) -> None:
        package = Path(__file__).resolve().parents[2] / "csrproxy" / "config"
        for module in package.glob("*.py"):
            tree = ast.parse(module.read_text("utf-8"))
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom) or node.module is None:
                    continue
                names = [a.name for a in node.names]
                self.assertFalse(
                    [n for n in names if n.startswith("_") and n != "annotations"],
                    (module.name, node.module),
                )
                if module.name != "__init__.py":
                    # Sections import sections, never the package that re-exports them.
                    self.assertNotEqual(node.module, "csrproxy.config", module.name)


class RRLConfigTests(ConfigTestCase):
    def test_on_by_default(self) -> None:
        rrl = parse_config(minimal()).dns.rrl
        self.assertEqual(
            (rrl.enabled, rrl.responses_per_second, rrl.wildcards_per_second, rrl.window),
            (True, 20, 1000, 15),
        )
        self.assertEqual((rrl.slip, rrl.ipv4_prefix_length, rrl.ipv6_prefix_length), (2, 24, 56))
        self.assertEqual((rrl.exempt, rrl.log_only, rrl.max_table_size), ((), False, 65536))

    def test_values_read(self) -> None:
        data = minimal()
        data["dns"]["rrl"] = {
            "responses_per_second": 5,
            "nxdomains_per_second": 0,
            "slip": 1,
            "exempt": ["192.0.2.7/24", "2001:db8::1"],
            "log_only": True,
            "enabled": False,
        }
        rrl = parse_config(data).dns.rrl
        self.assertEqual(rrl.exempt, ("192.0.2.0/24", "2001:db8::1/128"))
        self.assertEqual((rrl.responses_per_second, rrl.nxdomains_per_second), (5, 0))
        self.assertEqual((rrl.slip, rrl.log_only, rrl.enabled), (1, True, False))

    def test_bad_values_name_their_key(self) -> None:
        for key, value in [
            ("slip", 11),
            ("slip", -1),
            ("window", 0),
            ("responses_per_second", -1),
            ("errors_per_second", 1.5),
            ("ipv4_prefix_length", 33),
            ("ipv6_prefix_length", 129),
            ("max_table_size", 0),
            ("max_table_size", 1 << 21),
            ("exempt", ["192.0.2.0/33"]),
            ("exempt", "192.0.2.0/24"),
            ("log_only", "yes"),
            ("respones_per_second", 5),
        ]:
            data = minimal()
            data["dns"]["rrl"] = {key: value}
            self.assertKey(data, f"dns.rrl.{key}")
        data = minimal()
        data["dns"]["rrl"] = 5
        self.assertKey(data, "dns.rrl")


class NSIDAndCookieConfigTests(ConfigTestCase):
    def test_defaults(self) -> None:
        config = parse_config(minimal()).dns
        self.assertEqual((config.nsid, config.cookies), (None, True))
        self.assertEqual((config.cookie_rotation, config.require_cookies), (86400, False))

    def test_values_read(self) -> None:
        for nsid in ("ns1", "0x6e7331"):
            data = minimal()
            data["dns"].update(nsid=nsid, cookies=False)
            config = parse_config(data).dns
            self.assertEqual((config.nsid, config.cookies), (nsid, False))
        data = minimal()
        data["dns"].update(cookie_rotation=7200, require_cookies=True)
        config = parse_config(data).dns
        self.assertEqual((config.cookie_rotation, config.require_cookies), (7200, True))

    def test_bad_values_name_their_key(self) -> None:
        for key, value in [
            ("nsid", ""),
            ("nsid", "0xzz"),
            ("nsid", "0x"),
            ("nsid", "n" * 129),
            ("nsid", 1),
            ("cookies", "yes"),
            ("cookie_rotation", 7199),
            ("cookie_rotation", 0),
            ("cookie_rotation", "1d"),
            ("cookie_rotation", 86400.5),
            ("require_cookies", "yes"),
        ]:
            data = minimal()
            data["dns"][key] = value
            self.assertKey(data, f"dns.{key}")

    def test_require_needs_cookies(self) -> None:
        data = minimal()
        data["dns"].update(cookies=False, require_cookies=True)
        self.assertKey(data, "dns.require_cookies")
        with self.assertRaises(ConfigError) as e:
            parse_config(data)
        self.assertIn("needs cookies = true", str(e.exception))
        data["dns"]["require_cookies"] = False
        self.assertFalse(parse_config(data).dns.cookies)

    def test_rotation_floor_explained(self) -> None:
        data = minimal()
        data["dns"]["cookie_rotation"] = 3600
        with self.assertRaises(ConfigError) as e:
            parse_config(data)
        self.assertIn("at least 7200 seconds", str(e.exception))


class FallbackConfigTests(ConfigTestCase):
    def with_fallbacks(self, *tables: dict[str, Any]) -> dict[str, Any]:
        data = minimal()
        data["acme"] |= {"contact": ["mailto:ops@example.test"], "order_timeout": 120}
        data["acme"]["fallback"] = list(tables)
        return data

    def test_a_fallback_is_a_ca_of_its_own_with_the_primarys_defaults(self) -> None:
        config = parse_config(
            self.with_fallbacks(
                {"directory": "https://acme.zerossl.com/v2/DV90", "eab_kid": "k",
                 "eab_hmac_key": "aGVsbG8", "orders_per_3h": 100},
                {"directory": "https://other.test/dir", "caa_identity": "Other.Test."},
            )
        )  # fmt: skip
        first, second = config.acme.fallback
        self.assertEqual(first.acme.directory, "https://acme.zerossl.com/v2/DV90")
        self.assertEqual((first.acme.eab_kid, first.orders_per_3h), ("k", 100))
        self.assertEqual(first.acme.contact, ("mailto:ops@example.test",))
        self.assertEqual(first.acme.order_timeout, 120)
        self.assertEqual((first.new_names_per_week, first.caa_identity), (0, None))
        self.assertEqual(second.caa_identity, "other.test")
        self.assertIsNone(second.acme.eab_kid, "EAB is each CA's own")
        self.assertEqual(second.acme.fallback, ())

    def test_mistakes_name_the_fallback_and_key(self) -> None:
        self.assertKey(self.with_fallbacks({}), "acme.fallback[0].directory")
        self.assertKey(
            self.with_fallbacks({"directory": "https://ca.test/dir"}), "acme.fallback[0].directory"
        )
        self.assertKey(
            self.with_fallbacks({"directory": "https://b.test/dir", "orders_per_3h": -1}),
            "acme.fallback[0].orders_per_3h",
        )
        self.assertKey(
            self.with_fallbacks({"directory": "https://b.test/dir", "caa_identity": "no way"}),
            "acme.fallback[0].caa_identity",
        )
        self.assertKey(
            self.with_fallbacks({"directory": "https://b.test/dir", "fallback": []}),
            "acme.fallback[0].fallback",
        )
        self.assertKey(
            self.with_fallbacks({"directory": "https://b.test/dir", "typo": 1}),
            "acme.fallback[0].typo",
        )
        self.assertKey(
            self.with_fallbacks(*({"directory": f"https://{i}.test/dir"} for i in range(5))),
            "acme.fallback",
        )
