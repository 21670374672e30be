"""Admission budgets on a shared PostgreSQL (issue 16): one budget for the cluster, exactly.

Two instances ("ns1", "ns2"), each its own StateDB on one fresh database, decide through
:class:`ClusterAdmission`; a budget of N is N between them, hammered from two threads too.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from csrproxy.errors import RateLimited
from csrproxy.issuance.admission import HOUR, THREE_HOURS, WEEK, Admission, Budgets
from csrproxy.issuance.cluster_admission import ClusterAdmission
from csrproxy.state.budgets import load_budgets
from csrproxy.state.database import StateDB
from csrproxy.testing.postgres import available
from tests.support.renewals import InlineStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="PostgreSQL server binaries not installed"),
]

NOW = 1_800_000_000.0
NAMES = ["a.go.example.com"]


class Instance:
    """One instance's admission over its own connection, decided inline (no store thread)."""

    def __init__(
        self, dsn: str, name: str, budgets: Budgets, clock: list[float], scope: str = ""
    ) -> None:
        self.db = StateDB(dsn, name)
        self.refusals: list[str] = []
        rules = Admission(lambda: clock[0], budgets, "example.com", self.refusals.append)
        self.admission = ClusterAdmission(InlineStore(self.db), rules, scope)  # type: ignore[arg-type]

    def order(
        self, names: list[str] = NAMES, new: bool = True, replaces: str | None = None
    ) -> Any:
        """The refund when admitted, else the :class:`RateLimited`."""
        return _now(self.admission.decide_order(names, new, replaces))

    def client(self, client: str) -> Any:
        """None when admitted, else the :class:`RateLimited`."""
        return _now(self.admission.decide_client(client))


def _now(d: Deferred[Any]) -> Any:
    got: list[Any] = []
    d.addBoth(got.append)
    assert got, "decided inline"
    if isinstance(got[0], Failure):
        got[0].trap(RateLimited)
        return got[0].value
    return got[0]


@pytest.fixture
def clock() -> list[float]:
    return [NOW]


@contextmanager
def two(dsn: str, budgets: Budgets, clock: list[float]) -> Iterator[tuple[Instance, Instance]]:
    ns1, ns2 = Instance(dsn, "ns1", budgets, clock), Instance(dsn, "ns2", budgets, clock)
    try:
        yield ns1, ns2
    finally:
        ns1.db.close()
        ns2.db.close()


def test_a_budget_split_across_instances(dsn: str, clock: list[float]) -> None:
    with two(dsn, Budgets(0, 4, 0, 0), clock) as (ns1, ns2):
        for instance in (ns1, ns2, ns1, ns2):
            assert callable(instance.order())
        for instance in (ns1, ns2):
            refused = instance.order()
            assert isinstance(refused, RateLimited)
            assert refused.reason == "orders"
            assert refused.retry_after == pytest.approx(THREE_HOURS / 4)
            assert "more than 4 orders in 3 h" in str(refused)
        assert ns1.refusals == ns2.refusals == ["orders"]
        clock[0] += THREE_HOURS / 4  # one token back, for whoever asks first
        assert callable(ns2.order())
        assert isinstance(ns1.order(), RateLimited)


def test_every_kind_of_budget_is_shared(dsn: str, clock: list[float]) -> None:
    with two(dsn, Budgets(2, 100, 3, 2), clock) as (ns1, ns2):
        assert ns1.client("token:ab") is None
        assert ns2.client("token:ab") is None
        refused = ns1.client("token:ab")
        assert isinstance(refused, RateLimited) and refused.reason == "client"
        assert ns2.client("token:cd") is None

        assert callable(ns1.order(["x.example.com"], True))
        assert callable(ns2.order(["y.example.com"], True))
        refused = ns1.order(["z.example.com"], True)  # new names for example.com: 2 a week
        assert isinstance(refused, RateLimited) and refused.reason == "new-names"
        assert refused.retry_after == pytest.approx(WEEK / 2)
        assert callable(ns1.order(["z.other.org"], True))
        assert callable(ns1.order(["z.example.com"], False))  # a renewal: no new names, no order

        for instance in (ns1, ns2):
            assert callable(instance.order(["same.other.org"], False))
        assert callable(ns1.order(["same.other.org"], False))
        refused = ns2.order(["same.other.org"], False)
        assert isinstance(refused, RateLimited) and refused.reason == "same-names"
        # A refusal takes nothing: the orders budget counts only the admitted new name sets.
        orders = load_budgets(ns1.db, 0, 1, prefix="orders")
        assert orders == [("orders", 100 - 3, NOW)]


def test_the_exemptions_are_the_same(dsn: str, clock: list[float]) -> None:
    with two(dsn, Budgets(1, 1, 2, 0, 0, 0), clock) as (ns1, ns2):
        assert callable(ns1.order(["r.example.com"], True))
        assert ns2.order(["s.example.com"], True).reason == "orders"
        assert callable(ns2.order(["r.example.com"], False))  # a same-set renewal: no order
        refused = ns1.order(["r.example.com"], False)
        assert isinstance(refused, RateLimited) and refused.reason == "same-names"
        for instance in (ns1, ns2, ns1):  # an ARI renewal pays nothing at all
            assert callable(instance.order(["r.example.com"], True, replaces="aki.serial"))
        assert load_budgets(ns1.db, 0, 1, prefix="orders") == [("orders", 0.0, NOW)]


