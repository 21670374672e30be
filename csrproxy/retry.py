"""Back-off and ``Retry-After``: the one retry timing rule for every peer (the CA, PowerDNS)."""

from __future__ import annotations

from email.utils import parsedate_to_datetime

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater


class Backoff:
    """Delays that start at ``first`` and double up to ``cap``; ``Retry-After`` wins."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.next = first

    def __call__(self, retry_after: float | None = None) -> float:
        delay = self.next
        self.next = min(self.next * 2, self.cap)
        if retry_after is not None:
            return max(retry_after, 0.0)
        return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class RetryTimer:
    """The waits between attempts at one thing: back-off, ``Retry-After`` first, and never
    past ``give_up`` (clock time)."""

    def __init__(self, clock: IReactorTime, first: float, cap: float, give_up: float) -> None:
        self.clock = clock
        self.backoff = Backoff(first, cap)
        self.give_up = give_up

    def next_delay(self, retry_after: float | None = None) -> float | None:
        """Seconds to wait before the next attempt, or None when it would end past the deadline."""
        return self.within(self.backoff(retry_after))

    def within(self, delay: float) -> float | None:
        """``delay``, or None when a wait that long would end past the deadline; a wait
        outside the back-off (it does not advance it)."""
        return None if self.clock.seconds() + delay > self.give_up else delay

    def sleep(self, delay: float) -> Deferred[None]:
        return deferLater(self.clock, delay, lambda: None)
