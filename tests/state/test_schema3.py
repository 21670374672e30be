"""Schema 3: what a database of schema 2 becomes, and the indexes every per-pass query uses."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.state.database import StateDB
from csrproxy.state.schema import MIGRATIONS

DAY = 86400.0


def plan(db: StateDB, sql: object, *args: object) -> str:
    return " | ".join(r[3] for r in db.conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))


class MigrationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())

    def test_a_schema_2_database_is_carried_over(self) -> None:
        path = self.dir / "v2.sqlite3"
        old = sqlite3.connect(path)
        old.executescript(MIGRATIONS[0] + MIGRATIONS[1] + "\nPRAGMA user_version = 2;")
        insert = (
            "INSERT INTO certificates (id, request_key, csr, names, spki_sha256, chain, "
            "not_before, not_after, created, last_requested) VALUES (?, ?, x'00', ?, 's', 'P', "
            "?, ?, 1, 1)"
        )
        names = json.dumps(["b.go.example.test", "a.go.example.test"])
        old.execute(insert, ("old", "rk", names, 0.0, 90 * DAY))
        old.execute(insert, ("new", "rk", names, 60 * DAY, 150 * DAY))
        old.execute(insert, ("other", "rk2", names, 0.0, 90 * DAY))
        order = (
            "INSERT INTO orders (id, request_key, csr, names, status, certificate_id, created, "
            "updated) VALUES (?, 'rk', x'00', '[]', ?, ?, 1, 1)"
        )
        old.execute(order, ("done", "valid", "new"))
        old.execute(order, ("downloading", "valid", None))
        old.execute(order, ("failed", "invalid", None))
        old.commit()
        old.close()

        db = StateDB(path)
        self.addCleanup(db.close)
        self.assertEqual(db.version, len(MIGRATIONS))
        old_row, new_row = db.certificate("old"), db.certificate("new")
        assert old_row is not None and new_row is not None
        self.assertIsNotNone(old_row.superseded)
        self.assertIsNone(new_row.superseded)
        self.assertEqual(new_row.names_key, "a.go.example.test,b.go.example.test")
        self.assertIsNone(new_row.renew_at, "left to the renewal pass")
        self.assertEqual(db.schedule_unscheduled(3600.0, 100), 2)  # "new" and "other"
        new_row, old_row = db.certificate("new"), db.certificate("old")
        assert new_row is not None and old_row is not None
        assert new_row.renew_at is not None and new_row.ari_next is not None
        self.assertTrue(120 * DAY <= new_row.renew_at <= 127.5 * DAY, new_row.renew_at / DAY)
        self.assertIsNone(old_row.renew_at, "a superseded certificate is never renewed")
        self.assertEqual(db.current_certificate("rk").id, "new")  # type: ignore[union-attr]
        self.assertEqual([o.id for o in db.unfinished_orders()], ["downloading"])
        self.assertEqual(db.order("done").status, "issued")  # type: ignore[union-attr]
        self.assertTrue(db.names_issued(["a.go.example.test", "b.go.example.test"]))
        self.assertFalse(db.names_issued(["a.go.example.test"]))

    def test_a_new_database_gives_pages_back(self) -> None:
        db = StateDB(self.dir / "new.sqlite3")
        self.addCleanup(db.close)
        self.assertEqual(db.conn.execute("PRAGMA auto_vacuum").fetchone()[0], 2)


class IndexTests(SynchronousTestCase):
    """What is due, what to ask ARI for, unfinished orders, a certificate by id or request
    key, names issued before: each found by an index search, never a scan of the table."""

    def setUp(self) -> None:
        self.db = StateDB(Path(tempfile.mkdtemp()) / "s.sqlite3")
        self.addCleanup(self.db.close)

    def test_every_per_request_and_per_pass_query_searches_an_index(self) -> None:
        queries = {
            "certificates_due": (
                "SELECT * FROM certificates WHERE renew_at <= ? AND superseded IS NULL AND "
                "revoked IS NULL AND dormant = 0 ORDER BY renew_at LIMIT 200",
                1.0,
            ),
            "certificates_ari_due": (
                "SELECT id FROM certificates WHERE ari_next <= ? AND superseded IS NULL AND "
                "revoked IS NULL AND dormant = 0 ORDER BY ari_next LIMIT 20",
                1.0,
            ),
            "certificates_by_names": (
                "SELECT 1 FROM certificates WHERE names_key = ? LIMIT 1",
                "a",
            ),
            "orders_unfinished": (
                "SELECT * FROM orders WHERE status IN ('new', 'pending', 'ready', 'processing', "
                "'valid') AND created > -1 ORDER BY created LIMIT 10",
            ),
        }
        for index, (sql, *args) in queries.items():
            got = plan(self.db, sql, *args)
            self.assertIn("SEARCH", got, sql)
            self.assertIn(index, got, sql)
            self.assertNotIn("TEMP B-TREE", got, sql)

    def test_the_due_query_reads_only_due_rows(self) -> None:
        from tests.support.renewals import add_certificates

        add_certificates(self.db, 5000, prefix="later", renew_at=80 * DAY)
        add_certificates(self.db, 2, prefix="due", renew_at=1.0, last_requested=1.0)
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        def cost(run: object) -> int:
            steps[0] = 0
            self.db.sqlite.set_progress_handler(count, 100)
            try:
                assert callable(run)
                run()
            finally:
                self.db.sqlite.set_progress_handler(None, 0)
            return steps[0]

        due = cost(
            lambda: self.assertEqual(
                sorted(r.id for r in self.db.due_certificates(10.0, 200)), ["due0", "due1"]
            )
        )
        scan = cost(
            lambda: self.db.conn.execute(
                "SELECT count(*) FROM certificates WHERE last_requested + 0 = 1.0"
            ).fetchall()
        )
        self.assertLess(due, 5, f"{due} hundred VM steps for 2 due rows")
        self.assertGreater(scan, 100, "the measure cannot tell a scan")


class StatementIndexTests(SynchronousTestCase):
    """The statements the code runs (traced, with their bound values), not copies of them:
    a bound parameter where a partial index needs a literal makes SQLite scan."""

    def setUp(self) -> None:
        self.db = StateDB(Path(tempfile.mkdtemp()) / "s.sqlite3")
        self.addCleanup(self.db.close)

    def traced(self, run: object) -> list[tuple[str, tuple[object, ...]]]:
        conn = self.db.sqlite
        seen: list[tuple[str, tuple[object, ...]]] = []

        class Recording:
            def execute(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
                seen.append((sql, tuple(args)))
                return conn.execute(sql, args)

        self.db.conn = Recording()  # type: ignore[assignment]
        try:
            assert callable(run)
            run()
        finally:
            self.db.conn = conn
        return [(q, a) for q, a in seen if q.lstrip().upper().startswith("SELECT")]

    def test_each_read_of_a_request_or_a_pass_searches_an_index(self) -> None:
        calls = {
            "unfinished_orders": lambda: self.db.unfinished_orders(),
            "due_certificates": lambda: self.db.due_certificates(1.0, 200),
            "ari_due": lambda: self.db.ari_due(1.0, 20),
            "sign_lookup": lambda: self.db.sign_lookup("ab" * 32, ["a.go.example.test"]),
            "current_by_key_prefix": lambda: self.db.current_by_key_prefix("ab" * 16),
        }
        for what, run in calls.items():
            statements = self.traced(run)
            self.assertTrue(statements, what)
            for sql, args in statements:
                got = plan(self.db, sql, *args)
                self.assertIn("SEARCH", got, (what, sql))
                self.assertNotIn("SCAN", got, (what, sql))
