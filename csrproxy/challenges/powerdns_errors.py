"""What can go wrong talking to the PowerDNS HTTP API, as typed errors."""

from __future__ import annotations

import json
from typing import Any

from twisted.python.failure import Failure

from csrproxy.errors import PublishError

BACKEND = "powerdns"


class PowerDNSAPIError(PublishError):
    """A PowerDNS API call failed for good.

    ``reason`` is one of ``unreachable``, ``bad-key`` (401/403), ``no-zone``
    (404), ``rejected`` (422 and other 4xx), ``server`` (5xx), ``outside-zone``
    (the name is not in the configured zone, nothing was sent);
    ``http_status`` is PowerDNS's status code when it answered.
    """

    def __init__(self, reason: str, detail: str, http_status: int | None = None) -> None:
        super().__init__(BACKEND, detail)
        #: The detail without the backend prefix.
        self.text = detail
        self.reason = reason
        self.http_status = http_status


class Transient(Exception):
    """One attempt failed in a way worth retrying; ``error`` is what to raise at the deadline."""

    def __init__(self, error: PowerDNSAPIError) -> None:
        super().__init__(error.detail)
        self.error = error


def api_error_text(content: bytes) -> str:
    """PowerDNS's ``{"error": ...}`` text, or the start of the body."""
    try:
        doc: Any = json.loads(content)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        text = str(doc["error"])
    else:
        text = content[:200].decode("utf-8", "replace")
    return " ".join(text.split())[:300] or "no details"


def reason_of(e: Exception) -> str:
    """What went wrong, in words (for twisted.web's wrapper exceptions, their reasons')."""
    reasons = getattr(e, "reasons", None)  # ResponseFailed, RequestTransmissionFailed
    if isinstance(reasons, list) and reasons:
        text = "; ".join(r.getErrorMessage() if isinstance(r, Failure) else str(r) for r in reasons)
    else:
        text = str(e) or type(e).__name__
    return text.strip().rstrip(".")


def http_error(
    name: str, status: int, content: bytes, server_id: str, zone: str
) -> PowerDNSAPIError:
    """The error for PowerDNS's answer ``status`` to a write of ``name``."""
    text = api_error_text(content)
    if status in (401, 403):
        return PowerDNSAPIError(
            "bad-key",
            f"PowerDNS API refused the API key (HTTP {status}: {text}); "
            "check [dns.powerdns] api_key",
            status,
        )
    if status == 404:
        return PowerDNSAPIError(
            "no-zone",
            f"PowerDNS server {server_id!r} has no zone {zone}. "
            f"(HTTP 404: {text})",
            status,
        )
    if status >= 500:
        return PowerDNSAPIError(
            "server", f"PowerDNS API failed (HTTP {status}: {text})", status
        )
    return PowerDNSAPIError(
        "rejected", f"PowerDNS rejected the TXT record {name}. (HTTP {status}: {text})", status
    )
