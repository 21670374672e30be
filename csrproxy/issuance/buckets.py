"""Token buckets: ``capacity`` tokens refilled evenly over ``period`` seconds, and a bounded
map of them by key.  Pure arithmetic on the ``now`` the caller passes."""

from __future__ import annotations

import math
from collections import OrderedDict


class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity / period`` per second (an infinite
    ``period``: never refilled, only :meth:`reset`)."""

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
        if n > self.capacity or self.rate == 0:
            return math.inf
        return (n - self.tokens) / self.rate

    def take(self, n: float, now: float) -> None:
        self._refill(now)
        self.tokens -= n

    def give_back(self, n: float, now: float) -> None:
        self._refill(now)
        self.tokens = min(self.capacity, self.tokens + n)

    def reset(self, stamp: float) -> None:
        """Full again, as counted at ``stamp``."""
        self.tokens = self.capacity
        self.stamp = stamp

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

    def peek(self, key: str) -> TokenBucket | None:
        """The bucket of ``key`` if it has one (none is a full one), not made, not moved."""
        return self._buckets.get(key)

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
