"""Response rate limiting (RRL) for DNS over UDP, as BIND, Knot and NSD do it.

A spoofed UDP query makes us send our answer to the forged source: without a limit,
the server is a reflector. ``ResponseRateLimiter.check`` decides, for each UDP reply
about to be sent, whether it goes out, is dropped, or "slips" out truncated (TC=1,
no records) so a real resolver behind the address asks again over TCP, which cannot
be spoofed. TCP answers are never limited.

Accounts. One token bucket per (source prefix, kind of response), the prefix being
the address's first ``ipv4_prefix_length`` / ``ipv6_prefix_length`` bits; the kind
is the *account* the factory gives each reply (``account_of``):

- ``R`` + name + type: an answer or NODATA at a name that exists in the zone; the
  type is the first answer record's (CNAME for an alias; 0 for NODATA), so asking
  random types of one name cannot open new buckets. ``responses_per_second``.
- ``W`` + wildcard owner: anything synthesised from a wildcard (answer or NODATA,
  every type): every ``<id>.zone`` an installation has shares one bucket per prefix,
  so random names cannot open new buckets either. ``wildcards_per_second``.
- ``N``: NXDOMAIN, for the whole zone. ``nxdomains_per_second``.
- ``E``: every other rcode (REFUSED, FORMERR, NOTIMP, SERVFAIL, BADVERS).
  ``errors_per_second``.

A bucket holds at most one second of its rate, is credited its rate every second,
and goes into debt down to ``window`` seconds of it (BIND's accounting): a source
that flooded stays limited until it has been quiet for up to ``window`` seconds. A
rate of 0 leaves that kind unlimited. Every ``slip``-th limited reply of a bucket
slips (0: none do, 1: all do); the rest are dropped. Sources in ``exempt`` are never
limited; with ``log_only`` limited replies are counted and logged but sent.

Memory. The table (an ``OrderedDict``: O(1) moves and evictions) holds at most
``max_table_size`` buckets, least recently used first. A new bucket in a full table
evicts the first: the stalest (a bucket idle for ``window`` + 1 seconds holds nothing
a fresh one would not), else the least recently used. So spoofed sources only churn
the table, a prefix being flooded keeps its debt while it is flooded, and a
legitimate source always gets a bucket (a fresh one is full). ``ENTRY_BYTES`` is
the measured cost of one bucket (see the README).

Logging: never a line per reply; one summary line per ``SUMMARY_INTERVAL`` seconds
at most while replies are limited, with the prefixes limited most.
"""

from __future__ import annotations

import collections
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger

from csrproxy.dns.summary import WindowSummary

log = Logger()

# What ``check`` decides.
ANSWER, DROP, SLIP = 0, 1, 2
# The action labels passed to ``on_limit``.
DROPPED, SLIPPED, LOG_ONLY = "dropped", "slipped", "log_only"
# Account kinds (the account's first byte) and the names metrics and logs give them.
RESPONSE, WILDCARD, NXDOMAIN, ERROR = b"R", b"W", b"N", b"E"
KINDS = {
    RESPONSE[0]: "responses",
    WILDCARD[0]: "wildcards",
    NXDOMAIN[0]: "nxdomains",
    ERROR[0]: "errors",
}

#: Seconds between two summary lines, and prefixes named in one.
SUMMARY_INTERVAL = 10.0
SUMMARY_PREFIXES = 5
#: Bytes one bucket costs at most, measured with tracemalloc on CPython 3.11 (231 for an
#: error account, 275 with a 40-byte name: key, list, floats, OrderedDict slot and link).
ENTRY_BYTES = 280
#: The largest ``max_table_size`` accepted (about 290 MB of buckets).
MAX_TABLE_SIZE = 1 << 20
#: Addresses whose prefix is remembered (the map is cleared when full).
PREFIX_CACHE = 4096

_MAPPED = b"\0" * 10 + b"\xff\xff"
_TYPE = struct.Struct("!H")


