"""Start-up after a crash: what is resumed, published again or removed, and how a resumed
order that fails because of the crash is ordered afresh (within the budgets)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.client import ACMEClient
from csrproxy.challenges.zone import ZonePublisher, challenge_name
from csrproxy.dns.zone import ChallengeZone
from csrproxy.errors import IssuanceFailed, RateLimited
from csrproxy.issuance.admission import Admission, Budgets
from csrproxy.issuance.csr import check_csr
from csrproxy.issuance.orders import OrderBook
from csrproxy.issuance.recovery import identifier_of, plan_recovery, recover
from csrproxy.state.database import ChallengeRow, OrderRow
from tests.acme.test_client import ACCOUNT_KEY
from tests.support.driving import run_until_fired
from tests.support.fakeacme import BASE, ERR, Authz, FakeCA, Order
from tests.support.issuers import issue_now, make_issuer
from tests.support.keys import make_csr

ZONE = "go.example.test"


def order_row(order_id: str, **kw: Any) -> OrderRow:
    kw.setdefault("status", "pending")
    return OrderRow(order_id, "rk-" + order_id, b"csr", [f"{order_id}.{ZONE}"], **kw)


def challenge_row(
    row_id: int, order_id: str, value: str = "v", backend: str = "builtin"
) -> ChallengeRow:
    return ChallengeRow(row_id, order_id, challenge_name(f"{order_id}.{ZONE}"), value, backend, 0.0)


class PlanTests(SynchronousTestCase):
    """The decision, from the rows alone."""

    def test_records_of_a_resumed_order_at_the_ca_are_published_again(self) -> None:
        resumed = order_row("a", acme_url=f"{BASE}/orders/1")
        rows = [challenge_row(1, "a", "v1"), challenge_row(2, "a", "v2")]
        plan = plan_recovery(rows, [resumed], "builtin")
        self.assertEqual(plan.resume, (resumed,))
        self.assertEqual(plan.republish, {"a": tuple(rows)})
        self.assertEqual(plan.remove, ())

    def test_records_of_unknown_finished_or_new_orders_are_removed(self) -> None:
        new = order_row("new", status="new")  # never reached the CA: a fresh order follows
        finished = order_row(
            "done", status="valid", acme_url=f"{BASE}/orders/2", certificate_id="c1"
        )
        rows = [challenge_row(1, "gone"), challenge_row(2, "new"), challenge_row(3, "done")]
        plan = plan_recovery(rows, [new, finished], "builtin")
        self.assertEqual(plan.republish, {})
        self.assertEqual(plan.remove, tuple(rows))
        # An order whose certificate is on record has ended: it is not resumed.
        self.assertEqual(plan.resume, (new,))

    def test_records_on_another_backend_are_removed(self) -> None:
        resumed = order_row("a", acme_url=f"{BASE}/orders/1")
        rows = [challenge_row(1, "a", backend="powerdns"), challenge_row(2, "a")]
        plan = plan_recovery(rows, [resumed], "builtin")
        self.assertEqual(plan.republish, {"a": (rows[1],)})
        self.assertEqual(plan.remove, (rows[0],))

    def test_identifier_of_a_record(self) -> None:
        self.assertEqual(identifier_of(challenge_row(1, "a")), f"a.{ZONE}")


class SlowRemovals(ZonePublisher):
    """Removes a value only when the test fires its Deferred (a PowerDNS write in flight)."""

    def __init__(self, zone: ChallengeZone) -> None:
        super().__init__(zone)
        self.pending: list[Deferred[None]] = []

    def unpublish(self, identifier: str, value: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.addCallback(lambda _: super(SlowRemovals, self).unpublish(identifier, value))
        self.pending.append(d)
        return d


class ResumeTests(SynchronousTestCase):
    """A crashed run's order at a fake CA: its challenge answered, the look-up to come."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.ca = FakeCA()
        http, self.agent = self.ca.client()
        self.zone = ChallengeZone(ZONE, [f"ns1.{ZONE}"], ["@ A 127.0.0.1"])
        self.ca.published_check = lambda i, v: v in self.zone.txt_values(challenge_name(i))
        self.acme = ACMEClient(self.clock, http, BASE + "/dir", ACCOUNT_KEY)
        self.book = OrderBook(self.clock, lambda f: {"detail": str(f.value)})
        self.name = f"crashed.{ZONE}"
        self.csr = check_csr(make_csr([self.name]))

    def issuer(
        self, admission: Admission | None = None, responder: ZonePublisher | None = None
    ) -> Any:
        responder = responder or ZonePublisher(self.zone)
        issuer = make_issuer(self.clock, self.acme, responder, admission=admission)
        self.drive(issuer.ensure_account())
        return issuer

    def drive(self, d: Deferred[Any]) -> Any:
        return run_until_fired(d, self.agent.flush, self.clock)[0]

    def crashed_order(self, **authz: Any) -> tuple[OrderRow, ChallengeRow]:
        """The CA's order and authorization as the crash left them, and their rows."""
        (kid,) = self.ca.accounts
        state = {"status": "processing", "challenge_status": "processing", **authz}
        self.ca.authzs["900"] = a = Authz("900", self.name, False, token="tok900", **state)
        self.ca.orders["901"] = Order("901", kid, [self.name], ["900"])
        row = OrderRow(
            "async-1",
            self.csr.request_key,
            self.csr.der,
            [self.name],
            status="pending",
            acme_url=f"{BASE}/orders/901",
        )
        value = self.ca.key_authz_digest(a)
        return row, ChallengeRow(1, row.id, challenge_name(self.name), value, "builtin", 0.0)

    def recover(self, issuer: Any, leftovers: list[ChallengeRow], rows: list[OrderRow]) -> None:
        d = Deferred.fromCoroutine(recover(issuer.ledger, issuer, self.book, leftovers, rows))
        d.addErrback(self.fail)

    def ended(self, order_id: str) -> Any:
        record = self.book.get(order_id)
        assert record is not None
        for _ in range(10000):
            if record.status != "processing":
                break
            self.agent.flush()
            self.clock.advance(0.01)
        return record

    def test_record_is_served_again_before_the_resumed_run_asks_anything(self) -> None:
        issuer = self.issuer()
        row, leftover = self.crashed_order()
        orphan = ChallengeRow(2, "gone", challenge_name(f"old.{ZONE}"), "stale", "builtin", 0.0)
        served: list[tuple[str, ...]] = []
        read_order = self.acme.order

        def order(url: str, deadline: float | None = None) -> Any:
            # The CA's pending look-up arrives with the resumed run's first request.
            served.append(self.zone.txt_values(leftover.name))
            self.ca.validate_answered()
            return read_order(url, deadline)

        self.patch(self.acme, "order", order)
        self.recover(issuer, [leftover, orphan], [row])
        self.assertEqual(served, [(leftover.value,)])
        record = self.ended(row.id)
        self.assertEqual(record.status, "valid", record.error)
        self.assertEqual(self.ca.requests["newOrder"], 0)
        # The orphan was never served; the resumed order's record is gone once it ended.
        self.assertEqual(self.zone.challenge_names(), ())

    def test_waiters_hear_of_the_end_once_the_records_are_gone(self) -> None:
        responder = SlowRemovals(self.zone)
        issuer = self.issuer(responder=responder)
        # The CA validated before the crash: the resumed run publishes nothing itself.
        row, leftover = self.crashed_order(status="valid", challenge_status="valid")
        self.recover(issuer, [leftover], [row])
        joined = issue_now(issuer, self.csr, "client")
        self.assertEqual(joined.order_id, row.id)
        for _ in range(100):
            self.agent.flush()
            self.clock.advance(0.01)
        [removal] = responder.pending
        self.assertNoResult(joined.chain)
        record = self.book.get(row.id)
        assert record is not None
        self.assertEqual(record.status, "processing")
        removal.callback(None)
        self.assertIsInstance(self.successResultOf(joined.chain), str)
        self.assertEqual(record.status, "valid")
        self.assertEqual(self.zone.challenge_names(), ())

    def test_authorization_gone_invalid_during_the_resume_is_ordered_again(self) -> None:
        issuer = self.issuer()
        row, _ = self.crashed_order()
        # The record was lost with the crash, and the CA looked while it was gone.
        self.ca.validate_answered()
        self.assertEqual(self.ca.authzs["900"].status, "invalid")
        self.recover(issuer, [], [row])
        record = self.ended(row.id)
        self.assertEqual(record.status, "valid", record.error)
        self.assertEqual(self.ca.requests["newOrder"], 1)
        self.assertEqual(self.zone.challenge_names(), ())

    def test_order_invalid_at_the_resume_is_ordered_again(self) -> None:
        issuer = self.issuer()
        row, _ = self.crashed_order(status="invalid", challenge_status="invalid")
        self.ca.orders["901"].status = "invalid"
        self.recover(issuer, [], [row])
        self.assertEqual(self.ended(row.id).status, "valid")
        self.assertEqual(self.ca.requests["newOrder"], 1)

    def test_the_fresh_order_is_charged_to_the_order_budget(self) -> None:
        admission = Admission(self.clock.seconds, Budgets(0, 1, 0, 0))
        issuer = self.issuer(admission)
        admission.admit_order(["other.example.test"], True)  # the budget's one order is spent
        row, _ = self.crashed_order(status="invalid", challenge_status="invalid")
        waiter = issuer.resume(row).chain
        failure = self.drive(waiter)
        self.assertIsInstance(failure, Failure)
        failure.trap(RateLimited)
        self.assertEqual(self.ca.requests["newOrder"], 0)

    def test_a_problem_a_fresh_order_would_meet_again_is_not_ordered_again(self) -> None:
        issuer = self.issuer()
        caa = {"type": ERR + "caa", "detail": "CAA forbids this CA"}
        row, _ = self.crashed_order(status="invalid", challenge_status="invalid", error=caa)
        failure = self.drive(issuer.resume(row).chain)
        self.assertIsInstance(failure, Failure)
        failure.trap(IssuanceFailed)
        self.assertIn("caa", str(failure.value))
        self.assertEqual(self.ca.requests["newOrder"], 0)

    def test_a_row_that_cannot_be_resumed_gives_its_records_back(self) -> None:
        issuer = self.issuer()
        row, leftover = self.crashed_order()
        row.csr = b"not a csr"
        self.recover(issuer, [leftover], [row])
        self.assertEqual(self.zone.challenge_names(), ())
        record = self.book.get(row.id)
        assert record is not None
        self.assertEqual(record.status, "invalid", "its id answers: the order failed")

    def test_a_few_at_once_and_a_client_asking_again_joins_its_order_now(self) -> None:
        from csrproxy.issuance.resumes import RESUMING

        issuer = self.issuer()
        csrs = [check_csr(make_csr([f"many{i}.{ZONE}"])) for i in range(RESUMING + 10)]
        rows = [
            OrderRow(f"o{i}", c.request_key, c.der, list(c.names), status="new")
            for i, c in enumerate(csrs)
        ]
        self.recover(issuer, [], rows)
        in_flight = issuer.metrics.orders_in_flight
        self.assertEqual(in_flight._value.get(), RESUMING)
        last = f"o{len(rows) - 1}"
        self.assertIsNone(self.book.get(last), "a waiting order has no record in memory yet")
        joined = issue_now(issuer, csrs[-1], "client")
        self.assertEqual(joined.order_id, last)
        self.assertEqual(in_flight._value.get(), RESUMING + 1)
        self.assertIsInstance(self.drive(joined.chain), str)
        for i in range(len(rows)):
            self.assertEqual(self.ended(f"o{i}").status, "valid", i)
        self.assertEqual(self.ca.requests["newOrder"], len(rows))

    def test_two_rows_for_one_csr_make_one_order(self) -> None:
        issuer = self.issuer()
        rows = [
            OrderRow(oid, self.csr.request_key, self.csr.der, [self.name], status="new")
            for oid in ("first", "second")
        ]
        self.recover(issuer, [], rows)
        for oid in ("first", "second"):
            self.assertEqual(self.ended(oid).status, "valid", oid)
        self.assertEqual(self.ca.requests["newOrder"], 1)
