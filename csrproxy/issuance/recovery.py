"""Start-up after a crash: remove orphaned challenge records, finish orders in flight.

Challenge records an earlier run published are removed (the built-in zone
starts empty, so only the rows go; PowerDNS records are deleted).  Every
order that had not ended is resumed from its ACME order URL, and its async
order id keeps answering ``GET /v1/orders/<id>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from csrproxy.issuance.issuer import Issuer
from csrproxy.issuance.ledger import Ledger
from csrproxy.issuance.orders import OrderBook, OrderRecord
from csrproxy.state.database import ChallengeRow, OrderRow

log = Logger()


def load_order_records(ledger: Ledger, book: OrderBook) -> None:
    """Finished orders of earlier runs, so their async ids still answer."""
    by_id = {c.id: c for c in ledger.latest.values()}
    for row in reversed(ledger.recent_orders()):
        if row.status == "valid":
            cert = by_id.get(row.certificate_id) if row.certificate_id else None
            chain = cert.chain if cert is not None else None
            status = "valid" if chain else "invalid"
            book.add(OrderRecord(row.id, tuple(row.names), status, chain, None, row.request_key))
        elif row.status == "invalid":
            error = {"type": "about:blank", "title": "Order failed", "detail": row.error or ""}
            book.add(OrderRecord(row.id, tuple(row.names), "invalid", None, error))


async def remove_orphans(
    ledger: Ledger,
    rows: list[ChallengeRow],
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
    await ledger.forget_challenges(rows)


async def recover(
    ledger: Ledger,
    issuer: Issuer,
    book: OrderBook,
    leftovers: list[ChallengeRow],
    unfinished: list[OrderRow],
    remove_names: Callable[[Iterable[str]], Deferred[None]] | None = None,
) -> None:
    """Remove ``leftovers`` and resume ``unfinished`` (both read before the store's thread ran)."""
    await remove_orphans(ledger, leftovers, remove_names)
    for row in unfinished:
        log.info(
            "resuming order {id} ({status}) for {names}",
            id=row.id,
            status=row.status,
            names=",".join(row.names),
        )
        try:
            d = issuer.resume(row).chain
        except Exception as e:  # a row this version cannot use must not stop the others
            log.error("order {id} cannot be resumed: {err}", id=row.id, err=str(e))
            ledger.order_failed(row.id, f"not resumable: {e}")
            continue
        book.track(tuple(row.names), d, row.id, row.request_key)
