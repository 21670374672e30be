"""Back-off and ``Retry-After``: the one retry timing rule for every peer (the CA, PowerDNS)."""

from __future__ import annotations

from email.utils import parsedate_to_datetime


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
