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


class IssuanceTimeout(CsrproxyError):
    """The order did not finish before its deadline."""

    problem = "ca-timeout"
    status = 504
