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

from csrproxy.acme.client import ACMEClient
from csrproxy.acme.jws import AccountKey, eab_binding
from csrproxy.acme.order import OrderOptions
from csrproxy.admission import Admission, Budgets
from csrproxy.api import SigningAPI
from csrproxy.auth import ClientGate, load_tokens, parse_networks
from csrproxy.config import Config
from csrproxy.dns.publisher import ZonePublisher
from csrproxy.dns.server import DNSServerService
from csrproxy.dns.zone import ChallengeZone
from csrproxy.errors import ConfigError, ListenError
from csrproxy.issuer import Issuer
from csrproxy.limits import LimitedSite
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
    pol = config.policy
    admission = Admission(
        reactor.seconds,
        Budgets(
            new_names_per_week=pol.new_names_per_week,
            orders_per_3h=pol.orders_per_3h,
            same_names_per_week=pol.same_names_per_week,
            client_requests_per_hour=pol.client_requests_per_hour,
        ),
        registered_domain=pol.registered_domain,
        on_refusal=metrics.refusal,
    )
    issuer.admission = admission
    gate = ClientGate(
        load_tokens(config.api.tokens_file) if config.api.tokens_file else (),
        parse_networks(config.api.allow_from, "api.allow_from"),
        parse_networks(config.api.trusted_proxies, "api.trusted_proxies"),
    )
    listeners: list[EndpointService] = []
    api = SigningAPI(
        issuer,
        NamePolicy(pol.names, pol.subject),
        clock=reactor,
        max_body=config.api.max_body,
        key_types=pol.key_types,
        max_names=pol.max_names,
        sync_timeout=config.api.sync_timeout,
        # Ready once the account is known and every API listener is bound.
        ready=lambda: issuer.ready and all(s.port is not None for s in listeners),
        metrics=metrics,
        gate=gate,
        admission=admission,
    )

    top = CsrproxyService()
    collection = IServiceCollection(top)
    if config.dns.listen:
        DNSServerService(
            reactor, zone, config.dns.listen, on_rcode=metrics.dns_answer
        ).setServiceParent(collection)

    def refused(path: bytes, status: int) -> None:
        metrics.http_requests.labels("refused", str(status)).inc()

    site = LimitedSite(
        api.app.resource(),
        max_body=config.api.max_body,
        read_timeout=config.api.read_timeout,
        idle_timeout=config.api.idle_timeout,
        reactor=reactor,
        on_refused=refused,
        access_log=config.api.access_log,
    )
    for description in config.api.listen:
        listener = EndpointService(reactor, description, site)
        listener.setServiceParent(collection)
        listeners.append(listener)
    AccountService(issuer).setServiceParent(collection)
    return top
