"""The state database: schema, migrations, file modes, failures turned into 503."""

from __future__ import annotations

import os
import sqlite3
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from csrproxy.errors import ConfigError
from csrproxy.statedb import MIGRATIONS, CertificateRow, OrderRow, StateDB
from csrproxy.store import StateDir, Store, StoreUnavailable


def cert(request_key: str = "rk", not_after: float = 2e9, cid: str = "c1") -> CertificateRow:
    return CertificateRow(
        id=cid,
        request_key=request_key,
        csr=b"csr",
        names=["a.go.example.test"],
        spki_sha256="ab",
        chain="PEM",
        not_before=1e9,
        not_after=not_after,
    )


class StateDBTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir))
        self.state = StateDir(self.dir / "state")
        self.state.prepare()
        self.db = self.state.open_db()
        self.addCleanup(self.db.close)

    def test_modes_wal_and_version(self) -> None:
        self.assertEqual(stat.S_IMODE(os.stat(self.state.path).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.db.path).st_mode), 0o600)
        mode = self.db.conn.execute("PRAGMA journal_mode").fetchone()[0]
        self.assertEqual(mode, "wal")
        self.assertEqual(self.db.conn.execute("PRAGMA synchronous").fetchone()[0], 2)
        self.assertEqual(self.db.version, len(MIGRATIONS))

    def test_reopen_keeps_everything(self) -> None:
        self.db.save_account("https://ca/dir", "https://ca/acct/1", "account.key")
        self.db.save_order(OrderRow("o1", "rk", b"csr", ["a.go.example.test"]))
        self.db.update_order("o1", status="pending", acme_url="https://ca/order/1")
        self.db.save_certificate(cert())
        self.db.add_challenge("o1", "_acme-challenge.a.go.example.test", "v1", "builtin")
        self.db.close()
        again = self.state.open_db()
        self.addCleanup(again.close)
        self.assertEqual(again.account("https://ca/dir")["url"], "https://ca/acct/1")  # type: ignore[index]
        [order] = again.orders(["pending"])
        self.assertEqual(
            (order.id, order.acme_url, order.names),
            ("o1", "https://ca/order/1", ["a.go.example.test"]),
        )
        self.assertEqual(again.newest_certificate("rk").chain, "PEM")  # type: ignore[union-attr]
        [ch] = again.challenges()
        self.assertEqual(
            (ch.name, ch.value, ch.backend), ("_acme-challenge.a.go.example.test", "v1", "builtin")
        )

    def test_newest_certificate_wins_and_revoked_ones_are_skipped(self) -> None:
        self.db.save_certificate(cert(not_after=1.5e9, cid="old"))
        self.db.save_certificate(cert(not_after=2.5e9, cid="new"))
        self.assertEqual(self.db.newest_certificate("rk").id, "new")  # type: ignore[union-attr]
        self.db.mark_revoked("new", 1)
        self.assertEqual(self.db.newest_certificate("rk").id, "old")  # type: ignore[union-attr]

    def test_challenge_rows_are_a_multiset(self) -> None:
        for _ in range(2):
            self.db.add_challenge("o1", "n", "v", "builtin")
        self.db.remove_challenge("n", "v")
        self.assertEqual(len(self.db.challenges()), 1)

    def test_newer_schema_is_refused(self) -> None:
        self.db.conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
        with self.assertRaises(RuntimeError):
            self.db.migrate()

    def test_group_readable_account_key_is_refused(self) -> None:
        self.state.write_account_key(b"KEY")
        self.assertEqual(stat.S_IMODE(os.stat(self.state.path / "account.key").st_mode), 0o600)
        os.chmod(self.state.path / "account.key", 0o640)
        with self.assertRaises(ConfigError):
            self.state.read_account_key()


class StoreThreadTests(TestCase):
    """The store runs on its own thread and turns write failures into StoreUnavailable."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.dir = Path(tempfile.mkdtemp())
        self.state = StateDir(self.dir / "state")
        self.state.prepare()
        self.store = Store(reactor, self.state.open_db())
        self.store.start()
        self.addCleanup(self.store.stop)

    @defer.inlineCallbacks
    def test_write_then_read(self) -> Any:
        yield self.store.run(self.store.db.save_order, OrderRow("o1", "rk", b"c", ["a.x.test"]))
        row = yield self.store.run(self.store.db.order, "o1")
        self.assertEqual(row.names, ["a.x.test"])

    @defer.inlineCallbacks
    def test_injected_write_failure_is_503_and_nothing_half_written(self) -> Any:
        def failing(order: OrderRow) -> None:
            with self.store.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO orders (id, request_key, csr, names, status, created, updated) "
                    "VALUES ('half', 'rk', x'00', '[]', 'new', 0, 0)"
                )
                raise sqlite3.OperationalError("database or disk is full")

        with self.assertRaises(StoreUnavailable) as e:
            yield self.store.run(failing, OrderRow("o1", "rk", b"c", []))
        self.assertEqual(e.exception.status, 503)
        self.assertFalse(self.store.healthy)
        row = yield self.store.run(self.store.db.order, "half")
        self.assertIsNone(row, "the failed transaction left a row behind")
        yield self.store.run(self.store.db.save_order, OrderRow("o2", "rk", b"c", []))
        self.assertTrue(self.store.healthy)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_a_config_error() -> None:
    d = Path(tempfile.mkdtemp())
    os.chmod(d, 0o500)
    with pytest.raises(ConfigError):
        StateDir(d / "state").prepare()


def test_read_only_database_is_store_unavailable(tmp_path: Path) -> None:
    """A database that turned read-only (a remount, a full disk) fails writes cleanly."""
    state = StateDir(tmp_path / "state")
    state.prepare()
    db = state.open_db()
    db.close()
    ro = StateDB.__new__(StateDB)
    ro.path = db.path
    ro.conn = sqlite3.connect(f"file:{db.path}?mode=ro", uri=True, check_same_thread=False)
    with pytest.raises(sqlite3.OperationalError):
        ro.save_order(OrderRow("o1", "rk", b"c", []))
    ro.conn.close()
