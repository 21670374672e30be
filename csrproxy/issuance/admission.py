"""Admission control: token buckets that keep the publisher inside the CA's limits.

Pure logic with an injected clock.  Every budget is a token bucket that holds
``capacity`` tokens and refills them evenly over ``period`` seconds, so a full
bucket allows a burst of ``capacity`` and then ``capacity`` per ``period``.
A refusal names its budget and says when the bucket has room again.

Every bucket has a persistent name (``orders``, ``same-names:<names>``,
``new-names:<domain>``, ``client:<id>``): each change is handed to ``persist`` as
``(name, tokens, stamp)`` rows and :meth:`Admission.restore` rebuilds the buckets
from them, so a restart does not refill a spent budget.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred, fail, succeed

from csrproxy.errors import RateLimited

WEEK = 7 * 24 * 3600.0
THREE_HOURS = 3 * 3600.0
HOUR = 3600.0

#: A bucket as stored: its persistent name, its tokens and when they were counted.
BudgetRow = tuple[str, float, float]
#: The persistent names of buckets: ``orders``, then ``<prefix>:<key>`` per keyed budget.
ORDERS = "orders"
SAME_NAMES = "same-names"  # key: the sorted names joined by ","
NEW_NAMES = "new-names"  # key: the registered domain
CLIENT = "client"  # key: the client id (its token's id, else its address)


#: Gives back what a failed order should not cost.
Refund = Callable[[], None]


@dataclass(frozen=True)
class Charge:
    """One token an admission takes: from the bucket ``name`` (``capacity`` per ``period``
    seconds), refused as ``reason`` with ``detail``."""

    name: str
    reason: str
    detail: str
    capacity: float
    period: float


class AdmissionGate(Protocol):
    """What the issuer asks before it takes a request or places an order.

    A refusal is a failed Deferred of :class:`RateLimited`; nothing is charged then.
    """

    def decide_client(self, client: str) -> Deferred[None]:
        """Charge one sign request to ``client``."""

    def decide_order(self, names: Iterable[str], new_names: bool) -> Deferred[Refund]:
        """Charge one new order for ``names`` (``new_names``: never issued before)."""


class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity / period`` per second."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, capacity: float, period: float, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / period
        self.tokens = capacity
        self.stamp = now

    @classmethod
    def restored(
        cls, capacity: float, period: float, tokens: float, stamp: float, now: float
    ) -> TokenBucket:
        """The bucket that held ``tokens`` at ``stamp``, refilled since then at today's rate.

        At most ``capacity`` tokens (a budget lowered since keeps no more than its new
        size); a stamp later than ``now`` (the clock went back) counts from ``now``.
        """
        bucket = cls(capacity, period, now)
        bucket.tokens = min(capacity, tokens)
        bucket.stamp = min(stamp, now)
        return bucket

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens are there (0 when they are there now)."""
        self._refill(now)
        if self.tokens >= n:
            return 0.0
        if n > self.capacity:
            return float("inf")
        return (n - self.tokens) / self.rate

    def take(self, n: float, now: float) -> None:
        self._refill(now)
        self.tokens -= n

    def give_back(self, n: float, now: float) -> None:
        self._refill(now)
        self.tokens = min(self.capacity, self.tokens + n)

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


