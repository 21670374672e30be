"""The ledger's certificate ids and its rule of what counts as an installation's activity."""

from __future__ import annotations

import hashlib
import hmac
import shutil
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
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

NAME = "x.go.example.test"


class InlineStore:
    """The store's ``db`` and ``run``, run at once on the caller's thread (no store thread)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def run(self, method: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(method(*args, **kwargs))
        except Exception:
            return fail()


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
    def test_hmac_of_the_request_key_in_32_hex_characters(self) -> None:
        secret = bytes(range(32))
        cid = CertificateIds(secret).of("rk")
        self.assertEqual(len(cid), 32)
        self.assertRegex(cid, r"^[0-9a-f]{32}$")
        mac = hmac.new(secret, b"rk", hashlib.sha256).digest()[:16]
        self.assertEqual(cid, mac.hex())
        self.assertEqual(CertificateIds(secret).of("rk"), cid, "stable")
        self.assertNotEqual(CertificateIds(bytes(32)).of("rk"), cid, "keyed")
        self.assertNotEqual(CertificateIds(secret).of("rk2"), cid)

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
        self.row = self.ledger.latest[self.csr.request_key]

    def stored(self) -> tuple[float, str | None]:
        row = self.db.certificate("leaf")
        assert row is not None
        return row.last_requested, row.signed_by

    def test_found_by_its_id_only(self) -> None:
        cid = self.ledger.certificate_id(self.csr.request_key)
        self.assertIs(self.ledger.newest(cid), self.row)
        self.assertIsNone(self.ledger.newest(self.csr.request_key))

    def test_sign_counts_and_records_the_signer(self) -> None:
        self.ledger.signed(self.csr.request_key, 20.0, "token:a")
        self.assertEqual((self.row.last_requested, self.row.signed_by), (20.0, "token:a"))
        self.assertEqual(self.stored(), (20.0, "token:a"))

    def test_read_by_the_signer_counts_by_another_token_not(self) -> None:
        key = self.csr.request_key
        self.ledger.signed(key, 20.0, "token:a")
        self.assertFalse(self.ledger.read(key, 30.0, "token:b"))
        self.assertEqual(self.row.last_requested, 20.0)
        self.assertEqual(self.stored(), (20.0, "token:a"))
        self.assertTrue(self.ledger.read(key, 40.0, "token:a"))
        self.assertEqual(self.row.last_requested, 40.0)
        self.assertEqual(self.stored(), (40.0, "token:a"))

    def test_without_tokens_any_read_counts(self) -> None:
        self.row.signed_by = "token:a"  # signed while tokens were configured
        self.assertTrue(self.ledger.read(self.csr.request_key, 30.0, None))
        self.assertEqual(self.row.last_requested, 30.0)

    def test_with_tokens_no_signer_on_record_does_not_count(self) -> None:
        self.assertFalse(self.ledger.read(self.csr.request_key, 30.0, "token:a"))
        self.assertEqual(self.stored(), (10.0, None))

    def test_unknown_request_key(self) -> None:
        self.ledger.signed("nope", 1.0, None)
        self.assertFalse(self.ledger.read("nope", 1.0, None))


class LoadedOrderRecordTests(SynchronousTestCase):
    """Orders of an earlier run keep what a token's scope is checked against."""

    def test_names_key_label_and_request_key_of_finished_orders(self) -> None:
        from twisted.internet.task import Clock

        from csrproxy.issuance.orders import OrderBook
        from csrproxy.issuance.recovery import load_order_records

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
        book = OrderBook(Clock(), lambda f: {})
        load_order_records(ledger, book)
        valid, failed = book.get("valid"), book.get("failed")
        assert valid is not None and failed is not None
        self.assertEqual(
            (valid.status, valid.names, valid.key_label, valid.request_key),
            ("valid", (NAME,), csr.key_label, csr.request_key),
        )
        self.assertEqual((failed.status, failed.key_label), ("invalid", csr.key_label))
