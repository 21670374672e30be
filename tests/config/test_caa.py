"""``[dns] caa`` and ``caa_identities``: on by default, the identity known from the CA."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.config import parse_config
from csrproxy.config.acme import caa_identity
from csrproxy.errors import ConfigError
from tests.config.test_config import ConfigTestCase, minimal


def with_directory(directory: str, **dns: Any) -> dict[str, Any]:
    data = minimal()
    data["acme"]["directory"] = directory
    data["dns"].update(dns)
    return data


class KnownIdentityTests(SynchronousTestCase):
    def test_known_directories(self) -> None:
        for directory, identity in [
            ("https://acme-v02.api.letsencrypt.org/directory", "letsencrypt.org"),
            ("https://acme-staging-v02.api.letsencrypt.org/directory", "letsencrypt.org"),
            ("https://ACME-V02.API.LetsEncrypt.Org./directory", "letsencrypt.org"),
            ("https://acme.zerossl.com/v2/DV90", "sectigo.com"),
            ("https://dv.acme-v02.api.pki.goog/directory", "pki.goog"),
            ("https://api.buypass.com/acme/directory", "buypass.com"),
            ("https://api.test4.buypass.no/acme/directory", None),
        ]:
            self.assertEqual(caa_identity(directory), identity, directory)

    def test_unknown_and_lookalike_hosts(self) -> None:
        for directory in [
            "https://127.0.0.1:14000/dir",  # pebble
            "https://localhost:14000/dir",
            "https://notletsencrypt.org/directory",
            "https://letsencrypt.org.evil.test/directory",
            "https://evil.test/letsencrypt.org/directory",
            "not a url",
        ]:
            self.assertIsNone(caa_identity(directory), directory)


class CAAConfigTests(ConfigTestCase):
    def test_on_by_default_with_the_known_identity(self) -> None:
        config = parse_config(with_directory("https://acme-v02.api.letsencrypt.org/directory"))
        self.assertEqual((config.dns.caa, config.dns.caa_identities), (True, ("letsencrypt.org",)))

    def test_unknown_ca_has_no_identity(self) -> None:
        config = parse_config(minimal())  # https://ca.test/dir
        self.assertEqual((config.dns.caa, config.dns.caa_identities), (True, ()))

    def test_configured_identities_win(self) -> None:
        data = with_directory(
            "https://acme-v02.api.letsencrypt.org/directory",
            caa_identities=["Sectigo.com.", " letsencrypt.org", "sectigo.com"],
        )
        config = parse_config(data)
        self.assertEqual(config.dns.caa_identities, ("sectigo.com", "letsencrypt.org"))

    def test_off(self) -> None:
        config = parse_config(with_directory("https://acme-v02.api.letsencrypt.org/dir", caa=False))
        self.assertFalse(config.dns.caa)

    def test_bad_values_name_their_key(self) -> None:
        for key, value in [
            ("caa", "yes"),
            ("caa", 1),
            ("caa_identities", "letsencrypt.org"),
            ("caa_identities", [1]),
            ("caa_identities", []),
            ("caa_identities", ["lets encrypt"]),
            ("caa_identities", ["letsencrypt.org; accounturi=x"]),
            ("caa_identities", ["-bad.example"]),
            ("caa_identities", ["bad..example"]),
            ("caa_identities", ["xn--bcher-kva.example", "b\u00fccher.example"]),
            ("caa_identities", [f"ca{i}.example" for i in range(9)]),
        ]:
            data = minimal()
            data["dns"][key] = value
            self.assertKey(data, f"dns.{key}")

    def test_empty_list_says_what_to_do(self) -> None:
        data = minimal()
        data["dns"]["caa_identities"] = []
        with self.assertRaises(ConfigError) as e:
            parse_config(data)
        self.assertIn("caa = false", str(e.exception))
