"""Order leases across instances: an order dies with its instance only for a lease.

On a shared database each order is leased to the instance running it (``orders.owner``,
``orders.lease_until``, written with the order). :class:`OrderLeases` keeps this
instance's leases alive (one ``UPDATE`` every ``lease / 4`` seconds) and takes over the
unfinished orders whose lease ran out — their instance was killed, or lost the database
for longer than a lease — resuming each from its ACME order URL (the same order, the same
certificate; no second order) with the challenge records it had published. The client's
async id answers through any instance meanwhile (``processing``, then the chain).

Bounds: one heartbeat and one takeover query in flight at most; at most ``TAKE_AT_ONCE``
orders taken a round (the resume queue runs ``RESUMING`` at once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from csrproxy.state.database import ChallengeRow, OrderRow
from csrproxy.state.store import Store

log = Logger()

#: Orders taken over per round at most.
TAKE_AT_ONCE = 20

#: What takes over: ``resume(orders, records by order id)``.
Resume = Callable[[Sequence[OrderRow], Mapping[str, Sequence[ChallengeRow]]], None]


class OrderLeases(Service):
    """Extends this instance's order leases and takes over expired ones, every
    ``lease / 4`` seconds of ``reactor``'s clock."""

    def __init__(self, reactor: Any, store: Store, resume: Resume, lease: float) -> None:
        self.reactor = reactor
        self.store = store
        self.resume = resume
        self.lease = lease
        self.taken = 0
        self._failing = False
        self._busy = False
        self._loop = LoopingCall(self.tick)
        self._loop.clock = reactor

    def startService(self) -> None:
        Service.startService(self)
        self._loop.start(self.lease / 4, now=False).addErrback(
            lambda f: log.failure("order leases stopped", f)
        )

    def stopService(self) -> None:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()

    def tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        db = self.store.db
        now = self.reactor.seconds()
        d = self.store.run(db.extend_leases, now + self.lease)
        d.addCallback(lambda _: self.store.run(db.take_over_orders, now, TAKE_AT_ONCE))
        d.addCallbacks(self._took, self._failed)
        d.addBoth(self._idle)

    def _idle(self, _: object) -> None:
        self._busy = False

    def _took(self, taken: list[tuple[OrderRow, list[ChallengeRow]]]) -> None:
        if self._failing:
            self._failing = False
            log.info("order leases kept again")
        if not taken:
            return
        self.taken += len(taken)
        log.info(
            "taking over {n} orders whose instance's lease ran out ({ids})",
            n=len(taken),
            ids=", ".join(order.id for order, _ in taken[:5]),
        )
        self.resume([order for order, _ in taken], {order.id: rows for order, rows in taken})

    def _failed(self, failure: Any) -> None:
        if not self._failing:
            self._failing = True
            log.warn("order leases not kept: {err}", err=failure.getErrorMessage())
