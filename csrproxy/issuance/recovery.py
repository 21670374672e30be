"""Start-up after a crash: finish the orders in flight, remove what nobody needs.

Every order that had not ended is resumed from its ACME order URL, and its async
order id keeps answering ``GET /v1/orders/<id>``.  The challenge records such an
order had published are published again at once, before the reactor runs: the
CA may still be about to look them up (the built-in zone starts empty; PowerDNS
still has them and must keep them).  They are removed when that order ends.
The records of every other order (finished, unknown, never at the CA, or on a
backend no longer configured) are removed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.challenges.zone import CHALLENGE_LABEL
from csrproxy.issuance.issuer import Issuer
from csrproxy.issuance.ledger import Ledger, certificate_key_label, order_key_label
from csrproxy.issuance.orders import OrderBook, OrderRecord
from csrproxy.issuance.resumes import RESUMING, ResumeQueue
from csrproxy.state.database import UNFINISHED, CertificateRow, ChallengeRow, OrderRow

log = Logger()

#: Resumed orders logged one by one at most (the rest in one line).
RESUME_LOG_LINES = 20


@dataclass(frozen=True)
class RecoveryPlan:
    """What start-up does with what an earlier run left."""

    #: Orders to finish, oldest first.
    resume: tuple[OrderRow, ...]
    #: Challenge records to publish again, by the id of the resumed order they answer.
    republish: Mapping[str, tuple[ChallengeRow, ...]]
    #: Challenge records nobody needs any more.
    remove: tuple[ChallengeRow, ...]


def plan_recovery(
    leftovers: Sequence[ChallengeRow], unfinished: Sequence[OrderRow], backend: str
) -> RecoveryPlan:
    """Decide, from the rows alone, what to resume, what to publish again and what to remove.

    An order whose certificate is on record has ended, whatever its status says (a
    database of schema 2 marked finished orders ``valid``).  A
    record is kept for a resumed order that the CA already has (it has an order URL),
    when it was published on ``backend`` (the one configured now).
    """
    resume = tuple(o for o in unfinished if o.certificate_id is None)
    at_the_ca = {o.id for o in resume if o.acme_url}
    republish: dict[str, list[ChallengeRow]] = {}
    remove: list[ChallengeRow] = []
    for row in leftovers:
        if row.order_id in at_the_ca and row.backend == backend:
            republish.setdefault(row.order_id, []).append(row)
        else:
            remove.append(row)
    return RecoveryPlan(resume, {k: tuple(v) for k, v in republish.items()}, tuple(remove))


def identifier_of(row: ChallengeRow) -> str:
    """The identifier a challenge record answers (``_acme-challenge.x`` answers ``x``)."""
    return row.name.removeprefix(CHALLENGE_LABEL + ".")


def order_record(found: tuple[OrderRow, CertificateRow | None] | None) -> OrderRecord | None:
    """The async order record of an order on record (an earlier run's, or one forgotten
    from memory), for ``GET /v1/orders/<id>`` — to the tokens whose patterns allow its
    names and key label.  An unfinished one is waiting its turn to be resumed."""
    if found is None:
        return None
    row, cert = found
    names = tuple(row.names)
    if row.status in UNFINISHED:
        label = order_key_label(row)
        return OrderRecord(row.id, names, request_key=row.request_key, key_label=label)
    if row.status == "issued":
        label = certificate_key_label(cert) if cert is not None else order_key_label(row)
        chain = cert.chain if cert is not None else None
        return OrderRecord(
            row.id,
            names,
            "valid" if chain else "invalid",
            chain,
            request_key=row.request_key,
            key_label=label,
        )
    if row.status == "invalid":
        error = {"type": "about:blank", "title": "Order failed", "detail": row.error or ""}
        return OrderRecord(row.id, names, "invalid", None, error, key_label=order_key_label(row))
    return None


def earlier_orders(ledger: Ledger) -> Callable[[str], Deferred[OrderRecord | None]]:
    """:class:`OrderBook`'s look-up of orders not in memory: the state database, by id."""
    return lambda order_id: ledger.order_with_chain(order_id).addCallback(order_record)


