"""Wiring: build the whole daemon from a Config, a reactor and an HTTP client."""

from __future__ import annotations

import sys
from typing import Any

from treq.client import HTTPClient
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from csrproxy.acme.client import ACMEClient
from csrproxy.acme.jws import AccountKey, eab_binding
from csrproxy.acme.order import OrderOptions
from csrproxy.api import SigningAPI
from csrproxy.config import Config
from csrproxy.dns.publisher import ZonePublisher
from csrproxy.dns.server import DNSServerService
from csrproxy.dns.zone import ChallengeZone
from csrproxy.errors import ConfigError, ListenError
from csrproxy.issuer import Issuer
from csrproxy.metrics import Metrics
from csrproxy.policy import NamePolicy
from csrproxy.store import StateDir

log = Logger()


class EndpointService(Service):
    """Listens on one Twisted endpoint string; binds in privilegedStartService."""

    def __init__(self, reactor: Any, description: str, factory: Any) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        try:
            endpoint = serverFromString(self.reactor, self.description)
        except (ValueError, TypeError, KeyError) as e:
            raise ListenError(self.description, f"bad endpoint string ({e})") from e
        outcome: list[Any] = []
        endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise ListenError(self.description, "the endpoint did not bind at once")
        if isinstance(outcome[0], Failure):
            raise ListenError(self.description, outcome[0].getErrorMessage())
        self.port = outcome[0]
        log.info("API listening on {endpoint}", endpoint=self.description)
        super().privilegedStartService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class AccountService(Service):
    """Looks the ACME account up (or registers it) once the reactor runs."""

    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer

    def startService(self) -> None:
        super().startService()
        self.issuer.keep_trying_account()


class CsrproxyService(MultiService):
    """The daemon; a listener that cannot bind ends start-up with one clear line."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenError as e:
            sys.stderr.write(f"csrproxy: {e}\n")
            raise SystemExit(1) from None


def load_account_key(state: StateDir, key_type: str = "ec256") -> AccountKey:
    pem = state.read_account_key()
    if pem is not None:
        try:
            return AccountKey.from_pem(pem)
        except ValueError as e:
            raise ConfigError(
                "state.dir", f"the account key in {state.path} is unusable: {e}"
            ) from e
    key = AccountKey.generate(key_type)
    state.write_account_key(key.to_pem())
    log.info("new ACME account key written to {path}", path=str(state.path))
    return key


def build_service(config: Config, reactor: Any, http: HTTPClient) -> MultiService:
    """Everything the daemon runs, as one MultiService."""
    state = StateDir(config.state.dir)
    state.prepare()
    key = load_account_key(state, config.acme.account_key_type)

    zone = ChallengeZone(
        config.dns.zone,
        config.dns.nameservers,
        config.dns.records,
        ttl=config.dns.ttl,
        challenge_ttl=config.dns.challenge_ttl,
    )
    metrics = Metrics()
    acme = ACMEClient(
        reactor,
        http,
        config.acme.directory,
        key,
        request_timeout=config.acme.request_timeout,
        on_request=metrics.acme_request,
        eab=eab_binding(config.acme.eab_kid, config.acme.eab_hmac_key),
    )

    def remember_account(url: str) -> None:
        state.write_account({"url": url, "directory": config.acme.directory})

    issuer = Issuer(
        reactor,
        acme,
        ZonePublisher(zone),
        poll_interval=config.acme.poll_interval,
        poll_max=config.acme.poll_max,
        order_timeout=config.acme.order_timeout,
        contact=config.acme.contact,
        order_options=OrderOptions(config.acme.preferred_chain, config.acme.profile),
        on_account=remember_account,
        metrics=metrics,
    )
    api = SigningAPI(
        issuer, NamePolicy(config.policy.names), max_body=config.api.max_body, metrics=metrics
    )

    top = CsrproxyService()
    collection = IServiceCollection(top)
    if config.dns.listen:
        DNSServerService(
            reactor, zone, config.dns.listen, on_rcode=metrics.dns_answer
        ).setServiceParent(collection)
    site = Site(api.app.resource())
    site.displayTracebacks = False
    for description in config.api.listen:
        EndpointService(reactor, description, site).setServiceParent(collection)
    AccountService(issuer).setServiceParent(collection)
    return top