def account_of(rcode: int, name: bytes, answer_type: int | None, wildcard: bytes | None) -> bytes:
    """The account of a reply: its kind byte, then what distinguishes it (see above).

    ``name`` is the lowercase question name, ``answer_type`` the first answer
    record's type (None for NODATA), ``wildcard`` the owner of the wildcard the
    reply was synthesised from (None if it was not).
    """
    if rcode == 3:
        return NXDOMAIN
    if rcode != 0:
        return ERROR
    if wildcard is not None:
        return WILDCARD + wildcard
    return RESPONSE + _TYPE.pack(answer_type or 0) + name


class Prefixer:
    """Maps an address (text, as ``recvfrom`` gives it) to its prefix as bytes, and tells
    exempt addresses (``None``). IPv4-mapped IPv6 addresses count as IPv4."""

    def __init__(self, ipv4_length: int, ipv6_length: int, exempt: Iterable[str] = ()) -> None:
        self._v4 = _mask(ipv4_length, 4)
        self._v6 = _mask(ipv6_length, 16)
        self._exempt: list[tuple[int, int, int]] = []  # (address length, network, mask)
        for text in exempt:
            net = ipaddress.ip_network(text)
            size = 4 if net.version == 4 else 16
            self._exempt.append((size, int(net.network_address), int(net.netmask)))

    def __call__(self, host: str) -> bytes | None:
        try:
            if ":" in host:
                packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
                if packed.startswith(_MAPPED):
                    packed = packed[12:]
            else:
                packed = socket.inet_aton(host)
        except (OSError, ValueError):
            return b"?"  # not an address: one bucket for all such peers
        if self._exempt:
            number = int.from_bytes(packed, "big")
            size = len(packed)
            for length, network, mask in self._exempt:
                if length == size and number & mask == network:
                    return None
        if len(packed) == 4:
            tag, (keep, last) = b"\x04", self._v4
        else:
            tag, (keep, last) = b"\x10", self._v6
        # The tag keeps an IPv4 prefix apart from an IPv6 one of the same bytes.
        if last:
            return tag + packed[:keep] + bytes((packed[keep] & last,))
        return tag + packed[:keep]


def _mask(length: int, size: int) -> tuple[int, int]:
    # (whole bytes kept, mask of the next byte; 0 when the prefix ends on a byte)
    whole, bits = divmod(length, 8)
    if whole >= size:
        return size, 0
    return whole, (0xFF << (8 - bits)) & 0xFF if bits else 0


def prefix_text(prefix: bytes, ipv4_length: int, ipv6_length: int) -> str:
    """A prefix key (``Prefixer``'s bytes) as CIDR text, for log lines."""
    if prefix[:1] == b"\x04":
        packed, length = prefix[1:].ljust(4, b"\0"), ipv4_length
        return f"{ipaddress.IPv4Address(packed)}/{length}"
    if prefix[:1] == b"\x10":
        packed, length = prefix[1:].ljust(16, b"\0"), ipv6_length
        return f"{ipaddress.IPv6Address(packed)}/{length}"
    return "?"


class LimitSummary(WindowSummary[bytes]):
    """Counts limited replies and logs them in one line, at most once per ``interval``
    (:class:`~csrproxy.dns.summary.WindowSummary`), naming the prefixes limited most."""

    def __init__(
        self, clock: Any, describe: Callable[[bytes], str], interval: float = SUMMARY_INTERVAL
    ) -> None:
        super().__init__(
            clock,
            "DNS RRL: {total} UDP replies over the rate limit ({actions}); most to {top}",
            "actions",
            interval=interval,
            named=SUMMARY_PREFIXES,
            describe=describe,
        )

    def add(self, action: str, kind: str, prefix: bytes) -> None:
        self.count(f"{kind} {action}", prefix)


