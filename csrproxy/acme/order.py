"""One order from ``newOrder`` to the downloaded chain, answering dns-01.

Everything one order needs is an :class:`OrderRun`; :func:`obtain_chain` runs it from
``newOrder``, :func:`complete_order` from an order the CA already has.  The DNS side is
behind :class:`DNS01Responder`: this module computes the TXT value for an identifier
and asks the responder to publish it, and never learns how.  Every value published is
unpublished when the order ends, whatever the outcome.

The run calls its ``checkpoint`` with the name of each point in :data:`CHECKPOINTS` as
it passes it (a no-op unless a test asks for more, such as dying there).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from josepy.b64 import b64encode
from twisted.internet.defer import Deferred, DeferredList, FirstError, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.acme.certs import top_issuer_cn
from csrproxy.acme.client import ACMEClient, PollSchedule
from csrproxy.acme.jws import AccountKey
from csrproxy.acme.messages import Authorization, CertificateChain, Challenge, Order, Status
from csrproxy.acme.problems import (
    ACMEProblem,
    ACMEProtocolError,
    ACMETransportError,
    AuthorizationFailed,
    OrderFailed,
)
from csrproxy.errors import BadCSR

log = Logger()

__all__ = [
    "CHECKPOINTS",
    "Checkpoint",
    "DNS01Responder",
    "IssuedChain",
    "OrderOptions",
    "OrderRun",
    "PollSchedule",
    "Settle",
    "Watch",
    "complete_order",
    "dns01_value",
    "no_checkpoint",
    "obtain_chain",
]

#: The named points of a run, in order: the CA has the order (and it is on record); the
#: challenge was answered; finalize was accepted; the chain is downloaded.
CHECKPOINTS = ("after-new-order", "after-challenge", "after-finalize", "after-download")

#: Called with a name from :data:`CHECKPOINTS` when the run passes that point.
Checkpoint = Callable[[str], None]

#: identifier -> a Deferred of the clock time to poll its authorization at, fired once the
#: CA has been seen looking up its challenge record (cancel it to stop watching).
Watch = Callable[[str], Deferred[float]]


#: identifiers -> a Deferred that fires when no resolver can still hold an answer for
#: their challenge names older than the values now served (csrproxy.challenges.caches).
Settle = Callable[[Sequence[str]], Deferred[None]]


def no_checkpoint(point: str) -> None:
    """The checkpoint of production runs: passing a point does nothing."""


class DNS01Responder(Protocol):
    """Publishes and removes the dns-01 TXT value for an identifier (a DNS name, no ``*.``)."""

    def publish(self, identifier: str, value: str) -> Deferred[None]: ...

    def unpublish(self, identifier: str, value: str) -> Deferred[None]: ...


@dataclass(frozen=True)
class OrderOptions:
    """What every order asks of the CA beyond its names."""

    #: Pick the chain whose top certificate's issuer CN is this, among default and alternates.
    preferred_chain: str | None = None
    #: Ask for this profile when the directory's ``meta.profiles`` lists it.
    profile: str | None = None
    #: The profile was the request's own: not offered means no order (else: ordered
    #: without, the configured profile being a preference).
    strict_profile: bool = False


@dataclass(frozen=True, eq=False)
class OrderRun:
    """Everything one order's run needs: what to order, how, and the caller's hooks.

    ``replaces`` is the ARI certificate id of the certificate this order renews;
    ``on_order(url)`` is called as soon as the CA has created the order, and nothing is
    published before what it returns has completed; ``csr_spki`` is the CSR's
    SubjectPublicKeyInfo when the caller has it at hand; ``watch(identifier)``, when
    given, fires with the clock time at which to poll the authorization once the CA has
    been seen looking up its challenge record; ``settle(identifiers)``, when given, is
    awaited once every value is served and before any challenge is answered.
    """

    client: ACMEClient
    names: Sequence[str]
    csr_der: bytes
    responder: DNS01Responder
    schedule: PollSchedule
    options: OrderOptions = OrderOptions()
    replaces: str | None = None
    on_order: Callable[[str], Awaitable[object] | object] | None = None
    csr_spki: bytes | None = None
    watch: Watch | None = None
    checkpoint: Checkpoint = no_checkpoint
    settle: Settle | None = None


@dataclass
class IssuedChain:
    """The CA's answer: the PEM chain (leaf first) and where it came from."""

    pem: str
    order_url: str
    certificate_url: str
    alternates: list[str] = field(default_factory=list)


def dns01_value(key: AccountKey, token: str) -> str:
    """The TXT value that answers the dns-01 challenge ``token`` for the account ``key``."""
    digest = hashlib.sha256(key.key_authorization(token).encode("ascii")).digest()
    return b64encode(digest).decode("ascii")


