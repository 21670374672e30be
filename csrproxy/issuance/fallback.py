"""Which failures of one CA another CA would not share (``[[acme.fallback]]``).

An order goes to the next CA only when the first one refused it for a reason that is the
CA's own: its rate limits (or csrproxy's budget that mirrors them), its being away or
failing (unreachable, 5xx, ``serverInternal``, csrproxy's circuit breaker open, no answer
within the order's deadline). A problem with the request or with our DNS (a bad CSR,
``unauthorized``, ``dns``, ``caa``, ``rejectedIdentifier``) would meet every CA alike and
fails the order at once.
"""

from __future__ import annotations

from csrproxy.acme.problems import (
    ACMEProblem,
    ACMETransportError,
    AuthorizationFailed,
    DeadlineExceeded,
    OrderFailed,
)
from csrproxy.errors import CAUnavailable, RateLimited

#: ACME problem types (short form) that are the CA's own state, not the request's.
CA_OWN_PROBLEMS = frozenset({"rateLimited", "serverInternal"})


def another_ca_may_issue(error: BaseException) -> bool:
    """True when ``error`` ended an order for a reason another CA would not share."""
    if isinstance(error, RateLimited | CAUnavailable | ACMETransportError | DeadlineExceeded):
        return True
    if isinstance(error, ACMEProblem):
        return error.short_type in CA_OWN_PROBLEMS or error.status >= 500
    if isinstance(error, AuthorizationFailed | OrderFailed):
        problem = error.problem
        return problem is not None and (
            problem.short_type in CA_OWN_PROBLEMS or problem.status >= 500
        )
    return False


__all__ = ["CA_OWN_PROBLEMS", "another_ca_may_issue"]
