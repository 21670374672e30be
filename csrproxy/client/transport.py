"""One HTTP exchange with the server: :class:`Request`, :class:`Response`, and the
stdlib (urllib) :class:`UrllibTransport`, so the client needs no HTTP library."""

from __future__ import annotations

import email.utils
import http.client
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from csrproxy.client.errors import EXIT_NETWORK, ClientError


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None = None
    timeout: float = 60.0


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names lowercased
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


Transport = Callable[[Request], Response]
"""One HTTP exchange.  Any status is a :class:`Response`; a failure to talk to the server
raises :class:`ClientError` with ``EXIT_NETWORK``."""


class UrllibTransport:
    """A :data:`Transport` over urllib; ``cafile`` is trusted for https:// URLs."""

    def __init__(self, cafile: str | None = None) -> None:
        self.cafile = cafile

    def __call__(self, req: Request) -> Response:
        r = urllib.request.Request(req.url, req.body, dict(req.headers), method=req.method)
        ctx = (
            ssl.create_default_context(cafile=self.cafile) if req.url.startswith("https") else None
        )
        try:
            with urllib.request.urlopen(r, timeout=req.timeout, context=ctx) as resp:
                return Response(resp.status, _lower(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, _lower(e.headers.items()), e.read())
        except (OSError, http.client.HTTPException) as e:
            raise ClientError(f"cannot reach {req.url}: {e}", EXIT_NETWORK) from e


def _lower(items: Iterable[tuple[Any, Any]]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in items}


def retry_after(resp: Response, now: float) -> float | None:
    """Seconds from ``Retry-After`` (delta-seconds or an HTTP date), if any."""
    value = resp.header("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None
