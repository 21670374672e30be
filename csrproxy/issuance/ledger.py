"""What the issuer writes down about each order, so that a restart can finish it.

Before anything reaches the CA the order is on record; the CA's order URL is
recorded as soon as the CA made it; every challenge record is recorded before
it is published and forgotten after it is removed (lazily, with the next
write: a leftover record only costs a harmless removal at the next start); the
chain is recorded, together with the order's end, before any client sees it.
Without a store (unit tests) every step is a no-op.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from csrproxy.acme.order import DNS01Responder, IssuedChain
from csrproxy.challenges.zone import challenge_name
from csrproxy.issuance.csr import CheckedCSR
from csrproxy.state.database import UNFINISHED, CertificateRow, ChallengeRow, OrderRow
from csrproxy.state.store import Store

log = Logger()


def leaf_id(leaf: x509.Certificate) -> str:
    """A stable id of one issued certificate: the SHA-256 of its leaf, shortened."""
    return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()[:32]


class RecordingResponder:
    """Records each challenge value before the inner responder publishes it."""

    def __init__(self, inner: DNS01Responder, ledger: Ledger, order_id: str) -> None:
        self.inner = inner
        self.ledger = ledger
        self.order_id = order_id

    async def _publish(self, identifier: str, value: str) -> None:
        store = self.ledger.store
        if store is not None:
            name = challenge_name(identifier)
            await store.run(store.db.add_challenge, self.order_id, name, value, self.ledger.backend)
        await self.inner.publish(identifier, value)

    def _forget(self, _: object, identifier: str, value: str) -> None:
        store = self.ledger.store
        if store is not None:
            store.db.forget_challenge_later(challenge_name(identifier), value)

    def publish(self, identifier: str, value: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._publish(identifier, value))

    def unpublish(self, identifier: str, value: str) -> Deferred[None]:
        # Forgotten only once it is gone; the row goes with the store's next write.
        return self.inner.unpublish(identifier, value).addCallback(self._forget, identifier, value)


class Ledger:
    """The durable side of orders; ``latest`` is the newest certificate of each CSR."""

    def __init__(self, store: Store | None, backend: str = "builtin") -> None:
        self.store = store
        self.backend = backend
        #: request key -> the newest certificate issued for it (what GET /v1/certificates serves).
        self.latest: dict[str, CertificateRow] = {}

    # -- start-up (synchronous: before the reactor runs and the store's thread starts) ----

    def load(self) -> None:
        if self.store is None:
            return
        for row in reversed(self.store.db.certificates()):
            current = self.latest.get(row.request_key)
            if row.revoked is None and (current is None or row.not_after >= current.not_after):
                self.latest[row.request_key] = row

    def unfinished_orders(self) -> list[OrderRow]:
        return [] if self.store is None else self.store.db.orders(UNFINISHED)

    def recent_orders(self, limit: int = 10_000) -> list[OrderRow]:
        return [] if self.store is None else self.store.db.orders(None, limit)

    def leftover_challenges(self) -> list[ChallengeRow]:
        return [] if self.store is None else self.store.db.challenges()

    def forget_challenges(self, rows: list[ChallengeRow]) -> Deferred[Any]:
        if self.store is None or not rows:
            return succeed(None)
        return self.store.run(self.store.db.clear_challenges, [r.id for r in rows])

    # -- an order's life ------------------------------------------------------------

    def _run(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self.store is None:
            return succeed(None)
        return self.store.run(method, *args, **kwargs)

    def order_started(
        self, order_id: str, csr: CheckedCSR, replaces: str | None = None
    ) -> Deferred[Any]:
        if self.store is None:
            return succeed(None)
        row = OrderRow(order_id, csr.request_key, csr.der, list(csr.names), replaces=replaces)
        return self._run(self.store.db.save_order, row)

    def order_created(self, order_id: str) -> Callable[[str], Deferred[Any]]:
        """The ``on_order`` callback: records the CA's order URL."""

        def record(url: str) -> Deferred[Any]:
            if self.store is None:
                return succeed(None)
            return self._run(self.store.db.update_order, order_id, acme_url=url, status="pending")

        return record

    def responder(self, inner: DNS01Responder, order_id: str) -> DNS01Responder:
        return inner if self.store is None else RecordingResponder(inner, self, order_id)

    async def order_valid(
        self, order_id: str, csr: CheckedCSR, chain: IssuedChain, renewal: bool = False
    ) -> CertificateRow:
        leaf = x509.load_pem_x509_certificate(chain.pem.encode("ascii"))
        row = CertificateRow(
            id=leaf_id(leaf),
            request_key=csr.request_key,
            csr=csr.der,
            names=list(csr.names),
            spki_sha256=csr.spki_sha256,
            chain=chain.pem,
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            order_id=order_id,
            acme_url=chain.certificate_url,
        )
        current = self.latest.get(row.request_key)
        if renewal and current is not None:
            # csrproxy renewed it on its own: the installation has not asked since.
            row.last_requested = current.last_requested
        if self.store is not None:
            await self.store.run(self.store.db.certificate_issued, row, order_id)
        if current is None or row.not_after >= current.not_after:
            self.latest[row.request_key] = row
        return row

    def order_failed(self, order_id: str, error: str) -> None:
        """Best effort: a store that fails here must not hide the order's own error."""
        if self.store is None:
            return
        d = self.store.run(self.store.db.update_order, order_id, status="invalid", error=error)
        d.addErrback(
            lambda f: log.warn("order {id} not marked failed: {e}", id=order_id, e=f.value)
        )

    def newest(self, request_key: str) -> CertificateRow | None:
        """The newest certificate issued for ``request_key`` (its certificate id)."""
        return self.latest.get(request_key)

    def requested(self, request_key: str, when: float) -> None:
        """An installation asked for its certificate: it is alive (renewal's active_days)."""
        row = self.latest.get(request_key)
        if row is None:
            return
        row.last_requested = when
        if self.store is not None:
            d = self.store.run(self.store.db.touch_certificate, row.id, when)
            d.addErrback(lambda f: None)  # a missed touch only delays the activity clock


# CertificateRow is re-exported: it is what ``Ledger.newest`` hands the web API.
__all__ = ["CertificateRow", "Ledger", "RecordingResponder", "leaf_id"]