def _csr_spki(csr_der: bytes) -> bytes:
    return (
        x509.load_der_x509_csr(csr_der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


async def obtain_chain(run: OrderRun) -> IssuedChain:
    """Run one order from ``newOrder`` to the end and return the chain."""
    client = run.client
    if (run.csr_spki or _csr_spki(run.csr_der)) == client.key.spki_der():
        # RFC 8555 §11.1: a certificate key must not be the account key.
        raise BadCSR("the CSR's public key is csrproxy's ACME account key")
    await client.account()
    order = await client.new_order(
        run.names,
        profile=run.options.profile,
        replaces=run.replaces,
        deadline=run.schedule.deadline,
        require_profile=run.options.strict_profile,
    )
    log.info("order {order} created for {names}", order=order.url, names=",".join(run.names))
    # The authorizations are read while the order URL is recorded: reading changes nothing
    # at the CA, and nothing is published before the order is on record.
    authz_urls = order.authorizations if order.status is Status.PENDING else ()
    steps: list[Deferred[Any]] = [
        Deferred.fromCoroutine(client.authorization(u, run.schedule.deadline)) for u in authz_urls
    ]
    if run.on_order is not None:
        recorded = run.on_order(order.url)
        if isinstance(recorded, Deferred):
            steps.append(recorded)
        elif isinstance(recorded, Awaitable):
            steps.append(Deferred.fromCoroutine(_awaited(recorded)))
    try:
        done = await gatherResults(steps, consumeErrors=True) if steps else []
    except FirstError as e:
        e.subFailure.raiseException()
    authzs: dict[str, Authorization] = {a.url: a for a in done[: len(authz_urls)]}
    run.checkpoint("after-new-order")
    return await complete_order(run, order.url, order, authzs)


async def _awaited(step: Awaitable[object]) -> object:
    return await step


async def complete_order(
    run: OrderRun,
    order_url: str,
    order: Order | None = None,
    authzs: Mapping[str, Authorization] | None = None,
) -> IssuedChain:
    """Take the order at ``order_url`` from wherever it stands (pending, ready, processing,
    valid) to its chain.

    ``order`` is the order as last read, if the caller has it; ``authzs`` are its
    authorizations already read, by URL.
    """
    if order is None:
        await run.client.account()
        order = await run.client.order(order_url, run.schedule.deadline)
    steps = _OrderSteps(run, order_url)
    try:
        if order.status is Status.PENDING:
            await steps.authorize_all(order, authzs or {})
        if order.status in (Status.PENDING, Status.READY):
            order = await steps.finalize(order)
        elif order.status is Status.PROCESSING:
            order = await steps.await_order()
        if order.status is not Status.VALID:
            raise OrderFailed(order_url, order.error)
        if order.certificate is None:
            raise ACMEProtocolError(f"order {order_url} is valid but has no certificate URL")
        downloaded = await steps.download(order.certificate)
        run.checkpoint("after-download")
        log.info("order {order} valid; certificate {cert}", order=order_url, cert=downloaded.url)
        chain = IssuedChain(downloaded.pem, order_url, downloaded.url, list(downloaded.alternates))
    except BaseException:
        # Clean up without making the caller wait: a backend that just failed to publish
        # may take its whole retry deadline to fail the removal too.
        Deferred.fromCoroutine(steps.unpublish_all())
        raise
    await steps.unpublish_all()
    return chain


class _OrderSteps:
    """The steps of one run past ``newOrder``, and the TXT values it has published."""

    def __init__(self, run: OrderRun, order_url: str) -> None:
        self.run = run
        self.client = run.client
        self.schedule = run.schedule
        self.order_url = order_url
        self.published: list[tuple[str, str]] = []

    async def unpublish_all(self) -> None:
        for identifier, value in self.published:
            try:
                await self.run.responder.unpublish(identifier, value)
            except Exception as e:  # cleanup must go on for every record
                log.error(
                    "could not remove challenge for {name}: {err}", name=identifier, err=str(e)
                )

    async def authorize_all(self, order: Order, authzs: Mapping[str, Authorization]) -> None:
        """Publish every pending authorization's value and see all served, wait out any
        cached older answer, then answer every challenge (none before all are served:
        a resolver asked between two values would cache a set missing one)."""
        pending = await self._settled(
            [Deferred.fromCoroutine(self.publish(u, authzs.get(u))) for u in order.authorizations]
        )
        identifiers = [p[0] for p in pending if p is not None]
        if identifiers and self.run.settle is not None:
            await self.run.settle(identifiers)
        await self._settled(
            [Deferred.fromCoroutine(self.answer(*p)) for p in pending if p is not None]
        )

    async def _settled(self, steps: list[Deferred[Any]]) -> list[Any]:
        # Wait for every step to settle (cleanup must not run while one still publishes),
        # then raise the first failure.
        results = await DeferredList(steps, consumeErrors=True)
        for ok, result in results:
            if not ok:
                cast(Failure, result).raiseException()
        return [result for _, result in results]

    async def publish(
        self, url: str, authz: Authorization | None
    ) -> tuple[str, Authorization, Challenge] | None:
        """Publish the value of the authorization at ``url``; None if it is already valid."""
        if authz is None:
            authz = await self.client.authorization(url, self.schedule.deadline)
        ident = authz.identifier.value
        if authz.status is Status.VALID:
            log.info("authorization for {name} already valid", name=ident)
            return None
        if authz.status is not Status.PENDING:
            raise AuthorizationFailed(ident, authz.problem)
        challenge = authz.challenge("dns-01")
        if challenge is None or challenge.token is None:
            raise ACMEProtocolError(f"authorization {url} for {ident} offers no dns-01 challenge")
        value = dns01_value(self.client.key, challenge.token)
        self.published.append((ident, value))
        await self.run.responder.publish(ident, value)
        return ident, authz, challenge

    async def answer(self, ident: str, authz: Authorization, challenge: Challenge) -> None:
        """Answer the challenge whose value is served, and poll until it is decided."""
        watch = self.run.watch
        seen = watch(ident) if watch is not None else None
        try:
            authz = await self._answer_and_poll(authz, challenge, seen)
        finally:
            if seen is not None:
                if not seen.called:
                    seen.cancel()
                seen.addErrback(lambda _: None)
        if authz.status is not Status.VALID:
            raise AuthorizationFailed(ident, authz.problem)
        log.info("authorization for {name} valid", name=ident)

    async def _answer_and_poll(
        self, authz: Authorization, challenge: Challenge, seen: Deferred[float] | None
    ) -> Authorization:
        deadline = self.schedule.deadline
        if challenge.status is Status.PENDING:
            try:
                await self.client.answer_challenge(challenge.url, deadline)
                self.run.checkpoint("after-challenge")
            except ACMETransportError as e:
                if not e.sent:
                    raise
                # The answer may or may not have arrived: look before answering again.
                again = (await self.client.authorization(authz.url, deadline)).challenge("dns-01")
                if again is not None and again.status is Status.PENDING:
                    await self.client.answer_challenge(challenge.url, deadline)
        return await self.client.poll(
            authz.url,
            Authorization.from_json,
            lambda a: a.status not in (Status.PENDING, Status.PROCESSING),
            self.schedule,
            "authz-poll",
            nudge=seen,
        )

    async def finalize(self, order: Order) -> Order:
        """Finalize once; after an ambiguous failure, re-read the order instead of guessing."""
        ready = order
        for _ in range(3):
            try:
                order = await self.client.finalize(ready, self.run.csr_der, self.schedule.deadline)
                self.run.checkpoint("after-finalize")
                break
            except ACMETransportError as e:
                if not e.sent:
                    raise
                order = await self.client.order(self.order_url, self.schedule.deadline)
            except ACMEProblem as e:
                if e.short_type != "orderNotReady":
                    raise
                # The CA has not noticed yet that every authorization is valid.
                order = await self.client.poll(
                    self.order_url,
                    Order.from_json,
                    lambda o: o.status is not Status.PENDING,
                    self.schedule,
                    "order-poll",
                )
            if order.status is not Status.READY:
                break  # processing, valid or invalid: finalize reached the CA
        if order.status in (Status.PROCESSING, Status.READY):
            order = await self.await_order()
        return order

    async def await_order(self) -> Order:
        return await self.client.poll(
            self.order_url,
            Order.from_json,
            lambda o: o.status in (Status.VALID, Status.INVALID),
            self.schedule,
            "order-poll",
        )

    async def download(self, url: str) -> CertificateChain:
        """The default chain, or the first alternate whose top issuer CN is the preferred one."""
        chain = await self.client.download(url, self.schedule.deadline)
        want = self.run.options.preferred_chain
        if want is None or top_issuer_cn(chain.pem) == want:
            return chain
        for alt in chain.alternates:
            alt_chain = await self.client.download(alt, self.schedule.deadline)
            if top_issuer_cn(alt_chain.pem) == want:
                log.info("chain {url} matches preferred chain {want}", url=alt, want=want)
                # The alternates are those the default chain named.
                return CertificateChain(alt, alt_chain.pem, chain.alternates)
        log.warn("no chain is issued by {want}; using the default", want=want)
        return chain
