"""Token buckets and admission decisions, driven by a Clock."""

from __future__ import annotations

import math

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.errors import RateLimited
from csrproxy.issuance.admission import (
    CONSECUTIVE,
    FAILED_AUTHZ,
    HOUR,
    NEW_NAMES,
    REASONS,
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
        self.assertEqual(registered_domain_of("a.b.other.co.uk", "example.com"), "other.co.uk")

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


class LetsEncryptRuleTests(SynchronousTestCase):
    """Who pays what, as Let's Encrypt applies its limits; refusals name their limit."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.refusals: list[str] = []

    def admission(self, budgets: Budgets, registered: str = "") -> Admission:
        return Admission(self.clock.seconds, budgets, registered, self.refusals.append)

    def refused(self, a: Admission, names: list[str], new: bool = True,
                replaces: str | None = None) -> RateLimited:  # fmt: skip
        with self.assertRaises(RateLimited) as e:
            a.admit_order(names, new, replaces)
        refusal: RateLimited = e.exception
        return refusal

    def test_defaults_are_lets_encrypts_with_the_margins(self) -> None:
        b = Budgets()
        self.assertEqual(
            (b.orders_per_3h, b.new_names_per_week, b.same_names_per_week), (250, 45, 5)
        )
        self.assertEqual(b.failed_authorizations_per_hour, 5)
        self.assertEqual(b.consecutive_failed_authorizations, 1152)
        self.assertEqual(len(set(REASONS.values())), len(REASONS), "one reason per limit")

    def test_a_new_certificate_charges_every_registered_domain_of_its_names(self) -> None:
        a = self.admission(Budgets(1, 0, 0, 0))
        a.admit_order(["a.b.example.co.uk", "x.github.io", "192.0.2.1", "2001:db8::1"], True)
        for names in (["c.example.co.uk"], ["y.x.github.io"], ["192.0.2.1"], ["2001:db8::2"]):
            e = self.refused(a, names)
            self.assertEqual(e.reason, "new-names")
            self.assertAlmostEqual(e.retry_after or 0, WEEK)
        self.assertIn("example.co.uk", str(self.refused(a, ["n.example.co.uk", "n.other.org"])))
        a.admit_order(["n.other.org", "y.github.io", "192.0.2.2", "2001:db8:0:1::1"], True)

    def test_the_override_counts_names_below_it_for_it(self) -> None:
        a = self.admission(Budgets(1, 0, 0, 0), registered="go.example.com")
        a.admit_order(["a.go.example.com"], True)
        self.assertEqual(self.refused(a, ["b.go.example.com"]).reason, "new-names")
        a.admit_order(["b.example.com"], True)  # example.com by the list, not the override

    def test_a_same_set_renewal_pays_only_the_same_names_budget(self) -> None:
        a = self.admission(Budgets(1, 1, 3, 0))
        a.admit_order(["r.example.com"], True)  # the first certificate: every budget
        self.assertEqual(self.refused(a, ["s.example.com"]).reason, "orders")
        for _ in range(2):  # renewals: no order, no registered-domain charge
            a.admit_order(["r.example.com"], False)
        e = self.refused(a, ["r.example.com"], new=False)
        self.assertEqual(e.reason, "same-names")
        self.assertAlmostEqual(e.retry_after or 0, WEEK / 3)

    def test_an_ari_renewal_pays_nothing(self) -> None:
        a = self.admission(Budgets(1, 1, 1, 0, 1, 5))
        a.admit_order(["r.example.com"], True)
        a.authorization_failed("r.example.com")  # its hourly failures are spent too
        self.assertEqual(self.refused(a, ["r.example.com"], new=False).reason,
                         "failed-authorizations")  # fmt: skip
        for _ in range(10):
            a.admit_order(["r.example.com"], False, replaces="aki.serial")
            a.admit_order(["r.example.com"], True, replaces="aki.serial")
        self.assertEqual(self.refusals, ["failed-authorizations"])

    def test_failed_authorizations_per_identifier_per_hour(self) -> None:
        a = self.admission(Budgets(0, 0, 0, 0, 5, 0))
        for _ in range(5):
            a.admit_order(["f.example.com", "ok.example.com"], True)
            a.authorization_failed("*.F.example.com")  # the wildcard's identifier
        e = self.refused(a, ["ok.example.com", "*.f.example.com"])
        self.assertEqual(e.reason, "failed-authorizations")
        self.assertIn("more than 5 failed authorizations for f.example.com in an hour", e.detail)
        self.assertAlmostEqual(e.retry_after or 0, HOUR / 5)
        a.admit_order(["ok.example.com"], True)  # another identifier: its own budget
        self.clock.advance(HOUR / 5)
        a.admit_order(["f.example.com"], True)  # one failure's worth again
        self.assertEqual(self.refusals, ["failed-authorizations"])

    def test_consecutive_failures_pause_until_a_valid_authorization(self) -> None:
        a = self.admission(Budgets(0, 0, 0, 0, 0, 3))
        for _ in range(2):
            a.authorization_failed("p.example.com")
        a.authorizations_valid(["p.example.com", "q.example.com"])  # no longer in a row
        for _ in range(2):
            a.authorization_failed("p.example.com")
        a.admit_order(["p.example.com"], True)
        a.authorization_failed("p.example.com")  # the third in a row
        for replaces in (None, "aki.serial"):  # the CA refuses a paused name in any order
            e = self.refused(a, ["p.example.com"], replaces=replaces)
            self.assertEqual(e.reason, "paused")
            self.assertIsNone(e.retry_after, "no time makes room")
            self.assertIn("csrproxy-admin unpause p.example.com", e.detail)
        self.clock.advance(10 * 365 * 86400.0)
        self.assertEqual(self.refused(a, ["p.example.com"]).reason, "paused")
        a.authorizations_valid(["p.example.com"])
        a.admit_order(["p.example.com"], True)
        self.assertEqual(self.refusals, ["paused"] * 3)

    def test_checks_make_no_buckets_and_failures_are_bounded(self) -> None:
        a = self.admission(Budgets(0, 0, 0, 0, 5, 1152))
        for i in range(1000):  # a client's random names: nothing is kept for them
            a.admit_order([f"n{i}.example.com"], True)
        self.assertEqual([len(a._maps()[p]) for p in (FAILED_AUTHZ, CONSECUTIVE)], [0, 0])
        for prefix in (FAILED_AUTHZ, CONSECUTIVE):
            a._maps()[prefix].max_keys = 50
        for i in range(1000):  # a flood of failures: each map holds at most its bound
            a.authorization_failed(f"n{i}.example.com")
        self.assertEqual([len(a._maps()[p]) for p in (FAILED_AUTHZ, CONSECUTIVE)], [50, 50])

    def test_zero_turns_the_failure_budgets_off(self) -> None:
        a = self.admission(Budgets(0, 0, 0, 0, 0, 0))
        for _ in range(2000):
            a.authorization_failed("f.example.com")
        a.admit_order(["f.example.com"], True)


class ClusterMemoryTests(SynchronousTestCase):
    def test_the_names_known_to_fail_are_bounded(self) -> None:
        from typing import cast

        from csrproxy.issuance import cluster_admission
        from csrproxy.state.store import Store

        self.patch(cluster_admission, "MAX_FAILING", 10)
        gate = cluster_admission.ClusterAdmission(cast(Store, None), Admission(Clock().seconds))
        gate._remember_failing(f"consecutive-failures:n{i}.example.com" for i in range(1000))
        self.assertEqual(len(gate._failing), 10)
        self.assertIn("consecutive-failures:n999.example.com", gate._failing)


class NewNamesRoomTests(SynchronousTestCase):
    """What a zone chooser asks: how many new certificates a registered domain has room for."""

    def test_room_counts_down_and_refills_and_asking_makes_no_bucket(self) -> None:
        clock = Clock()
        admission = Admission(clock.seconds, Budgets(new_names_per_week=2))
        self.assertEqual(admission.new_names_room("example.com"), 2)
        self.assertEqual(len(admission._keyed[NEW_NAMES]), 0)
        admission.admit_order(["a.example.com"], True)
        admission.admit_order(["b.example.com"], True)
        self.assertEqual(admission.new_names_room("Example.COM."), 0)
        self.assertEqual(admission.new_names_room("example.net"), 2)
        clock.advance(WEEK / 2)
        self.assertAlmostEqual(admission.new_names_room("example.com"), 1)
        off = Admission(clock.seconds, Budgets(new_names_per_week=0))
        self.assertEqual(off.new_names_room("example.com"), math.inf)
