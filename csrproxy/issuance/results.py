"""What an order's run hands back: one result shared by every waiter, the handle a caller
gets, and ACME failures translated into the errors the API shows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from csrproxy.acme.problems import (
    ACMEError,
    ACMEProblem,
    ACMETransportError,
    AuthorizationFailed,
    DeadlineExceeded,
    OrderFailed,
)
from csrproxy.errors import CsrproxyError, IssuanceFailed, IssuanceTimeout

#: ACME problem types a fresh order would meet again: a resumed order failing with one of
#: them is not ordered afresh.
NOT_FROM_A_CRASH = frozenset(
    {
        "badCSR",
        "badPublicKey",
        "badSignatureAlgorithm",
        "caa",
        "rateLimited",
        "rejectedIdentifier",
        "unsupportedIdentifier",
        "userActionRequired",
    }
)


def problem_type(e: ACMEError) -> str | None:
    """The short ACME problem type behind ``e``, if the CA gave one."""
    if isinstance(e, ACMEProblem):
        return e.short_type
    if isinstance(e, AuthorizationFailed | OrderFailed) and e.problem is not None:
        return e.problem.short_type
    return None


class SharedResult:
    """One Deferred's result handed to many waiters; cancelling a waiter drops only it."""

    def __init__(self, source: Deferred[Any]) -> None:
        self._waiters: list[Deferred[Any]] = []
        self._result: Any = None
        self._done = False
        source.addBoth(self._fire)

    def _fire(self, result: Any) -> None:
        self._done, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(result) if not isinstance(result, Failure) else d.errback(result)
        return None

    @property
    def failed(self) -> bool:
        """True once the source has failed (a later caller may want to start afresh)."""
        return self._done and isinstance(self._result, Failure)

    def wait(self) -> Deferred[Any]:
        if self._done:
            d: Deferred[Any] = Deferred()
            if isinstance(self._result, Failure):
                d.errback(self._result)
            else:
                d.callback(self._result)
            return d
        d = Deferred(lambda waiter: self._waiters.remove(waiter))
        self._waiters.append(d)
        return d


@dataclass(frozen=True)
class Issuance:
    """What :meth:`Issuer.issue` hands back.

    ``chain`` fires with the PEM chain (leaf first) or fails with a csrproxy error;
    cancelling it drops only this waiter, never the order.  ``order_id`` is the id of the
    order it waits on (the async order id), ``None`` when no order runs (a stored chain,
    or a refusal).
    """

    order_id: str | None
    chain: Deferred[str]


def translate(failure: Failure) -> Failure:
    """ACME exceptions to csrproxy errors the API can show."""
    e = failure.value
    if isinstance(e, CsrproxyError | CancelledError):
        return failure
    if isinstance(e, DeadlineExceeded):
        return Failure(IssuanceTimeout(f"the CA did not finish the order in time: {e}"))
    if isinstance(e, ACMEProblem):
        status = 429 if e.short_type == "rateLimited" else 502
        return Failure(IssuanceFailed(f"the CA refused: {e.detail}", e.type, status, e.retry_after))
    if isinstance(e, AuthorizationFailed | OrderFailed):
        return Failure(IssuanceFailed(str(e), e.problem.type if e.problem else None, 502))
    if isinstance(e, ACMETransportError):
        return Failure(IssuanceFailed(f"the CA is unreachable: {e}", None, 503))
    if isinstance(e, ACMEError):
        return Failure(IssuanceFailed(f"ACME error: {e}", None, 502))
    return failure
