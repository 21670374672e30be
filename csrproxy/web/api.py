"""The client-facing HTTP API (Klein).

``POST /v1/sign`` (sync, or async with ``Prefer: respond-async``), ``GET /v1/orders/<id>``
and its ``/certificate``, ``GET /v1/name``, ``GET /v1/health``, ``GET /metrics`` and
``GET /v1/openapi.json`` (the contract: csrproxy/web/openapi.json).
Every error leaves as an RFC 9457 ``application/problem+json`` document, unknown routes
and wrong methods included.  Orders run in the issuer, detached from the request: a
client that goes away cancels only its own wait.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol, cast

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed

from csrproxy.errors import (
    BadRequest,
    BodyTooLarge,
    CsrproxyError,
    MethodNotAllowed,
    NotFound,
    OrderNotReady,
    ProfileNotAllowed,
)
from csrproxy.issuance.csr import (
    DEFAULT_MAX_NAMES,
    CheckedCSR,
    check_csr,
    public_key_label,
    sign_body,
)
from csrproxy.issuance.ledger import CertificateRow, certificate_key_label
from csrproxy.issuance.orders import OrderBook, OrderRecord
from csrproxy.issuance.policy import NamePolicy, ZoneRoom, always_room
from csrproxy.issuance.renewal import next_check_hint
from csrproxy.issuance.results import Issuance
from csrproxy.metrics import Metrics
from csrproxy.names import CSR_KEY_TYPES
from csrproxy.web.auth import ClientGate, Token
from csrproxy.web.connections import RefusalTally
from csrproxy.web.health import Health
from csrproxy.web.openapi import OPENAPI_JSON, openapi_bytes
from csrproxy.web.problems import PROBLEM_JSON, json_answer, problem_document, retry_after_of
from csrproxy.web.status import StatusPage

log = Logger()

CERTIFICATE_ID = b"CSRProxy-Certificate-Id"
PEM_CHAIN = b"application/pem-certificate-chain"
def wants_async(request: IRequest) -> bool:
    """``Prefer: respond-async`` (RFC 7240), among other preferences or not."""
    for value in request.requestHeaders.getRawHeaders(b"prefer", []):
        for pref in value.split(b","):
            if pref.split(b";")[0].split(b"=")[0].strip().lower() == b"respond-async":
                return True
    return False


def _readable(token: Token | None, names: Sequence[str], key_label: str | None) -> bool:
    """Whether ``token`` may read what was issued for ``names`` and ``key_label``."""
    if token is None or token.policy is None:
        return True
    return all(token.policy.allowed(n, key_label) for n in names)


class Signer(Protocol):
    """What the routes ask of the issuer."""

    @property
    def account_url(self) -> str | None: ...

    def issue(self, csr: CheckedCSR, client: str) -> Deferred[Issuance]: ...


class CertificateView(Protocol):
    """The newest certificate of each CSR by its certificate id (unguessable: made with a
    server-side secret), read-only but for the installation's activity."""

    def certificate_id(self, request_key: str) -> str: ...

    def newest(self, certificate_id: str) -> Deferred[CertificateRow | None]: ...

    def signed(self, request_key: str, when: float, signer: str | None) -> None: ...

    def read(self, row: CertificateRow, when: float, reader: str | None) -> bool: ...


