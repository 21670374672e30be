"""How a failed HTTP exchange with the CA is told: what went wrong, and whether the CA can
have seen the request (which decides whether a POST may be sent again)."""

from __future__ import annotations

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.web.client import ResponseFailed


def failure_reasons(error: ResponseFailed) -> str:
    """What went wrong, from the failures twisted.web wraps."""
    return "; ".join(reason.getErrorMessage() for reason in error.reasons) or repr(error)


def error_text(e: BaseException) -> str:
    """The exception's message, or its type's name when it has none."""
    return str(e) or type(e).__name__


def verification_failed(error: ResponseFailed) -> bool:
    """True when the CA's certificate failed verification (nothing reached the server).

    twisted.web writes the request into the TLS layer, which holds it until the handshake
    is done; verification (the chain, the host name) is part of the handshake, so its
    failure means no request bytes left us.  Other TLS errors may come after the request
    was delivered, so they count as possibly sent.
    """
    for reason in error.reasons:
        if reason.check(VerificationError):
            return True
        if reason.check(SSL.Error) and "certificate verify failed" in str(reason.value):
            return True
    return False
