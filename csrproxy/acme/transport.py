"""Signed requests to an ACME CA: nonces, JWS, retries and back-off (RFC 8555 §6).

The nonce pool is fed by every ``Replay-Nonce`` (newNonce is asked only when
it is empty) and used newest first.  ``badNonce`` is retried at once with the
nonce that came with the error, a bounded number of times.  ``rateLimited``,
``serverInternal``, 5xx and connection failures are retried no sooner than
``Retry-After`` (seconds or HTTP-date), else with capped exponential back-off,
never past the caller's deadline.  A POST whose connection failed after it was
sent is ambiguous: it is retried only when it is a POST-as-GET.

The caller's deadline bounds every request made for it, newNonce included: no request
starts after it, and none runs past it.  Every request passes the circuit breaker
(:mod:`csrproxy.acme.breaker`) and reports to it; one refused while the breaker is open is
retried like a connection failure, when the breaker says, within the deadline.  An
``accountDoesNotExist`` answer to a request signed with our account (the CA forgot it)
has the account found or registered again, then the request is sent once more.

Every request goes through the treq ``HTTPClient`` it is given (in production the
one of :mod:`csrproxy.http`: one Agent, one keep-alive pool, verified TLS); the tests
hand it treq's in-memory client or one over loopback, the same code path.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web._newclient import RequestNotSent  # not re-exported by twisted.web.client
from twisted.web.client import RequestTransmissionFailed, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from csrproxy.acme.breaker import CircuitBreaker
from csrproxy.acme.failures import error_text, failure_reasons, verification_failed
from csrproxy.acme.jws import AccountKey
from csrproxy.acme.messages import problem_from_json
from csrproxy.acme.problems import (
    ACMEProblem,
    ACMEProtocolError,
    ACMETransportError,
    DeadlineExceeded,
)
from csrproxy.acme.response import ACMEResponse
from csrproxy.errors import CAUnavailable
from csrproxy.http import MAX_BODY, BodyTooLarge, read_body
from csrproxy.retry import RetryTimer, parse_retry_after

log = Logger()

JOSE = "application/jose+json"
USER_AGENT = "csrproxy/0.1 (twisted; treq)"
# pebble rejects up to half of all good nonces in tests (PEBBLE_WFE_NONCEREJECT=50); each
# retry costs one request, so a generous bound still ends: 0.5**20 is one in a million.
MAX_BAD_NONCE = 20
#: Requests to the CA at once (more wait for a slot): the connections kept per host.
MAX_CONNECTIONS = 20
_USER_AGENT = [USER_AGENT.encode("ascii")]
#: Request kinds that start something at the CA (nothing of ours is there yet to wait for).
STARTS = frozenset({"newOrder", "newAccount"})
_JOSE = [JOSE.encode("ascii")]
#: What a cancelled exchange raises, whether our timeout or our caller cancelled it.
_CANCELLED = (CancelledError, ConnectingCancelledError)


class ACMETransport:
    """One account key's signed requests to one CA."""

    def __init__(
        self,
        clock: IReactorTime,
        http: HTTPClient,
        key: AccountKey,
        *,
        request_timeout: float = 30.0,
        retry_first: float = 1.0,
        retry_cap: float = 60.0,
        retry_deadline: float = 120.0,
        on_request: Callable[[str, int], None] | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.clock = clock
        self.http = http
        self.key = key
        self.request_timeout = request_timeout
        self.retry_first = retry_first
        self.retry_cap = retry_cap
        #: How long to keep retrying when the caller gives no deadline.
        self.retry_deadline = retry_deadline
        self.account_url: str | None = None
        self.new_nonce_url: str | None = None
        self._nonces: deque[str] = deque(maxlen=64)
        self._slots = DeferredSemaphore(MAX_CONNECTIONS)
        #: The largest answer body read from the CA.
        self.max_body = MAX_BODY
        #: Requests made, by (endpoint kind, HTTP status); status 0 is a transport failure.
        self.requests: Counter[tuple[str, int]] = Counter()
        self._on_request = on_request
        #: Refuses requests while the CA is known to be failing; told how each one went.
        self.breaker = breaker
        #: A request that starts something (:data:`STARTS`: newOrder, newAccount) and that
        #: the open breaker refuses fails at once instead of waiting for the breaker's
        #: probe (set when another CA can take the order: ``[[acme.fallback]]``). Requests
        #: of an order the CA already has wait as always: it may be issuing.
        self.fail_fast = False
        #: Called with our account URL when the CA says it does not know it; fires with the
        #: account's URL once it was found or registered again (None: the problem is raised).
        self.on_account_gone: Callable[[str], Deferred[str]] | None = None

    def _count(self, kind: str, status: int) -> None:
        self.requests[(kind, status)] += 1
        if self._on_request is not None:
            self._on_request(kind, status)

    async def send(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        kind: str = "other",
        deadline: float | None = None,
    ) -> ACMEResponse:
        """One HTTP exchange; keeps the answer's nonce; raises ACMETransportError.

        ``request_timeout``, or the time left before ``deadline`` (clock time) if that is
        less, covers the whole exchange: waiting for a connection slot, connecting, the
        request, the answer's head and its body (at most ``MAX_BODY``).  Past the deadline
        nothing is sent (DeadlineExceeded); while the circuit breaker is open neither
        (CAUnavailable).  ``sent`` on an error says whether the CA may have seen the request:
        a refused or timed-out connection, or a certificate that failed verification, did not
        reach it.
        """
        timeout = self.request_timeout
        if deadline is not None:
            left = deadline - self.clock.seconds()
            if left <= 0:
                raise DeadlineExceeded(f"{method} {url}: the deadline passed before it was sent")
            timeout = min(timeout, left)
        breaker = self.breaker
        probe = breaker.admit() if breaker is not None else False
        expired = [False]
        phase = ["waiting"]  # waiting for a slot -> requesting -> reading the body
        try:
            resp = await self._send(method, url, body, kind, timeout, expired, phase)
        except ACMETransportError as e:
            if breaker is not None:
                # No news of the CA: our caller gave up, or the time that ran out was the
                # caller's deadline (not a whole request_timeout), or the request never
                # got a connection slot.
                ours = (not expired[0] and isinstance(e.__cause__, _CANCELLED)) or (
                    expired[0] and (timeout < self.request_timeout or phase[0] == "waiting")
                )
                if ours:
                    breaker.released(probe)
                else:
                    breaker.failed(probe)
            raise
        except BaseException:
            if breaker is not None:
                breaker.released(probe)
            raise
        if breaker is not None:
            if resp.status >= 500:
                breaker.failed(probe)
            else:
                breaker.succeeded()
        return resp

    async def _send(
        self,
        method: str,
        url: str,
        body: bytes | None,
        kind: str,
        timeout: float,
        expired: list[bool],
        phase: list[str],
    ) -> ACMEResponse:
        headers = Headers({b"User-Agent": _USER_AGENT})
        if body is not None:
            headers.setRawHeaders(b"Content-Type", _JOSE)
        exchange = Deferred.fromCoroutine(self._exchange(method, url, body, headers, phase))

        def expire() -> None:
            expired[0] = True
            exchange.cancel()

        timer = self.clock.callLater(timeout, expire)
        ambiguous = method == "POST"
        try:
            resp, content = await exchange
        except (ConnectError, DNSLookupError, ConnectingCancelledError, RequestNotSent) as e:
            self._count(kind, 0)
            why = "timed out connecting" if expired[0] else f"cannot connect: {error_text(e)}"
            raise ACMETransportError(url, why, sent=False) from e
        except ResponseFailed as e:
            self._count(kind, 0)
            if verification_failed(e):
                why = f"TLS failed: {failure_reasons(e)}"
                raise ACMETransportError(url, why, sent=False) from e
            why = "timed out" if expired[0] else f"connection failed: {failure_reasons(e)}"
            raise ACMETransportError(url, why, sent=ambiguous) from e
        except (RequestTransmissionFailed, BodyTooLarge) as e:
            self._count(kind, 0)
            why = f"connection failed: {error_text(e)}"
            raise ACMETransportError(url, why, sent=ambiguous) from e
        except (TimeoutError, CancelledError) as e:
            self._count(kind, 0)
            raise ACMETransportError(
                url, "timed out", sent=ambiguous and phase[0] != "waiting"
            ) from e
        finally:
            if timer.active():
                timer.cancel()
        if not 100 <= resp.code <= 599:  # twisted.web takes any integer (RFC 9110 15: 3 digits)
            self._count(kind, 0)
            raise ACMETransportError(url, f"connection failed: status {resp.code}", sent=ambiguous)
        raw = resp.headers.getAllRawHeaders()
        headers_out = {
            k.decode("latin-1").lower(): [v.decode("latin-1") for v in vs] for k, vs in raw
        }
        nonce = headers_out.get("replay-nonce")
        if nonce:
            self._nonces.append(nonce[0])
        self._count(kind, resp.code)
        return ACMEResponse(url, resp.code, headers_out, content)

    async def _exchange(
        self, method: str, url: str, body: bytes | None, headers: Headers, phase: list[str]
    ) -> tuple[IResponse, bytes]:
        """The request and its whole answer, within one of the CA's connection slots."""
        await self._slots.acquire()
        try:
            phase[0] = "requesting"
            resp: IResponse = await self.http.request(
                method, url, data=body, headers=headers, allow_redirects=False
            )
            phase[0] = "reading"
            # Read even an answer we refuse, so its connection goes back to the pool.
            content = await read_body(resp, self.max_body)
            return resp, content
        finally:
            self._slots.release()

    def problem(self, resp: ACMEResponse) -> ACMEProblem:
        try:
            doc: Any = json.loads(resp.body)
        except ValueError:
            doc = {"detail": resp.body[:200].decode("utf-8", "replace")}
        return problem_from_json(
            doc,
            resp.status,
            retry_after=parse_retry_after(resp.header("retry-after"), self.clock.seconds()),
            nonce=resp.header("replay-nonce"),
            url=resp.url,
        )

    async def nonce(self, deadline: float | None = None, starts: bool = False) -> str:
        """A nonce from the pool, else from newNonce, retried until ``deadline`` (clock time);
        ``starts``: for a request that starts something (see :attr:`fail_fast`)."""
        if self._nonces:
            return self._nonces.pop()  # newest first: the least likely to have expired
        if self.new_nonce_url is None:
            raise ACMEProtocolError("no newNonce URL: load the directory first")
        url = self.new_nonce_url
        resp = await self.retrying(
            lambda: self.send("HEAD", url, kind="newNonce", deadline=deadline),
            deadline,
            starts=starts,
        )
        if not self._nonces:
            raise ACMEProtocolError(f"{url} gave no Replay-Nonce (HTTP {resp.status})")
        return self._nonces.pop()

    async def retrying(
        self,
        attempt: Callable[[], Awaitable[ACMEResponse]],
        deadline: float | None,
        safe: bool = True,
        starts: bool = False,
    ) -> ACMEResponse:
        """Run ``attempt`` again after transient failures until ``deadline`` (clock time).

        ``safe`` says a repeat cannot do anything twice (GET, HEAD, POST-as-GET), so an
        ambiguous connection failure is retried too.  A refusal by the circuit breaker is
        retried when the breaker says.  Giving up on an unreachable CA trips the breaker.
        """
        give_up = deadline if deadline is not None else self.clock.seconds() + self.retry_deadline
        timer = RetryTimer(self.clock, self.retry_first, self.retry_cap, give_up)
        while True:
            try:
                resp = await attempt()
            except ACMETransportError as e:
                if e.sent and not safe:
                    raise
                await self._wait(timer, None, e)
                continue
            except CAUnavailable as e:
                if self.fail_fast and starts:
                    raise
                await self._wait(timer, e.retry_after, e)
                continue
            if resp.status == 429 or resp.status >= 500:
                problem = self.problem(resp)
                if problem.retryable:
                    await self._wait(timer, problem.retry_after, problem)
                    continue
            return resp

    async def _wait(self, timer: RetryTimer, retry_after: float | None, cause: Exception) -> None:
        delay = timer.next_delay(retry_after)
        if delay is None:
            if isinstance(cause, ACMETransportError) and self.breaker is not None:
                self.breaker.trip()
            raise cause
        if isinstance(cause, CAUnavailable):
            log.debug("ACME request waits {delay:.2f}s for the CA circuit", delay=delay)
        else:
            log.info("ACME retry in {delay:.2f}s after {cause}", delay=delay, cause=str(cause))
        await timer.sleep(delay)

    async def post(
        self,
        url: str,
        payload: Any,
        kind: str = "other",
        *,
        jwk: bool = False,
        deadline: float | None = None,
        signer: Callable[[str], bytes] | None = None,
    ) -> ACMEResponse:
        """A signed POST (``payload=None``: POST-as-GET); raises ACMEProblem on an error.

        ``signer(nonce)`` builds the JWS itself (key rollover signs an inner JWS).  Every
        request it makes, newNonce included, ends by ``deadline`` (clock time).
        """
        bad_nonces = 0
        found_again = False
        signed_by: list[str | None] = [None]  # the account URL (kid) of the last attempt

        starts = kind in STARTS

        async def attempt() -> ACMEResponse:
            nonce = await self.nonce(deadline, starts)
            if signer is not None:
                body = signer(nonce)
            else:
                kid = None if jwk else self.account_url
                if kid is None and not jwk:
                    raise ACMEProtocolError("no account yet: look the account up first")
                signed_by[0] = kid
                body = self.key.sign(payload, url, nonce, kid)
            return await self.send("POST", url, body, kind=kind, deadline=deadline)

        while True:
            resp = await self.retrying(attempt, deadline, safe=payload is None, starts=starts)
            if resp.status < 400:
                return resp
            problem = self.problem(resp)
            if problem.short_type == "badNonce" and bad_nonces < MAX_BAD_NONCE:
                bad_nonces += 1
                continue  # the problem's own Replay-Nonce is the newest in the pool
            stale = signed_by[0]
            if (
                problem.short_type == "accountDoesNotExist"
                and stale is not None
                and self.on_account_gone is not None
                and not found_again
            ):
                # The CA forgot our account (a restart, a purge): find or register it again,
                # then send this request once more, signed for that account.
                found_again = True
                log.warn(
                    "the CA does not know account {account}; finding or registering it again",
                    account=stale,
                )
                await self._account_again(self.on_account_gone, stale, deadline)
                continue
            raise problem

    async def _account_again(
        self, find: Callable[[str], Deferred[str]], stale: str, deadline: float | None
    ) -> None:
        """Wait for ``find(stale)``, no longer than ``deadline``; cancelling drops our wait."""
        found = find(stale)
        if deadline is None:
            await found
            return
        late = [False]

        def expire() -> None:
            late[0] = True
            found.cancel()

        timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), expire)
        try:
            await found
        except CancelledError:
            if late[0]:
                raise DeadlineExceeded(f"account {stale} not found again by the deadline") from None
            raise
        finally:
            if timer.active():
                timer.cancel()
