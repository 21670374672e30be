"""Wiring: build the whole daemon from a Config, a reactor and an HTTP client."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cryptography import x509
from treq.client import HTTPClient
from twisted.application.internet import TimerService
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from csrproxy.acme.breaker import QUIET as CA_QUIET
from csrproxy.acme.breaker import STALE as CA_STALE
from csrproxy.acme.client import ACMEClient
from csrproxy.acme.jws import AccountKey, eab_binding
from csrproxy.acme.order import Checkpoint, DNS01Responder, OrderOptions
from csrproxy.challenges.caches import CacheWait
from csrproxy.challenges.powerdns import PowerDNSPublisher
from csrproxy.challenges.propagation import (
    CheckedPublisher,
    PropagationChecker,
    resolve_check_servers,
    system_resolver,
    udp_txt_query,
)
from csrproxy.challenges.txtquery import TXTQuerier
from csrproxy.challenges.watch import WatchedZone
from csrproxy.challenges.zone import ZonePublisher
from csrproxy.cluster.takeover import OrderLeases
from csrproxy.cluster.zonesync import ChallengeSync
from csrproxy.config import Config
from csrproxy.config.acme import caa_identity
from csrproxy.config.model import FallbackConfig, RRLConfig
from csrproxy.dns.cookies import COOKIE_SECRET, ServerCookies, nsid_bytes
from csrproxy.dns.notify import ZoneNotifier
from csrproxy.dns.rrl import ResponseRateLimiter
from csrproxy.dns.server import DNSServerService
from csrproxy.dns.transfer import keys_of
from csrproxy.dns.zone import ChallengeZone, next_serial
from csrproxy.dns.zones import Zones
from csrproxy.errors import ConfigError, ListenError
from csrproxy.issuance.admission import Admission, AdmissionGate, Budgets
from csrproxy.issuance.ari import AriPoller, Window
from csrproxy.issuance.cache import MemoryIssuedCache
from csrproxy.issuance.cluster_admission import ClusterAdmission
from csrproxy.issuance.domains import registered_domain
from csrproxy.issuance.issuer import Issuer
from csrproxy.issuance.ledger import Ledger
from csrproxy.issuance.orders import OrderBook
from csrproxy.issuance.policy import NamePolicy
from csrproxy.issuance.recovery import Resumer, earlier_orders, recover
from csrproxy.issuance.renewal import RenewalScheduler, RenewalService
from csrproxy.issuance.renewals import StoredRenewals
from csrproxy.issuance.room import has_room, new_names_room
from csrproxy.metrics import RCODES, Metrics
from csrproxy.state.budgets import budget_recorder, load_budgets
from csrproxy.state.lock import StateLock, StateLockService
from csrproxy.state.prune import Pruner, PrunerService
from csrproxy.state.serials import SerialRecorder, load_serial
from csrproxy.state.status_queries import status_rows
from csrproxy.state.store import ACCOUNT_KEY, StateDir, Store, account_key_file, ca_digest
from csrproxy.web.api import SigningAPI
from csrproxy.web.auth import ClientGate, load_tokens, reload_tokens
from csrproxy.web.health import Health, Probe, free_space_probe
from csrproxy.web.limits import LimitedSite
from csrproxy.web.listener import APIListener
from csrproxy.web.problems import problem_document
from csrproxy.web.status import CAStatus, Snapshot, StatusPage

log = Logger()


class AccountService(Service):
    """Looks the ACME account up (or registers it) once the reactor runs."""

    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer

    def startService(self) -> None:
        super().startService()
        self.issuer.keep_trying_account()


class OnStop(Service):
    """Calls ``call()`` when stopped (closes what has no service of its own)."""

    def __init__(self, call: Callable[[], None]) -> None:
        self.call = call

    def stopService(self) -> None:
        super().stopService()
        self.call()


class CsrproxyService(MultiService):
    """The daemon; a listener that cannot bind ends start-up with one clear line.

    ``reload_tokens`` reads ``[api] tokens_file`` again into the API's gate and returns the
    number of tokens (raising ``ConfigError``, tokens unchanged, for a bad file); None
    without a tokens file.  ``twistd csrproxy`` calls it on SIGHUP (:mod:`csrproxy.tap`).
    """

    reload_tokens: Callable[[], int] | None = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenError as e:
            sys.stderr.write(f"csrproxy: {e}\n")
            raise SystemExit(1) from None


def load_account_key(
    state: StateDir,
    key_type: str = "ec256",
    cluster_key: str | None = None,
    name: str = ACCOUNT_KEY,
) -> AccountKey:
    """The account key file ``name`` in ``state``, made on the first start.

    ``cluster_key`` is the thumbprint of the key the shared database's account was made
    with: every instance must hold that key (the same file on each; the key never goes
    into the database), so one missing or different is refused.
    """
    pem = state.read_account_key(name)
    copy = f"copy {name} from an instance of the cluster into [state] dir (mode 0600)"
    if pem is not None:
        try:
            key = AccountKey.from_pem(pem)
        except ValueError as e:
            raise ConfigError(
                "state.dir", f"the account key in {state.path} is unusable: {e}"
            ) from e
        if cluster_key is not None and key.thumbprint != cluster_key:
            raise ConfigError(
                "state.dir",
                f"{state.path / name} is not the cluster's account key "
                f"(thumbprint {key.thumbprint}, the database's {cluster_key}): {copy}",
            )
        return key
    if cluster_key is not None:
        raise ConfigError(
            "state.dir", f"the cluster's account key (thumbprint {cluster_key}) is missing: {copy}"
        )
    key = AccountKey.generate(key_type)
    state.write_account_key(key.to_pem(), name)
    log.info("new ACME account key written to {path}", path=str(state.path))
    return key


class StateService(Service):
    """The store's thread, and recovery of what an earlier run left, once the reactor runs."""

    def __init__(
        self,
        store: Store,
        ledger: Ledger,
        issuer: Issuer,
        book: OrderBook,
        remove_names: Callable[[Iterable[str]], Deferred[None]] | None,
        resumer: Resumer | None = None,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.issuer = issuer
        self.book = book
        self.remove_names = remove_names
        self.resumer = resumer
        # Read now, while no other thread uses the database.
        self.leftovers = ledger.leftover_challenges()
        self.unfinished = ledger.unfinished_orders()

    def startService(self) -> None:
        super().startService()
        self.store.start()
        d = Deferred.fromCoroutine(
            recover(
                self.ledger,
                self.issuer,
                self.book,
                self.leftovers,
                self.unfinished,
                self.remove_names,
                self.resumer,
            )
        )
        d.addErrback(lambda f: log.failure("recovery failed", f))

    def stopService(self) -> None:
        super().stopService()
        self.store.stop()


def make_publisher(
    config: Config,
    reactor: Any,
    http: HTTPClient,
    zone: ChallengeZone | Zones,
    dns_service: DNSServerService | None = None,
    metrics: Metrics | None = None,
) -> tuple[DNS01Responder, PowerDNSPublisher | None]:
    """The built-in zone (checked on our own listeners and every secondary when there are
    secondaries), or PowerDNS (with the DNS check before each challenge)."""
    pdns = config.dns.powerdns
    resolvers: list[Any] = []  # one, made on first use (it re-reads resolv.conf while alive)

    def resolver() -> Any:
        if not resolvers:
            resolvers.append(system_resolver(reactor))
        return resolvers[0]

    def checked(backend: str) -> Callable[[float], None] | None:
        return None if metrics is None else functools.partial(metrics.challenge_checked, backend)

    if config.dns.backend != "powerdns" or pdns is None:
        # Every instance's DNS ([cluster] dns_peers) and every secondary's must serve it.
        checks = [*config.cluster.dns_peers, *(s.check for s in config.dns.secondaries if s.check)]
        if not checks:
            return ZonePublisher(zone), None

        def name_servers() -> Deferred[list[tuple[str, int]]]:
            own = dns_service.served_at() if dns_service is not None else []
            found = resolve_check_servers(checks, zone.origin, resolver(), "dns.secondaries")
            return found.addCallback(lambda theirs: own + [s for s in theirs if s not in own])

        checker = PropagationChecker(
            reactor,
            udp_txt_query(reactor),
            name_servers,
            timeout=config.dns.check_timeout,
            # Few servers, cheap queries, and a transfer takes milliseconds: look often.
            max_delay=0.25,
            backend="builtin",
            on_served=checked("builtin"),
        )
        return CheckedPublisher(ZonePublisher(zone), checker), None
    publisher = PowerDNSPublisher(reactor, http, pdns)
    if not pdns.check_propagation:
        return publisher, publisher

    def servers() -> Deferred[list[tuple[str, int]]]:
        return resolve_check_servers(pdns.check_servers, pdns.zone, resolver())

    checker = PropagationChecker(
        reactor,
        udp_txt_query(reactor),
        servers,
        timeout=pdns.check_timeout,
        on_served=checked("powerdns"),
    )
    return CheckedPublisher(publisher, checker), publisher


def make_cache_wait(
    config: Config,
    reactor: Any,
    zone: ChallengeZone | Zones,
    dns_service: DNSServerService | None,
    metrics: Metrics,
) -> CacheWait:
    """What the issuer waits for before answering challenges: the copies of our own
    listeners' answers, and one TTL for every name server we do not see answer."""
    pdns = config.dns.powerdns
    if config.dns.backend == "powerdns" and pdns is not None:
        return CacheWait(reactor, unobserved_ttl=pdns.ttl, on_wait=metrics.challenge_cache_wait)
    others = bool(config.cluster.dns_peers or config.dns.secondaries) or dns_service is None
    return CacheWait(
        reactor,
        answered=dns_service.answers.until if dns_service is not None else None,
        unobserved_ttl=zone.challenge_ttl if others else None,
        on_wait=metrics.challenge_cache_wait,
    )


def caa_issuers(config: Config) -> list[tuple[str, tuple[str, ...]]] | None:
    """``(directory, CAA identities)`` of every configured CA, [acme]'s first; None (and one
    warning) when one CA's identity is unknown: CAA without it would lock that CA out."""
    cas = [(config.acme.directory, config.dns.caa_identities)]
    for fb in config.acme.fallback:
        identity = fb.caa_identity or caa_identity(fb.acme.directory)
        cas.append((fb.acme.directory, (identity,) if identity else ()))
    for directory, identities in cas:
        if not identities:
            # A guessed identity that is not the CA's would lock the CA out of the zone.
            log.warn(
                "no CAA record served: csrproxy does not know the CAA identity of the CA at"
                ' {directory}; set [dns] caa_identities (e.g. ["letsencrypt.org"]), a'
                " fallback's caa_identity, or caa = false",
                directory=directory,
            )
            return None
    return cas


def serve_caa(
    config: Config, zone: ChallengeZone | Zones, pdns: PowerDNSPublisher | None = None
) -> Callable[[str, str], None] | None:
    """The apex CAA of ``[dns] caa``: ``issue`` and ``issuewild`` for every configured CA's
    identity; the call returned, ``(directory, account URL)``, names a CA's account once it
    is known (None: no CAA). Each built-in zone allows each CA identity for any account
    until then; PowerDNS (``pdns``) gets the apex CAA RRset once every account is known."""
    if not config.dns.caa or (config.dns.backend != "builtin" and pdns is None):
        return None
    cas = caa_issuers(config)
    if cas is None:
        return None
    accounts: dict[str, str] = {}

    def issuers() -> list[tuple[str, str | None]]:
        return [
            (identity, accounts.get(directory))
            for directory, identities in cas
            for identity in identities
        ]

    if pdns is not None:
        publisher = pdns

        def push(directory: str, url: str) -> None:
            accounts[directory] = url
            if len(accounts) < len(cas):
                return  # a CA not named yet: PowerDNS keeps the operator's records till then
            try:
                written = publisher.set_caa(issuers())
            except ValueError as e:
                log.error("CAA not written to PowerDNS: {err}", err=str(e))
                return
            written.addErrback(
                lambda f: log.error("CAA not written to PowerDNS: {err}", err=f.value)
            )

        return push
    zones = list(Zones.of(zone))  # every apex gets the same CAA
    try:
        for each in zones:
            each.set_caa(issuers())
    except ValueError as e:
        raise ConfigError("dns.records", str(e)) from None

    def account_known(directory: str, url: str) -> None:
        accounts[directory] = url
        try:
            for each in zones:
                each.set_caa(issuers())
        except ValueError as e:
            log.error("CAA not limited to the account: {err}", err=str(e))

    return account_known


def make_admission(
    reactor: Any,
    store: Store,
    budgets: Budgets,
    registered_domain: str,
    metrics: Metrics,
    scope: str = "",
) -> AdmissionGate:
    """The budgets of one CA: decided in the shared database for the cluster, else in
    memory, recorded in the state database and restored from it (before the store's
    thread starts: what an earlier run spent is still spent). ``scope`` prefixes the
    rows' names (a fallback CA's budgets apart from ``[acme]``'s)."""
    shared = store.db.shared
    record = budget_recorder(store)
    rules = Admission(
        reactor.seconds,
        budgets,
        registered_domain=registered_domain,
        on_refusal=metrics.refusal,
        persist=None if shared else lambda rows: record([(scope + n, t, s) for n, t, s in rows]),
    )
    if shared:
        return ClusterAdmission(store, rules, scope)
    for prefix, since, limit in rules.restore_queries():
        rows = load_budgets(store.db, since, limit, prefix=scope + prefix)
        rules.restore([(name[len(scope) :], tokens, stamp) for name, tokens, stamp in rows])
    return rules


def fallback_issuer(
    config: Config,
    fallback: FallbackConfig,
    reactor: Any,
    http: HTTPClient,
    state: StateDir,
    primary: Issuer,
    metrics: Metrics,
    account_recorder: Callable[[str, AccountKey], Callable[[str], None]],
) -> Issuer:
    """The issuer of one ``[[acme.fallback]]`` CA: its own account key file, client and
    budgets; the primary's ledger, cache, challenges and in-flight orders."""
    ca = fallback.acme
    store = primary.ledger.store
    assert store is not None
    account_row = store.db.account(ca.directory) if store.db.shared else None
    key = load_account_key(
        state,
        ca.account_key_type,
        account_row.get("key_thumbprint") if account_row is not None else None,
        account_key_file(ca.directory, primary=False),
    )
    client = ACMEClient(
        reactor,
        http,
        ca.directory,
        key,
        request_timeout=ca.request_timeout,
        on_request=metrics.acme_request,
        eab=eab_binding(ca.eab_kid, ca.eab_hmac_key),
    )
    # Budgets of its own: this CA's limits are not [acme]'s. Their rows are named apart.
    budgets = Budgets(
        new_names_per_week=fallback.new_names_per_week,
        orders_per_3h=fallback.orders_per_3h,
        same_names_per_week=fallback.same_names_per_week,
        client_requests_per_hour=0,
    )
    admission = make_admission(
        reactor, store, budgets, config.policy.registered_domain, metrics,
        scope=f"ca-{ca_digest(ca.directory)}/",
    )  # fmt: skip
    return Issuer(
        reactor,
        client,
        primary.responder,
        ledger=primary.ledger,
        cache=primary.cache,
        admission=admission,
        metrics=metrics,
        poll_interval=ca.poll_interval,
        poll_max=ca.poll_max,
        order_timeout=ca.order_timeout,
        contact=ca.contact,
        order_options=OrderOptions(ca.preferred_chain, ca.profile),
        on_account=account_recorder(ca.directory, key),
        watch=primary._zone_watch,
        checkpoint=primary.checkpoint,
        settle=primary.settle,
        inflight=primary._inflight,
    )


def make_zones(config: Config, store: Store, reactor: Any) -> Zones:
    """One zone per ``[dns] zones`` entry, the same records and nameservers in each, its
    serial kept in the state database under its origin."""
    built = []
    for origin in config.dns.zones:
        # The serial rises past the one recorded: secondaries take the zone after a restart.
        recorded = load_serial(store.db, origin)
        zone = WatchedZone(
            origin,
            config.dns.nameservers,
            config.dns.records,
            ttl=config.dns.ttl,
            challenge_ttl=config.dns.challenge_ttl,
            serial=None if recorded is None else next_serial(recorded, int(reactor.seconds())),
        )
        record_serial = SerialRecorder(store, origin)
        record_serial(zone.serial)
        zone.on_serial(record_serial)
        built.append(zone)
    return Zones(built)


def zone_status(
    zones: Zones, room: Callable[[str], float | None], served: bool = True
) -> Callable[[], list[dict[str, Any]]]:
    """Each zone for health and metrics: origin, serial, records and challenge names when
    ``served`` (the built-in backend), and the budget's room when known."""

    def status() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = (
            zones.status() if served else [{"origin": o} for o in zones.origins]
        )
        for each in out:
            left = room(each["origin"])
            if left is not None:
                each["room"] = left
        return out

    return status


def link_fallbacks(issuers: Sequence[Issuer]) -> None:
    """Each CA's issuer hands an order it cannot take to the others, in config order; a CA
    known to be failing (its breaker open) ends its orders at once for them."""
    for each in issuers:
        each.others = [other for other in issuers if other is not each]
        each.acme.transport.fail_fast = len(issuers) > 1


def status_page(
    config: Config,
    reactor: Any,
    health: Health,
    issuers: Sequence[Issuer],
    store: Store,
    metrics: Metrics,
) -> StatusPage | None:
    """The ``[status]`` page (None when off): readiness, every CA with its budgets for the
    zone's registered domain, the database's orders and renewals due, the DNS counters."""
    if not config.status.enabled or config.status.tokens_file is None:
        return None
    try:
        tokens = load_tokens(config.status.tokens_file)
    except ConfigError as e:
        raise ConfigError("status.tokens_file", e.detail) from None
    # Each zone's registered domain once (zones in one registered domain share a budget).
    domains = {registered_domain(z): z for z in reversed(config.dns.zones)}
    due_days = config.status.due_days

    def ca(issuer: Issuer) -> CAStatus:
        breaker = issuer.breaker
        room = getattr(issuer.admission, "new_names_room", None)
        budgets = (
            [
                (f"new certificates for {d} (7 days; zone {z})", float(room(z)))
                for d, z in sorted(domains.items())
            ]
            if room is not None
            else []
        )
        detail = f"{breaker.failures} failures in a row"
        return CAStatus(issuer.ca, issuer.account_url, str(breaker.state), detail, budgets)

    def snapshot() -> Deferred[Snapshot]:
        now = reactor.seconds()
        rows = store.run(status_rows, store.db, now + due_days * 86400.0)
        return rows.addCallback(
            lambda found: Snapshot(
                now=now,
                instance=config.cluster.instance,
                checks=health.checks(),
                cas=[ca(i) for i in issuers],
                rows=found,
                due_days=due_days,
                rcodes=[(RCODES.get(k, str(k)), v) for k, v in sorted(metrics.dns_rcodes.items())],
                rrl=[(" ".join(k), v) for k, v in sorted(metrics.dns_rrl_counts.items())],
            )
        )

    return StatusPage(tokens, snapshot)


def ari_fetcher(
    acme: ACMEClient, others: Sequence[ACMEClient] = ()
) -> Callable[[str, str | None], Deferred[Window | None]]:
    """The ARI poller's fetch: the ARI window of a chain's leaf, asked of the CA that issued
    it (``acme`` for None or a CA no longer configured); None without ARI."""
    by_ca = {client.directory_url: client for client in others}

    async def fetch(chain_pem: str, ca: str | None) -> Window | None:
        leaf = x509.load_pem_x509_certificate(chain_pem.encode("ascii"))
        window = await by_ca.get(ca or "", acme).renewal_info(leaf)
        if window is None:
            return None
        return window.start.timestamp(), window.end.timestamp(), window.retry_after

    return lambda pem, ca: Deferred.fromCoroutine(fetch(pem, ca))


def readiness(
    issuer: Issuer,
    listeners: list[APIListener],
    dns_service: DNSServerService | None,
    store: Store,
    state_dir: str,
    sync: ChallengeSync | None = None,
    zones: Callable[[], list[dict[str, Any]]] | None = None,
) -> Health:
    """The parts of readiness: the ACME account, the CA (its circuit breaker is closed), the
    listeners, the state store, and (several instances) hearing the others' challenges;
    ``zones()`` lists each zone's state beside them."""

    def account() -> tuple[bool, str]:
        url = issuer.account_url
        return (url is not None, url or "not found or registered yet")

    def api() -> tuple[bool, str]:
        down = [s.description for s in listeners if s.port is None]
        return (not down, f"not listening: {', '.join(down)}" if down else "listening")

    def ca() -> tuple[bool, str]:
        breaker = issuer.breaker
        seen = breaker.last_success
        now = issuer.clock.seconds()
        ago = "never answered" if seen is None else f"last answered {now - seen:.0f}s ago"
        if breaker.state == "closed" and seen is not None and now - seen <= CA_STALE:
            return True, f"reachable ({ago})"
        if breaker.state == "closed":
            return False, f"not answered recently ({ago})"
        return False, f"failing ({breaker.state}, {breaker.failures} failures in a row; {ago})"

    probes: list[tuple[str, Probe]] = [("account", account), ("ca", ca), ("api", api)]
    if dns_service is not None:
        service = dns_service

        def dns() -> tuple[bool, str]:
            ports = len(service.ports)
            return (ports > 0, f"{ports} ports" if ports else "not listening")

        probes.append(("dns", dns))

    def retry_write() -> None:
        store.run(store.db.probe_write).addErrback(lambda _: None)  # the store logs it

    probes.append(
        ("store", free_space_probe(state_dir, lambda: store.healthy, retry_write=retry_write))
    )
    if sync is not None:
        syncing = sync

        def cluster() -> tuple[bool, str]:
            last = syncing.last_resync
            ago = "never" if last is None else f"{issuer.clock.seconds() - last:.0f}s ago"
            if syncing.connected:
                return True, f"listening for the other instances' challenges (resync {ago})"
            return False, f"not listening for the other instances' challenges (resync {ago})"

        probes.append(("cluster", cluster))

    def info() -> dict[str, Any]:
        db = store.db
        return {
            "instance": db.instance,
            "database": {"backend": db.dialect.name, "where": db.where, "writable": store.healthy},
            **({"zones": zones()} if zones is not None else {}),
        }

    return Health(probes, info)


def make_rrl(
    rrl: RRLConfig, reactor: Any, on_limit: Callable[[str, str], None]
) -> ResponseRateLimiter | None:
    """The UDP response rate limiter ``[dns.rrl]`` asks for (None when disabled)."""
    if not rrl.enabled:
        return None
    return ResponseRateLimiter(
        reactor,
        responses_per_second=rrl.responses_per_second,
        wildcards_per_second=rrl.wildcards_per_second,
        nxdomains_per_second=rrl.nxdomains_per_second,
        errors_per_second=rrl.errors_per_second,
        window=rrl.window,
        slip=rrl.slip,
        ipv4_prefix_length=rrl.ipv4_prefix_length,
        ipv6_prefix_length=rrl.ipv6_prefix_length,
        exempt=rrl.exempt,
        log_only=rrl.log_only,
        max_table_size=rrl.max_table_size,
        on_limit=on_limit,
    )


def build_service(
    config: Config,
    reactor: Any,
    http: HTTPClient,
    checkpoint: Checkpoint | None = None,
    http_for: Callable[[str | None], HTTPClient] | None = None,
) -> CsrproxyService:
    """Everything the daemon runs, as one MultiService.

    ``checkpoint`` is called at named points of every order (crash tests install one).
    ``http_for(ca_certs)`` makes the HTTP client of a fallback CA whose ``ca_certs``
    differ from ``[acme]``'s (``http`` serves every CA without it).
    """

    def client_for(cafile: str | None) -> HTTPClient:
        if http_for is None or cafile == config.acme.ca_certs:
            return http
        return http_for(cafile)

    state = StateDir(config.state.dir)
    state.prepare()
    # Before the account key and the database: a second daemon on this directory neither
    # migrates it nor resumes the first one's orders (StateInUse is a ConfigError).
    lock = StateLock(state.path)
    lock.acquire()
    db = state.open_db(config.state.dsn, config.cluster.instance)
    account_row = db.account(config.acme.directory) if db.shared else None
    key = load_account_key(
        state,
        config.acme.account_key_type,
        account_row.get("key_thumbprint") if account_row is not None else None,
    )
    store = Store(reactor, db)
    ledger = Ledger(store, config.dns.backend, ari_recheck=config.renewal.ari_recheck)
    ledger.load()

    zone = make_zones(config, store, reactor)  # every zone of [dns] zones
    metrics = Metrics()
    if config.state.backend == "postgresql":  # instances behind one scrape job
        metrics.label_instance(config.cluster.instance)
    acme = ACMEClient(
        reactor,
        http,
        config.acme.directory,
        key,
        request_timeout=config.acme.request_timeout,
        on_request=metrics.acme_request,
        eab=eab_binding(config.acme.eab_kid, config.acme.eab_hmac_key),
    )

    dns_service = (
        DNSServerService(
            reactor,
            zone,
            config.dns.listen,
            on_rcode=metrics.dns_answer,
            on_refusal=metrics.refusal,
            rrl=make_rrl(config.dns.rrl, reactor, metrics.dns_rrl),
            nsid=nsid_bytes(config.dns.nsid) if config.dns.nsid else None,
            # In the state database: instances sharing it agree, and a restart keeps
            # the cookies resolvers hold valid.
            cookies=ServerCookies(
                store.db.secret(COOKIE_SECRET, 16), reactor.seconds, config.dns.cookie_rotation
            )
            if config.dns.cookies
            else None,
            require_cookies=config.dns.require_cookies,
            transfer_keys=keys_of(config.dns.secondaries),
        )
        if config.dns.listen
        else None
    )
    publisher, pdns = make_publisher(config, reactor, http, zone, dns_service, metrics)
    caa_account = serve_caa(config, zone, pdns)

    def account_recorder(directory: str, key: AccountKey) -> Callable[[str], None]:
        """The issuer's ``on_account`` for the CA at ``directory``: CAA and the record."""
        primary = directory == config.acme.directory

        def remember(url: str) -> None:
            if caa_account is not None:
                caa_account(directory, url)
            d = store.run(
                store.db.save_account,
                directory,
                url,
                account_key_file(directory, primary),
                key.thumbprint,
            )
            d.addErrback(lambda f: log.warn("account not recorded: {err}", err=f.value))

        return remember

    cache = MemoryIssuedCache(reactor.seconds)
    pol = config.policy
    budgets = Budgets(
        new_names_per_week=pol.new_names_per_week,
        orders_per_3h=pol.orders_per_3h,
        same_names_per_week=pol.same_names_per_week,
        client_requests_per_hour=pol.client_requests_per_hour,
        failed_authorizations_per_hour=pol.failed_authorizations_per_hour,
        consecutive_failed_authorizations=pol.consecutive_failed_authorizations,
    )
    admission = make_admission(reactor, store, budgets, pol.registered_domain, metrics)
    issuer = Issuer(
        reactor,
        acme,
        publisher,
        ledger=ledger,
        cache=cache,
        admission=admission,
        metrics=metrics,
        poll_interval=config.acme.poll_interval,
        poll_max=config.acme.poll_max,
        order_timeout=config.acme.order_timeout,
        contact=config.acme.contact,
        order_options=OrderOptions(config.acme.preferred_chain, config.acme.profile),
        on_account=account_recorder(config.acme.directory, key),
        watch=zone.watch if pdns is None else None,
        checkpoint=checkpoint,
        settle=make_cache_wait(config, reactor, zone, dns_service, metrics).settle,
    )
    fallbacks = [
        fallback_issuer(
            config,
            fb,
            reactor,
            client_for(fb.acme.ca_certs),
            state,
            issuer,
            metrics,
            account_recorder,
        )
        for fb in config.acme.fallback
    ]
    link_fallbacks([issuer, *fallbacks])
    gate = ClientGate(
        load_tokens(config.api.tokens_file) if config.api.tokens_file else (),
        config.api.allow_from,
        config.api.trusted_proxies,
    )
    listeners: list[APIListener] = []
    # Another instance's challenge records, served here too (the built-in zone, shared DB).
    sync = (
        ChallengeSync(reactor, store, zone, config.state.dsn, config.cluster.instance)
        if store.db.shared and config.state.dsn and config.dns.backend == "builtin"
        else None
    )
    room_left = new_names_room(admission)
    zones_status = zone_status(zone, room_left, served=config.dns.backend == "builtin")
    health = readiness(
        issuer, listeners, dns_service, store, str(state.path), sync, zones=zones_status
    )
    metrics.watch_zones(zones_status)
    metrics.watch_readiness(lambda: [(c.name, c.ok) for c in health.checks()])
    book = OrderBook(reactor, lambda f: problem_document(f.value), earlier=earlier_orders(ledger))
    names = NamePolicy(pol.names, pol.subject, config.dns.zones, pol.ip_ranges)
    if any("{ip}" in p.labels for p in names.patterns):
        # Names that carry their address are answered from the name: no record each.
        for served in Zones.of(zone):
            served.addressed = names.address_of
    api = SigningAPI(
        issuer,
        ledger,
        names,
        book,
        metrics,
        gate,
        clock=reactor,
        health=health,
        max_body=config.api.max_body,
        key_types=pol.key_types,
        max_names=pol.max_names,
        sync_timeout=config.api.sync_timeout,
        profiles=pol.profiles,
        status=status_page(config, reactor, health, [issuer, *fallbacks], store, metrics),
        room=has_room(room_left),
    )

    top = CsrproxyService()
    if config.api.tokens_file:
        top.reload_tokens = functools.partial(reload_tokens, gate, config.api.tokens_file)
    collection = IServiceCollection(top)
    StateLockService(lock).setServiceParent(collection)  # first child: stopped last
    # Services stop in reverse order: the store after everything that asks it (the DNS
    # server, the API listeners, renewal), the pruner before the store.
    resumer = Resumer(ledger, issuer, book)
    StateService(
        store, ledger, issuer, book, pdns.remove_names if pdns is not None else None, resumer
    ).setServiceParent(collection)
    if store.db.shared:  # orders of an instance that died are taken over by the others
        store.db.order_lease = config.cluster.order_lease
        OrderLeases(reactor, store, resumer.add, config.cluster.order_lease).setServiceParent(
            collection
        )
    pruner = Pruner(store, reactor, config.state.retention_days)
    metrics.watch_pruning(lambda: pruner.pruned)
    PrunerService(pruner).setServiceParent(collection)
    if dns_service is not None:
        dns_service.setServiceParent(collection)
        if sync is not None:
            sync.setServiceParent(collection)
        if config.dns.secondaries:
            for each in zone:  # each zone's NOTIFY to every secondary
                ZoneNotifier(reactor, each, config.dns.secondaries).setServiceParent(collection)

    def refused(path: bytes, status: int) -> None:
        metrics.http_request("refused", status)

    site = LimitedSite(
        api.app.resource(),
        max_body=config.api.max_body,
        read_timeout=config.api.read_timeout,
        idle_timeout=config.api.idle_timeout,
        reactor=reactor,
        on_refused=refused,
        max_connections=config.api.max_connections,
        max_connections_per_address=config.api.max_connections_per_address,
        proxies=config.api.trusted_proxies,
        on_connection_refused=metrics.refusal,
        access_log=config.api.access_log,
    )
    for description in config.api.listen:
        listener = APIListener(reactor, description, site)
        listener.setServiceParent(collection)
        listeners.append(listener)
    for ca_issuer in (issuer, *fallbacks):
        AccountService(ca_issuer).setServiceParent(collection)
    if isinstance(publisher, CheckedPublisher) and isinstance(publisher.checker.query, TXTQuerier):
        OnStop(publisher.checker.query.close).setServiceParent(collection)
    ca_watch = TimerService(CA_QUIET, issuer.breaker.look_if_quiet, CA_QUIET)
    ca_watch.clock = reactor
    ca_watch.setServiceParent(collection)
    if config.renewal.enabled:
        ren = config.renewal
        renewals = StoredRenewals(store, ren.ari_recheck)
        # With fallback CAs, renewals stop only while every CA is failing.
        ca_failing = lambda: all(  # noqa: E731
            each.breaker.state != "closed" for each in (issuer, *fallbacks)
        )
        scheduler = RenewalScheduler(
            reactor,
            metrics.watch_renewals(renewals),
            lambda row: issuer.renew(row).chain,
            active_days=ren.active_days,
            interval=ren.interval,
            max_parallel=ren.max_parallel,
            paused=ca_failing,
            on_pass=metrics.renewal_pass,
            on_outcome=metrics.renewal,
        )
        ari = AriPoller(
            reactor,
            renewals,
            ari_fetcher(acme, [f.acme for f in fallbacks]),
            parallel=ren.ari_parallel,
            per_second=ren.ari_per_second,
            recheck=ren.ari_recheck,
            idle=min(60.0, ren.interval),
            paused=lambda: ca_failing() or not issuer.ready,
            on_lookup=metrics.ari_lookup,
        )
        RenewalService(scheduler, ari).setServiceParent(collection)
    return top
