"""Waiting for an order another instance runs: identical requests share one order.

A sign request whose CSR already has an unfinished order on the shared database, leased
to a live instance, does not place a second order: it waits for that one, reading its row
every ``POLL`` seconds (one indexed read by primary key) until it is issued (the chain),
invalid (its error) or ``timeout`` passes. Should its instance die meanwhile, another
takes the order over (:mod:`csrproxy.cluster.takeover`) and the wait goes on.

Bounds: one read in flight per waiting request; the API's own limits bound the requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from csrproxy.errors import IssuanceFailed
from csrproxy.state.database import CertificateRow, OrderRow

POLL = 0.25

Lookup = Callable[[str], "Deferred[tuple[OrderRow, CertificateRow | None] | None]"]


def wait_for_order(
    clock: IReactorTime, lookup: Lookup, order_id: str, timeout: float
) -> Deferred[str]:
    """The chain of ``order_id`` (run by another instance) once it is issued."""
    d = Deferred.fromCoroutine(wait_for_certificate(clock, lookup, order_id, timeout))
    return d.addCallback(lambda cert: cert.chain)


async def wait_for_certificate(
    clock: IReactorTime, lookup: Lookup, order_id: str, timeout: float
) -> CertificateRow:
    """The certificate ``order_id`` (run by another instance) issued, once it did."""
    deadline = clock.seconds() + timeout
    while True:
        found = await lookup(order_id)
        if found is not None:
            order, cert = found
            if order.status == "issued" and cert is not None:
                return cert
            if order.status == "invalid":
                raise IssuanceFailed(order.error or f"order {order_id} failed")
        if clock.seconds() >= deadline:
            raise IssuanceFailed(
                f"order {order_id} of another instance did not end within {timeout:g}s",
                status=504,
            )
        await _sleep(clock, POLL)


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[Any]:
    return deferLater(clock, seconds, lambda: None)
