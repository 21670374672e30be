"""Orders of an earlier run, resumed a few at a time.

A start-up after a crash with thousands of orders in flight must not start them all at once
(the API and the DNS server would wait behind them, and the CA would see a burst): the rows
wait in a queue, ``at_once`` run, each one ending starts the next, oldest first.  A client
that sends the CSR of a waiting order again does not wait its turn: that order starts at
once and the client joins it (:meth:`ResumeQueue.promote`).  A waiting order's async id
answers ``processing`` from the database meanwhile.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from csrproxy.state.database import OrderRow

log = Logger()

#: Orders of an earlier run running at once (as many as the requests the ACME transport
#: sends at once: more would only wait there, holding their records in memory).
RESUMING = 20


class ResumeQueue:
    """Waiting rows (memory: the rows themselves, about 1 KB each) and the count running."""

    def __init__(self, start: Callable[[OrderRow], Deferred[Any]], at_once: int = RESUMING) -> None:
        #: Starts one order; its Deferred fires (either way) when the order has ended.
        self._start = start
        self.at_once = at_once
        self._waiting: OrderedDict[str, OrderRow] = OrderedDict()
        #: request key -> the id of the first waiting order for it.
        self._by_key: dict[str, str] = {}
        self.running = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, rows: Iterable[OrderRow]) -> None:
        for row in rows:
            self._waiting[row.id] = row
            self._by_key.setdefault(row.request_key, row.id)
        self._fill()

    def promote(self, request_key: str) -> None:
        """Start the waiting order for ``request_key`` now, if there is one."""
        order_id = self._by_key.pop(request_key, None)
        if order_id is not None:
            self._run(self._waiting.pop(order_id), counted=False)

    def _fill(self) -> None:
        while self.running < self.at_once and self._waiting:
            _, row = self._waiting.popitem(last=False)
            if self._by_key.get(row.request_key) == row.id:
                del self._by_key[row.request_key]
            self._run(row, counted=True)

    def _run(self, row: OrderRow, counted: bool) -> None:
        try:
            ended = self._start(row)
        except Exception as e:  # one row must not stop the others
            log.error("order {id} not resumed: {err}", id=row.id, err=str(e))
            return
        if not counted:
            return
        self.running += 1

        def done(_: object) -> None:
            self.running -= 1
            self._fill()

        ended.addBoth(done)
