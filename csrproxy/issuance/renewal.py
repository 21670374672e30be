"""When to renew a certificate, and the loop that does it for active installations.

A certificate is renewed inside the CA's ARI window (RFC 9773) at a random
point, or, without ARI, at a random point between two thirds and three
quarters of its lifetime.  Only installations that asked for their
certificate within ``active_days`` are renewed: dead installations cost the
CA nothing.  Renewals are spread out by the random point and by running at
most ``max_parallel`` at a time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

DAY = 86400.0


@dataclass(frozen=True)
class Renewable:
    """What the scheduler needs to know about one issued certificate."""

    id: str
    not_before: float
    not_after: float
    last_requested: float
    #: The CA's suggested window (start, end) in POSIX seconds, when it offers ARI.
    window: tuple[float, float] | None = None
    #: What to renew: the CSR the certificate was issued for (default: ``id``).
    key: str = ""


def due_at(cert: Renewable, rng: random.Random) -> float:
    """The moment to renew ``cert``: random inside the ARI window, else at 2/3..3/4 of life."""
    if cert.window is not None:
        start, end = cert.window
        return start + rng.random() * max(0.0, end - start)
    life = cert.not_after - cert.not_before
    return cert.not_before + life * (2 / 3 + rng.random() / 12)


def is_active(cert: Renewable, now: float, active_days: float) -> bool:
    return now - cert.last_requested <= active_days * DAY


def next_check_hint(cert: Renewable, now: float) -> float:
    """Seconds until a client should look for a newer chain (a Retry-After hint)."""
    if cert.window is not None:
        return max(60.0, cert.window[0] - now)
    life = cert.not_after - cert.not_before
    return max(60.0, cert.not_before + life * 2 / 3 - now)


class RenewalScheduler:
    """Every ``interval`` seconds, renews the due certificates of active installations."""

    def __init__(
        self,
        clock: IReactorTime,
        certificates: Callable[[], Iterable[Renewable]],
        renew: Callable[[Renewable], Deferred[Any]],
        *,
        active_days: float = 30.0,
        interval: float = 60.0,
        max_parallel: int = 4,
        rng: random.Random | None = None,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self.clock = clock
        #: True while renewals would only fail (the CA is known to be failing): a pass is
        #: skipped whole rather than failing (and logging) once per due certificate.
        self.paused = paused
        self.certificates = certificates
        self.renew = renew
        self.active_days = active_days
        self.interval = interval
        self.rng = rng or random.Random()
        #: certificate id -> (the window it was computed for, the moment to renew)
        self._due: dict[str, tuple[tuple[float, float] | None, float]] = {}
        self._running: set[str] = set()
        #: Certificates already replaced by a renewal (the source may list them a while longer).
        self._replaced: set[str] = set()
        self._limit = DeferredSemaphore(max_parallel)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self.renewed = 0
        self.skipped_inactive = 0

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def forget(self, cert_id: str) -> None:
        """``cert_id`` was replaced: stop tracking it."""
        self._due.pop(cert_id, None)

    def tick(self) -> None:
        if self.paused():
            return
        now = self.clock.seconds()
        for cert in self.certificates():
            known = self._due.get(cert.id)
            if known is None or known[0] != cert.window:  # new, or the CA's window changed
                known = self._due[cert.id] = (cert.window, due_at(cert, self.rng))
            when = known[1]
            if when > now or cert.id in self._running or cert.id in self._replaced:
                continue
            if not is_active(cert, now, self.active_days):
                self.skipped_inactive += 1
                continue
            self._start(cert)

    def _start(self, cert: Renewable) -> None:
        self._running.add(cert.id)
        log.info("renewing certificate {id}", id=cert.id)

        def done(result: object) -> None:
            self._running.discard(cert.id)
            if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
                log.warn("renewal of {id} failed: {err}", id=cert.id, err=str(result))
                # Try again later, not at once.
                retry = self.clock.seconds() + max(self.interval * 10, 600.0)
                self._due[cert.id] = (cert.window, retry)
            else:
                self.renewed += 1
                self._due.pop(cert.id, None)
                self._replaced.add(cert.id)

        self._limit.run(self.renew, cert).addBoth(done)


class RenewalWindows:
    """The CA's ARI windows of certificates, fetched in the background and kept until the
    CA's ``Retry-After`` says to look again; ``None`` until known (or without ARI)."""

    def __init__(
        self,
        clock: IReactorTime,
        fetch: Callable[[str], Deferred[tuple[float, float, float | None] | None]],
        default_recheck: float = 6 * 3600.0,
    ) -> None:
        self.clock = clock
        #: fetch(chain PEM) -> (start, end, retry_after seconds) or None when there is no ARI.
        self.fetch = fetch
        self.default_recheck = default_recheck
        self._windows: dict[str, tuple[float, float]] = {}
        self._next_look: dict[str, float] = {}
        self._busy: set[str] = set()

    def lookup(self, key: str, chain_pem: str) -> tuple[float, float] | None:
        now = self.clock.seconds()
        if key not in self._busy and now >= self._next_look.get(key, 0.0):
            self._busy.add(key)
            self.fetch(chain_pem).addBoth(self._store, key)
        return self._windows.get(key)

    def _store(self, result: object, key: str) -> None:
        self._busy.discard(key)
        recheck = self.default_recheck
        if isinstance(result, tuple):
            start, end, retry_after = result
            self._windows[key] = (start, end)
            if retry_after:
                recheck = retry_after
        elif result is not None:  # a failure: keep what we had, look again later
            log.warn("renewal window of {key} unknown: {err}", key=key, err=str(result))
        self._next_look[key] = self.clock.seconds() + recheck

    def forget(self, key: str) -> None:
        self._windows.pop(key, None)
        self._next_look.pop(key, None)


class RenewalService(Service):
    """Runs the renewal scheduler while the daemon runs."""

    def __init__(self, scheduler: RenewalScheduler) -> None:
        self.scheduler = scheduler

    def startService(self) -> None:
        super().startService()
        self.scheduler.start()

    def stopService(self) -> None:
        super().stopService()
        self.scheduler.stop()