class SigningAPI:
    """The routes; collaborators come through the constructor."""

    app = Klein()

    def __init__(
        self,
        signer: Signer,
        certificates: CertificateView,
        policy: NamePolicy,
        book: OrderBook,
        metrics: Metrics,
        gate: ClientGate,
        *,
        clock: IReactorTime,
        health: Health,
        max_body: int = 64 * 1024,
        key_types: Collection[str] = CSR_KEY_TYPES,
        max_names: int = DEFAULT_MAX_NAMES,
        sync_timeout: float = 50.0,
        profiles: Collection[str] = (),
        status: StatusPage | None = None,
        room: ZoneRoom = always_room,
    ) -> None:
        self.signer = signer
        self.certificates = certificates
        self.policy = policy
        self.book = book
        self.metrics = metrics
        self.gate = gate
        self.clock = clock
        self._health = health
        self._failures = RefusalTally(clock, what="{total} API requests failed (5xx)")
        self.max_body = max_body
        self.key_types = key_types
        self.max_names = max_names
        self.sync_timeout = sync_timeout
        #: The certificate profiles a request may ask for ([policy] profiles).
        self.profiles = frozenset(profiles)
        #: The operator's status page (``[status] enabled``), else None: 404.
        self.status = status
        #: Whether a zone's weekly new-names budget has room (``GET /v1/name``'s choice).
        self.room = room

    # -- plumbing -------------------------------------------------------------

    def _count(self, request: IRequest, route: str) -> None:
        req = cast(Request, request)

        def done(_: object) -> None:
            self.metrics.http_request(route, req.code)

        req.notifyFinish().addBoth(done)

    def _body(self, request: IRequest) -> bytes:
        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise BodyTooLarge(self.max_body)
        assert request.content is not None
        body: bytes = request.content.read(self.max_body + 1)
        if len(body) > self.max_body:
            raise BodyTooLarge(self.max_body)
        return body

    def _address(self, request: IRequest) -> str:
        peer = getattr(request.getClientAddress(), "host", "unix")
        forwarded = [
            v.decode("latin-1")
            for v in request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
        ]
        return self.gate.client_address(peer, forwarded)

    def _client(self, request: IRequest) -> tuple[str, Token | None]:
        """Who asks (token id, else address); raises 403 outside allow_from, 401 without
        a valid token when tokens are configured, 400 for an X-Forwarded-For that names
        no client."""
        try:
            address = self._address(request)
            self.gate.check_address(address)
            auth = request.getHeader(b"authorization")
            token = self.gate.check_token(auth.decode("latin-1") if auth else None)
        except CsrproxyError as e:
            self.metrics.refusal(e.problem)
            raise
        return (token.client_id if token is not None else address), token

    def _csr_from(self, request: IRequest) -> CheckedCSR:
        """The checked CSR of a sign request, with the profile it asks for (the JSON body's
        ``"profile"``, else the ``profile`` query parameter)."""
        ctype = request.getHeader(b"content-type")
        der, profile = sign_body(self._body(request), ctype.decode("latin-1") if ctype else None)
        if profile is None:
            asked = (request.args or {}).get(b"profile")
            profile = asked[0].decode("utf-8", "replace") if asked else None
        if profile is not None and profile not in self.profiles:
            allowed = ", ".join(sorted(self.profiles)) or "none: the configured profile is used"
            raise ProfileNotAllowed(f"the profile {profile[:64]!r} is not allowed ({allowed})")
        csr = check_csr(der, key_types=self.key_types, max_names=self.max_names)
        return csr.with_profile(profile)

    # -- routes ---------------------------------------------------------------

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: IRequest) -> bytes:
        # Scrapers are held to allow_from, not to the signing tokens.
        self.gate.check_address(self._address(request))
        request.setHeader(b"Content-Type", self.metrics.content_type.encode())
        return bytes(self.metrics.render())

    @app.route("/status", methods=["GET"])
    def status_page(self, request: IRequest) -> Deferred[bytes]:
        """The operator's status page: 404 unless enabled, 401 without a status token."""
        if self.status is None:
            raise NotFound("no such route: /status (the status page is off)")
        self._count(request, "/status")
        self.gate.check_address(self._address(request))
        auth = request.getHeader(b"authorization")
        try:
            self.status.check(auth.decode("latin-1") if auth else None)
        except CsrproxyError:
            request.setHeader(b"WWW-Authenticate", b'Basic realm="csrproxy status"')
            raise
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(
            b"Content-Security-Policy",
            b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        )
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return self.status.render()

    @app.route("/v1/sign", methods=["POST"])
    def sign(self, request: IRequest) -> Deferred[bytes]:
        self._count(request, "/v1/sign")
        client, token = self._client(request)
        csr = self._csr_from(request)
        self.policy.check_subject(csr.subject)
        self.policy.check(csr.names, csr.key_label)
        if token is not None and token.policy is not None:
            token.policy.check(csr.names, csr.key_label)
        # A sign request always counts as the installation's activity; its token becomes
        # the one whose reads count too (CertificateView.signed).
        key, now = csr.request_key, self.clock.seconds()
        signer = token.client_id if token is not None else None
        self.certificates.signed(key, now, signer)
        return self.signer.issue(csr, client).addCallback(
            self._issuance, request, csr, now, signer
        )

    def _issuance(
        self,
        issuance: Issuance,
        request: IRequest,
        csr: CheckedCSR,
        now: float,
        signer: str | None,
    ) -> Deferred[bytes] | bytes:
        key = csr.request_key
        d = issuance.chain
        if d.called:  # a stored chain, or a refusal before any order
            return d.addCallback(self._chain, request, key)

        def issued(pem: str) -> str:
            # A new certificate is on record once its chain is: it was signed for too.
            self.certificates.signed(key, now, signer)
            return pem

        d.addCallback(issued)
        if wants_async(request):
            record = self.book.track(csr.names, d, issuance.order_id, key, csr.key_label)
            return self._accepted(request, record)
        return self._wait(request, csr.names, d, issuance.order_id, key, csr.key_label)

    def _chain(self, pem: str, request: IRequest, request_key: str | None = None) -> bytes:
        request.setHeader(b"Content-Type", PEM_CHAIN)
        if request_key is not None:
            # Where to look for this CSR's newest chain later (renewals included).
            certificate_id = self.certificates.certificate_id(request_key)
            request.setHeader(CERTIFICATE_ID, certificate_id.encode())
            request.setHeader(
                b"Link", f'</v1/certificates/{certificate_id}>; rel="csrproxy-certificate"'.encode()
            )
        return pem.encode("ascii")

    def _accepted(self, request: IRequest, record: OrderRecord) -> bytes:
        request.setHeader(b"Location", f"/v1/orders/{record.id}".encode())
        request.setHeader(b"Retry-After", b"1")
        return json_answer(request, 202, record.document())

    def _wait(
        self,
        request: IRequest,
        names: tuple[str, ...],
        d: Deferred[str],
        order_id: str | None = None,
        request_key: str | None = None,
        key_label: str | None = None,
    ) -> Deferred[bytes]:
        """The chain, or a 202 for an async order once ``sync_timeout`` has passed."""
        tracked = [False]

        def cancel(_: Deferred[bytes]) -> None:
            if timer.active():
                timer.cancel()
            d.cancel()

        out: Deferred[bytes] = Deferred(cancel)

        def finished(result: str | Failure) -> str | Failure | None:
            if timer.active():
                timer.cancel()
            if not out.called:
                if isinstance(result, Failure):
                    out.errback(result)
                else:
                    out.callback(self._chain(result, request, request_key))
            return result if tracked[0] else None

        def too_long() -> None:
            tracked[0] = True
            record = self.book.track(names, d, order_id, request_key, key_label)
            out.callback(self._accepted(request, record))

        timer = self.clock.callLater(self.sync_timeout, too_long)
        d.addBoth(finished)
        return out

    @app.route("/v1/orders/<string:order_id>", methods=["GET"])
    def order(self, request: IRequest, order_id: str) -> Deferred[bytes]:
        self._count(request, "/v1/orders/{id}")
        _, token = self._client(request)

        def answer(record: OrderRecord) -> bytes:
            if record.status == "processing":
                request.setHeader(b"Retry-After", b"1")
            return json_answer(request, 200, record.document())

        return self._record(order_id, token).addCallback(answer)

    @app.route("/v1/orders/<string:order_id>/certificate", methods=["GET"])
    def order_certificate(self, request: IRequest, order_id: str) -> Deferred[bytes]:
        self._count(request, "/v1/orders/{id}/certificate")
        _, token = self._client(request)

        def answer(record: OrderRecord) -> bytes:
            if record.chain is None:
                if record.status == "processing":
                    request.setHeader(b"Retry-After", b"1")
                raise OrderNotReady(f"order {order_id} is {record.status}", record.status)
            return self._chain(record.chain, request, record.request_key)

        return self._record(order_id, token).addCallback(answer)

    def _record(self, order_id: str, token: Token | None) -> Deferred[OrderRecord]:
        def found(record: OrderRecord | None) -> OrderRecord:
            # Outside the token's patterns an order does not exist: 404, not 403.
            if record is None or not _readable(token, record.names, record.key_label):
                raise NotFound(f"no order {order_id!r}")
            return record

        return self.book.find(order_id).addCallback(found)

    @app.route("/v1/certificates/<string:certificate_id>", methods=["GET"])
    def certificate(self, request: IRequest, certificate_id: str) -> Deferred[bytes]:
        """The newest chain for a CSR (renewals included), and when to look again.

        A token reads only certificates whose names its patterns allow (404 for others,
        as for unknown ids); whether the read counts as the installation's activity is
        :meth:`CertificateView.read`'s rule.
        """
        self._count(request, "/v1/certificates/{id}")
        _, token = self._client(request)

        def answer(row: CertificateRow | None) -> bytes:
            if row is None or not _readable(token, row.names, certificate_key_label(row)):
                raise NotFound(f"no certificate {certificate_id!r}")
            now = self.clock.seconds()
            self.certificates.read(row, now, token.client_id if token else None)
            hint = next_check_hint(row, now)
            request.setHeader(b"Retry-After", str(int(hint)).encode())
            return self._chain(row.chain, request, row.request_key)

        return self.certificates.newest(certificate_id).addCallback(answer)

    @app.route("/v1/name", methods=["GET", "POST"])
    def name(self, request: IRequest) -> bytes:
        self._count(request, "/v1/name")
        _, token = self._client(request)
        ctype = request.getHeader(b"content-type")
        label = public_key_label(
            self._body(request), ctype.decode("latin-1") if ctype else None, self.key_types
        )
        allowed = [self.policy]
        if token is not None and token.policy is not None:
            allowed.append(token.policy)

        def usable(name: str) -> bool:
            # A name with a placeholder left ({label}, {ip}) is the client's to fill in.
            return "{" in name or all(p.allowed(name, label) for p in allowed)

        # ?current=<name> (each name the installation has): kept while all still allowed,
        # so a renewal stays in its zone whatever the budgets say now.
        current = [
            raw.decode("utf-8", "replace").strip().rstrip(".").lower()
            for raw in (request.args or {}).get(b"current", [])
        ]
        if (
            current
            and len(current) <= self.max_names
            and all("{" not in n and usable(n) for n in current)
        ):
            names = list(dict.fromkeys(current))
        else:
            names = self.policy.offer(label, self.room, usable)
        return json_answer(request, 200, {"names": names, "key_label": label})

    @app.route("/v1/health", methods=["GET"])
    @app.route("/v1/health/ready", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        """Readiness, each check reported; 503 while any fails."""
        self._count(request, "/v1/health")
        doc = self._health.document()
        doc["account"] = self.signer.account_url
        return json_answer(request, 200 if doc["ready"] else 503, doc)

    @app.route("/v1/health/live", methods=["GET"])
    def live(self, request: IRequest) -> bytes:
        """Liveness: the process answers (a supervisor restarts it when this fails)."""
        self._count(request, "/v1/health/live")
        return json_answer(request, 200, {"live": True})

    @app.route("/v1/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        """This API's OpenAPI 3.1 document (csrproxy/web/openapi.json)."""
        self._count(request, "/v1/openapi.json")
        request.setHeader(b"Content-Type", OPENAPI_JSON)
        return openapi_bytes()

    # -- errors ---------------------------------------------------------------

    @app.handle_errors(CsrproxyError)
    def known_error(self, request: IRequest, failure: Failure) -> bytes:
        assert isinstance(failure.value, CsrproxyError)
        return self._problem(request, failure.value)

    def _problem(self, request: IRequest, e: CsrproxyError) -> bytes:
        retry_after = retry_after_of(e)
        if retry_after is not None:
            request.setHeader(b"Retry-After", str(int(retry_after + 0.999)).encode())
        if isinstance(e, MethodNotAllowed) and e.allowed:
            request.setHeader(b"Allow", ", ".join(e.allowed).encode())
        if e.status >= 500:
            # One summary line a second, however many requests fail (a CA outage).
            self._failures.add(e.problem)
        return json_answer(request, e.status, problem_document(e), PROBLEM_JSON)

    @app.handle_errors(HTTPException)
    def routing_error(self, request: IRequest, failure: Failure) -> bytes:
        he = failure.value
        assert isinstance(he, HTTPException)
        self.metrics.http_request("unmatched", he.code or 400)
        path = request.path.decode("latin-1", "replace")
        e: CsrproxyError
        if isinstance(he, WerkzeugMethodNotAllowed):
            allowed = sorted(set(he.valid_methods or ()))
            method = request.method.decode("latin-1", "replace")
            e = MethodNotAllowed(f"{method} is not allowed on {path}", allowed)
        elif he.code == 404:
            e = NotFound(f"no route {path}")
        else:
            e = BadRequest(f"the request cannot be routed: {he.description}")
        return self._problem(request, e)

    @app.handle_errors(Exception)
    def unexpected_error(self, request: IRequest, failure: Failure) -> bytes:
        if failure.check(CancelledError):
            return b""  # the client went away; the order goes on in the issuer
        log.failure("unexpected error serving {uri}", failure, uri=request.uri)
        return json_answer(request, 500, problem_document(Exception()), PROBLEM_JSON)
