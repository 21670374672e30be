"""The renewal and ARI sources over a real state database, called synchronously (no store
thread): what :class:`csrproxy.issuance.renewals.StoredRenewals` does, on a Clock."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed

from csrproxy.issuance.ari import AriRow
from csrproxy.state.database import CertificateRow, StateDB, names_key

DAY = 86400.0


class SyncRenewals:
    """RenewalSource and AriSource, each call one query on ``db`` at once."""

    def __init__(self, db: StateDB, ari_recheck: float = 6 * 3600.0) -> None:
        self.db = db
        self.ari_recheck = ari_recheck
        #: How many rows each ``due`` call returned (a pass reads only what it needs).
        self.due_calls: list[int] = []

    def due(self, now: float, limit: int) -> Deferred[list[CertificateRow]]:
        rows = self.db.due_certificates(now, limit)
        self.due_calls.append(len(rows))
        return succeed(rows)

    def park(self, cert_ids: Sequence[str]) -> Deferred[Any]:
        self.db.park(list(cert_ids))
        return succeed(None)

    def renewed(self, cert_id: str) -> Deferred[Any]:
        self.db.mark_renewed(cert_id)
        return succeed(None)

    def renew_later(self, cert_id: str, when: float) -> Deferred[Any]:
        self.db.renew_later(cert_id, when)
        return succeed(None)

    def schedule_unscheduled(self, limit: int) -> Deferred[int]:
        return succeed(self.db.schedule_unscheduled(self.ari_recheck, limit))

    def ari_due(self, now: float, limit: int) -> Deferred[list[AriRow]]:
        return succeed(self.db.ari_due(now, limit))

    def ari_looked(
        self,
        cert_id: str,
        window: tuple[float, float] | None,
        next_look: float,
        renew_at: float | None,
    ) -> Deferred[Any]:
        self.db.ari_looked(cert_id, window, next_look, renew_at)
        return succeed(None)


def add_certificates(
    db: StateDB,
    n: int,
    *,
    prefix: str = "c",
    renew_at: float | None = 60 * DAY,
    last_requested: float = 0.0,
    ari_next: float | None = None,
    chain: str = "PEM",
    rng: random.Random | None = None,
) -> list[str]:
    """``n`` current certificates (one per request key) in one transaction; their ids."""
    rng = rng or random.Random(1)
    ids = [f"{prefix}{i}" for i in range(n)]
    rows = []
    for cid in ids:
        names = [f"{cid}.go.example.test"]
        row = CertificateRow(
            id=cid,
            request_key=f"{rng.getrandbits(256):064x}",
            csr=b"csr",
            names=names,
            spki_sha256="00" * 32,
            chain=chain,
            not_before=0.0,
            not_after=90 * DAY,
            last_requested=last_requested,
            names_key=names_key(names),
            renew_at=renew_at,
            ari_next=ari_next,
        )
        rows.append(row.__dict__ | {"names": json.dumps(names)})
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO certificates (id, request_key, csr, names, spki_sha256, chain, "
            "not_before, not_after, order_id, acme_url, created, last_requested, revoked, "
            "signed_by, names_key, superseded, renew_at, dormant, ari_start, ari_end, ari_next) "
            "VALUES (:id, :request_key, :csr, :names, :spki_sha256, :chain, :not_before, "
            ":not_after, :order_id, :acme_url, :created, :last_requested, :revoked, :signed_by, "
            ":names_key, :superseded, :renew_at, :dormant, :ari_start, :ari_end, :ari_next)",
            rows,
        )
    return ids
