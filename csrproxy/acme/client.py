"""The RFC 8555 client: directory, account, orders, certificates, ARI, revocation.

One :class:`ACMEClient` serves the whole process: the directory is fetched
once, nonces are pooled, and the HTTP client's connection pool is shared by
every order.  Signing, nonces and retries live in :mod:`csrproxy.acme.transport`;
its circuit breaker (:mod:`csrproxy.acme.breaker`) is probed by this client.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509
from josepy.b64 import b64encode
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from csrproxy.acme.breaker import CircuitBreaker
from csrproxy.acme.certs import RenewalWindow, ari_cert_id, parse_window
from csrproxy.acme.jws import AccountKey, eab_jws
from csrproxy.acme.messages import (
    Account,
    Authorization,
    CertificateChain,
    Challenge,
    Directory,
    Order,
    checked_url,
)
from csrproxy.acme.problems import ACMEProblem, ACMEProtocolError, DeadlineExceeded
from csrproxy.acme.response import ACMEResponse
from csrproxy.acme.transport import ACMETransport
from csrproxy.errors import ProfileNotAllowed
from csrproxy.retry import RetryTimer, parse_retry_after

log = Logger()

#: RFC 5280 revocation reasons accepted by revoke().
REVOCATION_REASONS = {
    "unspecified": 0,
    "keyCompromise": 1,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
}

__all__ = [
    "REVOCATION_REASONS",
    "ACMEClient",
    "ACMEResponse",
    "PollSchedule",
]

T = TypeVar("T")


@dataclass(frozen=True)
class PollSchedule:
    """First poll delay, its cap, and the overall deadline in seconds (clock time)."""

    first: float
    cap: float
    deadline: float


def profile_not_offered(profile: str, offered: frozenset[str]) -> ProfileNotAllowed:
    """The refusal of a request for a profile the CA's directory does not list."""
    listed = ", ".join(sorted(offered)) or "none"
    return ProfileNotAllowed(f"the CA does not offer the profile {profile!r} (it offers: {listed})")


