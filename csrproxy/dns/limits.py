"""What one DNS-over-TCP client may hold: connections per source and in total, how long
a query may take to arrive, how much of it and of its answers is buffered.

``TCPLimits`` admits connections (``admit``/``release``), holds the deadlines the
protocol (``csrproxy.dns.protocols.DNSStreamProtocol``) keeps, and counts every
refusal: ``on_refusal(reason)`` for metrics, and one summary log line a second at
most (``RefusalSummary``), never one per connection.

Memory. A connection stops reading while more than ``TCP_BUFFER`` bytes of its
answers are unsent (it is the transport's streaming producer, and the transport's
``bufferSize`` is set to ``TCP_BUFFER``, so a read is at most that too). Answers are
written as their query is read (the zone answers at once), so a connection holds at
most:

- input: one read plus the start of a query read before it,
  ``TCP_BUFFER + TCP_MAX_QUERY + 1`` = 16,384 + 4,096 + 1 bytes;
- output: ``TCP_BUFFER`` unsent before the pause plus the answer that passed it,
  ``TCP_BUFFER + TCP_MAX_REPLY`` = 16,384 + 65,537 bytes;

102,402 bytes in all (``CONNECTION_BYTES``), times ``TCP_MAX_CONNECTIONS`` (256) =
26,214,912 bytes = 25.0 MiB of DNS buffers, under the 32 MiB budget
(``DNS_TCP_BUDGET``). A connection whose transport reads on while paused is aborted
when its input passes the bound.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger

from csrproxy.dns.summary import WindowSummary

log = Logger()

#: Open DNS TCP connections in all; a new source may evict (see ``TCPLimits.admit``).
TCP_MAX_CONNECTIONS = 256
#: Open connections from one source (an IPv4 address, an IPv6 /64).
TCP_MAX_PER_SOURCE = 16
#: Seconds a connection may wait for its next query (from its opening or its last
#: query), and seconds a client may leave answers over ``TCP_BUFFER`` unread.
TCP_IDLE_TIMEOUT = 30.0
#: Seconds from the first byte of a length-prefixed query to its last.
TCP_MESSAGE_TIMEOUT = 5.0
#: The longest query taken over TCP (a header, a question and an OPT record with
#: cookie and padding are a few hundred bytes); a longer length prefix aborts.
TCP_MAX_QUERY = 4096
#: Unsent answer bytes above which a connection stops reading; also its read size.
TCP_BUFFER = 16 * 1024
#: The longest answer, with its length prefix.
TCP_MAX_REPLY = 2 + 65535
#: Input bytes a paused connection may hold (see the module docstring).
TCP_MAX_INPUT = TCP_BUFFER + TCP_MAX_QUERY + 1
#: DNS buffer bytes one connection may hold, and what all of them may.
CONNECTION_BYTES = TCP_MAX_INPUT + TCP_BUFFER + TCP_MAX_REPLY
DNS_TCP_BUDGET = 32 * 1024 * 1024
#: Seconds between two summary log lines, and sources named in one.
SUMMARY_INTERVAL = 1.0
SUMMARY_SOURCES = 5

# The reasons passed to ``on_refusal``.
PER_SOURCE = "dns_tcp_per_source"  # the source already has its share of connections
TOTAL = "dns_tcp_total"  # every slot taken, by sources with no more than this one
EVICTED = "dns_tcp_evicted"  # closed to make room for a source with fewer connections
MESSAGE_TIMEOUT = "dns_tcp_message_timeout"  # a query took over TCP_MESSAGE_TIMEOUT
UNREAD = "dns_tcp_unread"  # answers left unread for TCP_IDLE_TIMEOUT
TOO_LONG = "dns_tcp_too_long"  # a length prefix over TCP_MAX_QUERY
OVERRUN = "dns_tcp_overrun"  # the transport kept reading while paused


def memory_bound(max_connections: int = TCP_MAX_CONNECTIONS) -> int:
    """The most DNS buffer bytes ``max_connections`` connections may hold."""
    return max_connections * CONNECTION_BYTES


def source_of(peer: Any) -> str:
    """The key connections are counted under: an IPv4 address (IPv4-mapped too), an
    IPv6 /64 (one subscriber's share), else the peer as text."""
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return str(peer)
    try:
        addr = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class Evictable(Protocol):
    """A connection ``TCPLimits`` may close to make room for another source."""

    def evict(self) -> None: ...


class RefusalSummary(WindowSummary[str]):
    """Counts refusals and logs them in one line, at most once per ``interval`` seconds:
    the count by reason and the ``SUMMARY_SOURCES`` sources refused most
    (:class:`~csrproxy.dns.summary.WindowSummary`). ``on_refusal(reason)`` is called for
    every refusal.
    """

    def __init__(
        self,
        clock: Any,
        on_refusal: Callable[[str], None] | None = None,
        interval: float = SUMMARY_INTERVAL,
    ) -> None:
        super().__init__(
            clock,
            "DNS TCP: {total} connections refused or closed ({reasons}); most from {top}",
            "reasons",
            interval=interval,
            named=SUMMARY_SOURCES,
        )
        self.on_refusal = on_refusal

    def refused(self, reason: str, source: str) -> None:
        if self.on_refusal is not None:
            self.on_refusal(reason)
        self.count(reason, source)


class TCPLimits:
    """The caps and deadlines of DNS-over-TCP connections (see the module docstring).

    At most ``max_per_source`` connections from one source (``source_of``) and
    ``max_connections`` in all. When all are taken, a source with fewer connections
    than the one holding most gets in and that one's oldest connection is evicted, so
    no group of sources can keep another out unless every source holds the same
    number; a connection from a source already holding most is refused.
    ``idle_timeout`` and ``message_timeout`` are the protocol's deadlines.
    """

    def __init__(
        self,
        clock: Any,
        *,
        max_connections: int = TCP_MAX_CONNECTIONS,
        max_per_source: int = TCP_MAX_PER_SOURCE,
        idle_timeout: float = TCP_IDLE_TIMEOUT,
        message_timeout: float = TCP_MESSAGE_TIMEOUT,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.clock = clock
        self.max_connections = max_connections
        self.max_per_source = min(max_per_source, max_connections)
        self.idle_timeout = idle_timeout
        self.message_timeout = message_timeout
        self.summary = RefusalSummary(clock, on_refusal)
        # source -> its connections, oldest first (dicts keep insertion order)
        self._sources: dict[str, dict[Evictable, None]] = {}
        self._source: dict[Evictable, str] = {}

    def __len__(self) -> int:
        return len(self._source)

    def count(self, source: str) -> int:
        """Connections open from ``source``."""
        return len(self._sources.get(source, ()))

    def admit(self, connection: Evictable, peer: Any) -> str | None:
        """Take ``connection`` from ``peer`` and return its source, or None if refused."""
        source = source_of(peer)
        held = self.count(source)
        if held >= self.max_per_source:
            self.refused(PER_SOURCE, source)
            return None
        if len(self._source) >= self.max_connections:
            heaviest = max(self._sources, key=lambda s: len(self._sources[s]))
            if len(self._sources[heaviest]) <= held:
                self.refused(TOTAL, source)
                return None
            victim = next(iter(self._sources[heaviest]))
            self.release(victim)
            self.refused(EVICTED, heaviest)
            victim.evict()
        self._sources.setdefault(source, {})[connection] = None
        self._source[connection] = source
        return source

    def release(self, connection: Evictable) -> None:
        """Forget ``connection`` (closed, or being evicted); unknown ones are ignored."""
        source = self._source.pop(connection, None)
        if source is None:
            return
        mine = self._sources[source]
        del mine[connection]
        if not mine:
            del self._sources[source]

    def refused(self, reason: str, source: str) -> None:
        """Count a refused or closed connection (one of the reasons above)."""
        self.summary.refused(reason, source)

    def stop(self) -> None:
        """Log what is still counted; nothing is left scheduled."""
        self.summary.flush()
