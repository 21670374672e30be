"""The CA's renewal windows (ARI, RFC 9773), asked for in the background, paced.

Every renewable certificate has a stored time for its next look-up (spread over the
recheck period when it is recorded).  ``parallel`` workers take due rows from the database
in batches and ask the CA, together never starting more than ``per_second`` look-ups a
second, so a million certificates never ask at once.  A window that changed moves the
certificate's renewal time to a random point inside it; the next look is at least
``recheck`` seconds away (longer when the CA's ``Retry-After`` says so), jittered by ±10%.
While the CA offers no ARI, or is failing, the workers wait.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

log = Logger()

#: What a look-up gives: (start, end, retry_after seconds or None), or None without ARI.
Window = tuple[float, float, float | None]
#: A due row: (certificate id, chain PEM, stored window start, stored window end, the
#: directory URL of the CA that issued it or None for [acme]'s).
AriRow = tuple[str, str, float | None, float | None, str | None]


class AriSource(Protocol):
    def ari_due(self, now: float, limit: int) -> Deferred[list[AriRow]]: ...

    def ari_looked(
        self,
        cert_id: str,
        window: tuple[float, float] | None,
        next_look: float,
        renew_at: float | None,
    ) -> Deferred[Any]: ...


class AriPoller:
    """Paced, bounded ARI look-ups of what is due."""

    def __init__(
        self,
        clock: IReactorTime,
        source: AriSource,
        fetch: Callable[[str, str | None], Deferred[Window | None]],
        *,
        parallel: int = 4,
        per_second: float = 20.0,
        recheck: float = 6 * 3600.0,
        idle: float = 60.0,
        rng: random.Random | None = None,
        paused: Callable[[], bool] = lambda: False,
        on_lookup: Callable[[str], None] | None = None,
    ) -> None:
        self.clock = clock
        self.source = source
        #: fetch(chain PEM, its CA) -> the window, None when the CA offers no ARI.
        self.fetch = fetch
        self.parallel = parallel
        self.spacing = 1.0 / per_second
        self.recheck = recheck
        #: Seconds a worker waits when nothing is due, the CA has no ARI or is failing.
        self.idle = idle
        self.rng = rng or random.Random()
        self.paused = paused
        self._on_lookup = on_lookup
        #: Rows read and not yet taken by a worker (at most 2 * parallel + a batch).
        self._queue: deque[AriRow] = deque()
        self._taken: set[str] = set()
        self._filling: Deferred[None] | None = None
        self._next_start = 0.0
        self._running = False
        self._failing = False
        self._workers: list[Deferred[None]] = []
        self.looked = 0
        self.failures = 0

    @property
    def batch(self) -> int:
        return max(2 * self.parallel, int(1.0 / self.spacing))

    def start(self) -> None:
        self._running = True
        self._next_start = self.clock.seconds()
        self._workers = [Deferred.fromCoroutine(self._work()) for _ in range(self.parallel)]
        for w in self._workers:
            w.addErrback(lambda f: log.failure("ARI worker stopped", f))

    def stop(self) -> None:
        self._running = False

    def _sleep(self, seconds: float) -> Deferred[None]:
        return deferLater(self.clock, max(0.0, seconds), lambda: None)

    async def _pace(self) -> None:
        """Wait for this worker's turn: starts are ``spacing`` apart, whatever the workers."""
        now = self.clock.seconds()
        slot = max(now, self._next_start)
        self._next_start = slot + self.spacing
        if slot > now:
            await self._sleep(slot - now)

    async def _refill(self) -> None:
        if self._filling is not None:  # one read at a time; the others wait for it
            await self._filling
            return
        self._filling = Deferred()
        try:
            rows = await self.source.ari_due(self.clock.seconds(), self.batch + len(self._taken))
            self._queue.extend(r for r in rows if r[0] not in self._taken)
        finally:
            filling, self._filling = self._filling, None
            filling.callback(None)

    async def _work(self) -> None:
        while self._running:
            if self.paused():
                await self._sleep(self.idle)
                continue
            if not self._queue:
                try:
                    await self._refill()
                except Exception as e:
                    log.warn("ARI look-ups: database not read: {err}", err=str(e))
                    await self._sleep(self.idle)
                    continue
                if not self._queue:
                    await self._sleep(self.idle)
                    continue
            row = self._queue.popleft()
            self._taken.add(row[0])
            try:
                await self._pace()
                await self._look(row)
            finally:
                self._taken.discard(row[0])

    async def _look(self, row: AriRow) -> None:
        cert_id, chain, old_start, old_end, ca = row
        try:
            found = await self.fetch(chain, ca)
        except Exception as e:
            self.failures += 1
            self._report("failed")
            if not self._failing:
                self._failing = True
                log.warn("ARI look-ups failing: {err}", err=str(e))
            await self._record(cert_id, None, self.recheck / 4, None)
            return
        if self._failing:
            self._failing = False
            log.info("ARI look-ups answered again")
        if found is None:  # the CA offers no ARI: nothing to ask until it might
            self._report("none")
            self._queue.clear()
            await self._record(cert_id, None, self.recheck, None)
            await self._sleep(self.recheck)
            return
        start, end, retry_after = found
        self.looked += 1
        self._report("window")
        renew_at = None
        if (start, end) != (old_start, old_end):
            now = self.clock.seconds()
            renew_at = max(now, start + self.rng.random() * max(0.0, end - start))
        await self._record(cert_id, (start, end), max(self.recheck, retry_after or 0.0), renew_at)

    async def _record(
        self,
        cert_id: str,
        window: tuple[float, float] | None,
        after: float,
        renew_at: float | None,
    ) -> None:
        next_look = self.clock.seconds() + after * (0.9 + 0.2 * self.rng.random())
        try:
            await self.source.ari_looked(cert_id, window, next_look, renew_at)
        except Exception as e:
            log.warn("ARI window of {id} not recorded: {err}", id=cert_id, err=str(e))

    def _report(self, what: str) -> None:
        if self._on_lookup is not None:
            self._on_lookup(what)

