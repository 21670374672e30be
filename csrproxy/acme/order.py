"""One order from ``newOrder`` to the downloaded chain, answering dns-01.

The DNS side is behind :class:`DNS01Responder`: this module computes the
TXT value for an identifier and asks the responder to publish it, and never
learns how.  Every value published is unpublished when the order ends,
whatever the outcome.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from josepy.b64 import b64encode
from twisted.internet.defer import Deferred, DeferredList, FirstError, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy import crashpoints
from csrproxy.acme.certs import top_issuer_cn
from csrproxy.acme.client import ACMEClient
from csrproxy.acme.messages import problem_from_json
from csrproxy.acme.problems import (
    ACMEProblem,
    ACMEProtocolError,
    ACMETransportError,
    AuthorizationFailed,
    OrderFailed,
)
from csrproxy.errors import BadCSR

log = Logger()


class DNS01Responder(Protocol):
    """Publishes and removes the dns-01 TXT value for an identifier (a DNS name, no ``*.``)."""

    def publish(self, identifier: str, value: str) -> Deferred[None]: ...

    def unpublish(self, identifier: str, value: str) -> Deferred[None]: ...


@dataclass(frozen=True)
class PollSchedule:
    """First poll delay, its cap, and the overall deadline in seconds (clock time)."""

    first: float
    cap: float
    deadline: float


@dataclass(frozen=True)
class OrderOptions:
    """What every order asks of the CA beyond its names."""

    #: Pick the chain whose top certificate's issuer CN is this, among default and alternates.
    preferred_chain: str | None = None
    #: Ask for this profile when the directory's ``meta.profiles`` lists it.
    profile: str | None = None


@dataclass
class IssuedChain:
    """The CA's answer: the PEM chain (leaf first) and where it came from."""

    pem: str
    order_url: str
    certificate_url: str
    alternates: list[str] = field(default_factory=list)


#: identifier -> a Deferred of the clock time to poll its authorization at, fired once the
#: CA has been seen looking up its challenge record (cancel it to stop watching).
Watch = Callable[[str], Deferred[float]]


def dns01_value(client: ACMEClient, token: str) -> str:
    digest = hashlib.sha256(client.key.key_authorization(token).encode("ascii")).digest()
    return b64encode(digest).decode("ascii")


def _problem(doc: Any) -> ACMEProblem | None:
    if isinstance(doc, dict) and doc.get("type"):
        return problem_from_json(doc, int(doc.get("status") or 403))
    return None


