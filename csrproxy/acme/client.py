"""The RFC 8555 client: directory, account, orders, certificates, ARI, revocation.

One :class:`ACMEClient` serves the whole process: the directory is fetched
once, nonces are pooled, and the HTTP client's connection pool is shared by
every order.  Signing, nonces and retries live in :mod:`csrproxy.acme.transport`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from josepy.b64 import b64encode
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from csrproxy.acme.certs import RenewalWindow, ari_cert_id, parse_window
from csrproxy.acme.jws import AccountKey, eab_jws
from csrproxy.acme.problems import ACMEProblem, ACMEProtocolError, DeadlineExceeded
from csrproxy.acme.transport import (
    ACMEResponse,
    ACMETransport,
    Backoff,
    parse_retry_after,
)

log = Logger()

#: RFC 5280 revocation reasons accepted by revoke().
REVOCATION_REASONS = {
    "unspecified": 0,
    "keyCompromise": 1,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
}

__all__ = ["REVOCATION_REASONS", "ACMEClient", "ACMEResponse", "Backoff", "parse_retry_after"]


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
    ) -> None:
        self.clock = clock
        self.directory_url = directory_url
        #: External Account Binding (key id, HMAC key) for newAccount, when the CA needs it.
        self.eab = eab
        self.transport = ACMETransport(
            clock,
            http,
            key,
            request_timeout=request_timeout,
            retry_first=retry_first,
            retry_cap=retry_cap,
            retry_deadline=retry_deadline,
            on_request=on_request,
        )
        self._directory: dict[str, Any] | None = None
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

    async def directory(self) -> dict[str, Any]:
        """The CA's directory, fetched once per process."""
        if self._directory is None:
            t = self.transport
            resp = await t.retrying(
                lambda: t.send("GET", self.directory_url, kind="directory"), None
            )
            if resp.status != 200:
                raise t.problem(resp)
            doc = resp.json()
            for key in ("newNonce", "newAccount", "newOrder"):
                if not isinstance(doc.get(key), str):
                    raise ACMEProtocolError(f"directory {self.directory_url} has no {key}")
            t.new_nonce_url = doc["newNonce"]
            self._directory = doc
            log.info("ACME directory {url} loaded", url=self.directory_url)
        return self._directory

    async def _url(self, name: str) -> str:
        url = (await self.directory()).get(name)
        if not isinstance(url, str):
            raise ACMEProtocolError(f"the CA's directory offers no {name}")
        return url

    async def post(
        self, url: str, payload: Any, kind: str = "other", deadline: float | None = None
    ) -> ACMEResponse:
        await self.directory()
        return await self.transport.post(url, payload, kind, deadline=deadline)

    async def get(self, url: str, kind: str = "other", deadline: float | None = None) -> Any:
        """POST-as-GET a JSON resource."""
        return (await self.post(url, None, kind, deadline)).json()

    # -- account ----------------------------------------------------------

    async def account(self, contact: Sequence[str] = ()) -> str:
        """Find the account of our key, or register it; returns (and keeps) its URL.

        An existing account whose contacts differ from ``contact`` is updated.
        """
        if self.account_url is not None:
            return self.account_url
        url = await self._url("newAccount")
        t = self.transport
        try:
            resp = await t.post(url, {"onlyReturnExisting": True}, "newAccount", jwk=True)
            found = True
        except ACMEProblem as e:
            if e.short_type != "accountDoesNotExist":
                raise
            payload: dict[str, Any] = {"termsOfServiceAgreed": True}
            if contact:
                payload["contact"] = list(contact)
            if self.eab is not None:
                payload["externalAccountBinding"] = eab_jws(self.key, *self.eab, url)
            resp = await t.post(url, payload, "newAccount", jwk=True)
            found = False
        if not resp.location:
            raise ACMEProtocolError("newAccount gave no Location")
        t.account_url = resp.location
        log.info(
            "ACME account {account} {how}",
            account=resp.location,
            how="found" if found else "registered",
        )
        if found and contact:
            current = resp.json().get("contact") if resp.body else None
            if sorted(current or []) != sorted(contact):
                await self.update_contact(contact)
        return resp.location

    async def update_contact(self, contact: Sequence[str]) -> None:
        if self.account_url is None:
            raise ACMEProtocolError("no account yet")
        await self.post(self.account_url, {"contact": list(contact)}, "account")
        log.info("ACME account {account} contacts updated", account=self.account_url)

    async def key_change(self, new_key: AccountKey) -> None:
        """Roll the account over to ``new_key`` (RFC 8555 §7.3.5)."""
        if self.account_url is None:
            raise ACMEProtocolError("no account yet")
        url = await self._url("keyChange")
        inner = new_key.sign(
            {"account": self.account_url, "oldKey": self.key.public_jwk}, url, None, None
        )
        inner_doc = json.loads(inner)
        await self.transport.post(url, inner_doc, "keyChange")
        self.transport.key = new_key
        log.info("ACME account {account} rolled over to a new key", account=self.account_url)

    # -- orders -----------------------------------------------------------

    async def offers_profile(self, profile: str) -> bool:
        profiles = (await self.directory()).get("meta", {}).get("profiles")
        return isinstance(profiles, dict) and profile in profiles

    async def new_order(
        self,
        names: Sequence[str],
        *,
        profile: str | None = None,
        replaces: str | None = None,
        deadline: float | None = None,
    ) -> tuple[str, dict[str, Any]]:
        url = await self._url("newOrder")
        payload: dict[str, Any] = {"identifiers": [{"type": "dns", "value": n} for n in names]}
        if profile is not None:
            if await self.offers_profile(profile):
                payload["profile"] = profile
            elif not self._warned_profile:
                self._warned_profile = True
                log.warn(
                    "the CA does not offer profile {profile}; ordering without", profile=profile
                )
        if replaces is not None and "renewalInfo" in await self.directory():
            payload["replaces"] = replaces
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
        return resp.location, resp.json()

    async def answer_challenge(self, url: str, deadline: float | None = None) -> Any:
        return (await self.post(url, {}, "challenge", deadline)).json()

    async def finalize(
        self, url: str, csr_der: bytes, deadline: float | None = None
    ) -> ACMEResponse:
        payload = {"csr": b64encode(csr_der).decode("ascii")}
        return await self.post(url, payload, "finalize", deadline)

    async def poll(
        self,
        url: str,
        done: Callable[[dict[str, Any]], bool],
        first: float,
        cap: float,
        deadline: float,
        kind: str,
        nudge: Deferred[float] | None = None,
    ) -> dict[str, Any]:
        """POST-as-GET ``url`` until ``done(doc)``; honours ``Retry-After``, else doubles.

        ``nudge`` fires with a clock time at which the CA is likely done (it was seen
        validating): the first wait then ends by that time, and a poll that finds the
        CA not done yet is an extra one, leaving the schedule as it was.
        """
        backoff = Backoff(first, cap)
        delay = backoff()
        while True:
            now = self.clock.seconds()
            if now + delay > deadline:
                raise DeadlineExceeded(f"{url} not done before the order's deadline")
            due = now + delay
            early = await self._sleep(delay, nudge)
            nudge = None
            resp = await self.post(url, None, kind, deadline)
            doc = resp.json()
            if done(doc):
                return doc
            retry_after = parse_retry_after(resp.header("retry-after"), self.clock.seconds())
            if early and retry_after is None:
                delay = max(0.0, due - self.clock.seconds())
            else:
                delay = backoff(retry_after)

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

    async def download(self, url: str, deadline: float | None = None) -> ACMEResponse:
        return await self.post(url, None, "certificate", deadline)

    # -- renewal information and revocation -------------------------------------

    async def renewal_info(self, cert: x509.Certificate) -> RenewalWindow | None:
        """The CA's suggested renewal window for ``cert`` (RFC 9773), or None without ARI."""
        base = (await self.directory()).get("renewalInfo")
        if not isinstance(base, str):
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
        url = await self._url("revokeCert")
        payload = {"certificate": b64encode(cert_der).decode("ascii"), "reason": code}
        await self.post(url, payload, "revokeCert")
        log.info("certificate revoked (reason {reason})", reason=code)
