"""The database side of renewal and ARI: what is due, parked, rescheduled (one indexed
query per call on the store's thread; see :class:`csrproxy.state.database.StateDB`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred

from csrproxy.issuance.ari import AriRow
from csrproxy.state.database import CertificateRow
from csrproxy.state.store import Store


class StoredRenewals:
    """:class:`~csrproxy.issuance.renewal.RenewalSource` and
    :class:`~csrproxy.issuance.ari.AriSource` over the state store."""

    def __init__(self, store: Store, ari_recheck: float = 6 * 3600.0) -> None:
        self.store = store
        self.ari_recheck = ari_recheck

    def due(self, now: float, limit: int) -> Deferred[list[CertificateRow]]:
        return self.store.run(self.store.db.due_certificates, now, limit)

    def park(self, cert_ids: Sequence[str]) -> Deferred[Any]:
        return self.store.run(self.store.db.park, list(cert_ids))

    def renewed(self, cert_id: str) -> Deferred[Any]:
        return self.store.run(self.store.db.mark_renewed, cert_id)

    def renew_later(self, cert_id: str, when: float) -> Deferred[Any]:
        return self.store.run(self.store.db.renew_later, cert_id, when)

    def schedule_unscheduled(self, limit: int) -> Deferred[int]:
        return self.store.run(self.store.db.schedule_unscheduled, self.ari_recheck, limit)

    def ari_due(self, now: float, limit: int) -> Deferred[list[AriRow]]:
        return self.store.run(self.store.db.ari_due, now, limit)

    def ari_looked(
        self,
        cert_id: str,
        window: tuple[float, float] | None,
        next_look: float,
        renew_at: float | None,
    ) -> Deferred[Any]:
        return self.store.run(self.store.db.ari_looked, cert_id, window, next_look, renew_at)
