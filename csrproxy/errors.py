"""Our exceptions.  Each carries structured fields, not just a message.

The API maps them to RFC 9457 problem documents: every subclass of
``CsrproxyError`` names its problem ``type`` (relative to
``PROBLEM_NAMESPACE``) and HTTP ``status``.
"""

from __future__ import annotations

from collections.abc import Sequence

PROBLEM_NAMESPACE = "https://csrproxy.dev/problems/"


class CsrproxyError(Exception):
    """Base of every error csrproxy raises on purpose."""

    problem = "internal"
    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def problem_type(self) -> str:
        return PROBLEM_NAMESPACE + self.problem


class ConfigError(CsrproxyError):
    """The configuration is wrong; ``key`` names the offending key (e.g. ``dns.listen``)."""

    problem = "config"

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}" if key else detail)
        self.key = key


class ListenError(CsrproxyError):
    """A listener could not be started; ``endpoint`` names it as configured."""

    problem = "listen"

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"cannot listen on {endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class BadCSR(CsrproxyError):
    """The request body is not a usable CSR."""

    problem = "bad-csr"
    status = 400

    def __init__(self, detail: str, names: Sequence[str] = ()) -> None:
        super().__init__(detail)
        self.names = list(names)


class BadRequest(CsrproxyError):
    """The request itself (not the CSR in it) is malformed."""

    problem = "bad-request"
    status = 400


class ProfileNotAllowed(CsrproxyError):
    """The request asks for a certificate profile ``[policy] profiles`` does not allow,
    or the CA's directory does not offer."""

    problem = "profile-not-allowed"
    status = 400


class NameNotAllowed(CsrproxyError):
    """One or more names of the CSR are outside ``[policy] names``."""

    problem = "name-not-allowed"
    status = 403

    def __init__(self, detail: str, names: Sequence[str]) -> None:
        super().__init__(detail)
        self.names = list(names)


class KeyNotAllowed(CsrproxyError):
    """The CSR's public key type or size is refused by policy."""

    problem = "key-not-allowed"
    status = 403


class PublishError(CsrproxyError):
    """A challenge record could not be published; ``backend`` names where."""

    problem = "dns-publish"
    status = 503

    def __init__(self, backend: str, detail: str) -> None:
        super().__init__(f"{backend}: {detail}")
        self.backend = backend


class IssuanceFailed(CsrproxyError):
    """The CA refused or failed the order; ``acme_type`` keeps the CA's problem type."""

    problem = "ca-error"
    status = 502

    def __init__(
        self,
        detail: str,
        acme_type: str | None = None,
        status: int = 502,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.acme_type = acme_type
        self.status = status
        self.retry_after = retry_after


class CAUnavailable(IssuanceFailed):
    """The CA is known to be failing (csrproxy's circuit breaker is open): nothing was asked
    of it; ``retry_after`` is the number of seconds until csrproxy tries it again."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail, None, 503, retry_after)


class IssuanceTimeout(CsrproxyError):
    """The order did not finish before its deadline."""

    problem = "ca-timeout"
    status = 504


class BodyTooLarge(CsrproxyError):
    """The request body is (or announces itself as) larger than ``[api] max_body``."""

    problem = "body-too-large"
    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


class NotFound(CsrproxyError):
    """No such route, order or resource."""

    problem = "not-found"
    status = 404


class MethodNotAllowed(CsrproxyError):
    """The route exists but not for this method; ``allowed`` lists the methods it takes."""

    problem = "method-not-allowed"
    status = 405

    def __init__(self, detail: str, allowed: Sequence[str] = ()) -> None:
        super().__init__(detail)
        self.allowed = list(allowed)


class OrderNotReady(CsrproxyError):
    """The asynchronous order has no certificate (yet, or ever); ``order_status`` says which."""

    problem = "order-not-ready"
    status = 409

    def __init__(self, detail: str, order_status: str) -> None:
        super().__init__(detail)
        self.order_status = order_status


class Unauthorized(CsrproxyError):
    """A bearer token is required and none, or no valid one, was sent."""

    problem = "unauthorized"
    status = 401


class ClientNotAllowed(CsrproxyError):
    """The client address is outside ``[api] allow_from``."""

    problem = "client-not-allowed"
    status = 403

    def __init__(self, detail: str, address: str) -> None:
        super().__init__(detail)
        self.address = address


class SubjectNotAllowed(CsrproxyError):
    """Seed mode: the CSR's subject is not exactly ``[policy] subject``."""

    problem = "subject-not-allowed"
    status = 403

    def __init__(self, detail: str, subject: str) -> None:
        super().__init__(detail)
        self.subject = subject


class RateLimited(CsrproxyError):
    """csrproxy's own admission control refused; ``reason`` names the budget, ``retry_after``
    is the number of seconds until it has room again (None: never by itself, e.g. a paused
    identifier, which needs the operator)."""

    problem = "rate-limited"
    status = 429

    def __init__(self, detail: str, reason: str, retry_after: float | None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after = retry_after
