"""Admission control: token buckets that keep the publisher inside the CA's limits.

Pure logic with an injected clock.  Every budget is a token bucket
(:mod:`csrproxy.issuance.buckets`) that holds ``capacity`` tokens and refills them
evenly over ``period`` seconds, so a full bucket allows a burst of ``capacity`` and then
``capacity`` per ``period``.  Which buckets a request pays is
:mod:`csrproxy.issuance.limits` (Let's Encrypt's rules).  A refusal names its budget and
says when the bucket has room again (a paused identifier never has: no ``Retry-After``).

Every bucket has a persistent name (``orders``, ``same-names:<names>``,
``new-names:<domain>``, ``client:<id>``, ``failed-authz:<identifier>``,
``consecutive-failures:<identifier>``): each change is handed to ``persist`` as
``(name, tokens, stamp)`` rows and :meth:`Admission.restore` rebuilds the buckets
from them, so a restart does not refill a spent budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from csrproxy.errors import RateLimited
from csrproxy.issuance.buckets import BucketMap, TokenBucket
from csrproxy.issuance.limits import (
    CLIENT,
    CONSECUTIVE,
    FAILED_AUTHZ,
    HOUR,
    NEVER,
    NEW_NAMES,
    ORDERS,
    REASONS,
    RESET_STAMP,
    SAME_NAMES,
    THREE_HOURS,
    WEEK,
    Budgets,
    Charge,
    client_charge,
    failure_charges,
    order_charges,
    registered_domain_of,
    reset_charges,
)

__all__ = [
    "CLIENT",
    "CONSECUTIVE",
    "FAILED_AUTHZ",
    "HOUR",
    "NEW_NAMES",
    "ORDERS",
    "REASONS",
    "RESET_STAMP",
    "SAME_NAMES",
    "THREE_HOURS",
    "WEEK",
    "Admission",
    "AdmissionGate",
    "BucketMap",
    "BudgetRow",
    "Budgets",
    "Charge",
    "Refund",
    "TokenBucket",
    "registered_domain_of",
]

log = Logger()

#: A bucket as stored: its persistent name, its tokens and when they were counted.
BudgetRow = tuple[str, float, float]
#: Gives back what a failed order should not cost.
Refund = Callable[[], None]
#: Let's Encrypt's limits with csrproxy's margins.
DEFAULT_BUDGETS = Budgets()


class AdmissionGate(Protocol):
    """What the issuer asks before it takes a request or places an order, and tells after.

    A refusal is a failed Deferred of :class:`RateLimited`; nothing is charged then.
    """

    def decide_client(self, client: str) -> Deferred[None]:
        """Charge one sign request to ``client``."""

    def decide_order(
        self, names: Iterable[str], new_names: bool, replaces: str | None = None
    ) -> Deferred[Refund]:
        """Charge one new order for ``names`` (``new_names``: that set was never issued;
        ``replaces``: the ARI id of the certificate it renews)."""

    def authorization_failed(self, identifier: str) -> None:
        """The CA failed an authorization of ``identifier`` (charged in the background)."""

    def authorizations_valid(self, names: Iterable[str]) -> None:
        """Every identifier of ``names`` has a valid authorization: no failures in a row."""


class Admission:
    """Decides, before any order is made, whether it fits every budget.

    ``registered_domain``, when given, is an override: names at or below it count for it,
    every other name for its registered domain by the Public Suffix List.

    ``persist``, when given, is called once after each change (a charge, a refund, a
    failed or valid authorization) with the rows of exactly the buckets that change
    touched; it must not raise.
    """

    def __init__(
        self,
        now: Callable[[], float],
        budgets: Budgets = DEFAULT_BUDGETS,
        registered_domain: str = "",
        on_refusal: Callable[[str], None] | None = None,
        persist: Callable[[list[BudgetRow]], object] | None = None,
    ) -> None:
        self.now = now
        self.budgets = budgets
        self.registered_domain = registered_domain.lower().rstrip(".")
        self._on_refusal = on_refusal
        self._persist = persist
        b = budgets
        self._orders = TokenBucket(b.orders_per_3h, THREE_HOURS, now()) if b.orders_per_3h else None
        # Each map holds at most its max_keys buckets (100,000), full ones forgotten first.
        periods = {
            NEW_NAMES: (b.new_names_per_week, WEEK),
            SAME_NAMES: (b.same_names_per_week, WEEK),
            CLIENT: (b.client_requests_per_hour, HOUR),
            FAILED_AUTHZ: (b.failed_authorizations_per_hour, HOUR),
            CONSECUTIVE: (b.consecutive_failed_authorizations, NEVER),
        }
        self._keyed = {
            prefix: BucketMap(capacity, period)
            for prefix, (capacity, period) in periods.items()
            if capacity
        }

    def new_names_room(self, name: str) -> float:
        """New certificates the new-names budget of ``name``'s registered domain (a zone's
        apex, or the domain itself) has room for now (``inf`` when that budget is off);
        asking creates no bucket.

        On a shared database it is this instance's last view (the decisions themselves are
        the database's): a zone chooser's hint, not a promise."""
        names = self._keyed.get(NEW_NAMES)
        if names is None:
            return math.inf
        bucket = names.peek(registered_domain_of(name, self.registered_domain))
        if bucket is None:
            return float(names.capacity)
        bucket.wait_for(0, self.now())  # refills it to now
        return bucket.tokens

    def _maps(self) -> dict[str, BucketMap]:
        """The keyed budgets turned on, by the prefix of their buckets' names."""
        return self._keyed

    def _changed(self, buckets: list[tuple[str, TokenBucket]]) -> None:
        if self._persist is not None and buckets:
            self._persist([(name, b.tokens, b.stamp) for name, b in buckets])

    def restore_queries(self) -> list[tuple[str, float, int]]:
        """``(name prefix, since, limit)`` per budget turned on: the rows :meth:`restore` uses.

        A bucket untouched for its whole period is full again and needs no row; of the
        rest, a budget holds at most its ``max_keys`` newest.
        """
        now = self.now()
        queries = [(ORDERS, now - THREE_HOURS, 1)] if self._orders is not None else []
        for prefix, m in self._maps().items():
            since = now - m.period if math.isfinite(m.period) else 0.0
            queries.append((prefix + ":", since, m.max_keys))
        return queries

    def restore(self, rows: Iterable[BudgetRow]) -> int:
        """Rebuild the buckets stored as ``rows`` (at start-up); returns how many were kept.

        Each refills from its stamp to now at today's rate, holding at most today's
        capacity.  Rows of unknown names, of budgets turned off and of buckets full by
        now are ignored; per budget only the newest ``max_keys`` rows are kept.
        """
        now = self.now()
        maps = self._maps()
        found: dict[str, list[tuple[float, str, TokenBucket]]] = {}
        for name, tokens, stamp in rows:
            prefix, colon, key = name.partition(":")
            if name == ORDERS and self._orders is not None:
                capacity, period = self._orders.capacity, THREE_HOURS
            elif colon and prefix in maps:
                capacity, period = maps[prefix].capacity, maps[prefix].period
            else:
                continue
            if not (math.isfinite(tokens) and math.isfinite(stamp)):
                continue
            bucket = TokenBucket.restored(capacity, period, tokens, stamp, now)
            if not bucket.full(now):  # a full bucket is what no row means
                found.setdefault(prefix, []).append((stamp, key, bucket))
        kept = 0
        for prefix, buckets in found.items():
            buckets.sort(key=lambda found_bucket: found_bucket[0])
            if prefix == ORDERS:
                self._orders = buckets[-1][2]
                kept += 1
                continue
            m = maps[prefix]
            # Oldest first, so that the map forgets the oldest first, as it would have.
            for _, key, bucket in buckets[max(0, len(buckets) - m.max_keys) :]:
                m.put(key, bucket, now)
                kept += 1
        return kept

    def _refuse(self, reason: str, wait: float, detail: str) -> RateLimited:
        if self._on_refusal is not None:
            self._on_refusal(reason)
        # A budget that never refills (a paused identifier) has no time to retry after.
        return RateLimited(detail, reason, max(1.0, wait) if math.isfinite(wait) else None)

    def admit_client(self, client: str) -> None:
        """Charge one request to ``client``; raise :class:`RateLimited` when over budget."""
        charge = self.client_charge(client)
        clients = self._keyed.get(CLIENT)
        if clients is None or charge is None:
            return
        now = self.now()
        bucket = clients.get(client, now)
        wait = bucket.wait_for(1, now)
        if wait > 0:
            raise self._refuse(charge.reason, wait, charge.detail)
        bucket.take(1, now)
        self._changed([(f"{CLIENT}:{client}", bucket)])

    def domains(self, names: Iterable[str]) -> list[str]:
        """The distinct registered domains of ``names``, sorted."""
        return sorted({registered_domain_of(n, self.registered_domain) for n in names})

    def charges(
        self, names: Iterable[str], new_names: bool, replaces: str | None = None
    ) -> list[Charge]:
        """:func:`~csrproxy.issuance.limits.order_charges` under these budgets."""
        return order_charges(self.budgets, names, new_names, replaces, self.registered_domain)

    def failure_charges(self, identifier: str) -> list[Charge]:
        """:func:`~csrproxy.issuance.limits.failure_charges` under these budgets."""
        return failure_charges(self.budgets, identifier)

    def reset_charges(self, names: Iterable[str]) -> list[Charge]:
        """:func:`~csrproxy.issuance.limits.reset_charges` under these budgets."""
        return reset_charges(self.budgets, names)

    def client_charge(self, client: str) -> Charge | None:
        """:func:`~csrproxy.issuance.limits.client_charge` under these budgets."""
        return client_charge(self.budgets, client)

    def refuse(self, reason: str, wait: float, detail: str) -> RateLimited:
        """The refusal of budget ``reason`` with room again in ``wait`` s (counted once)."""
        return self._refuse(reason, wait, detail)

    def decide_client(self, client: str) -> Deferred[None]:
        """:meth:`admit_client`, answered at once."""
        try:
            self.admit_client(client)
        except RateLimited as e:
            return fail(e)
        return succeed(None)

    def decide_order(
        self, names: Iterable[str], new_names: bool, replaces: str | None = None
    ) -> Deferred[Refund]:
        """:meth:`admit_order`, answered at once."""
        try:
            return succeed(self.admit_order(names, new_names, replaces))
        except RateLimited as e:
            return fail(e)

    def _bucket(self, name: str, now: float, make: bool) -> TokenBucket | None:
        if name == ORDERS:
            return self._orders
        prefix, _, key = name.partition(":")
        m = self._keyed[prefix]
        return m.get(key, now) if make else m.peek(key)

    def admit_order(
        self, names: Iterable[str], new_names: bool, replaces: str | None = None
    ) -> Refund:
        """Charge one new order for ``names``; ``new_names`` when that set was never issued,
        ``replaces`` for an ARI renewal.

        Raises :class:`RateLimited` without charging anything when a budget is short.
        Returns a function that gives back what only issued certificates should cost
        (call it when the order fails).
        """
        now = self.now()
        taken: list[tuple[str, TokenBucket]] = []
        for c in self.charges(names, new_names, replaces):
            # A bucket only checked is not made: no bucket is a full one.
            bucket = self._bucket(c.name, now, make=c.take)
            if bucket is None:
                continue
            wait = bucket.wait_for(1, now)
            if wait > 0:
                raise self._refuse(c.reason, wait, c.detail)
            if c.take:
                taken.append((c.name, bucket))
        for _, bucket in taken:
            bucket.take(1, now)
        self._changed(taken)
        # Failed orders still count against the CA's order limit, not against certificates.
        refundable = [(name, b) for name, b in taken if name != ORDERS]

        def refund() -> None:
            now = self.now()
            for _, bucket in refundable:
                bucket.give_back(1, now)
            self._changed(refundable)

        return refund

    def authorization_failed(self, identifier: str) -> None:
        """Charge a failed authorization of ``identifier``: one of its failures per hour and
        one of its failures in a row (none left: it is paused)."""
        now = self.now()
        changed: list[tuple[str, TokenBucket]] = []
        for c in self.failure_charges(identifier):
            bucket = self._bucket(c.name, now, make=True)
            assert bucket is not None
            bucket.take(1, now)
            changed.append((c.name, bucket))
            if c.reason == REASONS[CONSECUTIVE] and 0 <= bucket.tokens < 1:
                log.warn(
                    "{name} paused: {n} failed authorizations in a row",
                    name=c.name.partition(":")[2],
                    n=int(c.capacity),
                )
        self._changed(changed)

    def authorizations_valid(self, names: Iterable[str]) -> None:
        """Reset the failures in a row of each of ``names`` (they have valid authorizations)."""
        now = self.now()
        changed: list[tuple[str, TokenBucket]] = []
        for c in self.reset_charges(names):
            bucket = self._bucket(c.name, now, make=False)
            if bucket is not None and not bucket.full(now):
                bucket.reset(RESET_STAMP)
                changed.append((c.name, bucket))
        self._changed(changed)
