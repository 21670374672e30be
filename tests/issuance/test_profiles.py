"""A request's own certificate profile: asked of the CA, kept, asked again on renewal."""

from __future__ import annotations

from csrproxy.errors import ProfileNotAllowed
from csrproxy.issuance.csr import check_csr
from tests.support.fakeacme import Faults
from tests.support.issuers import FakeCAIssuerCase, issue_now
from tests.support.keys import make_csr

ZONE = "go.example.test"


class ProfileTests(FakeCAIssuerCase):
    def configure(self, faults: Faults) -> None:
        faults.profiles = ("classic", "shortlived")

    def test_the_requested_profile_is_ordered_kept_and_renewed_with(self) -> None:
        plain = check_csr(make_csr([f"p.{ZONE}"]))
        short = plain.with_profile("shortlived")
        self.assertNotEqual(short.request_key, plain.request_key, "another request")
        self.assertEqual(plain.with_profile(None).request_key, plain.request_key)
        self.assertIsInstance(self.drive(issue_now(self.issuer, short, "c").chain), str)
        self.assertEqual(self.ca.order_payloads[-1]["profile"], "shortlived")
        row = self.successResultOf(self.issuer.ledger.current(short.request_key))
        assert row is not None
        self.assertEqual(row.profile, "shortlived")
        self.assertIsInstance(self.drive(self.issuer.renew(row).chain), str)
        self.assertEqual(self.ca.order_payloads[-1]["profile"], "shortlived")
        renewed = self.successResultOf(self.issuer.ledger.current(short.request_key))
        assert renewed is not None
        self.assertEqual((renewed.profile, renewed.request_key), ("shortlived", row.request_key))
        # Without one, the configured profile (none here) as before.
        self.drive(issue_now(self.issuer, plain, "c").chain)
        self.assertNotIn("profile", self.ca.order_payloads[-1])

    def test_a_profile_the_ca_does_not_offer_places_no_order(self) -> None:
        csr = check_csr(make_csr([f"q.{ZONE}"])).with_profile("tlsserver")
        # Before the directory is known, newOrder refuses to go without it.
        failure = self.drive(issue_now(self.issuer, csr, "c").chain)
        self.assertTrue(failure.check(ProfileNotAllowed), failure)
        self.assertEqual(self.ca.requests["newOrder"], 0)
        self.assertIn("shortlived", failure.value.detail)
        # Once it is, the request is refused before any budget or order.
        failure = self.drive(self.issuer.issue(csr, "c").addCallback(lambda i: i.chain))
        self.assertTrue(failure.check(ProfileNotAllowed), failure)
        self.assertEqual(self.ca.requests["newOrder"], 0)
