"""ACME failures as typed exceptions; a problem document (RFC 8555 §6.7) is an ACMEProblem.

The documents themselves are parsed in :mod:`csrproxy.acme.messages`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

ACME_ERROR = "urn:ietf:params:acme:error:"

#: Problems a retry can fix, given time.
RETRYABLE = frozenset({"rateLimited", "serverInternal", "badNonce"})


def short_problem_type(type: str) -> str:
    """``badNonce`` for ``urn:ietf:params:acme:error:badNonce``, else the type unchanged."""
    return type[len(ACME_ERROR) :] if type.startswith(ACME_ERROR) else type


class ProblemIdentifier(Protocol):
    """What a subproblem names (``messages.Identifier`` matches)."""

    @property
    def type(self) -> str: ...

    @property
    def value(self) -> str: ...


class ProblemPart(Protocol):
    """What an :class:`ACMEProblem` keeps of a subproblem (``messages.Subproblem`` matches).

    Declared here, not imported, so this module stays below :mod:`csrproxy.acme.messages`.
    """

    @property
    def type(self) -> str: ...

    @property
    def detail(self) -> str: ...

    @property
    def identifier(self) -> ProblemIdentifier | None: ...

    @property
    def short_type(self) -> str: ...


class ACMEError(Exception):
    """Any failure talking to the CA."""


class ACMEProblem(ACMEError):
    """The CA answered with a problem document; keeps type, detail, subproblems and status.

    Raised for an error answer; also what an order's or a challenge's ``error`` field holds.
    """

    def __init__(
        self,
        type: str,
        detail: str,
        status: int,
        subproblems: Sequence[ProblemPart] = (),
        retry_after: float | None = None,
        nonce: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(f"{type}: {detail} (HTTP {status})")
        self.type = type
        self.detail = detail
        self.status = status
        self.subproblems = tuple(subproblems)
        self.retry_after = retry_after
        self.nonce = nonce
        self.url = url

    @property
    def short_type(self) -> str:
        """``badNonce`` for ``urn:ietf:params:acme:error:badNonce``, else the full type."""
        return short_problem_type(self.type)

    @property
    def retryable(self) -> bool:
        return self.short_type in RETRYABLE or self.status >= 500


class ACMEProtocolError(ACMEError):
    """The CA answered something RFC 8555 does not allow (bad JSON, missing field, ...)."""


class ACMETransportError(ACMEError):
    """The CA could not be reached, or the connection failed mid-request."""

    def __init__(self, url: str, reason: str, sent: bool = False) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
        #: True when the request may have reached the CA (the failure is ambiguous).
        self.sent = sent


class AuthorizationFailed(ACMEError):
    """An authorization went invalid; ``problem`` is the challenge's error when the CA gave one."""

    def __init__(self, identifier: str, problem: ACMEProblem | None) -> None:
        why = f"{problem.short_type}: {problem.detail}" if problem else "no reason given"
        super().__init__(f"authorization for {identifier} failed: {why}")
        self.identifier = identifier
        self.problem = problem


class OrderFailed(ACMEError):
    """An order went invalid."""

    def __init__(self, url: str, problem: ACMEProblem | None) -> None:
        why = f"{problem.short_type}: {problem.detail}" if problem else "no reason given"
        super().__init__(f"order {url} is invalid: {why}")
        self.url = url
        self.problem = problem


class DeadlineExceeded(ACMEError):
    """The order's overall deadline passed."""
