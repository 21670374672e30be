"""The RFC 8555 client: directory, nonces, signed requests, account, orders.

One :class:`ACMEClient` serves the whole process: the directory is fetched
once, nonces are pooled from every ``Replay-Nonce``, and the HTTP client's
connection pool is shared by every order.  Retries follow the CA's
``Retry-After``; problems that a retry cannot fix are raised at once.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import ResponseFailed
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from csrproxy.acme.jws import AccountKey, eab_jws
from csrproxy.acme.problems import (
    ACMEProblem,
    ACMEProtocolError,
    ACMETransportError,
    DeadlineExceeded,
)

log = Logger()

JOSE = "application/jose+json"
MAX_BAD_NONCE = 5


class ACMEResponse:
    """What the client keeps of one CA answer."""

    def __init__(
        self, url: str, status: int, headers: Mapping[str, list[str]], body: bytes
    ) -> None:
        self.url = url
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def location(self) -> str | None:
        return self.header("location")

    def json(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.body)
        except ValueError as e:
            raise ACMEProtocolError(f"{self.url}: answer is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise ACMEProtocolError(f"{self.url}: answer is not a JSON object")
        return doc

    def links(self, rel: str) -> list[str]:
        """URLs of ``Link: <url>;rel="rel"`` headers."""
        out = []
        for value in self.headers.get("link", []):
            for part in value.split(","):
                url, _, params = part.partition(";")
                if f'rel="{rel}"' in params.replace(" ", "") or f"rel={rel}" in params:
                    out.append(url.strip().strip("<>"))
        return out


@implementer(IBodyProducer)
class BytesProducer:
    """A request body written in one go (no cooperator on the global reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Backoff:
    """Delays that start at ``first`` and double up to ``cap``."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.next = first

    def __call__(self, retry_after: float | None = None) -> float:
        delay = self.next
        self.next = min(self.next * 2, self.cap)
        if retry_after is not None:
            return max(retry_after, 0.0)
        return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class ACMEClient:
    """Signed requests to one ACME CA with one account key."""

    def __init__(
        self,
        clock: IReactorTime,
        http: HTTPClient,
        directory_url: str,
        key: AccountKey,
        *,
        request_timeout: float = 30.0,
        retry_first: float = 1.0,
        retry_cap: float = 60.0,
        retry_deadline: float = 120.0,
        on_request: Callable[[str, int], None] | None = None,
        eab: tuple[str, bytes] | None = None,
    ) -> None:
        #: External Account Binding (key id, HMAC key) for newAccount, when the CA needs it.
        self.eab = eab
        self.clock = clock
        self.http = http
        self.directory_url = directory_url
        self.key = key
        self.request_timeout = request_timeout
        self.retry_first = retry_first
        self.retry_cap = retry_cap
        self.retry_deadline = retry_deadline
        self.account_url: str | None = None
        self._directory: dict[str, Any] | None = None
        self._nonces: deque[str] = deque(maxlen=64)
        #: ACME requests made, by (endpoint kind, HTTP status).
        self.requests: Counter[tuple[str, int]] = Counter()
        self._on_request = on_request

    # -- transport --------------------------------------------------------

    async def _send(
        self, method: str, url: str, body: bytes | None = None, kind: str = "other"
    ) -> ACMEResponse:
        headers: dict[bytes | str, list[bytes | str]] = {}
        if body is not None:
            headers["Content-Type"] = [JOSE]
        headers["User-Agent"] = ["csrproxy/0.1 (+twisted treq)"]
        try:
            resp: IResponse = await self.http.request(
                method,
                url,
                data=BytesProducer(body) if body is not None else None,
                headers=headers,
                timeout=self.request_timeout,
                reactor=cast(Any, self.clock),
                allow_redirects=False,
            )
            content = await _read(resp)
        except (ConnectError, DNSLookupError) as e:
            raise ACMETransportError(url, f"cannot connect: {e}", sent=False) from e
        except (ResponseFailed, TimeoutError) as e:
            raise ACMETransportError(url, f"connection failed: {e}", sent=method == "POST") from e
        except Exception as e:
            if "CancelledError" in type(e).__name__:
                raise ACMETransportError(url, "timed out", sent=method == "POST") from e
            raise
        raw_headers = {
            k.decode("latin-1").lower(): [v.decode("latin-1") for v in vs]
            for k, vs in resp.headers.getAllRawHeaders()
        }
        out = ACMEResponse(url, resp.code, raw_headers, content)
        nonce = out.header("replay-nonce")
        if nonce:
            self._nonces.append(nonce)
        self.requests[(kind, resp.code)] += 1
        if self._on_request is not None:
            self._on_request(kind, resp.code)
        return out

    async def directory(self) -> dict[str, Any]:
        """The CA's directory, fetched once per process."""
        if self._directory is None:
            resp = await self._retrying(
                lambda: self._send("GET", self.directory_url, kind="directory")
            )
            if resp.status != 200:
                raise self._problem(resp)
            doc = resp.json()
            for key in ("newNonce", "newAccount", "newOrder"):
                if not isinstance(doc.get(key), str):
                    raise ACMEProtocolError(f"directory {self.directory_url} has no {key}")
            self._directory = doc
            log.info("ACME directory {url} loaded", url=self.directory_url)
        return self._directory

    async def _nonce(self) -> str:
        if self._nonces:
            return self._nonces.popleft()
        url = (await self.directory())["newNonce"]
        resp = await self._retrying(lambda: self._send("HEAD", url, kind="newNonce"))
        if not self._nonces:
            raise ACMEProtocolError(f"{url} gave no Replay-Nonce (HTTP {resp.status})")
        return self._nonces.popleft()

    def _problem(self, resp: ACMEResponse) -> ACMEProblem:
        try:
            doc: Any = json.loads(resp.body)
        except ValueError:
            doc = {"detail": resp.body[:200].decode("utf-8", "replace")}
        return ACMEProblem.from_document(
            doc,
            resp.status,
            retry_after=parse_retry_after(resp.header("retry-after"), self.clock.seconds()),
            nonce=resp.header("replay-nonce"),
            url=resp.url,
        )

    async def _retrying(self, attempt: Callable[[], Any]) -> ACMEResponse:
        """Run ``attempt`` again after transient failures (not after ambiguous ones)."""
        backoff = Backoff(self.retry_first, self.retry_cap)
        give_up = self.clock.seconds() + self.retry_deadline
        while True:
            try:
                resp: ACMEResponse = await attempt()
            except ACMETransportError as e:
                if e.sent:
                    raise
                await self._wait(backoff(), give_up, e)
                continue
            if resp.status in (500, 502, 503, 504) or resp.status == 429:
                problem = self._problem(resp)
                if problem.short_type in ("rateLimited", "serverInternal") or resp.status >= 500:
                    await self._wait(backoff(problem.retry_after), give_up, problem)
                    continue
            return resp

    async def _wait(self, delay: float, give_up: float, cause: Exception) -> None:
        if self.clock.seconds() + delay > give_up:
            raise cause
        log.info("ACME retry in {delay:.1f}s after {cause}", delay=delay, cause=str(cause))
        await deferLater(self.clock, delay, lambda: None)

    async def post(
        self, url: str, payload: Any, kind: str = "other", jwk: bool = False
    ) -> ACMEResponse:
        """A signed POST (``payload=None``: POST-as-GET); raises :class:`ACMEProblem` on error."""
        bad_nonces = 0

        async def attempt() -> ACMEResponse:
            nonce = await self._nonce()
            kid = None if jwk else self.account_url
            if kid is None and not jwk:
                raise ACMEProtocolError("no account yet: call account() first")
            body = self.key.sign(payload, url, nonce, kid)
            return await self._send("POST", url, body, kind=kind)

        while True:
            resp = await self._retrying(attempt)
            if resp.status < 400:
                return resp
            problem = self._problem(resp)
            if problem.short_type == "badNonce" and bad_nonces < MAX_BAD_NONCE:
                bad_nonces += 1
                continue  # the problem's own Replay-Nonce is already in the pool
            raise problem

    async def get(self, url: str, kind: str = "other") -> dict[str, Any]:
        """POST-as-GET a JSON resource."""
        return (await self.post(url, None, kind=kind)).json()

    # -- account ----------------------------------------------------------

    async def account(self, contact: Sequence[str] = ()) -> str:
        """Find the account of our key, or register it; returns (and keeps) its URL."""
        if self.account_url is not None:
            return self.account_url
        url = (await self.directory())["newAccount"]
        try:
            resp = await self.post(url, {"onlyReturnExisting": True}, kind="newAccount", jwk=True)
            log.info("ACME account {account} found", account=resp.location)
        except ACMEProblem as e:
            if e.short_type != "accountDoesNotExist":
                raise
            payload: dict[str, Any] = {"termsOfServiceAgreed": True}
            if contact:
                payload["contact"] = list(contact)
            if self.eab is not None:
                payload["externalAccountBinding"] = eab_jws(self.key, *self.eab, url)
            resp = await self.post(url, payload, kind="newAccount", jwk=True)
            log.info("ACME account {account} registered", account=resp.location)
        if not resp.location:
            raise ACMEProtocolError("newAccount gave no Location")
        self.account_url = resp.location
        return resp.location

    # -- orders -----------------------------------------------------------

    async def new_order(self, names: Sequence[str]) -> tuple[str, dict[str, Any]]:
        url = (await self.directory())["newOrder"]
        payload = {"identifiers": [{"type": "dns", "value": n} for n in names]}
        resp = await self.post(url, payload, kind="newOrder")
        if not resp.location:
            raise ACMEProtocolError("newOrder gave no Location")
        return resp.location, resp.json()

    async def answer_challenge(self, url: str) -> dict[str, Any]:
        return (await self.post(url, {}, kind="challenge")).json()

    async def finalize(self, url: str, csr_der: bytes) -> ACMEResponse:
        from josepy.b64 import b64encode

        payload = {"csr": b64encode(csr_der).decode("ascii")}
        return await self.post(url, payload, kind="finalize")

    async def poll(
        self,
        url: str,
        done: Callable[[dict[str, Any]], bool],
        first: float,
        cap: float,
        deadline: float,
        kind: str,
    ) -> dict[str, Any]:
        """POST-as-GET ``url`` until ``done(doc)``; honours ``Retry-After``, else doubles."""
        backoff = Backoff(first, cap)
        retry_after: float | None = None
        while True:
            delay = backoff(retry_after)
            if self.clock.seconds() + delay > deadline:
                raise DeadlineExceeded(f"{url} not done before the order's deadline")
            await deferLater(self.clock, delay, lambda: None)
            resp = await self.post(url, None, kind=kind)
            doc = resp.json()
            if done(doc):
                return doc
            retry_after = parse_retry_after(resp.header("retry-after"), self.clock.seconds())

    async def download(self, url: str) -> ACMEResponse:
        resp = await self.post(url, None, kind="certificate")
        return resp


async def _read(resp: IResponse) -> bytes:
    from twisted.web.client import readBody

    body: bytes = await readBody(resp)
    return body
