"""When to renew a certificate, and the loop that renews the due ones of active installations.

Each certificate's renewal time is stored with it (:func:`csrproxy.issuance.ledger.lifetime_due`
when it is recorded: a random point between two thirds and three quarters of its lifetime;
a random point inside the CA's ARI window once :mod:`csrproxy.issuance.ari` learned one).
A pass asks the database for what is due now, soonest first, in batches, and starts at most
``max_parallel`` renewals at a time.  Only installations that asked for their certificate
within ``active_days`` are renewed: a due certificate of an inactive installation is parked
(it leaves the due index) until the installation asks again.  Nothing is held in memory but
the renewals running.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.state.database import CertificateRow

log = Logger()

DAY = 86400.0
#: Rows read per query of a pass.
BATCH = 200
#: Queries per pass at most (a pass parks at most BATCH * ROUNDS inactive certificates).
ROUNDS = 50
#: Certificates without a renewal time given one per pass at most.
SCHEDULE_CHUNK = 2000


def next_check_hint(row: CertificateRow, now: float) -> float:
    """Seconds until a client should look for a newer chain (a Retry-After hint)."""
    if row.renew_at is not None:
        return max(60.0, row.renew_at - now)
    life = row.not_after - row.not_before
    return max(60.0, row.not_before + life * 2 / 3 - now)


def is_active(row: CertificateRow, now: float, active_days: float) -> bool:
    return now - row.last_requested <= active_days * DAY


class RenewalSource(Protocol):
    """The database side of renewal (:class:`csrproxy.issuance.renewals.StoredRenewals`)."""

    def due(self, now: float, limit: int) -> Deferred[list[CertificateRow]]: ...

    def park(self, cert_ids: Sequence[str]) -> Deferred[Any]: ...

    def renewed(self, cert_id: str) -> Deferred[Any]: ...

    def renew_later(self, cert_id: str, when: float) -> Deferred[Any]: ...

    def schedule_unscheduled(self, limit: int) -> Deferred[int]: ...


class PassObserver(Protocol):
    def __call__(self, seconds: float, started: int, parked: int) -> None: ...


class RenewalScheduler:
    """Every ``interval`` seconds, renews the due certificates of active installations."""

    def __init__(
        self,
        clock: IReactorTime,
        source: RenewalSource,
        renew: Callable[[CertificateRow], Deferred[Any]],
        *,
        active_days: float = 30.0,
        interval: float = 60.0,
        max_parallel: int = 4,
        paused: Callable[[], bool] = lambda: False,
        on_pass: PassObserver | None = None,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.clock = clock
        #: True while renewals would only fail (the CA is known to be failing): a pass is
        #: skipped whole rather than failing (and logging) once per due certificate.
        self.paused = paused
        self.source = source
        self.renew = renew
        self.active_days = active_days
        self.interval = interval
        self.max_parallel = max_parallel
        self._on_pass = on_pass
        self._on_outcome = on_outcome
        #: Ids of the certificates being renewed (at most ``max_parallel``).
        self._running: set[str] = set()
        self._passing = False
        #: The last pass left due certificates for want of a free slot: each renewal that
        #: ends starts a pass at once, so throughput is max_parallel at a time, not per pass.
        self._backlog = False
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self.renewed = 0
        self.failed = 0
        self.skipped_inactive = 0

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    @property
    def running(self) -> int:
        return len(self._running)

    def tick(self) -> Deferred[None] | None:
        """One pass, unless one is still running or renewals are paused."""
        if self._passing or self.paused():
            return None
        self._passing = True
        d = Deferred.fromCoroutine(self._pass())

        def done(result: object) -> None:
            self._passing = False
            if isinstance(result, Failure):
                log.warn("renewal pass failed: {err}", err=result.getErrorMessage())

        d.addBoth(done)
        return d

    async def _pass(self) -> None:
        t0 = time.perf_counter()
        now = self.clock.seconds()
        started = parked = 0
        for _ in range(ROUNDS):  # a database of schema 2 gets its renewal times here
            if await self.source.schedule_unscheduled(SCHEDULE_CHUNK) < SCHEDULE_CHUNK:
                break
        self._backlog = False
        for _ in range(ROUNDS):
            free = self.max_parallel - len(self._running)
            if free <= 0:
                self._backlog = True
                break
            rows = await self.source.due(now, BATCH)
            idle: list[str] = []
            for row in rows:
                if row.id in self._running:
                    continue
                if not is_active(row, now, self.active_days):
                    idle.append(row.id)
                elif free > 0:
                    self._start(row)
                    started += 1
                    free -= 1
                else:
                    self._backlog = True
            if idle:
                await self.source.park(idle)
                parked += len(idle)
                self.skipped_inactive += len(idle)
            if len(rows) < BATCH or not idle:
                break  # nothing more is due, or what is left waits for a free slot
        if parked:
            log.info(
                "{n} certificates due but their installations inactive: not renewed", n=parked
            )
        if self._on_pass is not None:
            self._on_pass(time.perf_counter() - t0, started, parked)

    def _outcome(self, what: str) -> None:
        if self._on_outcome is not None:
            self._on_outcome(what)

    def _start(self, row: CertificateRow) -> None:
        self._running.add(row.id)
        self._outcome("started")
        log.info("renewing certificate {id}", id=row.id)

        def done(result: object) -> None:
            self._running.discard(row.id)
            if self._backlog and self._loop.running:
                self.clock.callLater(0, self.tick)
            if isinstance(result, Failure):
                self.failed += 1
                self._outcome("failed")
                log.warn("renewal of {id} failed: {err}", id=row.id, err=result.getErrorMessage())
                # Try again later, not at once (and not at once after a restart either).
                retry = self.clock.seconds() + max(self.interval * 10, 600.0)
                self.source.renew_later(row.id, retry).addErrback(lambda _: None)
            else:
                self.renewed += 1
                self._outcome("renewed")
                # Superseded already when the new certificate has the same request key; this
                # also ends a row whose key differs (copied, restored): never renewed twice.
                self.source.renewed(row.id).addErrback(lambda _: None)

        try:
            d = self.renew(row)
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addBoth(done)


class RenewalService(Service):
    """Runs the renewal scheduler (and the ARI poller, when there is one) while the daemon
    runs."""

    def __init__(self, scheduler: RenewalScheduler, *others: Any) -> None:
        self.scheduler = scheduler
        #: Anything else with start()/stop() (the ARI poller).
        self.others = others

    def startService(self) -> None:
        super().startService()
        self.scheduler.start()
        for other in self.others:
            other.start()

    def stopService(self) -> None:
        super().stopService()
        self.scheduler.stop()
        for other in self.others:
            other.stop()
