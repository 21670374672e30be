"""Registered domains by the Public Suffix List, as Let's Encrypt counts them."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.issuance.admission import registered_domain_of
from csrproxy.issuance.domains import identifier_of, registered_domain


class RegisteredDomainTests(SynchronousTestCase):
    def test_icann_and_private_suffixes(self) -> None:
        for name, domain in [
            ("a.b.example.co.uk", "example.co.uk"),
            ("www.example.com", "example.com"),
            ("example.com", "example.com"),
            ("x.github.io", "x.github.io"),  # github.io is in the private section
            ("deep.x.github.io", "x.github.io"),
            ("a1.go.example.test", "example.test"),
            ("*.W.Example.COM.", "example.com"),  # wildcard, case and final dot
            ("xn--80ak6aa92e.com", "xn--80ak6aa92e.com"),
        ]:
            self.assertEqual(registered_domain(name), domain, name)

    def test_addresses(self) -> None:
        self.assertEqual(registered_domain("192.0.2.7"), "192.0.2.7")
        self.assertEqual(registered_domain("2001:db8:1:2:3::4"), "2001:db8:1:2::/64")
        self.assertEqual(registered_domain("2001:DB8:1:2::ffff"), "2001:db8:1:2::/64")

    def test_fallbacks(self) -> None:
        # A public suffix itself counts as itself; an unknown TLD gets the default rule "*".
        self.assertEqual(registered_domain("co.uk"), "co.uk")
        self.assertEqual(registered_domain("github.io"), "github.io")
        self.assertEqual(registered_domain("com"), "com")
        self.assertEqual(registered_domain("a.b.internal"), "b.internal")

    def test_an_explicit_override(self) -> None:
        for name in ("a.go.example.com", "go.example.com", "*.go.example.com"):
            self.assertEqual(registered_domain_of(name, "go.example.com"), "go.example.com")
        self.assertEqual(registered_domain_of("a.b.other.co.uk", "go.example.com"), "other.co.uk")
        self.assertEqual(registered_domain_of("a.b.other.co.uk"), "other.co.uk")

    def test_identifier(self) -> None:
        self.assertEqual(identifier_of(" *.A.Example.com. "), "a.example.com")