class BucketMap:
    """Buckets by key, made full on first use; full buckets are the first to be forgotten."""

    def __init__(self, capacity: float, period: float, max_keys: int = 100_000) -> None:
        self.capacity = capacity
        self.period = period
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(now)
            bucket = self._buckets[key] = TokenBucket(self.capacity, self.period, now)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def put(self, key: str, bucket: TokenBucket, now: float) -> None:
        """Hold ``bucket`` for ``key`` as its most recently used (within ``max_keys``)."""
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._evict(now)
        self._buckets[key] = bucket
        self._buckets.move_to_end(key)

    def _evict(self, now: float) -> None:
        # A full bucket carries no state: forget those first (down to 90%), oldest first;
        # scanning once per tenth of max_keys insertions keeps this amortised O(1).
        target = self.max_keys - max(1, self.max_keys // 10)
        for key in list(self._buckets):
            if len(self._buckets) <= target:
                break
            if self._buckets[key].full(now):
                del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class Budgets:
    """The limits; 0 turns a budget off."""

    #: New certificates (a set of names never issued before) per registered domain per week.
    new_names_per_week: int = 45
    #: New orders per 3 hours (Let's Encrypt: 300 per account).
    orders_per_3h: int = 250
    #: Certificates for one exact set of names per week (Let's Encrypt: 5, no override).
    same_names_per_week: int = 5
    #: Sign requests per client (bearer token, else address) per hour.
    client_requests_per_hour: int = 60


def registered_domain_of(name: str, registered: str) -> str:
    """``registered`` when ``name`` is it or below it, else the name's last two labels."""
    name = name.removeprefix("*.")
    if name == registered or name.endswith("." + registered):
        return registered
    return ".".join(name.rsplit(".", 2)[-2:])


class Admission:
    """Decides, before any order is made, whether it fits every budget.

    ``persist``, when given, is called once after each change (a charge, a refund)
    with the rows of exactly the buckets that change touched; it must not raise.
    """

    def __init__(
        self,
        now: Callable[[], float],
        budgets: Budgets = Budgets(),
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
        self._domains = BucketMap(b.new_names_per_week, WEEK) if b.new_names_per_week else None
        self._name_sets = BucketMap(b.same_names_per_week, WEEK) if b.same_names_per_week else None
        self._clients = (
            BucketMap(b.client_requests_per_hour, HOUR) if b.client_requests_per_hour else None
        )

    def _maps(self) -> dict[str, BucketMap]:
        """The keyed budgets turned on, by the prefix of their buckets' names."""
        maps = {NEW_NAMES: self._domains, SAME_NAMES: self._name_sets, CLIENT: self._clients}
        return {prefix: m for prefix, m in maps.items() if m is not None}

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
            queries.append((prefix + ":", now - m.period, m.max_keys))
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
        return RateLimited(detail, reason, max(1.0, wait))

    def admit_client(self, client: str) -> None:
        """Charge one request to ``client``; raise :class:`RateLimited` when over budget."""
        charge = self.client_charge(client)
        if self._clients is None or charge is None:
            return
        now = self.now()
        bucket = self._clients.get(client, now)
        wait = bucket.wait_for(1, now)
        if wait > 0:
            raise self._refuse(charge.reason, wait, charge.detail)
        bucket.take(1, now)
        self._changed([(f"{CLIENT}:{client}", bucket)])

    def domains(self, names: Iterable[str]) -> list[str]:
        return sorted({registered_domain_of(n, self.registered_domain) for n in names})

    def charges(self, names: Iterable[str], new_names: bool) -> list[Charge]:
        """The buckets one order for ``names`` costs a token of, in the order they are checked."""
        names = sorted(names)
        b = self.budgets
        found: list[Charge] = []
        if self._orders is not None:
            found.append(
                Charge(ORDERS, "orders", f"more than {b.orders_per_3h} orders in 3 h",
                       b.orders_per_3h, THREE_HOURS)
            )
        if self._name_sets is not None:
            found.append(
                Charge(
                    f"{SAME_NAMES}:{','.join(names)}",
                    "same-names",
                    f"more than {b.same_names_per_week} certificates for "
                    "this exact set of names in a week",
                    b.same_names_per_week,
                    WEEK,
                )
            )
        if new_names and self._domains is not None:
            for domain in self.domains(names):
                found.append(
                    Charge(
                        f"{NEW_NAMES}:{domain}",
                        "new-names",
                        f"more than {b.new_names_per_week} new certificates "
                        f"for {domain} in a week",
                        b.new_names_per_week,
                        WEEK,
                    )
                )
        return found

    def client_charge(self, client: str) -> Charge | None:
        """The bucket a sign request of ``client`` costs a token of (None: budget off)."""
        if self._clients is None:
            return None
        return Charge(
            f"{CLIENT}:{client}",
            "client",
            f"this client made more than {self.budgets.client_requests_per_hour} "
            "sign requests in the last hour",
            self.budgets.client_requests_per_hour,
            HOUR,
        )

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

    def decide_order(self, names: Iterable[str], new_names: bool) -> Deferred[Refund]:
        """:meth:`admit_order`, answered at once."""
        try:
            return succeed(self.admit_order(names, new_names))
        except RateLimited as e:
            return fail(e)

    def admit_order(self, names: Iterable[str], new_names: bool) -> Refund:
        """Charge one new order for ``names``; ``new_names`` when that set was never issued.

        Raises :class:`RateLimited` without charging anything when a budget is short.
        Returns a function that gives back what only issued certificates should cost
        (call it when the order fails).
        """
        now = self.now()
        # (bucket, its persistent name, the reason a refusal gives, its detail)
        charges: list[tuple[TokenBucket, str, str, str]] = []
        for c in self.charges(names, new_names):
            if c.name == ORDERS:
                assert self._orders is not None
                bucket = self._orders
            else:
                prefix, _, key = c.name.partition(":")
                bucket = self._maps()[prefix].get(key, now)
            charges.append((bucket, c.name, c.reason, c.detail))
        for bucket, _, reason, detail in charges:
            wait = bucket.wait_for(1, now)
            if wait > 0:
                raise self._refuse(reason, wait, detail)
        for bucket, _, _, _ in charges:
            bucket.take(1, now)
        self._changed([(name, bucket) for bucket, name, _, _ in charges])
        # Failed orders still count against the CA's order limit, not against certificates.
        refundable = [(name, b) for b, name, reason, _ in charges if reason != "orders"]

        def refund() -> None:
            now = self.now()
            for _, bucket in refundable:
                bucket.give_back(1, now)
            self._changed(refundable)

        return refund