def test_failed_authorizations_are_shared(dsn: str, clock: list[float]) -> None:
    with two(dsn, Budgets(0, 0, 0, 0, 2, 0), clock) as (ns1, ns2):
        ns1.admission.authorization_failed("*.F.example.com")
        ns2.admission.authorization_failed("f.example.com")
        assert callable(ns1.order(["ok.example.com"]))
        for instance in (ns1, ns2):
            refused = instance.order(["ok.example.com", "f.example.com"])
            assert isinstance(refused, RateLimited) and refused.reason == "failed-authorizations"
            assert refused.retry_after == pytest.approx(HOUR / 2)
        clock[0] += HOUR / 2
        assert callable(ns2.order(["f.example.com"]))
        # Checking made no rows: only the failures did.
        assert [r[0] for r in load_budgets(ns1.db, 0, 100)] == ["failed-authz:f.example.com"]


def test_a_pause_is_shared_and_a_valid_authorization_lifts_it(
    dsn: str, clock: list[float]
) -> None:
    from typing import cast

    from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

    logged: list[LogEvent] = []
    observer = cast(ILogObserver, logged.append)
    globalLogPublisher.addObserver(observer)
    with two(dsn, Budgets(0, 0, 0, 0, 0, 2), clock) as (ns1, ns2):
        ns1.admission.authorization_failed("p.example.com")
        ns2.admission.authorization_failed("p.example.com")
        globalLogPublisher.removeObserver(observer)
        paused = [formatEvent(e) for e in logged if "paused" in formatEvent(e)]
        assert paused == ["p.example.com paused: as many failed authorizations in a row as "
                          "the CA allows"]  # fmt: skip
        clock[0] += 400 * 86400.0  # never refilled
        for instance in (ns1, ns2):
            for replaces in (None, "aki.serial"):
                refused = instance.order(["p.example.com"], replaces=replaces)
                assert isinstance(refused, RateLimited) and refused.reason == "paused"
                assert refused.retry_after is None
        ns2.admission.authorizations_valid(["p.example.com", "q.example.com"])
        assert callable(ns1.order(["p.example.com"]))
        # The reset row is stamped 0 (pruned as stale); none was made for q.
        assert load_budgets(ns1.db, 0, 100) == [("consecutive-failures:p.example.com", 2.0, 0.0)]


def test_a_valid_order_resets_a_count_another_instance_made(
    dsn: str, clock: list[float]
) -> None:
    with two(dsn, Budgets(0, 0, 0, 0, 0, 3), clock) as (ns1, ns2):
        ns1.admission.authorization_failed("p.example.com")
        ns2.admission.authorizations_valid(["p.example.com"])  # ns2 knows of no failure
        assert load_budgets(ns1.db, 0, 10) == [("consecutive-failures:p.example.com", 2.0, NOW)]
        assert callable(ns2.order(["p.example.com"]))  # its decision sees the count
        ns2.admission.authorizations_valid(["p.example.com"])
        assert load_budgets(ns1.db, 0, 10) == [("consecutive-failures:p.example.com", 3.0, 0.0)]


def test_unpause_takes_effect_at_once_for_the_cluster(dsn: str, clock: list[float]) -> None:
    from csrproxy.admin import unpause

    with two(dsn, Budgets(0, 0, 0, 0, 0, 1), clock) as (ns1, ns2):
        ns1.admission.authorization_failed("p.example.com")
        assert ns2.order(["p.example.com"]).reason == "paused"
        message = unpause(ns2.db, "p.example.com")
        assert "forgotten" in message and "restart" not in message
        assert callable(ns1.order(["p.example.com"]))


def test_a_refund_gives_one_back_to_the_cluster(dsn: str, clock: list[float]) -> None:
    with two(dsn, Budgets(0, 5, 1, 0), clock) as (ns1, ns2):
        refund = ns1.order()
        assert callable(refund)
        refused = ns2.order()
        assert isinstance(refused, RateLimited) and refused.reason == "same-names"
        refund()  # the order failed before the CA issued anything
        assert callable(ns2.order())
        # What the CA counts stays spent: two orders placed.
        assert load_budgets(ns2.db, 0, 1, prefix="orders") == [("orders", 3.0, NOW)]


def test_a_restart_keeps_the_spent_budget(dsn: str, clock: list[float]) -> None:
    budgets = Budgets(0, 3, 0, 1)
    with two(dsn, budgets, clock) as (ns1, ns2):
        assert callable(ns1.order()) and callable(ns2.order()) and callable(ns1.order())
        assert ns1.client("c") is None
    again = Instance(dsn, "ns1", budgets, clock)
    try:
        refused = again.order()
        assert isinstance(refused, RateLimited) and refused.reason == "orders"
        refused = again.client("c")
        assert isinstance(refused, RateLimited) and refused.reason == "client"
    finally:
        again.db.close()


