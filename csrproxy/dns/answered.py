"""When each challenge name's answers can have left every cache that took them.

A resolver keeps what we answered for the TTL we gave (RFC 1035, 2308: a positive
answer for the record's TTL, a negative one for the SOA's minimum), so a new challenge
value for a name this server answered a moment ago is not seen by the CA until those
copies expire: the CA reads the old value and the order fails ``unauthorized``.
:class:`AnswerLog` is told of every reply sent for an ``_acme-challenge`` name and says
until when a copy of any of them can live; the issuer waits that out before answering
a challenge for the name.

Bounded: at most ``max_names`` names are kept. When full, every entry is folded into one
horizon (the latest of their expiries) that then stands for any name not kept: a flood
of queries for made-up challenge names costs a wait of at most one TTL, never memory.
"""

from __future__ import annotations

from collections.abc import Callable

#: The first label of every dns-01 challenge name, as it is on the wire (length byte first).
CHALLENGE_LABEL = b"\x0f_acme-challenge"

#: Names kept before they are folded into the horizon (about 24 MB at most, with names
#: of 250 bytes).
MAX_NAMES = 65_536


class AnswerLog:
    """Per challenge name, the clock time until which a cache may hold an answer we sent.

    ``ttl`` is how long a cache may keep any answer for a challenge name, positive or
    negative: the zone's challenge TTL, which is also its negative TTL's upper bound.
    """

    def __init__(
        self, clock: Callable[[], float], ttl: Callable[[], float], max_names: int = MAX_NAMES
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self.max_names = max_names
        self._until: dict[bytes, float] = {}
        self._horizon = 0.0

    def answered(self, name: bytes) -> None:
        """A reply for ``name`` (its wire form, lower case) was sent just now."""
        until = self.clock() + self.ttl()
        if len(self._until) >= self.max_names and name not in self._until:
            self._horizon = max(self._horizon, *self._until.values())
            self._until.clear()
        if until > self._until.get(name, 0.0):
            self._until[name] = until

    def answered_reply(self, reply: bytes) -> None:
        """Note ``reply`` (a DNS message) when its question is a challenge name; any other
        reply costs one comparison. The question's name is uncompressed (RFC 1035 4.1.4
        lets compression point only backwards), so its lowercased wire bytes are the key,
        as the memo's are (``csrproxy.dns.cached``)."""
        if reply[12:28].lower() != CHALLENGE_LABEL:
            return
        end, size = 12, len(reply)
        while end < size and 0 < reply[end] < 64:
            end += 1 + reply[end]
        if end < size and reply[end] == 0:
            self.answered(reply[12 : end + 1].lower())

    def until(self, name: str) -> float:
        """The clock time after which no cache holds an answer we sent for ``name``
        (``_acme-challenge.<...>``); 0 when we never sent one (or long ago)."""
        kept = self._until.get(wire_name(name), 0.0)
        return max(kept, self._horizon)

    def __len__(self) -> int:
        return len(self._until)


def wire_name(name: str) -> bytes:
    """``name`` (text, any case, trailing dot or not) as the lowercased wire bytes of a
    question's name: the key of :class:`AnswerLog`."""
    labels = name.rstrip(".").lower().encode("ascii", "replace").split(b".")
    return b"".join(bytes((len(label),)) + label for label in labels if label) + b"\0"