class ACMEClient:
    """Everything csrproxy asks of one ACME CA with one account key."""

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
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.clock = clock
        self.directory_url = directory_url
        #: External Account Binding (key id, HMAC key) for newAccount, when the CA needs it.
        self.eab = eab
        #: Every request to the CA passes it; its ``state`` and ``last_success`` are for
        #: health and metrics.  This client probes for it.
        self.breaker = breaker if breaker is not None else CircuitBreaker(clock)
        self.transport = ACMETransport(
            clock,
            http,
            key,
            request_timeout=request_timeout,
            retry_first=retry_first,
            retry_cap=retry_cap,
            retry_deadline=retry_deadline,
            on_request=on_request,
            breaker=self.breaker,
        )
        self.breaker.probe = self._probe
        self.transport.on_account_gone = self._account_gone
        #: Called with the account URL the CA no longer knows; fires with the URL found or
        #: registered again.  The issuer installs its own, shared by every order; without
        #: one this client looks the account up again itself.
        self.find_account_again: Callable[[str], Deferred[str]] | None = None
        self._contact: Sequence[str] = ()
        self._directory: Directory | None = None
        self._warned_profile = False

    @property
    def key(self) -> AccountKey:
        return self.transport.key

    @property
    def account_url(self) -> str | None:
        return self.transport.account_url

    @property
    def requests(self) -> Counter[tuple[str, int]]:
        """ACME requests made, by (endpoint kind, HTTP status)."""
        return self.transport.requests

    @property
    def offered_profiles(self) -> frozenset[str] | None:
        """The profiles the CA's directory offers; None until the directory is loaded."""
        return None if self._directory is None else self._directory.profiles

    async def directory(self, deadline: float | None = None) -> Directory:
        """The CA's directory, fetched once per process (retried until ``deadline``)."""
        if self._directory is None:
            t = self.transport
            resp = await t.retrying(
                lambda: t.send("GET", self.directory_url, kind="directory", deadline=deadline),
                deadline,
            )
            if resp.status != 200:
                raise t.problem(resp)
            directory = Directory.from_json(resp.json(), self.directory_url)
            t.new_nonce_url = directory.new_nonce
            self._directory = directory
            log.info("ACME directory {url} loaded", url=self.directory_url)
        return self._directory

    async def post(
        self, url: str, payload: Any, kind: str = "other", deadline: float | None = None
    ) -> ACMEResponse:
        await self.directory(deadline)
        return await self.transport.post(url, payload, kind, deadline=deadline)

    def _probe(self) -> Deferred[ACMEResponse]:
        """The breaker's probe: one unsigned request, newNonce (its nonce is kept) or, before
        the directory was loaded, the directory."""
        t = self.transport
        if t.new_nonce_url is None:
            return Deferred.fromCoroutine(t.send("GET", self.directory_url, kind="directory"))
        return Deferred.fromCoroutine(t.send("HEAD", t.new_nonce_url, kind="newNonce"))

    # -- account ----------------------------------------------------------

    async def account(self, contact: Sequence[str] = (), deadline: float | None = None) -> str:
        """Find the account of our key, or register it; returns (and keeps) its URL.

        An existing account whose contacts differ from ``contact`` is updated.
        """
        self._contact = tuple(contact)
        if self.account_url is not None:
            return self.account_url
        url = (await self.directory(deadline)).new_account
        t = self.transport
        try:
            resp = await t.post(
                url, {"onlyReturnExisting": True}, "newAccount", jwk=True, deadline=deadline
            )
            found = True
        except ACMEProblem as e:
            if e.short_type != "accountDoesNotExist":
                raise
            payload: dict[str, Any] = {"termsOfServiceAgreed": True}
            if contact:
                payload["contact"] = list(contact)
            if self.eab is not None:
                payload["externalAccountBinding"] = eab_jws(self.key, *self.eab, url)
            resp = await t.post(url, payload, "newAccount", jwk=True, deadline=deadline)
            found = False
        if not resp.location:
            raise ACMEProtocolError("newAccount gave no Location")
        location = checked_url(resp.location, "newAccount's Location")
        account = Account.from_json(resp.json(), location) if resp.body else None
        t.account_url = location
        log.info(
            "ACME account {account} {how}",
            account=location,
            how="found" if found else "registered",
        )
        if found and contact:
            current = account.contact if account is not None else ()
            if sorted(current) != sorted(contact):
                await self.update_contact(contact, deadline)
        return location

    def forget_account(self, stale: str) -> bool:
        """Forget the account URL ``stale`` (the CA does not know it); False if it is not the
        one kept (it was forgotten already, or replaced)."""
        if self.transport.account_url != stale:
            return False
        self.transport.account_url = None
        return True

    def _account_gone(self, stale: str) -> Deferred[str]:
        if self.find_account_again is not None:
            return self.find_account_again(stale)
        self.forget_account(stale)
        return Deferred.fromCoroutine(self.account(self._contact))

    async def update_contact(self, contact: Sequence[str], deadline: float | None = None) -> None:
        if self.account_url is None:
            raise ACMEProtocolError("no account yet")
        await self.post(self.account_url, {"contact": list(contact)}, "account", deadline)
        log.info("ACME account {account} contacts updated", account=self.account_url)

    async def key_change(self, new_key: AccountKey) -> None:
        """Roll the account over to ``new_key`` (RFC 8555 §7.3.5)."""
        if self.account_url is None:
            raise ACMEProtocolError("no account yet")
        url = _offered((await self.directory()).key_change, "keyChange")
        inner = new_key.sign(
            {"account": self.account_url, "oldKey": self.key.public_jwk}, url, None, None
        )
        inner_doc = json.loads(inner)
        await self.transport.post(url, inner_doc, "keyChange")
        self.transport.key = new_key
        log.info("ACME account {account} rolled over to a new key", account=self.account_url)

    # -- orders -----------------------------------------------------------

    async def new_order(
        self,
        names: Sequence[str],
        *,
        profile: str | None = None,
        replaces: str | None = None,
        deadline: float | None = None,
        require_profile: bool = False,
    ) -> Order:
        """Place an order; ``profile`` is asked for when the directory offers it, else the
        order goes without (once warned) or, with ``require_profile``, is not placed:
        :class:`ProfileNotAllowed`."""
        directory = await self.directory(deadline)
        payload: dict[str, Any] = {"identifiers": [{"type": "dns", "value": n} for n in names]}
        if profile is not None:
            if profile in directory.profiles:
                payload["profile"] = profile
            elif require_profile:
                raise profile_not_offered(profile, directory.profiles)
            elif not self._warned_profile:
                self._warned_profile = True
                log.warn(
                    "the CA does not offer profile {profile}; ordering without", profile=profile
                )
        if replaces is not None and directory.renewal_info is not None:
            payload["replaces"] = replaces
        url = directory.new_order
        try:
            resp = await self.post(url, payload, "newOrder", deadline)
        except ACMEProblem as e:
            if "replaces" not in payload or e.status not in (400, 409):
                raise
            # The CA would not take this order as that certificate's replacement: order plainly.
            log.warn(
                "newOrder refused replaces={r} ({err}); ordering without", r=replaces, err=e.detail
            )
            del payload["replaces"]
            resp = await self.post(url, payload, "newOrder", deadline)
        if not resp.location:
            raise ACMEProtocolError("newOrder gave no Location")
        return Order.from_json(resp.json(), checked_url(resp.location, "newOrder's Location"))

    async def order(self, url: str, deadline: float | None = None) -> Order:
        """POST-as-GET the order at ``url``."""
        return Order.from_json((await self.post(url, None, "order", deadline)).json(), url)

    async def authorization(self, url: str, deadline: float | None = None) -> Authorization:
        """POST-as-GET the authorization at ``url``."""
        resp = await self.post(url, None, "authz", deadline)
        return Authorization.from_json(resp.json(), url)

    async def answer_challenge(self, url: str, deadline: float | None = None) -> Challenge:
        """Tell the CA the challenge at ``url`` is ready to be validated."""
        resp = await self.post(url, {}, "challenge", deadline)
        return Challenge.from_json(resp.json(), f"challenge {url}")

    async def finalize(self, order: Order, csr_der: bytes, deadline: float | None = None) -> Order:
        """Send the CSR to the order's finalize URL; the CA answers with the order."""
        payload = {"csr": b64encode(csr_der).decode("ascii")}
        resp = await self.post(order.finalize, payload, "finalize", deadline)
        return Order.from_json(resp.json(), order.url)

    async def poll(
        self,
        url: str,
        parse: Callable[[dict[str, Any], str], T],
        done: Callable[[T], bool],
        schedule: PollSchedule,
        kind: str,
        nudge: Deferred[float] | None = None,
    ) -> T:
        """POST-as-GET ``url`` until ``done(parse(doc, url))``; honours ``Retry-After``, else
        doubles the delay from ``schedule.first`` up to ``schedule.cap``.

        ``nudge`` fires with a clock time at which the CA is likely done (it was seen
        validating): the first wait then ends by that time, and a poll that finds the
        CA not done yet is an extra one, leaving the schedule as it was.
        """
        timer = RetryTimer(self.clock, schedule.first, schedule.cap, schedule.deadline)
        delay = timer.next_delay()
        while delay is not None:
            due = self.clock.seconds() + delay
            early = await self._sleep(delay, nudge)
            nudge = None
            resp = await self.post(url, None, kind, schedule.deadline)
            message = parse(resp.json(), url)
            if done(message):
                return message
            retry_after = parse_retry_after(resp.header("retry-after"), self.clock.seconds())
            if early and retry_after is None:
                # The nudged poll was an extra one: the scheduled wait resumes where it was.
                delay = timer.within(max(0.0, due - self.clock.seconds()))
            else:
                delay = timer.next_delay(retry_after)
        raise DeadlineExceeded(f"{url} not done before the order's deadline")

    def _sleep(self, delay: float, nudge: Deferred[float] | None) -> Deferred[bool]:
        """Wait ``delay`` seconds, or less if ``nudge`` names an earlier time; True if less."""
        if nudge is None:
            return deferLater(self.clock, delay, lambda: False)
        cut = [False]
        woken: Deferred[bool] = Deferred(lambda _: call.cancel() if call.active() else None)
        call = self.clock.callLater(delay, lambda: woken.callback(cut[0]))

        def early(when: float) -> float:
            if call.active() and when < call.getTime():
                left = when - self.clock.seconds()
                if left > 0:
                    call.reset(left)
                    cut[0] = True
                else:
                    call.cancel()
                    woken.callback(True)
            return when

        nudge.addCallback(early)
        return woken

    async def download(self, url: str, deadline: float | None = None) -> CertificateChain:
        """POST-as-GET the chain at ``url``, with the alternates it links to."""
        resp = await self.post(url, None, "certificate", deadline)
        return CertificateChain.from_pem(resp.body, url, resp.links("alternate"))

    # -- renewal information and revocation -------------------------------------

    async def renewal_info(self, cert: x509.Certificate) -> RenewalWindow | None:
        """The CA's suggested renewal window for ``cert`` (RFC 9773), or None without ARI."""
        base = (await self.directory()).renewal_info
        if base is None:
            return None
        url = f"{base.rstrip('/')}/{ari_cert_id(cert)}"
        t = self.transport
        resp = await t.retrying(lambda: t.send("GET", url, kind="renewalInfo"), None)
        if resp.status != 200:
            raise t.problem(resp)
        retry_after = parse_retry_after(resp.header("retry-after"), self.clock.seconds())
        try:
            return parse_window(resp.json(), retry_after)
        except ValueError as e:
            raise ACMEProtocolError(f"{url}: {e}") from e

    async def revoke(self, cert_der: bytes, reason: str | int = "unspecified") -> None:
        """Revoke a certificate this account ordered (RFC 8555 §7.6)."""
        code = REVOCATION_REASONS.get(reason) if isinstance(reason, str) else reason
        if code is None:
            raise ValueError(f"unknown revocation reason {reason!r}")
        url = _offered((await self.directory()).revoke_cert, "revokeCert")
        payload = {"certificate": b64encode(cert_der).decode("ascii"), "reason": code}
        await self.post(url, payload, "revokeCert")
        log.info("certificate revoked (reason {reason})", reason=code)


def _offered(url: str | None, name: str) -> str:
    if url is None:
        raise ACMEProtocolError(f"the CA's directory offers no {name}")
    return url