async def remove_orphans(
    ledger: Ledger,
    rows: Sequence[ChallengeRow],
    remove_names: Callable[[Iterable[str]], Deferred[None]] | None,
) -> None:
    if not rows:
        return
    names = sorted({r.name for r in rows})
    log.info("removing {n} challenge records left by an earlier run", n=len(rows))
    if remove_names is not None:
        try:
            await remove_names(names)
        except Exception as e:
            log.error("orphaned challenge records not removed ({err}); will retry", err=str(e))
            return
    await ledger.forget_challenges(list(rows))


def republish(issuer: Issuer, rows: Iterable[ChallengeRow]) -> None:
    """Publish ``rows`` again through the issuer's responder (already on record).

    The built-in zone takes them at once; a backend that fails is logged: the resumed
    order publishes its pending values again itself.
    """
    for row in rows:
        d = issuer.responder.publish(identifier_of(row), row.value)
        d.addErrback(_warn, "challenge record {name} not published again: {err}", row.name)


def unpublish(ledger: Ledger, issuer: Issuer, rows: Iterable[ChallengeRow]) -> Deferred[None]:
    """Take back one publication of each of ``rows`` and forget one record of each; fires
    when every removal is done or has failed (failures are logged)."""
    removals = []
    for row in rows:
        responder = ledger.responder(issuer.responder, row.order_id)
        d = responder.unpublish(identifier_of(row), row.value)
        removals.append(d.addErrback(_warn, "challenge record {name} not removed: {err}", row.name))
    return gatherResults(removals).addCallback(lambda _: None)


def _warn(failure: Failure, message: str, name: str) -> None:
    log.warn(message, name=name, err=failure.value)


class Resumer:
    """Resumes orders, ``RESUMING`` at a time (:class:`ResumeQueue`), each with the challenge
    records it had published (published again now, removed when it ends), and tracks each
    in the order book so its async id answers. Recovery at start and a cluster's takeover
    of a dead instance's orders both hand it rows."""

    def __init__(self, ledger: Ledger, issuer: Issuer, book: OrderBook) -> None:
        self.ledger = ledger
        self.issuer = issuer
        self.book = book
        self._records: dict[str, tuple[ChallengeRow, ...]] = {}
        self._logged = 0
        self.queue = ResumeQueue(self._start)
        issuer.promote = self.queue.promote

    def add(self, rows: Sequence[OrderRow], records: Mapping[str, Sequence[ChallengeRow]]) -> None:
        """Resume ``rows``; ``records`` holds each one's challenge records, by order id."""
        kept = [row for order in rows for row in records.get(order.id, ())]
        if kept:
            log.info("publishing {n} challenge records of resumed orders again", n=len(kept))
            republish(self.issuer, kept)
        for order in rows:
            self._records[order.id] = tuple(records.get(order.id, ()))
        self.queue.add(rows)

    def _start(self, row: OrderRow) -> Deferred[None]:
        own = self._records.pop(row.id, ())
        if self._logged < RESUME_LOG_LINES:
            self._logged += 1
            log.info(
                "resuming order {id} ({status}) for {names}",
                id=row.id,
                status=row.status,
                names=",".join(row.names),
            )
        # Its records go when it ends, before anyone waiting hears of it, as its own do.
        settle = functools.partial(unpublish, self.ledger, self.issuer, own) if own else None
        d = self.issuer.resume(row, settle).chain
        ended: Deferred[None] = Deferred()

        def end(result: object) -> object:
            ended.callback(None)
            return result

        d.addBoth(end)
        self.book.track(
            tuple(row.names), d, row.id, row.request_key, key_label=order_key_label(row)
        )
        return ended


async def recover(
    ledger: Ledger,
    issuer: Issuer,
    book: OrderBook,
    leftovers: list[ChallengeRow],
    unfinished: list[OrderRow],
    remove_names: Callable[[Iterable[str]], Deferred[None]] | None = None,
    resumer: Resumer | None = None,
) -> None:
    """Resume ``unfinished`` and settle ``leftovers`` (both read before the store's thread ran).

    Everything up to the first resumed order's start happens before this returns
    control, so records published again are served before the DNS server answers.
    """
    plan = plan_recovery(leftovers, unfinished, ledger.backend)
    if len(plan.resume) > RESUME_LOG_LINES:
        log.info(
            "resuming {n} orders of an earlier run, {at_once} at once",
            n=len(plan.resume),
            at_once=RESUMING,
        )
    (resumer or Resumer(ledger, issuer, book)).add(plan.resume, plan.republish)
    await remove_orphans(ledger, plan.remove, remove_names)
