"""An Issuer for unit tests: every collaborator explicit, nothing durable, no budgets."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from csrproxy.acme.client import ACMEClient
from csrproxy.acme.order import DNS01Responder
from csrproxy.issuance.admission import Admission, AdmissionGate, Budgets
from csrproxy.issuance.cache import MemoryIssuedCache
from csrproxy.issuance.csr import CheckedCSR
from csrproxy.issuance.issuer import Issuer
from csrproxy.issuance.ledger import Ledger
from csrproxy.issuance.results import Issuance
from csrproxy.metrics import Metrics

NO_BUDGETS = Budgets(0, 0, 0, 0, 0, 0)


def make_issuer(
    clock: IReactorTime,
    acme: ACMEClient,
    responder: DNS01Responder,
    *,
    admission: AdmissionGate | None = None,
    metrics: Metrics | None = None,
    ledger: Ledger | None = None,
    **kwargs: Any,
) -> Issuer:
    """An :class:`Issuer` with an in-memory ledger and cache; budgets off unless given."""
    kwargs.setdefault("poll_interval", 0.05)
    kwargs.setdefault("poll_max", 1.0)
    kwargs.setdefault("order_timeout", 60)
    return Issuer(
        clock,
        acme,
        responder,
        ledger=ledger if ledger is not None else Ledger(None),
        cache=MemoryIssuedCache(clock.seconds),
        admission=admission if admission is not None else Admission(clock.seconds, NO_BUDGETS),
        metrics=metrics if metrics is not None else Metrics(),
        **kwargs,
    )


def issue_now(issuer: Issuer, csr: CheckedCSR, client: str) -> Issuance:
    """``issuer.issue`` where it is decided at once (a ledger without a store, a cached chain
    or an order in flight): the :class:`Issuance`."""
    decided = issuer.issue(csr, client)
    found: list[Issuance] = []
    decided.addCallback(found.append)
    assert found, "the issuance was not decided at once (a ledger with a store?)"
    return found[0]