class ResponseRateLimiter:
    """Token buckets per (source prefix, account); see the module docstring.

    ``on_limit(action, kind)`` is called for every reply over its limit (action
    ``dropped``, ``slipped`` or ``log_only``; kind ``responses``, ``wildcards``,
    ``nxdomains`` or ``errors``), never for one within it.
    """

    def __init__(
        self,
        clock: Any,
        *,
        responses_per_second: int = 20,
        wildcards_per_second: int = 1000,
        nxdomains_per_second: int = 20,
        errors_per_second: int = 20,
        window: int = 15,
        slip: int = 2,
        ipv4_prefix_length: int = 24,
        ipv6_prefix_length: int = 56,
        exempt: Iterable[str] = (),
        log_only: bool = False,
        max_table_size: int = 65536,
        on_limit: Callable[[str, str], None] | None = None,
    ) -> None:
        self.clock = clock
        self.window = window
        self.slip = slip
        self.log_only = log_only
        self.max_table_size = max_table_size
        self.on_limit = on_limit
        # kind byte -> (rate, floor), rate 0 for an unlimited kind
        self._rates = {
            RESPONSE[0]: responses_per_second,
            WILDCARD[0]: wildcards_per_second,
            NXDOMAIN[0]: nxdomains_per_second,
            ERROR[0]: errors_per_second,
        }
        self.prefix = Prefixer(ipv4_prefix_length, ipv6_prefix_length, exempt)
        self._seconds = clock.seconds
        # address -> its prefix and a NUL (b"" when exempt): most replies go to a few
        # resolvers, and parsing an address costs more than the rest of a check.
        self._prefixes: dict[str, bytes] = {}
        self.summary = LimitSummary(
            clock, lambda p: prefix_text(p, ipv4_prefix_length, ipv6_prefix_length)
        )
        # (prefix tag + prefix + NUL + account) -> [balance, last use, limited count]
        self._table: collections.OrderedDict[bytes, list[float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def check(self, host: str, account: bytes) -> int:
        """``ANSWER``, ``DROP`` or ``SLIP`` for a UDP reply of ``account`` to ``host``."""
        rate = self._rates[account[0]]
        if not rate:
            return ANSWER
        prefix = self._prefixes.get(host)
        if prefix is None:
            found = self.prefix(host)
            prefix = b"" if found is None else found + b"\0"
            if len(self._prefixes) >= PREFIX_CACHE:
                self._prefixes.clear()
            self._prefixes[host] = prefix
        if not prefix:
            return ANSWER
        key = prefix + account
        now = self._seconds()
        table = self._table
        entry = table.get(key)
        if entry is None:
            if len(table) >= self.max_table_size:
                table.popitem(last=False)
            table[key] = [rate - 1.0, now, 0.0]
            return ANSWER
        table.move_to_end(key)
        balance = entry[0]
        if now > entry[1]:
            balance += (now - entry[1]) * rate
            if balance > rate:
                balance = rate
            entry[1] = now
        elif now < entry[1]:  # the clock stepped back (NTP): count on from now
            entry[1] = now
        balance -= 1.0
        if balance >= 0.0:
            entry[0] = balance
            return ANSWER
        floor = -self.window * rate
        entry[0] = balance if balance > floor else floor
        return self._limited(entry, prefix[:-1], account)

    def _limited(self, entry: list[float], prefix: bytes, account: bytes) -> int:
        kind = KINDS[account[0]]
        if self.log_only:
            action, decision = LOG_ONLY, ANSWER
        else:
            entry[2] += 1.0
            if self.slip and entry[2] % self.slip == 0:
                action, decision = SLIPPED, SLIP
            else:
                action, decision = DROPPED, DROP
        if self.on_limit is not None:
            self.on_limit(action, kind)
        self.summary.add(action, kind, prefix)
        return decision

    def stop(self) -> None:
        """Log what is still counted; nothing is left scheduled."""
        self.summary.flush()


def slipped(reply: bytes, question_end: int) -> bytes:
    """``reply`` cut to its header and question with TC set: the client retries over TCP."""
    if len(reply) < 12:
        return reply
    qdcount = reply[4:6] if question_end else b"\0\0"
    return b"".join(
        (
            reply[:2],
            bytes((reply[2] | 0x02, reply[3])),
            qdcount,
            b"\0\0\0\0\0\0",
            reply[12:question_end] if question_end else b"",
        )
    )