def _csr_spki(csr_der: bytes) -> bytes:
    return (
        x509.load_der_x509_csr(csr_der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


async def obtain_chain(
    client: ACMEClient,
    names: Sequence[str],
    csr_der: bytes,
    responder: DNS01Responder,
    schedule: PollSchedule,
    options: OrderOptions = OrderOptions(),
    replaces: str | None = None,
    on_order: Callable[[str], Awaitable[object] | object] | None = None,
    csr_spki: bytes | None = None,
    watch: Watch | None = None,
) -> IssuedChain:
    """Run one order to the end and return the chain.

    ``replaces`` is the ARI certificate id of the certificate this order renews;
    ``on_order(url)`` is called as soon as the CA has created the order;
    ``csr_spki`` is the CSR's SubjectPublicKeyInfo when the caller has it at hand;
    ``watch`` is as for :func:`complete_order`.
    """
    if (csr_spki or _csr_spki(csr_der)) == client.key.spki_der():
        # RFC 8555 §11.1: a certificate key must not be the account key.
        raise BadCSR("the CSR's public key is csrproxy's ACME account key")
    await client.account()
    order_url, order = await client.new_order(
        names, profile=options.profile, replaces=replaces, deadline=schedule.deadline
    )
    log.info("order {order} created for {names}", order=order_url, names=",".join(names))
    # The authorizations are read while the order URL is recorded: reading changes nothing
    # at the CA, and nothing is published before the order is on record.
    authz_urls = order.get("authorizations")
    if order.get("status") != "pending" or not isinstance(authz_urls, list):
        authz_urls = []
    reads = [client.get(str(u), "authz", schedule.deadline) for u in authz_urls]
    steps: list[Deferred[Any]] = [Deferred.fromCoroutine(r) for r in reads]
    if on_order is not None:
        recorded = on_order(order_url)
        if isinstance(recorded, Deferred):
            steps.append(recorded)
        elif isinstance(recorded, Awaitable):
            steps.append(Deferred.fromCoroutine(_awaited(recorded)))
    try:
        done = await gatherResults(steps, consumeErrors=True) if steps else []
    except FirstError as e:
        e.subFailure.raiseException()
    authzs = dict(zip((str(u) for u in authz_urls), done, strict=False))
    crashpoints.reached("after-new-order")
    return await complete_order(
        client, order_url, order, csr_der, responder, schedule, options, watch, authzs
    )


async def _awaited(step: Awaitable[object]) -> object:
    return await step


async def complete_order(
    client: ACMEClient,
    order_url: str,
    order: dict[str, Any] | None,
    csr_der: bytes,
    responder: DNS01Responder,
    schedule: PollSchedule,
    options: OrderOptions = OrderOptions(),
    watch: Watch | None = None,
    authzs: dict[str, dict[str, Any]] | None = None,
) -> IssuedChain:
    """Take an order from wherever it stands (pending, ready, processing, valid) to its chain.

    ``watch(identifier)``, when given, fires with the clock time at which to poll the
    authorization once the CA has been seen looking up its challenge record; ``authzs``
    are authorizations already read, by URL.
    """
    if order is None:
        await client.account()
        order = await client.get(order_url, "order", schedule.deadline)
    published: list[tuple[str, str]] = []
    try:
        if order.get("status") == "pending":
            await _authorize_all(
                client, order_url, order, responder, schedule, published, watch, authzs or {}
            )
        if order.get("status") in ("pending", "ready"):
            order = await _finalize(client, order_url, order, csr_der, schedule)
        elif order.get("status") == "processing":
            order = await _await_order(client, order_url, schedule)
        if order.get("status") != "valid":
            raise OrderFailed(order_url, _problem(order.get("error")))
        cert_url = order.get("certificate")
        if not isinstance(cert_url, str):
            raise ACMEProtocolError(f"order {order_url} is valid but has no certificate URL")
        pem, cert_url, alternates = await _download(client, cert_url, options, schedule)
        crashpoints.reached("after-download")
        log.info("order {order} valid; certificate {cert}", order=order_url, cert=cert_url)
        chain = IssuedChain(pem, order_url, cert_url, alternates)
    except BaseException:
        # Clean up without making the caller wait: a backend that just failed to publish
        # may take its whole retry deadline to fail the removal too.
        Deferred.fromCoroutine(_unpublish_all(responder, published))
        raise
    await _unpublish_all(responder, published)
    return chain


async def _unpublish_all(responder: DNS01Responder, published: list[tuple[str, str]]) -> None:
    for identifier, value in published:
        try:
            await responder.unpublish(identifier, value)
        except Exception as e:  # cleanup must go on for every record
            log.error("could not remove challenge for {name}: {err}", name=identifier, err=str(e))


async def _authorize_all(
    client: ACMEClient,
    order_url: str,
    order: dict[str, Any],
    responder: DNS01Responder,
    schedule: PollSchedule,
    published: list[tuple[str, str]],
    watch: Watch | None,
    authzs: dict[str, dict[str, Any]],
) -> None:
    authz_urls = order.get("authorizations")
    if not isinstance(authz_urls, list):
        raise ACMEProtocolError(f"order {order_url} has no authorizations")
    # Wait for every authorization to settle before cleanup may run.
    results = await DeferredList(
        [
            Deferred.fromCoroutine(
                _authorize(
                    client, str(u), responder, schedule, published, watch, authzs.get(str(u))
                )
            )
            for u in authz_urls
        ],
        consumeErrors=True,
    )
    for ok, result in results:
        if not ok:
            cast(Failure, result).raiseException()


async def _download(
    client: ACMEClient, url: str, options: OrderOptions, schedule: PollSchedule
) -> tuple[str, str, list[str]]:
    """The default chain, or the first alternate whose top issuer CN is the preferred one."""
    resp = await client.download(url, schedule.deadline)
    pem = _pem(resp.body, url)
    alternates = resp.links("alternate")
    want = options.preferred_chain
    if want is None or top_issuer_cn(pem) == want:
        return pem, url, alternates
    for alt in alternates:
        alt_pem = _pem((await client.download(alt, schedule.deadline)).body, alt)
        if top_issuer_cn(alt_pem) == want:
            log.info("chain {url} matches preferred chain {want}", url=alt, want=want)
            return alt_pem, alt, alternates
    log.warn("no chain is issued by {want}; using the default", want=want)
    return pem, url, alternates


def _pem(body: bytes, url: str) -> str:
    pem = body.decode("ascii", "replace")
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ACMEProtocolError(f"{url} did not return a PEM chain")
    return pem


async def _authorize(
    client: ACMEClient,
    url: str,
    responder: DNS01Responder,
    schedule: PollSchedule,
    published: list[tuple[str, str]],
    watch: Watch | None = None,
    authz: dict[str, Any] | None = None,
) -> None:
    if authz is None:
        authz = await client.get(url, "authz", schedule.deadline)
    ident = str((authz.get("identifier") or {}).get("value", "?"))
    status = authz.get("status")
    if status == "valid":
        log.info("authorization for {name} already valid", name=ident)
        return
    if status != "pending":
        raise AuthorizationFailed(ident, _challenge_problem(authz))
    challenge = _dns01(authz)
    if challenge is None:
        raise ACMEProtocolError(f"authorization {url} for {ident} offers no dns-01 challenge")
    value = dns01_value(client, str(challenge["token"]))
    published.append((ident, value))
    await responder.publish(ident, value)
    seen = watch(ident) if watch is not None else None
    try:
        authz = await _answer_and_poll(client, url, ident, challenge, schedule, seen)
    finally:
        if seen is not None:
            if not seen.called:
                seen.cancel()
            seen.addErrback(lambda _: None)
    if authz.get("status") != "valid":
        raise AuthorizationFailed(ident, _challenge_problem(authz))
    log.info("authorization for {name} valid", name=ident)


async def _answer_and_poll(
    client: ACMEClient,
    url: str,
    ident: str,
    challenge: dict[str, Any],
    schedule: PollSchedule,
    seen: Deferred[float] | None,
) -> dict[str, Any]:
    if challenge.get("status") == "pending":
        try:
            await client.answer_challenge(str(challenge["url"]), schedule.deadline)
            crashpoints.reached("after-challenge")
        except ACMETransportError as e:
            if not e.sent:
                raise
            # The answer may or may not have arrived: look before answering again.
            again = _dns01(await client.get(url, "authz", schedule.deadline))
            if again is not None and again.get("status") == "pending":
                await client.answer_challenge(str(challenge["url"]), schedule.deadline)
    return await client.poll(
        url,
        lambda d: d.get("status") not in ("pending", "processing"),
        schedule.first,
        schedule.cap,
        schedule.deadline,
        kind="authz-poll",
        nudge=seen,
    )


def _dns01(authz: dict[str, Any]) -> dict[str, Any] | None:
    for c in authz.get("challenges", []):
        if isinstance(c, dict) and c.get("type") == "dns-01":
            return c
    return None


def _challenge_problem(authz: dict[str, Any]) -> ACMEProblem | None:
    for c in authz.get("challenges", []):
        if isinstance(c, dict) and (p := _problem(c.get("error"))) is not None:
            return p
    return None


async def _finalize(
    client: ACMEClient,
    order_url: str,
    order: dict[str, Any],
    csr_der: bytes,
    schedule: PollSchedule,
) -> dict[str, Any]:
    """Finalize once; after an ambiguous failure, re-read the order instead of guessing."""
    finalize_url = str(order["finalize"])
    for _ in range(3):
        try:
            order = (await client.finalize(finalize_url, csr_der, schedule.deadline)).json()
            crashpoints.reached("after-finalize")
            break
        except ACMETransportError as e:
            if not e.sent:
                raise
            order = await client.get(order_url, "order", schedule.deadline)
        except ACMEProblem as e:
            if e.short_type != "orderNotReady":
                raise
            # The CA has not noticed yet that every authorization is valid.
            order = await client.poll(
                order_url,
                lambda d: d.get("status") != "pending",
                schedule.first,
                schedule.cap,
                schedule.deadline,
                kind="order-poll",
            )
        if order.get("status") != "ready":
            break  # processing, valid or invalid: finalize reached the CA
    if order.get("status") in ("processing", "ready"):
        order = await _await_order(client, order_url, schedule)
    return order


async def _await_order(client: ACMEClient, order_url: str, schedule: PollSchedule) -> Any:
    return await client.poll(
        order_url,
        lambda d: d.get("status") in ("valid", "invalid"),
        schedule.first,
        schedule.cap,
        schedule.deadline,
        kind="order-poll",
    )
