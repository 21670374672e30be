"""Who is connecting (the key a client's connections are counted under), and refusals
summed into one log line a second however many there are."""

from __future__ import annotations

import collections
import ipaddress

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


def source_of(
    addr: IAddress | None,
) -> tuple[str | None, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """The key a peer's connections are counted under (an IPv4 address, or an IPv6 /64)
    and its address; ``(None, None)`` for a peer without an IP address."""
    host = getattr(addr, "host", None)
    if not isinstance(host, str):
        return None, None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None, None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        else:
            return str(ipaddress.IPv6Network((ip, 64), strict=False)), ip
    return str(ip), ip


class RefusalTally:
    """Counts refusals by reason and logs them as one summary line, at most one line
    every ``interval`` seconds however many there are."""

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = 1.0,
        what: str = "HTTP API refused {total} connections or requests",
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.what = what
        self.counts: collections.Counter[str] = collections.Counter()
        self._flush: IDelayedCall | None = None

    def add(self, reason: str) -> None:
        self.counts[reason] += 1
        if self._flush is None:
            self._flush = self.clock.callLater(self.interval, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line (nothing when nothing was)."""
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        if not self.counts:
            return
        counts = dict(self.counts)
        self.counts.clear()
        log.warn(
            self.what + " in {interval:g}s: {summary}",
            total=sum(counts.values()),
            interval=self.interval,
            summary=", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())),
            counts=counts,
        )
