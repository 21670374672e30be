"""One HTTP exchange with the server: :class:`Request`, :class:`Response`, and the
stdlib (urllib) :class:`UrllibTransport`, so the client needs no HTTP library.  No
redirect is followed: a 3xx is an answer like any other."""

from __future__ import annotations

import email.utils
import http.client
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from csrproxy.client.errors import EXIT_NETWORK, EXIT_REFUSED, ClientError

MAX_BODY = 1 << 20
"""The longest answer read: a chain or a problem document is a few KiB."""


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


class RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows 301/302/303/307/308 (and turns a POST into a GET with the same
    headers, the token among them): this handler follows none, so the 3xx is the answer."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class UrllibTransport:
    """A :data:`Transport` over urllib that follows no redirect; ``cafile`` is trusted for
    https:// URLs."""

    def __init__(self, cafile: str | None = None) -> None:
        self.cafile = cafile
        self._openers: dict[bool, urllib.request.OpenerDirector] = {}

    def __call__(self, req: Request) -> Response:
        r = urllib.request.Request(req.url, req.body, dict(req.headers), method=req.method)
        try:
            opener = self._opener(req.url.lower().startswith("https:"))
            with opener.open(r, timeout=req.timeout) as resp:
                return Response(resp.status, _lower(resp.headers.items()), _body(resp, req))
        except urllib.error.HTTPError as e:
            try:
                body = _body(e, req)
            except (OSError, http.client.HTTPException):
                body = b""  # the status is the answer; a body cut short is no detail
            return Response(e.code, _lower(e.headers.items()), body)
        except (OSError, http.client.HTTPException) as e:
            raise ClientError(f"cannot reach {req.url}: {e}", EXIT_NETWORK) from e

    def _opener(self, https: bool) -> urllib.request.OpenerDirector:
        if https not in self._openers:
            handlers: list[urllib.request.BaseHandler] = [RefuseRedirects()]
            if https:
                context = ssl.create_default_context(cafile=self.cafile)
                handlers.append(urllib.request.HTTPSHandler(context=context))
            self._openers[https] = urllib.request.build_opener(*handlers)
        return self._openers[https]


def _body(resp: Any, req: Request) -> bytes:
    body = bytes(resp.read(MAX_BODY + 1))
    if len(body) > MAX_BODY:
        raise ClientError(f"{req.url} answered more than {MAX_BODY} bytes", EXIT_REFUSED)
    return body


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
