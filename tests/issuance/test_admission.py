"""Token buckets and admission decisions, driven by a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.errors import RateLimited
from csrproxy.issuance.admission import (
    THREE_HOURS,
    WEEK,
    Admission,
    BucketMap,
    Budgets,
    TokenBucket,
    registered_domain_of,
)


class BucketTests(SynchronousTestCase):
    def test_burst_then_refill(self) -> None:
        b = TokenBucket(3, 30.0, 0.0)
        for _ in range(3):
            self.assertEqual(b.wait_for(1, 0.0), 0.0)
            b.take(1, 0.0)
        self.assertAlmostEqual(b.wait_for(1, 0.0), 10.0)
        self.assertAlmostEqual(b.wait_for(1, 4.0), 6.0)
        self.assertEqual(b.wait_for(1, 10.0), 0.0)
        b.give_back(5, 10.0)
        self.assertEqual(b.tokens, 3)

    def test_map_forgets_full_buckets_first(self) -> None:
        m = BucketMap(2, 100.0, max_keys=10)
        m.get("busy", 0.0).take(2, 0.0)
        for i in range(20):
            m.get(f"k{i}", 0.0)
        self.assertLessEqual(len(m), 10)
        self.assertEqual(m.get("busy", 0.0).wait_for(1, 0.0), 50.0)


class AdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.refusals: list[str] = []

    def admission(self, budgets: Budgets) -> Admission:
        return Admission(self.clock.seconds, budgets, "example.com", self.refusals.append)

    def test_registered_domain(self) -> None:
        self.assertEqual(registered_domain_of("a.go.example.com", "example.com"), "example.com")
        self.assertEqual(registered_domain_of("*.example.com", "example.com"), "example.com")
        self.assertEqual(registered_domain_of("a.b.other.org", "example.com"), "other.org")

    def test_orders_budget_and_retry_after(self) -> None:
        a = self.admission(Budgets(0, 2, 0, 0))
        a.admit_order(["a.example.com"], True)
        a.admit_order(["b.example.com"], True)
        with self.assertRaises(RateLimited) as e:
            a.admit_order(["c.example.com"], True)
        self.assertEqual(e.exception.reason, "orders")
        self.assertAlmostEqual(e.exception.retry_after, THREE_HOURS / 2)
        self.assertEqual(self.refusals, ["orders"])
        self.clock.advance(THREE_HOURS / 2)
        a.admit_order(["c.example.com"], True)

    def test_new_names_only_for_new_name_sets_and_refunded_on_failure(self) -> None:
        a = self.admission(Budgets(1, 0, 0, 0))
        refund = a.admit_order(["a.go.example.com"], True)
        with self.assertRaises(RateLimited) as e:
            a.admit_order(["b.go.example.com"], True)
        self.assertEqual(e.exception.reason, "new-names")
        self.assertAlmostEqual(e.exception.retry_after, WEEK)
        a.admit_order(["a.go.example.com"], False)  # a renewal is free
        refund()  # the first order failed: no certificate, no charge
        a.admit_order(["b.go.example.com"], True)

    def test_refusal_charges_nothing(self) -> None:
        a = self.admission(Budgets(1, 5, 0, 0))
        a.admit_order(["a.example.com"], True)
        for _ in range(10):
            with self.assertRaises(RateLimited):
                a.admit_order(["b.example.com"], True)
        a.admit_order(["c.other.org"], True)  # a different registered domain
        with self.assertRaises(RateLimited) as e:
            a.admit_order(["d.other.org"], True)
        self.assertEqual(e.exception.reason, "new-names")

    def test_same_names(self) -> None:
        a = self.admission(Budgets(0, 0, 2, 0))
        for _ in range(2):
            a.admit_order(["x.example.com", "y.example.com"], False)
        with self.assertRaises(RateLimited) as e:
            a.admit_order(["y.example.com", "x.example.com"], False)
        self.assertEqual(e.exception.reason, "same-names")

    def test_clients_apart(self) -> None:
        a = self.admission(Budgets(0, 0, 0, 1))
        a.admit_client("192.0.2.1")
        a.admit_client("token:abc")
        with self.assertRaises(RateLimited) as e:
            a.admit_client("192.0.2.1")
        self.assertAlmostEqual(e.exception.retry_after, 3600.0)
        self.clock.advance(3600)
        a.admit_client("192.0.2.1")

    def test_zero_turns_budgets_off(self) -> None:
        a = self.admission(Budgets(0, 0, 0, 0))
        for i in range(1000):
            a.admit_client("c")
            a.admit_order([f"n{i}.example.com"], True)
