"""The ledger's certificate ids and its rule of what counts as an installation's activity."""

from __future__ import annotations

import hashlib
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.issuance.csr import check_csr
from csrproxy.issuance.ledger import (
    CertificateIds,
    CertificateRow,
    Ledger,
    certificate_key_label,
    order_key_label,
)
from csrproxy.state.database import OrderRow, StateDB
from tests.support.keys import EC256_B, make_csr
from tests.support.renewals import InlineStore

NAME = "x.go.example.test"


def row_for(request_key: str, csr_der: bytes, spki_sha256: str) -> CertificateRow:
    return CertificateRow(
        id="leaf",
        request_key=request_key,
        csr=csr_der,
        names=[NAME],
        spki_sha256=spki_sha256,
        chain="PEM",
        not_before=0.0,
        not_after=1e10,
        last_requested=10.0,
    )


class CertificateIdTests(SynchronousTestCase):
    def test_the_request_key_enciphered_in_32_hex_characters(self) -> None:
        secret = bytes(range(32))
        rk = hashlib.sha256(b"key and names").hexdigest()
        cid = CertificateIds(secret).of(rk)
        self.assertEqual(len(cid), 32)
        self.assertRegex(cid, r"^[0-9a-f]{32}$")
        self.assertNotIn(rk[:32], cid)
        self.assertEqual(CertificateIds(secret).of(rk), cid, "stable")
        self.assertNotEqual(CertificateIds(bytes(32)).of(rk), cid, "keyed")
        other = hashlib.sha256(b"other").hexdigest()
        self.assertNotEqual(CertificateIds(secret).of(other), cid)

    def test_an_id_gives_back_the_request_keys_prefix_only_with_the_secret(self) -> None:
        secret = bytes(range(32))
        rk = hashlib.sha256(b"key and names").hexdigest()
        cid = CertificateIds(secret).of(rk)
        self.assertEqual(CertificateIds(secret).key_prefix(cid), rk[:32])
        self.assertNotEqual(CertificateIds(bytes(32)).key_prefix(cid), rk[:32])
        for bad in ("", "x" * 32, cid.upper(), cid + "0", "-" + cid[1:], rk):
            self.assertIsNone(CertificateIds(secret).key_prefix(bad), bad)

    def test_short_secret_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            CertificateIds(b"short")

    def test_key_labels_from_the_record_match_the_csrs(self) -> None:
        csr = check_csr(make_csr([NAME], EC256_B))
        row = row_for(csr.request_key, csr.der, csr.spki_sha256)
        self.assertEqual(certificate_key_label(row), csr.key_label)
        order = OrderRow("o1", csr.request_key, csr.der, [NAME])
        self.assertEqual(order_key_label(order), csr.key_label)
        self.assertIsNone(order_key_label(OrderRow("o2", "rk", b"junk", [NAME])))


class ActivityRuleTests(SynchronousTestCase):
    """Ledger.signed always counts; Ledger.read only from the installation itself."""

    def setUp(self) -> None:
        self.csr = check_csr(make_csr([NAME], EC256_B))
        path = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, path)
        self.db = StateDB(f"{path}/state.sqlite3")
        self.addCleanup(self.db.close)
        self.db.save_certificate(row_for(self.csr.request_key, self.csr.der, self.csr.spki_sha256))
        self.ledger = Ledger(InlineStore(self.db))  # type: ignore[arg-type]
        self.ledger.load()

    def row(self) -> CertificateRow:
        found = self.successResultOf(self.ledger.current(self.csr.request_key))
        assert found is not None
        return found

    def stored(self) -> tuple[float, str | None]:
        row = self.db.certificate("leaf")
        assert row is not None
        return row.last_requested, row.signed_by

    def test_found_by_its_id_only(self) -> None:
        cid = self.ledger.certificate_id(self.csr.request_key)
        found = self.successResultOf(self.ledger.newest(cid))
        assert found is not None
        self.assertEqual(found.id, "leaf")
        self.assertIsNone(self.successResultOf(self.ledger.newest(self.csr.request_key[:32])))
        self.assertIsNone(self.successResultOf(self.ledger.newest("nope")))

    def test_the_id_outlives_a_new_secret_never(self) -> None:
        cid = self.ledger.certificate_id(self.csr.request_key)
        other = Ledger(InlineStore(self.db))  # type: ignore[arg-type]  # ephemeral ids
        self.assertIsNone(self.successResultOf(other.newest(cid)))

    def test_sign_counts_and_records_the_signer(self) -> None:
        self.ledger.signed(self.csr.request_key, 20.0, "token:a")
        self.assertEqual(self.stored(), (20.0, "token:a"))

    def test_read_by_the_signer_counts_by_another_token_not(self) -> None:
        key = self.csr.request_key
        self.ledger.signed(key, 20.0, "token:a")
        self.assertFalse(self.ledger.read(self.row(), 30.0, "token:b"))
        self.assertEqual(self.stored(), (20.0, "token:a"))
        self.assertTrue(self.ledger.read(self.row(), 40.0, "token:a"))
        self.assertEqual(self.stored(), (40.0, "token:a"))

    def test_without_tokens_any_read_counts(self) -> None:
        self.ledger.signed(self.csr.request_key, 20.0, "token:a")  # tokens were configured
        self.assertTrue(self.ledger.read(self.row(), 30.0, None))
        self.assertEqual(self.stored(), (30.0, "token:a"))

    def test_with_tokens_no_signer_on_record_does_not_count(self) -> None:
        self.assertFalse(self.ledger.read(self.row(), 30.0, "token:a"))
        self.assertEqual(self.stored(), (10.0, None))

    def test_unknown_request_key(self) -> None:
        self.ledger.signed("nope", 1.0, None)
        self.assertIsNone(self.successResultOf(self.ledger.current("nope")))