def test_concurrent_admissions_never_exceed_the_budget(dsn: str, clock: list[float]) -> None:
    # Orders per 3 h is the short budget; same names and new names add rows to lock, in
    # overlapping sets (a deadlock between the instances would fail a decision).
    budgets = Budgets(1000, 20, 1000, 0)
    name_sets = [["a.example.com"], ["b.other.org", "a.example.com"], ["b.other.org"]]
    outcomes: dict[str, list[str]] = {"ns1": [], "ns2": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def hammer(instance: Instance, seed: int) -> None:
        pick = random.Random(seed)
        try:
            start.wait()
            for _ in range(50):
                got = instance.order(pick.choice(name_sets), True)
                outcomes[instance.db.instance].append(
                    "admitted" if callable(got) else got.reason
                )
        except BaseException as e:
            errors.append(e)

    with two(dsn, budgets, clock) as (ns1, ns2):
        threads = [threading.Thread(target=hammer, args=(i, n)) for n, i in enumerate((ns1, ns2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        everything = outcomes["ns1"] + outcomes["ns2"]
        assert len(everything) == 100
        assert everything.count("admitted") == 20
        assert everything.count("orders") == 80
        assert outcomes["ns1"].count("admitted") > 0 and outcomes["ns2"].count("admitted") > 0
        assert load_budgets(ns1.db, 0, 1, prefix="orders") == [("orders", 0.0, NOW)]


def test_through_the_store_thread(dsn: str, clock: list[float]) -> None:
    """The daemon's path: decisions queued together run in one batch (savepoints), and a
    caller that gives up before its decision arrives gets its tokens given back."""
    from twisted.internet import reactor

    from csrproxy.state.store import Store

    db = StateDB(dsn, "ns1")
    store = Store(reactor, db)
    store.start()
    refusals: list[str] = []
    rules = Admission(lambda: clock[0], Budgets(0, 6, 0, 0), "example.com", refusals.append)
    admission = ClusterAdmission(store, rules)
    try:
        decisions = [admission.decide_order([f"{i}.example.com"], True) for i in range(10)]
        results = [_wait(d) for d in decisions]
        assert sum(callable(r) for r in results) == 6
        assert [r.reason for r in results if isinstance(r, RateLimited)] == ["orders"] * 4
        assert refusals == ["orders"] * 4

        clock[0] += THREE_HOURS / 6
        gone = admission.decide_order(NAMES, True)
        gone.cancel()  # the client went away while the database decided
        _wait(gone)
        assert isinstance(_wait(store.run(lambda: None)), type(None))
        # The token taken for the cancelled decision is back: the next one gets it.
        assert callable(_wait(admission.decide_order(NAMES, True)))
    finally:
        store.stop()


def _wait(d: Deferred[Any]) -> Any:
    from twisted.internet import reactor

    result: list[Any] = []
    d.addBoth(lambda value: result.append(value.value if isinstance(value, Failure) else value))
    for _ in range(200):
        if result:
            break
        reactor.iterate(0.05)
    assert result, "no answer from the store thread"
    return result[0]


def test_a_spent_new_names_budget_is_remembered_as_no_room(dsn: str, clock: list[float]) -> None:
    # The zone chooser's hint: the instance a budget refused knows it has no room till then.
    with two(dsn, Budgets(1, 100, 3, 0), clock) as (ns1, ns2):
        assert ns1.admission.new_names_room("example.com") == 1
        assert callable(ns1.order(["x.example.com"], True))
        assert isinstance(ns2.order(["y.example.com"], True), RateLimited)
        assert ns2.admission.new_names_room("example.com") == 0
        assert ns2.admission.new_names_room("other.org") == 1
        clock[0] += WEEK
        assert ns2.admission.new_names_room("example.com") == 1


def test_a_fallback_cas_budgets_are_shared_apart_from_the_primarys(
    dsn: str, clock: list[float]
) -> None:
    # [[acme.fallback]] on a shared database: its rows named apart, shared by the cluster.
    budgets = Budgets(0, 1, 0, 0)
    primary = Instance(dsn, "ns1", budgets, clock)
    fallback_here = Instance(dsn, "ns1", budgets, clock, scope="ca-abc/")
    fallback_there = Instance(dsn, "ns2", budgets, clock, scope="ca-abc/")
    try:
        assert callable(primary.order())
        assert callable(fallback_here.order()), "the primary's spent budget is not the fallback's"
        assert isinstance(fallback_there.order(), RateLimited), "the fallback's is the cluster's"
        names = [r[0] for r in primary.db.conn.execute("SELECT name FROM budgets ORDER BY name")]
        assert names == ["ca-abc/orders", "orders"], names
    finally:
        for each in (primary, fallback_here, fallback_there):
            each.db.close()
