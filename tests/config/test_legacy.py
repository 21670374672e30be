"""The original csr_proxy's environment variables configure csrproxy alike."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.config import config_from_environment, uses_legacy_environment
from csrproxy.errors import ConfigError

ENV = {
    "CSR_PROXY_ACME_DIRECTORY": "https://127.0.0.1:14000/dir",
    "CSR_PROXY_EMAIL": "admin@go.example.test",
    "CSR_PROXY_SUBJ": "CN=go.example.test",
    "CSR_PROXY_PDNS_API_URL": "http://127.0.0.1:8081",
    "CSR_PROXY_PDNS_API_KEY": "secret",
    "CSR_PROXY_API_HOST": "127.0.0.1",
    "CSR_PROXY_API_PORT": "8001",
    "CSR_PROXY_STATE_PATH": "/var/lib/csr-proxy/state.json",
}


class LegacyTests(SynchronousTestCase):
    def test_mapping(self) -> None:
        self.assertTrue(uses_legacy_environment(ENV))
        self.assertFalse(uses_legacy_environment({"HOME": "/root"}))
        c = config_from_environment(ENV)
        self.assertEqual(c.acme.directory, "https://127.0.0.1:14000/dir")
        self.assertEqual(c.acme.contact, ("mailto:admin@go.example.test",))
        self.assertEqual(c.api.listen, ("tcp:8001:interface=127.0.0.1",))
        self.assertEqual(c.dns.backend, "powerdns")
        self.assertEqual(c.dns.listen, ())
        assert c.dns.powerdns is not None
        self.assertEqual(c.dns.powerdns.api_url, "http://127.0.0.1:8081")
        self.assertEqual(c.dns.powerdns.zone, "go.example.test")
        self.assertFalse(c.dns.powerdns.check_propagation)
        self.assertNotIn("secret", repr(c))
        self.assertEqual(c.policy.subject, "CN=go.example.test")
        self.assertEqual(c.policy.names, ("go.example.test",))
        self.assertEqual(c.state.dir, "/var/lib/csr-proxy/csrproxy")

    def test_eab(self) -> None:
        env = ENV | {"CSR_PROXY_EAB_KID": "kid", "CSR_PROXY_EAB_HMAC": "aGVsbG8"}
        c = config_from_environment(env)
        self.assertEqual((c.acme.eab_kid, c.acme.eab_hmac_key), ("kid", "aGVsbG8"))

    def test_errors_name_the_variable(self) -> None:
        for env, key in (
            (ENV | {"CSR_PROXY_SUBJ": "O=x"}, "CSR_PROXY_SUBJ"),
            (
                {k: v for k, v in ENV.items() if k != "CSR_PROXY_PDNS_API_URL"},
                "CSR_PROXY_PDNS_API_URL",
            ),
            (ENV | {"CSR_PROXY_API_PORT": "http"}, "CSR_PROXY_API_PORT"),
            (ENV | {"CSR_PROXY_TYPO": "1"}, "CSR_PROXY_TYPO"),
        ):
            with self.assertRaises(ConfigError) as e:
                config_from_environment(env)
            self.assertEqual(e.exception.key, key)
