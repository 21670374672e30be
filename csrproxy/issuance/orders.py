"""Asynchronous orders: an unguessable id per accepted request, its status, and its chain.

Records are kept in memory while the order runs and a little after it ends (five minutes
with a state database, else ``retention`` seconds), at most ``max_records`` at a time (the
oldest go first); after that (or a restart) an order is found in the state database
(``earlier``).  Memory holds the orders of the last minutes, never the history.  Each
record knows its CSR's names and key label, so that a token reads only the records its name
patterns allow.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

#: Seconds an ended order's record (and chain) stays in memory when the database has it.
ENDED_IN_MEMORY = 300.0


@dataclass
class OrderRecord:
    """One accepted request: ``processing``, then ``valid`` (with the chain) or ``invalid``."""

    id: str
    names: tuple[str, ...]
    status: str = "processing"
    chain: str | None = None
    error: dict[str, Any] | None = field(default=None)
    #: The CSR's request key (the ledger turns it into its certificate id).
    request_key: str | None = None
    #: The ``{key}`` label of the CSR's public key (None: not known, see ``track``).
    key_label: str | None = None

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": self.id, "status": self.status, "names": list(self.names)}
        if self.error is not None:
            doc["error"] = self.error
        if self.status == "valid":
            doc["certificate"] = f"/v1/orders/{self.id}/certificate"
        return doc


class OrderBook:
    """The asynchronous orders of this process."""

    def __init__(
        self,
        clock: IReactorTime,
        problem_of: Any,
        retention: float = 3600.0,
        max_records: int = 10_000,
        earlier: Callable[[str], Deferred[OrderRecord | None]] | None = None,
    ) -> None:
        self.clock = clock
        #: Turns a Failure into the problem document (dict) shown as the order's error.
        self.problem_of = problem_of
        self.retention = retention
        self.max_records = max_records
        self._records: OrderedDict[str, OrderRecord] = OrderedDict()
        #: Finds an order no longer (or never) in memory: the state database.
        self.earlier = earlier

    def track(
        self,
        names: tuple[str, ...],
        waiter: Deferred[str],
        order_id: str | None = None,
        request_key: str | None = None,
        key_label: str | None = None,
    ) -> OrderRecord:
        """A record following ``waiter`` (its result is consumed); ``order_id`` is the
        issuer's id of the order, so the record can be found again after a restart.

        Without ``key_label`` only tokens whose patterns need no key label can read it.
        """
        existing = self._records.get(order_id) if order_id else None
        if existing is not None and existing.status == "processing":
            waiter.addErrback(lambda _: None)
            return existing
        record = OrderRecord(
            order_id or secrets.token_hex(16),
            tuple(names),
            request_key=request_key,
            key_label=key_label,
        )
        self.add(record)

        def done(result: str | Failure) -> None:
            if isinstance(result, Failure):
                record.status, record.error = "invalid", self.problem_of(result)
            else:
                record.status, record.chain = "valid", result
            self.clock.callLater(self.kept_for, self._records.pop, record.id, None)

        waiter.addBoth(done)
        return record

    @property
    def kept_for(self) -> float:
        """Seconds an ended record stays in memory: with the state database behind it, long
        enough for its client's polls (then it is read from the database), else
        ``retention``."""
        return min(self.retention, ENDED_IN_MEMORY) if self.earlier is not None else self.retention

    def add(self, record: OrderRecord) -> None:
        """Keep ``record`` (also: records of an earlier run, loaded at start-up)."""
        self._records[record.id] = record
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

    def get(self, order_id: str) -> OrderRecord | None:
        return self._records.get(order_id)

    def find(self, order_id: str) -> Deferred[OrderRecord | None]:
        """The record in memory, else the one on record (an order of an earlier run)."""
        record = self._records.get(order_id)
        if record is not None or self.earlier is None:
            return succeed(record)
        return self.earlier(order_id)

    def __len__(self) -> int:
        return len(self._records)
