"""DNS cookies (RFC 7873) with server cookies in RFC 9018's format, and NSID (RFC 5001).

A server cookie is 16 bytes: version 1, three reserved zero bytes, a 32-bit timestamp
(seconds) and an 8-byte hash of client cookie | version | reserved | timestamp | client
IP under the server's secret. RFC 9018 names SipHash-2-4 so that servers of different
makes behind one anycast address can share a secret; every csrproxy sharing a state
database uses this code and that database's secret, so the hash is keyed BLAKE2b
(``hashlib``, one C call) instead: a keyed PRF like SipHash, with no pure-Python cost.

The secret is rotated (RFC 9018 5, RFC 7873 7.1) without any database write: the stored
secret is a master, and the secret of period ``p = floor(now / rotation)`` is a keyed
hash of ``p`` under it, the same on every instance sharing the database and after a
restart. New cookies are made under the current period's secret; a cookie verifies under
the current or the previous one (then answered with a fresh cookie under the current).
With ``rotation`` at least ``MIN_ROTATION`` (twice ``MAX_AGE``) a cookie's secret is
still current or previous for the cookie's whole life, clock skew of ``MAX_AHEAD``
between instances included.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

# The name of the server secret in the state database (``StateDB.secret``).
COOKIE_SECRET = "dns-cookie"
NSID = 3
COOKIE = 10

CLIENT_COOKIE = 8
# RFC 7873 5.2.2: a server cookie is 8 to 32 bytes.
MIN_COOKIE, MAX_COOKIE = CLIENT_COOKIE + 8, CLIENT_COOKIE + 32
VERSION = 1
SERVER_COOKIE = 16
# RFC 9018 4.3: valid up to an hour old and five minutes ahead; refreshed after half an hour.
MAX_AGE = 3600
MAX_AHEAD = 300
REFRESH_AGE = 1800
# [dns] cookie_rotation: seconds a derived secret is current, by default and at least.
DEFAULT_ROTATION = 86400
MIN_ROTATION = 2 * MAX_AGE
# RFC 7873 8: the extended rcode BADCOOKIE (rcode 7 in the header, 1 in the OPT).
BADCOOKIE = 23
# The longest [dns] nsid (BIND allows about as much).
MAX_NSID = 128
# The most our EDNS options add to a reply: a COOKIE and an NSID.
OPTIONS_ROOM = 4 + MAX_COOKIE + 4 + MAX_NSID
# Client IPs kept in packed form at most (cleared when full).
PACKED_CACHE = 4096


class MalformedCookie(ValueError):
    """A COOKIE option of a length RFC 7873 does not allow: FORMERR."""


class ServerCookies:
    """Makes and checks RFC 9018 server cookies under secrets derived from ``secret``
    (the master, 16 to 64 bytes), a new one every ``rotation`` seconds (at least
    ``MIN_ROTATION``) of ``seconds()``; the current and previous ones are cached."""

    def __init__(
        self, secret: bytes, seconds: Callable[[], float], rotation: int = DEFAULT_ROTATION
    ) -> None:
        if not 16 <= len(secret) <= 64:
            raise ValueError("a cookie secret is 16 to 64 bytes")
        if rotation < MIN_ROTATION:
            raise ValueError(f"a cookie secret rotates every {MIN_ROTATION} seconds at least")
        self.secret = secret
        self.rotation = rotation
        self._seconds = seconds
        self._packed: dict[str, bytes] = {}
        self._period: int | None = None
        self._current = self._previous = b""
        self._next: tuple[int, bytes] | None = None  # the next period's, when seen

    def key(self, period: int) -> bytes:
        """The secret of ``period`` (``floor(seconds / rotation)``), derived from the master."""
        return hashlib.blake2b(
            struct.pack("!q", period), key=self.secret, digest_size=32, person=b"csrproxy-cookie"
        ).digest()

    def _keys(self, seconds: float) -> tuple[bytes, bytes]:
        # The current and previous periods' secrets, derived once per period change.
        period = int(seconds // self.rotation)
        if period != self._period:
            if self._period is not None and period == self._period + 1:
                self._previous, self._current = self._current, self.key(period)
            else:
                self._previous, self._current = self.key(period - 1), self.key(period)
            self._period = period
        return self._current, self._previous

    def _hash(self, key: bytes, client: bytes, head: bytes, host: str) -> bytes:
        packed = self._packed.get(host)
        if packed is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                packed = socket.inet_pton(family, host.partition("%")[0])
            except OSError:  # not an IP peer (a UNIX socket, a test's transport)
                packed = host.encode()
            if len(self._packed) >= PACKED_CACHE:
                self._packed.clear()
            self._packed[host] = packed
        return hashlib.blake2b(client + head + packed, key=key, digest_size=8).digest()

    def answer(self, option: bytes, host: str) -> tuple[bytes, bool]:
        """The COOKIE option data to send back to ``host``, and whether ``option`` held a
        valid server cookie (the query then bypasses rate limiting).

        A cookie is checked under the secret of the period its timestamp falls in (the
        current, the previous, or — from an instance whose clock is up to ``MAX_AHEAD``
        ahead — the next). A valid cookie is echoed unless it is over ``REFRESH_AGE`` old
        or not made under the current secret: it is then answered with a fresh one. Raises
        :class:`MalformedCookie` for a length RFC 7873 5.2.2 forbids.
        """
        length = len(option)
        if length != CLIENT_COOKIE and not MIN_COOKIE <= length <= MAX_COOKIE:
            raise MalformedCookie(length)
        client = option[:CLIENT_COOKIE]
        seconds = self._seconds()
        now = int(seconds) & 0xFFFFFFFF
        current, previous = self._keys(seconds)
        if length == CLIENT_COOKIE + SERVER_COOKIE and option[8] == VERSION:
            head = option[8:16]
            # Serial-number arithmetic (RFC 1982): the timestamp wraps in 2106.
            age = (now - struct.unpack_from("!I", option, 12)[0] + 0x80000000) % (
                1 << 32
            ) - 0x80000000
            if -MAX_AHEAD <= age <= MAX_AGE:
                # The secret of the period the cookie was made in: the current or the
                # previous one, or the next (made by an instance whose clock is ahead).
                made = int((int(seconds) - age) // self.rotation)
                key = self._key_of(made, int(seconds // self.rotation), current, previous)
                if self._hash(key, client, head, host) == option[16:]:
                    if key is current and age <= REFRESH_AGE:
                        return option, True
                    return client + self._fresh(current, client, host, now), True
        return client + self._fresh(current, client, host, now), False

    def _key_of(self, made: int, period: int, current: bytes, previous: bytes) -> bytes:
        if made == period:
            return current
        if made == period - 1:
            return previous
        if self._next is None or self._next[0] != made:
            self._next = (made, self.key(made))
        return self._next[1]

    def option(self, option: bytes, host: str) -> tuple[bytes, bool]:
        """:meth:`answer` encoded as the COOKIE option, and whether it was valid."""
        data, valid = self.answer(option, host)
        return option_bytes(COOKIE, data), valid

    def fresh(self, client: bytes, host: str, now: int) -> bytes:
        """A new server cookie for ``client`` from ``host`` with timestamp ``now``, under
        the current period's secret."""
        return self._fresh(self._keys(self._seconds())[0], client, host, now)

    def _fresh(self, key: bytes, client: bytes, host: str, now: int) -> bytes:
        head = struct.pack("!B3xI", VERSION, now)
        return head + self._hash(key, client, head, host)


def option_bytes(code: int, data: bytes) -> bytes:
    """One EDNS option on the wire."""
    return struct.pack("!HH", code, len(data)) + data


def reply_options(
    options: Iterable[Any], nsid: bytes | None, cookies: ServerCookies | None, host: str
) -> tuple[bytes, bool | None]:
    """The encoded NSID and COOKIE options answering a query's EDNS ``options`` (each with
    ``code`` and ``data``) from ``host``, and whether its cookie was valid (None: no COOKIE
    answered). An empty NSID is answered with ``nsid``, the first COOKIE by ``cookies``,
    when given.

    Raises :class:`MalformedCookie` for a COOKIE of a forbidden length.
    """
    out = []
    valid = None
    for option in options:
        if option.code == NSID and nsid is not None and not option.data:
            out.append(option_bytes(NSID, nsid))
        elif option.code == COOKIE and cookies is not None and valid is None:
            data, valid = cookies.answer(option.data, host)
            out.append(option_bytes(COOKIE, data))
    return b"".join(out), valid


def nsid_bytes(text: str) -> bytes:
    """``[dns] nsid`` as the option carries it: ``0x``-prefixed hex, else the text."""
    if text[:2].lower() == "0x":
        return bytes.fromhex(text[2:])
    return text.encode()
