"""The CA's look-ups of challenge records, as the built-in DNS server sees them.

A CA validates dns-01 by asking for the TXT record; when it does, the answer to
the authorization poll is moments away.  :class:`WatchedZone` tells whoever
watches a challenge name that it was asked for, so the first poll can follow the
CA's look-up instead of a fixed delay.  Only the look-ups that reach the zone
count (the DNS server's answer caches serve repeats); the first one after a
change of the zone always does, since every change drops those caches.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.names import dns

from csrproxy.challenges.zone import challenge_name
from csrproxy.dns import records as rr
from csrproxy.dns.zone import ChallengeZone, Result


class WatchedZone(ChallengeZone):
    """A :class:`ChallengeZone` that reports look-ups of watched challenge TXT records."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watches: dict[bytes, list[Deferred[None]]] = {}

    def watch(self, identifier: str) -> Deferred[None]:
        """Fires at the next look-up of ``identifier``'s challenge TXT record; cancellable."""
        key = rr.normalize_name(challenge_name(identifier))
        waiting = self._watches.setdefault(key, [])

        def forget(d: Deferred[None]) -> None:
            if d in waiting:
                waiting.remove(d)
            if not waiting and self._watches.get(key) is waiting:
                del self._watches[key]

        seen: Deferred[None] = Deferred(forget)
        waiting.append(seen)
        return seen

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object = None) -> Deferred[Result]:
        if self._watches and type == dns.TXT:
            for seen in self._watches.pop(name.lower(), ()):
                seen.callback(None)
        return super()._lookup(name, cls, type, timeout)
