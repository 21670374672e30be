"""The client-facing HTTP API (Klein): ``POST /v1/sign`` and ``GET /v1/health``.

Every error leaves as an RFC 9457 ``application/problem+json`` document.  The
order runs in the issuer, detached from the request: a client that goes away
cancels only its own wait.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import Any, cast

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from csrproxy.acme.order import IssuedChain
from csrproxy.csr import DEFAULT_KEY_TYPES, DEFAULT_MAX_NAMES, check_csr, csr_bytes_from_body
from csrproxy.errors import PROBLEM_NAMESPACE, CsrproxyError, IssuanceFailed
from csrproxy.issuer import Issuer
from csrproxy.metrics import Metrics
from csrproxy.policy import NamePolicy

log = Logger()

PEM_CHAIN = b"application/pem-certificate-chain"
PROBLEM_JSON = b"application/problem+json"


def problem(
    request: IRequest,
    status: int,
    type_: str,
    title: str,
    detail: str,
    **extra: Any,
) -> bytes:
    """Set the status and headers for a problem document and return its body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", PROBLEM_JSON)
    doc = {"type": type_, "title": title, "status": status, "detail": detail}
    doc.update({k: v for k, v in extra.items() if v is not None})
    return json.dumps(doc).encode() + b"\n"


class SigningAPI:
    """The routes; collaborators come through the constructor."""

    app = Klein()

    def __init__(
        self,
        issuer: Issuer,
        policy: NamePolicy,
        *,
        max_body: int = 64 * 1024,
        key_types: Collection[str] = DEFAULT_KEY_TYPES,
        max_names: int = DEFAULT_MAX_NAMES,
        ready: Callable[[], bool] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.issuer = issuer
        self.policy = policy
        self.max_body = max_body
        self.key_types = key_types
        self.max_names = max_names
        self._ready = ready or (lambda: issuer.ready)

    def _count(self, request: IRequest, route: str) -> None:
        req = cast(Request, request)

        def done(_: object) -> None:
            self.metrics.http_requests.labels(route, str(req.code)).inc()

        req.notifyFinish().addBoth(done)

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", self.metrics.content_type.encode())
        return self.metrics.render()

    @app.route("/v1/sign", methods=["POST"])
    def sign(self, request: IRequest) -> Deferred[bytes] | bytes:
        self._count(request, "/v1/sign")
        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return self._too_large(request)
        assert request.content is not None
        body = request.content.read(self.max_body + 1)
        if len(body) > self.max_body:
            return self._too_large(request)
        ctype = request.getHeader(b"content-type")
        csr = check_csr(
            csr_bytes_from_body(body, ctype.decode("latin-1") if ctype else None),
            key_types=self.key_types,
            max_names=self.max_names,
        )
        self.policy.check(csr.names, csr.key_label)
        log.info("sign request for {names}", names=",".join(csr.names))
        d = self.issuer.issue(csr)

        def done(chain: IssuedChain) -> bytes:
            request.setHeader(b"Content-Type", PEM_CHAIN)
            return chain.pem.encode("ascii")

        return d.addCallback(done)

    def _too_large(self, request: IRequest) -> bytes:
        return problem(
            request,
            413,
            PROBLEM_NAMESPACE + "body-too-large",
            "IRequest body too large",
            f"the body is larger than {self.max_body} bytes",
        )

    @app.route("/v1/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        self._count(request, "/v1/health")
        ready = self._ready()
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"Content-Type", b"application/json")
        account = self.issuer.acme.account_url
        return json.dumps({"ready": ready, "account": account}).encode() + b"\n"

    @app.handle_errors(CsrproxyError)
    def known_error(self, request: IRequest, failure: Failure) -> bytes:
        e: CsrproxyError = failure.value  # type: ignore[assignment]
        extra: dict[str, Any] = {}
        names = getattr(e, "names", None)
        if names:
            extra["names"] = names
        if isinstance(e, IssuanceFailed):
            extra["acme_type"] = e.acme_type
            if e.retry_after is not None:
                request.setHeader(b"Retry-After", str(int(e.retry_after + 0.999)).encode())
        if e.status >= 500:
            log.warn("request failed: {err}", err=e.detail)
        return problem(request, e.status, e.problem_type, type(e).__name__, e.detail, **extra)

    @app.handle_errors(Exception)
    def unexpected_error(self, request: IRequest, failure: Failure) -> bytes:
        if failure.check(CancelledError):
            return b""  # the client went away; the order goes on in the issuer
        log.failure("unexpected error serving {uri}", failure, uri=request.uri)
        return problem(
            request,
            500,
            PROBLEM_NAMESPACE + "internal",
            "Internal error",
            "an unexpected error occurred; it has been logged",
        )
