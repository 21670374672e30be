"""One order from ``newOrder`` to the downloaded chain, answering dns-01.

The DNS side is behind :class:`DNS01Responder`: this module computes the
TXT value for an identifier and asks the responder to publish it, and never
learns how.  Every value published is unpublished when the order ends,
whatever the outcome.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from josepy.b64 import b64encode
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.acme.client import ACMEClient
from csrproxy.acme.problems import (
    ACMEProblem,
    ACMEProtocolError,
    AuthorizationFailed,
    OrderFailed,
)

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


def dns01_value(client: ACMEClient, token: str) -> str:
    digest = hashlib.sha256(client.key.key_authorization(token).encode("ascii")).digest()
    return b64encode(digest).decode("ascii")


def _problem(doc: Any) -> ACMEProblem | None:
    if isinstance(doc, dict) and doc.get("type"):
        return ACMEProblem.from_document(doc, int(doc.get("status") or 403))
    return None


async def obtain_chain(
    client: ACMEClient,
    names: Sequence[str],
    csr_der: bytes,
    responder: DNS01Responder,
    schedule: PollSchedule,
    options: OrderOptions = OrderOptions(),
    replaces: str | None = None,
) -> IssuedChain:
    """Run one order to the end and return the chain.

    ``replaces`` is the ARI certificate id of the certificate this order renews.
    """
    await client.account()
    order_url, order = await client.new_order(names)
    log.info("order {order} created for {names}", order=order_url, names=",".join(names))
    published: list[tuple[str, str]] = []
    try:
        authz_urls = order.get("authorizations")
        if not isinstance(authz_urls, list):
            raise ACMEProtocolError(f"order {order_url} has no authorizations")
        # Wait for every authorization to settle before cleanup may run.
        results = await DeferredList(
            [
                Deferred.fromCoroutine(_authorize(client, str(u), responder, schedule, published))
                for u in authz_urls
            ],
            consumeErrors=True,
        )
        for ok, result in results:
            if not ok:
                cast(Failure, result).raiseException()
        order = await _finalize(client, order_url, order, csr_der, schedule)
        cert_url = order.get("certificate")
        if not isinstance(cert_url, str):
            raise ACMEProtocolError(f"order {order_url} is valid but has no certificate URL")
        resp = await client.download(cert_url)
        pem = resp.body.decode("ascii", "replace")
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise ACMEProtocolError(f"{cert_url} did not return a PEM chain")
        log.info("order {order} valid; certificate {cert}", order=order_url, cert=cert_url)
        return IssuedChain(pem, order_url, cert_url, resp.links("alternate"))
    finally:
        for identifier, value in published:
            try:
                await responder.unpublish(identifier, value)
            except Exception as e:  # cleanup must go on for every record
                log.error(
                    "could not remove challenge for {name}: {err}", name=identifier, err=str(e)
                )


async def _authorize(
    client: ACMEClient,
    url: str,
    responder: DNS01Responder,
    schedule: PollSchedule,
    published: list[tuple[str, str]],
) -> None:
    authz = await client.get(url, kind="authz")
    ident = str((authz.get("identifier") or {}).get("value", "?"))
    status = authz.get("status")
    if status == "valid":
        log.info("authorization for {name} already valid", name=ident)
        return
    if status != "pending":
        raise AuthorizationFailed(ident, _challenge_problem(authz))
    challenge = next(
        (
            c
            for c in authz.get("challenges", [])
            if isinstance(c, dict) and c.get("type") == "dns-01"
        ),
        None,
    )
    if challenge is None:
        raise ACMEProtocolError(f"authorization {url} for {ident} offers no dns-01 challenge")
    value = dns01_value(client, str(challenge["token"]))
    published.append((ident, value))
    await responder.publish(ident, value)
    if challenge.get("status") == "pending":
        await client.answer_challenge(str(challenge["url"]))
        log.info("challenge for {name} answered", name=ident)
    authz = await client.poll(
        url,
        lambda d: d.get("status") not in ("pending", "processing"),
        schedule.first,
        schedule.cap,
        schedule.deadline,
        kind="authz-poll",
    )
    if authz.get("status") != "valid":
        raise AuthorizationFailed(ident, _challenge_problem(authz))
    log.info("authorization for {name} valid", name=ident)


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
    try:
        order = (await client.finalize(str(order["finalize"]), csr_der)).json()
    except ACMEProblem as e:
        if e.short_type != "orderNotReady":
            raise
        # The CA has not noticed yet that every authorization is valid.
        await client.poll(
            order_url,
            lambda d: d.get("status") != "pending",
            schedule.first,
            schedule.cap,
            schedule.deadline,
            kind="order-poll",
        )
        order = (await client.finalize(str(order["finalize"]), csr_der)).json()
    if order.get("status") in ("processing", "ready"):
        order = await client.poll(
            order_url,
            lambda d: d.get("status") in ("valid", "invalid"),
            schedule.first,
            schedule.cap,
            schedule.deadline,
            kind="order-poll",
        )
    if order.get("status") != "valid":
        raise OrderFailed(order_url, _problem(order.get("error")))
    return order
