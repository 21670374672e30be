"""Admission control: token buckets that keep the publisher inside the CA's limits.

Pure logic with an injected clock.  Every budget is a token bucket that holds
``capacity`` tokens and refills them evenly over ``period`` seconds, so a full
bucket allows a burst of ``capacity`` and then ``capacity`` per ``period``.
A refusal names its budget and says when the bucket has room again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from csrproxy.errors import RateLimited

WEEK = 7 * 24 * 3600.0
THREE_HOURS = 3 * 3600.0
HOUR = 3600.0


class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity / period`` per second."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, capacity: float, period: float, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / period
        self.tokens = capacity
        self.stamp = now

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
    """Decides, before any order is made, whether it fits every budget."""

    def __init__(
        self,
        now: Callable[[], float],
        budgets: Budgets = Budgets(),
        registered_domain: str = "",
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.now = now
        self.budgets = budgets
        self.registered_domain = registered_domain.lower().rstrip(".")
        self._on_refusal = on_refusal
        b = budgets
        self._orders = TokenBucket(b.orders_per_3h, THREE_HOURS, now()) if b.orders_per_3h else None
        self._domains = BucketMap(b.new_names_per_week, WEEK) if b.new_names_per_week else None
        self._name_sets = BucketMap(b.same_names_per_week, WEEK) if b.same_names_per_week else None
        self._clients = (
            BucketMap(b.client_requests_per_hour, HOUR) if b.client_requests_per_hour else None
        )

    def _refuse(self, reason: str, wait: float, detail: str) -> RateLimited:
        if self._on_refusal is not None:
            self._on_refusal(reason)
        return RateLimited(detail, reason, max(1.0, wait))

    def admit_client(self, client: str) -> None:
        """Charge one request to ``client``; raise :class:`RateLimited` when over budget."""
        if self._clients is None:
            return
        now = self.now()
        bucket = self._clients.get(client, now)
        wait = bucket.wait_for(1, now)
        if wait > 0:
            raise self._refuse(
                "client",
                wait,
                f"this client made more than {self.budgets.client_requests_per_hour} "
                "sign requests in the last hour",
            )
        bucket.take(1, now)

    def domains(self, names: Iterable[str]) -> list[str]:
        return sorted({registered_domain_of(n, self.registered_domain) for n in names})

    def admit_order(self, names: Iterable[str], new_names: bool) -> Callable[[], None]:
        """Charge one new order for ``names``; ``new_names`` when that set was never issued.

        Raises :class:`RateLimited` without charging anything when a budget is short.
        Returns a function that gives back what only issued certificates should cost
        (call it when the order fails).
        """
        now = self.now()
        names = sorted(names)
        charges: list[tuple[TokenBucket, str, str]] = []
        if self._orders is not None:
            charges.append(
                (self._orders, "orders", f"more than {self.budgets.orders_per_3h} orders in 3 h")
            )
        if self._name_sets is not None:
            charges.append(
                (
                    self._name_sets.get(",".join(names), now),
                    "same-names",
                    f"more than {self.budgets.same_names_per_week} certificates for "
                    "this exact set of names in a week",
                )
            )
        if new_names and self._domains is not None:
            for domain in self.domains(names):
                charges.append(
                    (
                        self._domains.get(domain, now),
                        "new-names",
                        f"more than {self.budgets.new_names_per_week} new certificates "
                        f"for {domain} in a week",
                    )
                )
        for bucket, reason, detail in charges:
            wait = bucket.wait_for(1, now)
            if wait > 0:
                raise self._refuse(reason, wait, detail)
        for bucket, _, _ in charges:
            bucket.take(1, now)
        # Failed orders still count against the CA's order limit, not against certificates.
        refundable = [b for b, reason, _ in charges if reason != "orders"]

        def refund() -> None:
            for bucket in refundable:
                bucket.give_back(1, self.now())

        return refund
