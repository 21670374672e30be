"""``[[dns.secondaries]]``: every key of the contract, each mistake naming its key."""

from __future__ import annotations

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.config import parse_config
from csrproxy.config.dns import TSIG_ALGORITHMS
from csrproxy.errors import ConfigError
from tests.config.test_config import minimal

SECRET = base64.b64encode(bytes(range(32))).decode()


def secondary(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "address": "192.0.2.53",
        "notify_port": 5300,
        "tsig_name": "csrproxy-xfr.",
        "tsig_algorithm": "HMAC-SHA256",
        "tsig_secret": SECRET,
        "check": "192.0.2.53:53",
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def with_secondaries(*entries: dict[str, Any]) -> dict[str, Any]:
    data = minimal()
    data["dns"]["secondaries"] = list(entries)
    return data


class SecondariesConfigTests(SynchronousTestCase):
    def assertKey(self, data: dict[str, Any], key: str) -> None:
        with self.assertRaises(ConfigError) as e:
            parse_config(data)
        self.assertEqual(e.exception.key, key)

    def test_none_by_default(self) -> None:
        self.assertEqual(parse_config(minimal()).dns.secondaries, ())

    def test_every_key_read(self) -> None:
        (found,) = parse_config(with_secondaries(secondary())).dns.secondaries
        self.assertEqual(
            (found.address, found.notify_port, found.tsig_name, found.tsig_algorithm, found.check),
            ("192.0.2.53", 5300, "csrproxy-xfr", "hmac-sha256", "192.0.2.53:53"),
        )
        self.assertEqual(found.tsig_secret, bytes(range(32)))
        self.assertNotIn(SECRET, repr(found))

    def test_defaults(self) -> None:
        entry = secondary(notify_port=None, tsig_algorithm=None, check=None, address="2001:db8::1")
        (found,) = parse_config(with_secondaries(entry)).dns.secondaries
        self.assertEqual(
            (found.notify_port, found.tsig_algorithm, found.check),
            (53, "hmac-sha256", "[2001:db8::1]:53"),
        )
        self.assertEqual(found.address, "2001:db8::1")

    def test_check_defaults_to_the_notify_address_and_empty_skips_it(self) -> None:
        (found,) = parse_config(with_secondaries(secondary(check=None))).dns.secondaries
        self.assertEqual(found.check, "192.0.2.53:5300")
        (found,) = parse_config(with_secondaries(secondary(check=""))).dns.secondaries
        self.assertIsNone(found.check)

    def test_check_timeout(self) -> None:
        self.assertEqual(parse_config(minimal()).dns.check_timeout, 60.0)
        data = minimal()
        data["dns"]["check_timeout"] = 5
        self.assertEqual(parse_config(data).dns.check_timeout, 5.0)
        data["dns"]["check_timeout"] = 0
        self.assertKey(data, "dns.check_timeout")

    def test_algorithms_are_the_ones_tsig_signs_with(self) -> None:
        from csrproxy.dns.tsig import ALGORITHMS

        self.assertEqual(set(TSIG_ALGORITHMS), set(ALGORITHMS))

    def test_missing_keys(self) -> None:
        for key in ("address", "tsig_name", "tsig_secret"):
            self.assertKey(with_secondaries(secondary(**{key: None})), f"dns.secondaries[0].{key}")

    def test_bad_values_name_their_key(self) -> None:
        for key, value in [
            ("address", "ns2.example.test"),
            ("address", 53),
            ("notify_port", 0),
            ("notify_port", 65536),
            ("tsig_name", ""),
            ("tsig_name", "a" * 64 + ".test"),
            ("tsig_algorithm", "hmac-md5"),
            ("tsig_algorithm", "rsa"),
            ("tsig_secret", "not base64!"),
            ("tsig_secret", "c2hvcnQ="),  # 5 bytes
            ("check", "192.0.2.53"),
            ("check", "192.0.2.53:99999"),
            ("chekc", "x"),
        ]:
            self.assertKey(
                with_secondaries(secondary(), secondary(**{key: value})),
                f"dns.secondaries[1].{key}",
            )

    def test_not_tables(self) -> None:
        data = minimal()
        data["dns"]["secondaries"] = ["192.0.2.53"]
        self.assertKey(data, "dns.secondaries")
        self.assertKey(with_secondaries(*[secondary()] * 33), "dns.secondaries")
