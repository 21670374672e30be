"""The state database: schema, migrations, file modes, failures turned into 503."""

from __future__ import annotations

import collections
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
from csrproxy.state.database import CertificateRow, OrderRow, StateDB
from csrproxy.state.engine import SQLITE
from csrproxy.state.schema import MIGRATIONS
from csrproxy.state.store import StateDir, Store, StoreUnavailable


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

    def test_certificate_issued_saves_and_ends_the_order_at_once(self) -> None:
        self.db.save_order(OrderRow("o1", "rk", b"csr", ["a.go.example.test"]))
        self.db.certificate_issued(cert(cid="c1"), "o1")
        self.assertEqual(self.db.unfinished_orders(), [], "an issued order has ended")
        [order] = self.db.orders(["issued"])
        self.assertEqual((order.id, order.certificate_id), ("o1", "c1"))
        self.assertEqual(self.db.newest_certificate("rk").id, "c1")  # type: ignore[union-attr]

    def test_certificate_issued_is_all_or_nothing(self) -> None:
        self.db.save_order(OrderRow("o1", "rk", b"csr", ["a.go.example.test"]))
        bad = cert(cid="c1")
        bad.chain = None  # type: ignore[assignment]  # NOT NULL: the insert fails
        with self.assertRaises(sqlite3.IntegrityError):
            self.db.certificate_issued(bad, "o1")
        self.assertEqual(self.db.orders(["valid"]), [])

    def test_forgotten_challenges_go_with_the_next_write(self) -> None:
        self.db.add_challenge("o1", "n", "v", "builtin")
        self.db.add_challenge("o1", "n", "w", "builtin")
        self.db.forget_challenge_later("n", "v")
        self.assertEqual(len(self.db.challenges()), 2, "not before a write")
        self.db.save_order(OrderRow("o2", "rk", b"csr", []))
        self.assertEqual([c.value for c in self.db.challenges()], ["w"])

    def test_forgotten_challenges_survive_a_failed_write(self) -> None:
        self.db.add_challenge("o1", "n", "v", "builtin")
        self.db.forget_challenge_later("n", "v")
        with self.assertRaises(ValueError), self.db.transaction():
            raise ValueError("boom")
        self.assertEqual(len(self.db.challenges()), 1, "rolled back with the write")
        self.db.flush_removals()
        self.assertEqual(self.db.challenges(), [])

    def test_newer_schema_is_refused(self) -> None:
        self.db.conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
        with self.assertRaises(RuntimeError):
            self.db.migrate()

    def test_secret_is_made_once_kept_and_shared(self) -> None:
        self.assertIsNone(self.db.existing_secret("certificate-id"))
        secret = self.db.secret("certificate-id")
        self.assertEqual(len(secret), 32)
        self.assertEqual(self.db.secret("certificate-id"), secret)
        self.assertNotEqual(self.db.secret("other"), secret)
        # Another instance on the same database, and a restart: the same secret.
        other = self.state.open_db()
        self.addCleanup(other.close)
        self.assertEqual(other.secret("certificate-id"), secret)
        self.db.close()
        again = self.state.open_db()
        self.addCleanup(again.close)
        self.assertEqual(again.existing_secret("certificate-id"), secret)

    def test_certificate_signed_records_when_and_by_whom(self) -> None:
        self.db.save_certificate(cert())
        self.assertIsNone(self.db.certificate("c1").signed_by)  # type: ignore[union-attr]
        self.db.certificate_signed(cert().request_key, 5.0, "token:abc")
        row = self.db.certificate("c1")
        assert row is not None
        self.assertEqual((row.last_requested, row.signed_by), (5.0, "token:abc"))

    def test_version_1_database_is_migrated_in_place(self) -> None:
        path = self.dir / "v1.sqlite3"
        old = sqlite3.connect(path)
        old.executescript(MIGRATIONS[0] + "\nPRAGMA user_version = 1;")
        old.execute(
            "INSERT INTO certificates (id, request_key, csr, names, spki_sha256, chain, "
            "not_before, not_after, created, last_requested) VALUES "
            "('c1', 'rk', x'00', '[\"a.go.example.test\"]', 'ab', 'PEM', 1, 2, 3, 4)"
        )
        old.commit()
        old.close()
        db = StateDB(path)
        self.addCleanup(db.close)
        self.assertEqual(db.version, len(MIGRATIONS))
        row = db.certificate("c1")
        assert row is not None
        self.assertEqual((row.request_key, row.last_requested, row.signed_by), ("rk", 4.0, None))
        self.assertEqual(len(db.secret("certificate-id")), 32)

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
        self.assertFalse(self.store.healthy, "a read that worked is no sign of a writable disk")
        yield self.store.run(self.store.db.save_order, OrderRow("o2", "rk", b"c", []))
        self.assertTrue(self.store.healthy)

    @defer.inlineCallbacks
    def test_the_probe_write_makes_it_healthy_again(self) -> Any:
        def failing() -> None:
            raise sqlite3.OperationalError("database or disk is full")

        with self.assertRaises(StoreUnavailable):
            yield self.store.run(failing)
        yield self.store.run(self.store.db.unfinished_orders)
        self.assertFalse(self.store.healthy)
        yield self.store.run(self.store.db.probe_write)
        self.assertTrue(self.store.healthy)

    @defer.inlineCallbacks
    def test_unpublished_challenge_is_forgotten_with_the_next_write(self) -> Any:
        from csrproxy.issuance.ledger import Ledger

        class Inner:
            def publish(self, identifier: str, value: str) -> defer.Deferred[None]:
                return defer.succeed(None)

            unpublish = publish

        responder = Ledger(self.store).responder(Inner(), "o1")
        yield responder.publish("a.go.example.test", "v")
        rows = yield self.store.run(self.store.db.challenges)
        self.assertEqual([r.name for r in rows], ["_acme-challenge.a.go.example.test"])
        yield responder.unpublish("a.go.example.test", "v")
        rows = yield self.store.run(self.store.db.challenges)
        self.assertEqual(len(rows), 1, "kept until the next write")
        yield self.store.run(self.store.db.save_order, OrderRow("o1", "rk", b"c", []))
        rows = yield self.store.run(self.store.db.challenges)
        self.assertEqual(rows, [])

    @defer.inlineCallbacks
    def test_calls_made_while_busy_commit_together_each_on_its_own(self) -> Any:
        batches: list[int] = []
        real = self.store.db.batch

        def batch(calls: Any) -> Any:
            batches.append(len(calls))
            return real(calls)

        self.store.db.batch = batch  # type: ignore[method-assign]
        db = self.store.db
        first = self.store.run(db.save_order, OrderRow("o1", "rk", b"c", []))
        second = self.store.run(db.save_order, OrderRow("o2", "rk", b"c", []))
        bad = self.store.run(db.update_order, "o2", nonsense=1)
        third = self.store.run(db.update_order, "o2", status="pending")
        yield first
        yield second
        with self.assertRaises(ValueError):
            yield bad
        yield third
        self.assertEqual(batches, [3])
        rows = yield self.store.run(db.orders, None)
        self.assertEqual(sorted((r.id, r.status) for r in rows), [("o1", "new"), ("o2", "pending")])

    @defer.inlineCallbacks
    def test_a_call_run_alone_is_never_grouped(self) -> Any:
        groups: list[list[str]] = []
        real = self.store.db.batch

        def batch(calls: Any) -> Any:
            groups.append([args[0].id for _, args, _ in calls])
            return real(calls)

        self.store.db.batch = batch  # type: ignore[method-assign]
        db = self.store.db
        ran: list[str] = []

        def alone(order: OrderRow) -> None:
            ran.append(order.id)
            db.save_order(order)

        waits = [self.store.run(db.save_order, OrderRow("o0", "rk", b"c", []))]  # busy now
        waits += [self.store.run(db.save_order, OrderRow(f"o{i}", "rk", b"c", [])) for i in (1, 2)]
        waits.append(self.store.run_alone(alone, OrderRow("o3", "rk", b"c", [])))
        waits += [self.store.run(db.save_order, OrderRow(f"o{i}", "rk", b"c", [])) for i in (4, 5)]
        yield defer.gatherResults(waits)
        self.assertEqual(groups, [["o1", "o2"], ["o4", "o5"]])
        self.assertEqual(ran, ["o3"])  # between the two groups, on its own

    @defer.inlineCallbacks
    def test_a_failed_write_in_a_batch_leaves_nothing_behind(self) -> Any:
        def failing() -> None:
            with self.store.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO orders (id, request_key, csr, names, status, created, updated) "
                    "VALUES ('half', 'rk', x'00', '[]', 'new', 0, 0)"
                )
                raise sqlite3.OperationalError("database or disk is full")

        db = self.store.db
        first = self.store.run(db.save_order, OrderRow("o1", "rk", b"c", []))
        broken = self.store.run(failing)
        after = self.store.run(db.save_order, OrderRow("o2", "rk", b"c", []))
        yield first
        with self.assertRaises(StoreUnavailable):
            yield broken
        yield after
        rows = yield self.store.run(db.orders, None)
        self.assertEqual(sorted(r.id for r in rows), ["o1", "o2"])

    def test_stop_forgets_what_is_left(self) -> None:
        from twisted.internet import reactor

        store = Store(reactor, _prepared(self.dir / "other").open_db())
        store.start()
        store.db.add_challenge("o1", "n", "v", "builtin")
        store.db.forget_challenge_later("n", "v")
        store.stop()
        again = StateDir(self.dir / "other").open_db()
        self.addCleanup(again.close)
        self.assertEqual(again.challenges(), [])


def _prepared(path: Path) -> StateDir:
    state = StateDir(path)
    state.prepare()
    return state


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
    ro._path = db.path
    ro.where = str(db.path)
    ro.dialect = SQLITE
    ro.instance = ""
    ro.conn = sqlite3.connect(f"file:{db.path}?mode=ro", uri=True, check_same_thread=False)
    ro._removals = collections.deque()
    ro._in_batch = False
    with pytest.raises(sqlite3.OperationalError):
        ro.save_order(OrderRow("o1", "rk", b"c", []))
    ro.conn.close()


def test_probe_write_is_a_write_and_keeps_the_schema(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "s.sqlite3")
    version = db.version
    db.probe_write()
    assert db.version == version
    db.close()
