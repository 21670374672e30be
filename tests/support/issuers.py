"""An Issuer for unit tests: every collaborator explicit, nothing durable, no budgets."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.client import ACMEClient
from csrproxy.acme.order import DNS01Responder
from csrproxy.challenges.zone import ZonePublisher, challenge_name
from csrproxy.dns.zone import ChallengeZone
from csrproxy.issuance.admission import Admission, AdmissionGate, Budgets
from csrproxy.issuance.cache import MemoryIssuedCache
from csrproxy.issuance.csr import CheckedCSR, check_csr
from csrproxy.issuance.issuer import Issuer
from csrproxy.issuance.ledger import Ledger
from csrproxy.issuance.results import Issuance
from csrproxy.metrics import Metrics
from csrproxy.state.rows import CertificateRow
from tests.acme.test_client import ACCOUNT_KEY
from tests.support.driving import run_until_fired
from tests.support.fakeacme import BASE, FakeCA, Faults
from tests.support.keys import make_csr

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


class FakeCAIssuerCase(SynchronousTestCase):
    """An issuer over the fake CA and a built-in zone, on a Clock: ``configure`` sets the
    CA's faults, ``admission`` the budgets (none by default)."""

    ZONE = "go.example.test"

    def configure(self, faults: Faults) -> None:
        """Set the fake CA's knobs before anything is asked of it."""

    def admission(self) -> AdmissionGate | None:
        return None

    def setUp(self) -> None:
        self.clock = Clock()
        self.ca = FakeCA()
        self.configure(self.ca.faults)
        http, self.agent = self.ca.client()
        zone = ChallengeZone(self.ZONE, [f"ns1.{self.ZONE}"], ["@ A 127.0.0.1"])
        self.ca.published_check = lambda i, v: v in zone.txt_values(challenge_name(i))
        acme = ACMEClient(self.clock, http, BASE + "/dir", ACCOUNT_KEY)
        self.issuer = make_issuer(
            self.clock, acme, ZonePublisher(zone), admission=self.admission()
        )

    def drive(self, d: Deferred[Any]) -> Any:
        return run_until_fired(d, self.agent.flush, self.clock)[0]

    def issued(self, name: str) -> CertificateRow:
        """Issue a certificate for ``name`` (a new key) and return its current row."""
        csr = check_csr(make_csr([name]))
        self.drive(issue_now(self.issuer, csr, "client").chain)
        row = self.successResultOf(self.issuer.ledger.current(csr.request_key))
        assert row is not None
        return row
