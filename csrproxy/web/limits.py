"""HTTP request limits that twisted.web lacks: a body limit enforced before the body is
read, and a deadline for a request's headers and body to arrive.

twisted.web buffers any body and answers ``100 Continue`` to any ``Content-Length``.
Here a too-large ``Content-Length`` is refused with 413 as soon as the headers are in
(no ``100 Continue`` is sent), a chunked body is counted as it arrives and refused the
moment it passes the limit, and a request whose headers and body have not arrived
within ``read_timeout`` gets 408.  Each refusal closes the connection.  Idle
keep-alive connections are cut by the Site's ``timeout``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from csrproxy.errors import PROBLEM_NAMESPACE

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Content Too Large"}


def raw_problem(status: int, problem: str, detail: str) -> bytes:
    """A complete HTTP/1.1 response carrying a problem document, ending the connection."""
    body = json.dumps(
        {
            "type": PROBLEM_NAMESPACE + problem,
            "title": _REASONS.get(status, b"Error").decode(),
            "status": status,
            "detail": detail,
        }
    ).encode()
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/problem+json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, _REASONS.get(status, b"Error"), len(body))
    )
    return head + body


class LimitedRequest(Request):
    """Counts body bytes as they arrive and keeps the body in memory (it is small)."""

    _received = 0

    def gotLength(self, length: int | None) -> None:
        # Never a temporary file: a body over max_body is refused anyway.
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        self._received += len(data)
        if isinstance(channel, LimitedChannel) and self._received > channel.site.max_body:
            channel.refuse(413, "body-too-large", channel.site.too_large_detail())
            return
        assert self.content is not None
        self.content.write(data)


class LimitedChannel(HTTPChannel):
    """An HTTPChannel that refuses an over-long ``Content-Length`` before ``100 Continue``."""

    site: LimitedSite
    _refused = False
    _deadline: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        # The deadline starts with the first byte of a request, not while idle.
        if self._deadline is None and not self._handlingRequest and self.site.read_timeout:
            self._deadline = self.callLater(self.site.read_timeout, self._too_slow)  # type: ignore[no-untyped-call]
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.refuse(
            408,
            "request-timeout",
            f"the request did not arrive within {self.site.read_timeout:g} seconds",
        )

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.site.max_body:
            self.refuse(413, "body-too-large", self.site.too_large_detail())
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def refuse(self, status: int, problem: str, detail: str) -> None:
        """Answer ``status`` with a problem document and close; ignore whatever follows."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        path = getattr(self, "_path", b"")
        self.site.refused(path, status)
        assert self.transport is not None
        self.transport.write(raw_problem(status, problem, detail))
        self.loseConnection()  # type: ignore[no-untyped-call]

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's bare "400 Bad Request" (bad request line, headers, framing): as a
        # problem document like every other error.
        self.refuse(400, "bad-request", "the HTTP request is malformed")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(400, "bad-request", "a request or header line is too long")

    def lineReceived(self, line: bytes) -> None:
        if not self._refused:
            super().lineReceived(line)  # type: ignore[no-untyped-call]

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)


class LimitedSite(Site):
    """A Site whose connections are :class:`LimitedChannel` and requests
    :class:`LimitedRequest`; ``timeout`` cuts idle connections."""

    protocol = LimitedChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        *,
        max_body: int,
        read_timeout: float,
        idle_timeout: float,
        reactor: Any = None,
        on_refused: Callable[[bytes, int], None] | None = None,
        access_log: bool = False,
    ) -> None:
        kwargs: dict[str, Any] = {"timeout": idle_timeout}
        if reactor is not None:
            kwargs["reactor"] = reactor
        # Bodies are CSRs, never HTML forms: skip twisted.web's form parsing.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(resource, requestFactory=LimitedRequest, **kwargs)  # type: ignore[no-untyped-call]
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.displayTracebacks = False
        self._on_refused = on_refused
        self._access_log = access_log

    def too_large_detail(self) -> str:
        return f"the request body is larger than {self.max_body} bytes"

    def refused(self, path: bytes, status: int) -> None:
        if self._on_refused is not None:
            self._on_refused(path, status)

    def log(self, request: Any) -> None:
        # One access-log line per request costs more than the rest of a cache hit.
        if self._access_log:
            super().log(request)
