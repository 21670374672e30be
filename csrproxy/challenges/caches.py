"""Waiting out the copies of a challenge name that resolvers may still hold.

A validating resolver between the CA and our name servers keeps every answer for its
TTL. When it took an answer for ``_acme-challenge.<name>`` before the order's values
were served (an earlier order's value, or none yet), the CA reads that copy and the
authorization fails ``unauthorized``. :class:`CacheWait` says when the challenges for
a set of names may be answered:

- for csrproxy's own listeners it knows: :class:`csrproxy.dns.answered.AnswerLog`
  says until when any answer it sent for the name can live; a name never answered is
  ready at once;
- for name servers it does not see answer (secondaries, other instances, PowerDNS), it
  assumes the worst: any of them may have handed out the old answer until the moment
  the new values were seen served, so it waits one TTL from then.

Either wait gets ``margin`` on top: resolvers count TTLs in whole seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from csrproxy.challenges.zone import challenge_name

log = Logger()

#: Resolvers keep TTLs in whole seconds: a copy taken at 0.9 s with TTL 1 may live to 2 s.
MARGIN = 1.0


class CacheWait:
    """``settle(identifiers)`` fires when no cache can hold an older answer for them.

    ``answered(name)`` (when our own listeners serve the zone) is the clock time until
    which a copy of an answer they sent for ``name`` can live; ``unobserved_ttl`` (when
    other name servers serve it too) is the TTL their answers carry. ``on_wait`` sees
    each wait that is not zero, in seconds.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        answered: Callable[[str], float] | None = None,
        unobserved_ttl: float | None = None,
        margin: float = MARGIN,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.answered = answered
        self.unobserved_ttl = unobserved_ttl
        self.margin = margin
        self.on_wait = on_wait

    def ready_at(self, identifiers: Sequence[str]) -> float:
        """The clock time at which challenges for ``identifiers`` may be answered."""
        now: float = self.reactor.seconds()
        ready = now
        if self.unobserved_ttl is not None:
            ready = now + self.unobserved_ttl + self.margin
        if self.answered is not None:
            for name in {challenge_name(i) for i in identifiers}:
                until = self.answered(name)
                if until > 0:
                    ready = max(ready, until + self.margin)
        return ready

    def settle(self, identifiers: Sequence[str]) -> Deferred[None]:
        wait = self.ready_at(identifiers) - self.reactor.seconds()
        if wait <= 0:
            return succeed(None)
        log.info(
            "waiting {wait:.1f} s before answering challenges for {names}: resolvers may"
            " still hold an older answer",
            wait=wait,
            names=",".join(identifiers),
        )
        if self.on_wait is not None:
            self.on_wait(wait)
        return deferLater(self.reactor, wait, lambda: None)


__all__ = ["MARGIN", "CacheWait"]
