"""Errors as RFC 9457 problem documents, and JSON answers."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

from csrproxy.errors import PROBLEM_NAMESPACE, CsrproxyError, IssuanceFailed, RateLimited

PROBLEM_JSON = b"application/problem+json"
JSON = b"application/json"


def problem_document(e: BaseException) -> dict[str, Any]:
    """The RFC 9457 document for an exception (``internal`` for anything unexpected)."""
    if not isinstance(e, CsrproxyError):
        return {
            "type": PROBLEM_NAMESPACE + "internal",
            "title": "Internal error",
            "status": 500,
            "detail": "an unexpected error occurred; it has been logged",
        }
    doc: dict[str, Any] = {
        "type": e.problem_type,
        "title": type(e).__name__,
        "status": e.status,
        "detail": e.detail,
    }
    for field in ("names", "acme_type", "reason", "allowed", "order_status"):
        value = getattr(e, field, None)
        if value:
            doc[field] = value
    return doc


def retry_after_of(e: BaseException) -> float | None:
    """The seconds a client should wait before asking again, when the error says."""
    if isinstance(e, IssuanceFailed | RateLimited):
        return e.retry_after
    return None


def json_answer(
    request: IRequest, status: int, doc: dict[str, Any], ctype: bytes = JSON
) -> bytes:
    """Set the status and content type; the document as JSON."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", ctype)
    return json.dumps(doc).encode() + b"\n"
