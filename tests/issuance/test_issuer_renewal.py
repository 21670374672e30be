"""The issuer renews from the stored CSR, with ARI replaces, keeping the activity clock."""

from __future__ import annotations

from cryptography import x509
from twisted.python.failure import Failure

from csrproxy.acme.certs import ari_cert_id
from csrproxy.issuance.admission import Admission, Budgets
from csrproxy.issuance.csr import check_csr
from tests.support.fakeacme import Faults
from tests.support.issuers import FakeCAIssuerCase, issue_now
from tests.support.keys import make_csr

ZONE = "go.example.test"


class IssuerRenewalTests(FakeCAIssuerCase):
    def configure(self, faults: Faults) -> None:
        faults.ari = True

    def test_renewal_replaces_the_old_certificate(self) -> None:
        csr = check_csr(make_csr([f"r.{ZONE}"]))
        first = self.drive(issue_now(self.issuer, csr, "client").chain)
        old_leaf = x509.load_pem_x509_certificates(first.encode())[0]
        row = self.successResultOf(self.issuer.ledger.current(csr.request_key))
        assert row is not None
        row.last_requested = 1234.0  # the installation last asked long ago
        row.signed_by = "token:a"
        cid = self.issuer.ledger.certificate_id(csr.request_key)
        second = self.drive(self.issuer.renew(row).chain)
        self.assertIsInstance(second, str, second)
        self.assertNotEqual(second, first)
        self.assertEqual(self.ca.order_payloads[-1]["replaces"], ari_cert_id(old_leaf))
        newest = self.successResultOf(self.issuer.ledger.current(csr.request_key))
        assert newest is not None
        self.assertEqual(newest.chain, second)
        self.assertEqual(newest.last_requested, 1234.0, "a renewal counted as activity")
        self.assertEqual(newest.signed_by, "token:a", "the installation's token is kept")
        self.assertIs(
            self.successResultOf(self.issuer.ledger.newest(cid)),
            newest,
            "the same id serves the renewal",
        )
        # The same CSR posted again gets the renewed chain from the cache, no order.
        orders = self.ca.requests["newOrder"]
        self.assertEqual(self.drive(issue_now(self.issuer, csr, "client").chain), second)
        self.assertEqual(self.ca.requests["newOrder"], orders)

    def test_no_replaces_for_an_expired_or_already_replaced_certificate(self) -> None:
        # Let's Encrypt refuses such orders: they go as ordinary orders of the same names.
        for change in ("expired", "superseded"):
            row = self.issued(f"{change}.{ZONE}")
            if change == "expired":
                row.not_after = self.clock.seconds()
            else:
                row.superseded = self.clock.seconds()
            self.assertIsInstance(self.drive(self.issuer.renew(row).chain), str)
            self.assertNotIn("replaces", self.ca.order_payloads[-1], change)

    def test_a_stored_csr_that_no_longer_passes_fails(self) -> None:
        row = self.issued(f"r.{ZONE}")
        row.csr = b"garbage"
        with self.assertRaises(Exception):  # noqa: B017  (the CSR's own error)
            self.issuer.renew(row)


class RenewalBudgetTests(FakeCAIssuerCase):
    """As Let's Encrypt applies its limits: an ARI renewal pays none of them."""

    def configure(self, faults: Faults) -> None:
        faults.ari = True

    def admission(self) -> Admission:
        # One order, one certificate per set of names, one new certificate per domain.
        self.budgets = Admission(self.clock.seconds, Budgets(1, 1, 1, 0, 5, 1152))
        return self.budgets

    def test_an_ari_renewal_is_placed_with_every_budget_spent(self) -> None:
        csr = check_csr(make_csr([f"r.{ZONE}"]))
        self.drive(issue_now(self.issuer, csr, "client").chain)
        refused = self.drive(issue_now(self.issuer, check_csr(make_csr([f"s.{ZONE}"])), "c").chain)
        self.assertIsInstance(refused, Failure)
        self.assertEqual(refused.value.reason, "orders")
        for _ in range(2):
            row = self.successResultOf(self.issuer.ledger.current(csr.request_key))
            assert row is not None
            renewed = self.drive(self.issuer.renew(row).chain)
            self.assertIsInstance(renewed, str, renewed)
            self.assertIn("replaces", self.ca.order_payloads[-1])
