"""The circuit breaker in front of the CA: fail fast while the CA is known to be failing.

The transport (:mod:`csrproxy.acme.transport`) asks it before every request and tells it how
each one went; the issuer asks it before it starts an order.  It lives beside the transport
that feeds it, below :mod:`csrproxy.issuance`, so that both can reach it.

``closed``: every request goes out.  ``threshold`` consecutive failures (no answer, or a 5xx),
or one request that gave up on an unreachable CA (:meth:`CircuitBreaker.trip`), open it.

``open``: no request goes out; each is refused at once with :class:`CAUnavailable`, whose
``retry_after`` is the cool-down left.

``half-open``: the cool-down is over.  One request goes out as the probe: the breaker's own
(``probe``, one cheap unsigned request, run when the cool-down ends, so it recovers with no
traffic at all) or whichever comes first.  The others are refused for ``PROBE_RETRY_AFTER``
seconds.  The probe's success, or any answer from the CA, closes the breaker; its failure
opens it for another cool-down.

Its state is a handful of numbers and at most one pending timer, whatever the traffic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from csrproxy.errors import CAUnavailable

log = Logger()

#: Consecutive failed CA requests that open the breaker.
THRESHOLD = 5
#: Seconds the breaker stays open before it lets a probe through.
COOLDOWN = 10.0
#: With no requests for this long, the CA is asked once (HEAD newNonce) to know it answers.
QUIET = 60.0
#: Readiness says the CA is not reachable when it has not answered for this long.
STALE = 3 * QUIET
#: Retry-After of a request refused while the probe is out (it ends within a request timeout,
#: and in milliseconds when the CA answers or refuses connections).
PROBE_RETRY_AFTER = 1.0

BreakerState = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """Counts the CA's consecutive failures and refuses requests while it is down."""

    def __init__(
        self, clock: IReactorTime, *, threshold: int = THRESHOLD, cooldown: float = COOLDOWN
    ) -> None:
        if threshold < 1 or cooldown <= 0:
            raise ValueError("threshold must be at least 1 and cooldown positive")
        self.clock = clock
        self.threshold = threshold
        self.cooldown = cooldown
        #: Sends one cheap request through the transport (which reports it here); run when a
        #: cool-down ends.  The ACME client sets it; without one the next request probes.
        self.probe: Callable[[], Deferred[Any]] | None = None
        #: Clock time of the CA's last answer that was not a 5xx; None before the first.
        self.last_success: float | None = None
        #: Clock time of the last failed request (no answer, or a 5xx); None before the first.
        self.last_failure: float | None = None
        #: Consecutive failures since the last answer (at most ``threshold``).
        self.failures = 0
        #: Times the breaker opened (a counter for metrics).
        self.opened = 0
        self._opened_at: float | None = None
        self._probing = False
        self._timer: IDelayedCall | None = None

    # -- what health and metrics read ------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """``"closed"``, ``"open"`` (cooling down) or ``"half-open"`` (a probe may go or is out)."""
        if self._opened_at is None:
            return "closed"
        if self._probing or self.clock.seconds() >= self._opened_at + self.cooldown:
            return "half-open"
        return "open"

    @property
    def retry_after(self) -> float | None:
        """Seconds a refused request should wait; None when a request would go out now."""
        if self._opened_at is None:
            return None
        if self._probing:
            return PROBE_RETRY_AFTER
        left = self._opened_at + self.cooldown - self.clock.seconds()
        return left if left > 0 else None

    # -- what the issuer and the transport ask -------------------------------------------

    def check(self) -> None:
        """Raise :class:`CAUnavailable` if a request would be refused now (nothing changes)."""
        wait = self.retry_after
        if wait is not None:
            raise self._refusal(wait)

    def admit(self) -> bool:
        """Let one request go out, or raise :class:`CAUnavailable`; True if it is the probe.

        The caller must report the request: :meth:`succeeded`, :meth:`failed` or
        :meth:`released` (no outcome: it was cancelled).
        """
        self.check()
        if self._opened_at is None:
            return False
        self._probing = True
        log.info("CA circuit half-open: probing the CA")
        return True

    def succeeded(self) -> None:
        """The CA answered (anything but a 5xx): close."""
        self.last_success = self.clock.seconds()
        self.failures = 0
        if self._opened_at is not None:
            log.info("CA circuit closed: the CA answers again")
        self._opened_at = None
        self._probing = False
        self._cancel_timer()

    def failed(self, probe: bool) -> None:
        """A request got no answer, or a 5xx."""
        self.last_failure = self.clock.seconds()
        if self._opened_at is None:
            self.failures = min(self.failures + 1, self.threshold)
            if self.failures >= self.threshold:
                self._open(f"{self.failures} CA requests failed in a row")
        elif probe:
            self._probing = False
            self._open("the probe failed")
        # Other requests sent before the breaker opened change nothing while it is open.

    def released(self, probe: bool) -> None:
        """A request ended without an outcome (cancelled): a probe slot it held is free."""
        if probe:
            self._probing = False

    def trip(self) -> None:
        """A request gave up on an unreachable CA after its retries: open now if closed."""
        if self._opened_at is None:
            self._open("a CA request gave up: the CA is unreachable")

    # -- inside ---------------------------------------------------------------------------

    def _refusal(self, wait: float) -> CAUnavailable:
        return CAUnavailable(
            f"the CA is failing (circuit {self.state}); not asking it for {wait:.0f}s", wait
        )

    def _open(self, why: str) -> None:
        self._opened_at = self.clock.seconds()
        self.opened += 1
        log.warn("CA circuit open for {cooldown:.0f}s: {why}", cooldown=self.cooldown, why=why)
        self._cancel_timer()
        self._timer = self.clock.callLater(self.cooldown, self._probe_due)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _probe_due(self) -> None:
        self._timer = None
        if self.probe is None or self.state != "half-open" or self._probing:
            return
        try:
            d = self.probe()
        except Exception as e:  # the probe's outcome was reported by the transport
            log.info("CA probe failed: {err}", err=str(e))
            return
        d.addErrback(lambda f: log.info("CA probe failed: {err}", err=str(f.value)))

    # -- while nothing is asked ---------------------------------------------------------

    def look_if_quiet(self, quiet: float) -> None:
        """Probe the CA when it has not answered for ``quiet`` seconds and the breaker is
        closed, so that "the CA answered recently" stays true or becomes false without
        traffic (a timer calls this; a failing probe counts like any failed request)."""
        seen = self.last_success
        if self.state != "closed" or self.probe is None or self._probing:
            return
        # Before the CA ever answered, the account look-up is asking it: no extra request.
        if seen is None or self.clock.seconds() - seen < quiet:
            return
        self.probe().addErrback(lambda _: None)
