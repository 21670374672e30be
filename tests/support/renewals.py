"""The state store run inline (no store thread), and the renewal and ARI sources over it:
:class:`csrproxy.issuance.renewals.StoredRenewals` on a real database, on a Clock."""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from csrproxy.issuance.renewals import StoredRenewals
from csrproxy.state.database import CertificateRow, StateDB, names_key

DAY = 86400.0


class InlineStore:
    """The store's ``db`` and ``run``, run at once on the caller's thread (no store thread)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def run(self, method: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(method(*args, **kwargs))
        except Exception:
            return fail()

    run_alone = run  # nothing is grouped here


class SyncRenewals(StoredRenewals):
    """:class:`StoredRenewals` over :class:`InlineStore`; counts the rows each ``due``
    returned (a pass reads only what it needs)."""

    def __init__(self, db: StateDB, ari_recheck: float = 6 * 3600.0) -> None:
        super().__init__(InlineStore(db), ari_recheck)  # type: ignore[arg-type]
        self.db = db
        self.due_calls: list[int] = []

    def due(self, now: float, limit: int) -> Deferred[list[CertificateRow]]:
        return super().due(now, limit).addCallback(self._counted)

    def _counted(self, rows: list[CertificateRow]) -> list[CertificateRow]:
        self.due_calls.append(len(rows))
        return rows


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
