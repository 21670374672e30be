"""The operator's status page: who may see it, and what it shows (escaped, no assets)."""

from __future__ import annotations

import base64
import time

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.errors import Unauthorized
from csrproxy.state.database import StateDB
from csrproxy.state.rows import CertificateRow, OrderRow
from csrproxy.state.status_queries import DueCertificate, StatusRows, status_rows
from csrproxy.web.auth import parse_tokens, token_hash
from csrproxy.web.health import Check
from csrproxy.web.status import CAStatus, Snapshot, StatusPage, render

TOKEN = "status-token-123"
NOW = 1_800_000_000.0


def snapshot(**overrides: object) -> Snapshot:
    failed = OrderRow("f1", "k", b"", ["x.go.example.test"], status="invalid",
                      error="<script>alert(1)</script> unauthorized", updated=NOW - 90)
    running = OrderRow("r1", "k2", b"", ["y.go.example.test"], status="pending",
                       created=NOW - 30, owner="ns1")
    due = DueCertificate("c" * 40, ["z.go.example.test"], NOW + 3600, NOW + 86400, None)
    fields: dict[str, object] = dict(
        now=NOW,
        instance="ns1",
        checks=[Check("account", True, "https://ca/acct/1"), Check("store", False, "disk full")],
        cas=[CAStatus("https://ca/dir", "https://ca/acct/1", "closed", "0 failures in a row",
                      [("new certificates for example.test (7 days)", 41.0)])],
        rows=StatusRows([running], [failed], [due], 1),
        due_days=7.0,
        rcodes=[("NOERROR", 12), ("NXDOMAIN", 3)],
        rrl=[("slip 10.0.0.0/24", 5)],
    )  # fmt: skip
    fields.update(overrides)
    return Snapshot(**fields)  # type: ignore[arg-type]


class RenderTests(SynchronousTestCase):
    def test_every_section_and_every_value_escaped(self) -> None:
        page = render(snapshot()).decode()
        for text in (
            "not ready", "disk full", "https://ca/acct/1", "closed", "41",
            "y.go.example.test", "30 s", "pending", "ns1",
            "x.go.example.test", "&lt;script&gt;alert(1)&lt;/script&gt; unauthorized",
            "Renewals due in the next 7 days: 1", "z.go.example.test",
            "NXDOMAIN", "slip 10.0.0.0/24",
        ):  # fmt: skip
            self.assertIn(text, page)
        self.assertNotIn("<script>", page)
        self.assertNotIn("src=", page)
        self.assertNotIn("href=", page)

    def test_empty_tables_say_none(self) -> None:
        page = render(snapshot(rows=StatusRows([], [], [], 0), rrl=[])).decode()
        self.assertIn("no response was rate limited", page)
        self.assertIn("none", page)


class AccessTests(SynchronousTestCase):
    def setUp(self) -> None:
        tokens = parse_tokens(token_hash(TOKEN) + "\n")
        self.page = StatusPage(tokens, lambda: succeed(snapshot()))

    def test_bearer_and_basic_password_are_accepted(self) -> None:
        self.page.check(f"Bearer {TOKEN}")
        basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        self.page.check(f"Basic {basic}")

    def test_anything_else_is_refused(self) -> None:
        wrong = base64.b64encode(b"anyone:nope").decode()
        for auth in (None, "", "Bearer nope", f"Basic {wrong}", "Basic !!!", f"Token {TOKEN}"):
            with self.assertRaises(Unauthorized):
                self.page.check(auth)

    def test_render_is_the_snapshot_rendered(self) -> None:
        d: Deferred[bytes] = self.page.render()
        self.assertIn(b"csrproxy ns1", self.successResultOf(d))


class QueryTests(SynchronousTestCase):
    def test_orders_failures_and_due_certificates_from_the_database(self) -> None:
        import tempfile

        db = StateDB(tempfile.mkdtemp() + "/state.db")
        now = time.time()
        db.save_order(OrderRow("o1", "k1", b"", ["a.example.test"], status="pending"))
        db.save_order(OrderRow("o2", "k2", b"", ["b.example.test"], status="invalid", error="x"))
        db.save_order(OrderRow("o3", "k3", b"", ["c.example.test"], status="issued"))
        for i, renew_at in enumerate((now + 3600, now + 30 * 86400)):
            db.save_certificate(
                CertificateRow(
                    f"c{i}", f"k{i}", b"", [f"d{i}.example.test"], "", "", now, now + 90 * 86400,
                    renew_at=renew_at,
                )
            )
        rows = status_rows(db, now + 7 * 86400)
        self.assertEqual([o.id for o in rows.in_flight], ["o1"])
        self.assertEqual([(o.id, o.error) for o in rows.failures], [("o2", "x")])
        self.assertEqual(([d.id for d in rows.due], rows.due_count), (["c0"], 1))
        db.close()