class EveryInstallationCountsTests(SynchronousTestCase):
    """No in-memory bound: the first installation among many more than any cache holds is
    found by its id and its sign look-up, through the request key's index."""

    def test_the_oldest_of_many_is_still_served(self) -> None:
        from csrproxy.issuance.cache import MemoryIssuedCache
        from tests.support.renewals import add_certificates

        path = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, path)
        db = StateDB(f"{path}/state.sqlite3")
        self.addCleanup(db.close)
        csr = check_csr(make_csr([NAME], EC256_B))
        db.certificate_issued(row_for(csr.request_key, csr.der, csr.spki_sha256), "o1")
        many = MemoryIssuedCache(lambda: 0.0).max_entries * 20
        add_certificates(db, many)
        ledger = Ledger(InlineStore(db))  # type: ignore[arg-type]
        ledger.load()
        found = self.successResultOf(ledger.newest(ledger.certificate_id(csr.request_key)))
        assert found is not None
        self.assertEqual(found.id, "leaf")
        current, before = self.successResultOf(ledger.sign_lookup(csr.request_key, [NAME]))
        assert current is not None
        self.assertEqual((current.id, before), ("leaf", True))
        plan = db.conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM certificates WHERE request_key >= ? "
            "AND request_key < ? AND superseded IS NULL AND revoked IS NULL "
            "ORDER BY not_after DESC LIMIT 1",
            ("a", "b"),
        ).fetchall()
        self.assertIn("USING INDEX certificates_by_request", " ".join(r[3] for r in plan))


class RecordedCertificateTests(SynchronousTestCase):
    """order_valid: the new certificate is current, the one it renews superseded."""

    def test_a_renewal_supersedes_and_keeps_the_installations_signer(self) -> None:
        path = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, path)
        db = StateDB(f"{path}/state.sqlite3")
        self.addCleanup(db.close)
        csr = check_csr(make_csr([NAME], EC256_B))
        first = row_for(csr.request_key, csr.der, csr.spki_sha256)
        first.signed_by = "token:a"
        db.certificate_issued(first, "o1")
        second = row_for(csr.request_key, csr.der, csr.spki_sha256)
        second.id, second.not_after, second.last_requested = "leaf2", 2e10, 99.0
        second.renew_at = 1.0
        db.save_order(OrderRow("o2", csr.request_key, csr.der, [NAME]))
        recorded = db.certificate_issued(second, "o2", renewal=True)
        self.assertEqual((recorded.signed_by, recorded.last_requested), ("token:a", 10.0))
        current = db.current_certificate(csr.request_key)
        assert current is not None
        self.assertEqual(current.id, "leaf2")
        old = db.certificate("leaf")
        assert old is not None
        self.assertIsNotNone(old.superseded)
        self.assertEqual([r.id for r in db.due_certificates(1e11, 10)], ["leaf2"])
        self.assertEqual(db.order("o2").status, "issued")  # type: ignore[union-attr]


class LoadedOrderRecordTests(SynchronousTestCase):
    """Orders of an earlier run keep what a token's scope is checked against."""

    def test_names_key_label_and_request_key_of_finished_orders(self) -> None:
        from twisted.internet.task import Clock

        from csrproxy.issuance.orders import OrderBook
        from csrproxy.issuance.recovery import earlier_orders

        csr = check_csr(make_csr([NAME], EC256_B))
        path = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, path)
        db = StateDB(f"{path}/state.sqlite3")
        self.addCleanup(db.close)
        db.save_order(OrderRow("valid", csr.request_key, csr.der, [NAME]))
        db.certificate_issued(row_for(csr.request_key, csr.der, csr.spki_sha256), "valid")
        db.save_order(OrderRow("failed", csr.request_key, csr.der, [NAME], status="invalid"))
        ledger = Ledger(InlineStore(db))  # type: ignore[arg-type]
        ledger.load()
        book = OrderBook(Clock(), lambda f: {}, earlier=earlier_orders(ledger))
        self.assertEqual(len(book), 0, "nothing is loaded into memory")
        valid = self.successResultOf(book.find("valid"))
        failed = self.successResultOf(book.find("failed"))
        self.assertIsNone(self.successResultOf(book.find("unknown")))
        assert valid is not None and failed is not None
        self.assertEqual(
            (valid.status, valid.names, valid.key_label, valid.request_key),
            ("valid", (NAME,), csr.key_label, csr.request_key),
        )
        self.assertEqual((failed.status, failed.key_label), ("invalid", csr.key_label))
