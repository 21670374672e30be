"""One checked CSR to one chain.

The issuer runs each order detached from whoever asked for it: a caller gets
its own Deferred, and cancelling that (an HTTP client that went away) leaves
the order running.  Identical requests in flight share one order.  ACME
failures become csrproxy's typed errors in :mod:`csrproxy.issuance.results`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import Callable
from typing import Any

from cryptography import x509
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.acme.certs import ari_cert_id
from csrproxy.acme.client import ACMEClient, profile_not_offered
from csrproxy.acme.order import (
    Checkpoint,
    DNS01Responder,
    IssuedChain,
    OrderOptions,
    OrderRun,
    PollSchedule,
    Settle,
    complete_order,
    no_checkpoint,
    obtain_chain,
)
from csrproxy.acme.problems import (
    ACMEProblem,
    AuthorizationFailed,
    OrderFailed,
)
from csrproxy.cluster.remote import wait_for_certificate, wait_for_order
from csrproxy.errors import (
    CAUnavailable,
    RateLimited,
)
from csrproxy.issuance.admission import SAME_NAMES, AdmissionGate, Refund
from csrproxy.issuance.cache import CachedChain, IssuedCache
from csrproxy.issuance.csr import CheckedCSR, check_csr
from csrproxy.issuance.fallback import another_ca_may_issue
from csrproxy.issuance.ledger import Ledger
from csrproxy.issuance.results import (
    NOT_FROM_A_CRASH,
    Issuance,
    SharedResult,
    problem_type,
    translate,
)
from csrproxy.metrics import Metrics
from csrproxy.names import CSR_KEY_TYPES
from csrproxy.retry import Backoff
from csrproxy.state.cluster_queries import OrderRunningElsewhere
from csrproxy.state.database import CertificateRow, OrderRow

log = Logger()

#: A request refused by a budget its identical requests on other instances just spent
#: looks for their order this many times, this many seconds apart, before it is refused.
JOIN_TRIES = 4
JOIN_WAIT = 0.25
#: How long after the CA's look-up of a challenge record its authorization is polled
#: (when that is sooner than the poll schedule): the CA asks from several places, then
#: decides; a poll that comes too early is one extra request.
POLL_AFTER_LOOKUP = 0.002


class Issuer:
    """Turns checked CSRs into chains through one ACME account."""

    def __init__(
        self,
        clock: IReactorTime,
        acme: ACMEClient,
        responder: DNS01Responder,
        *,
        ledger: Ledger,
        cache: IssuedCache,
        admission: AdmissionGate,
        metrics: Metrics,
        poll_interval: float,
        poll_max: float,
        order_timeout: float,
        contact: tuple[str, ...] = (),
        order_options: OrderOptions | None = None,
        on_account: Callable[[str], None] | None = None,
        watch: Callable[[str], Deferred[None]] | None = None,
        checkpoint: Checkpoint | None = None,
        settle: Settle | None = None,
        inflight: dict[str, tuple[str, SharedResult]] | None = None,
    ) -> None:
        self.clock = clock
        self.acme = acme
        self.responder = responder
        self.ledger = ledger
        self.cache = cache
        self.admission = admission
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.poll_max = poll_max
        self.order_timeout = order_timeout
        self.contact = contact
        self.order_options = order_options or OrderOptions()
        self._on_account = on_account
        #: identifier -> fires when the CA looks up its challenge record (built-in DNS:
        #: ``WatchedZone.watch``).
        self._zone_watch = watch
        #: Called at each named point of every order run (crash tests); else a no-op.
        self.checkpoint: Checkpoint = checkpoint or no_checkpoint
        #: Waits out resolvers' copies of older answers before challenges are answered.
        self.settle = settle
        #: request key -> the order in flight for it, and that order's id (one map for the
        #: issuers of every CA: a CSR has one order in flight, whichever CA runs it).
        self._inflight: dict[str, tuple[str, SharedResult]] = {} if inflight is None else inflight
        #: The issuers of the other CAs (``[[acme.fallback]]``), in the order to try them
        #: when this CA refuses an order for a reason of its own.
        self.others: list[Issuer] = []
        #: Starts the waiting resumed order of a request key, if any (recovery's queue).
        self.promote: Callable[[str], None] | None = None
        self._account: SharedResult | None = None
        self._account_loop: SharedResult | None = None  # keep_trying_account's loop
        #: The ACME client's circuit breaker: new orders fail fast while it is not closed.
        self.breaker = acme.breaker
        # The CA forgot the account: every order that meets it shares one look-up.
        acme.find_account_again = self.ensure_account

    @property
    def ready(self) -> bool:
        return self.acme.account_url is not None

    @property
    def ca(self) -> str:
        """The CA this issuer orders from (its directory URL), as rows record it."""
        return self.acme.directory_url

    @property
    def account_url(self) -> str | None:
        """The ACME account's URL once it is known (for health and CAA ``accounturi``)."""
        return self.acme.account_url

    def ensure_account(self, stale: str | None = None) -> Deferred[str]:
        """Find or register the account once, however many callers ask.

        ``stale`` is an account URL the CA said it does not know: it is forgotten and the
        account looked up again, once for all the callers that met it (those that come
        while that look-up runs, or after it found the account again, share its result).
        """
        if stale is not None and self.acme.forget_account(stale):
            self._account = None
        if self._account is None or self._account.failed:
            d = Deferred.fromCoroutine(self._find_account(again=stale is not None))
            self._account = SharedResult(d)
        return self._account.wait()

    async def _find_account(self, again: bool = False) -> str:
        try:
            url = await self.acme.account(
                self.contact, deadline=self.clock.seconds() + self.order_timeout
            )
        except Exception:
            if again:
                # The account is gone and the CA did not answer: keep looking in the
                # background, so the daemon gets it back without waiting for an order.
                self.keep_trying_account()
            raise
        if self._on_account is not None:
            self._on_account(url)
        return url

    def keep_trying_account(self) -> Deferred[None]:
        """Look the account up, retrying with back-off while the CA is away (at start-up, and
        when the CA forgot the account); one loop at a time."""
        if self._account_loop is not None:
            return self._account_loop.wait()
        backoff = Backoff(1.0, 60.0)

        async def loop() -> None:
            from twisted.internet.task import deferLater

            while True:
                try:
                    url = await self.ensure_account()
                    log.info("ACME account ready: {account}", account=url)
                    return
                except Exception as e:
                    delay = backoff()
                    log.warn(
                        "ACME account lookup failed ({err}); retrying in {delay:.0f}s",
                        err=str(e),
                        delay=delay,
                    )
                    await deferLater(self.clock, delay, lambda: None)

        def done(result: object) -> object:
            self._account_loop = None
            return result

        d = Deferred.fromCoroutine(loop())
        shared = self._account_loop = SharedResult(d)
        d.addBoth(done)
        return shared.wait()

    def issue(self, csr: CheckedCSR, client: str) -> Deferred[Issuance]:
        """The chain for ``csr``, asked for by ``client`` (token id or address), once it is
        decided where it comes from.

        In order: a stored chain with most of its life left (the small memory cache, else
        the state database by the request key's index); else, once the client's budget
        lets it in, the identical order in flight; else, if the order budgets allow, a new
        order.  A refusal is a failed ``chain`` of :class:`RateLimited`, or of
        :class:`CAUnavailable` while the CA is known to be failing.
        """
        key = csr.request_key
        cached = self.cache.get(key)
        if cached is not None:
            self.metrics.cache_hits.inc()
            return succeed(Issuance(None, succeed(cached.pem)))
        offered = self.acme.offered_profiles
        if csr.profile is not None and offered is not None and csr.profile not in offered:
            return succeed(Issuance(None, fail(profile_not_offered(csr.profile, offered))))
        if self.promote is not None:
            self.promote(key)
        if key in self._inflight:
            return self._admitted(csr, client, new_names=False)
        found = self.ledger.sign_lookup(key, csr.names)
        if self.ledger.shared:  # the identical order may run on another instance
            return found.addCallback(self._shared_lookup, csr, client)
        return found.addCallback(self._looked_up, csr, client)

    def _shared_lookup(
        self, found: tuple[CertificateRow | None, bool], csr: CheckedCSR, client: str
    ) -> Issuance | Deferred[Issuance]:
        if self._fresh(found[0]) is not None:
            return self._looked_up(found, csr, client)  # a stored chain wins
        remote = self.ledger.running_elsewhere(csr.request_key, self.clock.seconds())
        return remote.addCallback(self._join_elsewhere, found, csr, client)

    def _join_elsewhere(
        self,
        remote: OrderRow | None,
        found: tuple[CertificateRow | None, bool],
        csr: CheckedCSR,
        client: str,
    ) -> Issuance | Deferred[Issuance]:
        if remote is None or csr.request_key in self._inflight:
            return self._looked_up(found, csr, client)
        order_id = remote.id
        return self.admission.decide_client(client).addCallbacks(
            lambda _: self._joined(order_id), _refused
        )

    def _joined(self, order_id: str) -> Issuance:
        """The Issuance of the order ``order_id`` another instance runs."""
        log.info("joining order {id} of another instance", id=order_id)
        lookup = self.ledger.order_with_chain
        return Issuance(order_id, wait_for_order(self.clock, lookup, order_id, self.order_timeout))

    def _fresh(self, current: CertificateRow | None) -> CachedChain | None:
        """``current``'s chain when it has most of its life left (served, not renewed)."""
        if current is None:
            return None
        stored = CachedChain(current.chain, current.not_before, current.not_after)
        return stored if stored.fresh(self.clock.seconds()) else None

    def _looked_up(
        self, found: tuple[CertificateRow | None, bool], csr: CheckedCSR, client: str
    ) -> Issuance | Deferred[Issuance]:
        _, issued_before = found
        stored = self._fresh(found[0])
        if stored is not None:
            self.metrics.cache_hits.inc()
            self.cache.put(csr.request_key, stored)
            return Issuance(None, succeed(stored.pem))
        if csr.request_key not in self._inflight and not self.others:
            try:
                # Before the client's budget: a client retrying after Retry-After while
                # the CA is down must not use it up.
                self.breaker.check()
            except CAUnavailable as e:
                return Issuance(None, fail(e))
        return self._admitted(csr, client, new_names=not issued_before)

    def _admitted(self, csr: CheckedCSR, client: str, new_names: bool) -> Deferred[Issuance]:
        return self.admission.decide_client(client).addCallbacks(
            lambda _: self._join_or_start(csr, new_names=new_names), _refused
        )

    def renew(self, row: CertificateRow) -> Issuance:
        """A new certificate for the CSR ``row`` was issued for, with ARI ``replaces``;
        asked of the CA that issued it first."""
        issuing = self._issuer_of(row.ca)
        if issuing is not self:
            return issuing.renew(row)
        csr = check_csr(row.csr, key_types=CSR_KEY_TYPES, max_names=10_000)
        csr = csr.with_profile(row.profile)  # the profile its request asked for
        leaf = x509.load_pem_x509_certificate(row.chain.encode("ascii"))
        replaces: str | None = None
        # The CA refuses an ARI ``replaces`` naming an expired certificate or one already
        # replaced: such a renewal is an ordinary order of the same names.
        if row.superseded is None and row.not_after > self.clock.seconds():
            with contextlib.suppress(ValueError):  # a certificate without an AKI
                replaces = ari_cert_id(leaf)
        decided = self._join_or_start(csr, new_names=False, replaces=replaces, renewal=True)
        return Issuance(None, decided.addCallback(lambda issuance: issuance.chain))

    def resume(self, row: OrderRow, settle: Callable[[], Deferred[None]] | None = None) -> Issuance:
        """Finish (or redo) an order recorded by an earlier run; joins later identical requests.

        Its budget was charged by the run that started it.  ``settle`` is awaited when the
        order ends, before anyone hears of it (recovery removes the records it published
        again for the order).  Recovery calls it when the order's turn comes
        (:class:`csrproxy.issuance.resumes.ResumeQueue`).
        """
        issuing = self._issuer_of(row.ca)
        if issuing is not self:  # the order is at a fallback CA: only it knows its URL
            return issuing.resume(row, settle)
        inflight = self._inflight.get(row.request_key)
        if inflight is not None:
            # Another order for the same CSR already runs (two rows left for one request):
            # this one joins it rather than placing a second order at the CA.
            order_id, shared = inflight
            self.ledger.order_failed(row.id, f"joined order {order_id} for the same CSR")
            d = shared.wait()
            if settle is not None:
                d.addBoth(lambda result: settle().addCallback(lambda _: result))
            return Issuance(order_id, d)
        return self._start(
            row.csr,
            row.id,
            None,
            row.replaces,
            row.acme_url or "",
            False,
            settle,
            row.request_key,
            row.profile,
        )

    def _join_or_start(
        self,
        csr: CheckedCSR,
        *,
        new_names: bool,
        replaces: str | None = None,
        renewal: bool = False,
        tried: frozenset[str] = frozenset(),
    ) -> Deferred[Issuance]:
        """Wait on the identical order in flight, or charge the order budgets and start one.

        While the CA is known to be failing (the breaker is open, or its probe is out) no
        order starts: the chain fails at once with :class:`CAUnavailable` and its
        ``retry_after``, nothing charged, nothing asked of the CA. With other CAs
        (``others``), such a CA and one whose budget is spent hand the order to the next
        CA not in ``tried``.
        """
        if self.promote is not None:
            self.promote(csr.request_key)
        inflight = self._inflight.get(csr.request_key)
        if inflight is not None:
            order_id, shared = inflight
            return succeed(Issuance(order_id, shared.wait()))
        try:
            self.breaker.check()
        except CAUnavailable as e:
            return self._elsewhere(Failure(e), csr, new_names, renewal, tried)

        def admitted(refund: Refund) -> Issuance:
            inflight = self._inflight.get(csr.request_key)
            if inflight is not None:  # started while this one was decided (shared database)
                refund()
                return Issuance(inflight[0], inflight[1].wait())
            return self._start(
                csr, secrets.token_hex(16), refund, replaces, None, renewal, tried=tried
            )

        decided = self.admission.decide_order(csr.names, new_names, replaces)
        if self.ledger.shared and not renewal:
            # Identical requests decided together on several instances: the budget refused
            # this one because the others took it; join the order one of them places.
            decided.addErrback(self._refused_but_running, csr)
        if self.others:
            decided.addErrback(self._refused_here, csr, new_names, renewal, tried)
        return decided.addCallbacks(admitted, _refused)

    def _refused_here(
        self,
        failure: Failure,
        csr: CheckedCSR,
        new_names: bool,
        renewal: bool,
        tried: frozenset[str],
    ) -> Any:
        # This CA's budget is spent (or the request joined another instance's order):
        # the next CA with room takes the order.
        if not failure.check(RateLimited):
            return failure
        return self._elsewhere(failure, csr, new_names, renewal, tried).addCallback(_handed_on)

    def _elsewhere(
        self,
        failure: Failure,
        csr: CheckedCSR,
        new_names: bool,
        renewal: bool,
        tried: frozenset[str],
    ) -> Deferred[Issuance]:
        """The order at the next CA not yet tried, when this one cannot take it (its
        breaker is open, its budget spent); else the Issuance failing with ``failure``."""
        other = self._next_ca(tried)
        if other is None:
            return succeed(Issuance(None, fail(failure)))
        log.info(
            "{ca} cannot take the order for {names} ({err}); trying {other}",
            ca=self.ca,
            names=",".join(csr.names),
            err=failure.getErrorMessage(),
            other=other.ca,
        )
        # An ARI replaces is the issuing CA's id of its certificate: not another's.
        return other._join_or_start(
            csr, new_names=new_names, renewal=renewal, tried=tried | {self.ca}
        )

    def _refused_but_running(self, failure: Failure, csr: CheckedCSR) -> Any:
        # Only the budget identical requests share: any other refusal answers at once (a
        # client flooding new CSRs past the order budget costs no look-ups and no wait).
        if not isinstance(failure.value, RateLimited) or failure.value.reason != SAME_NAMES:
            return failure
        return Deferred.fromCoroutine(self._find_running(failure, csr))

    async def _find_running(self, failure: Failure, csr: CheckedCSR) -> Any:
        for _ in range(JOIN_TRIES):
            remote = await self.ledger.running_elsewhere(csr.request_key, self.clock.seconds())
            if remote is not None:
                raise _Joined(self._joined(remote.id))
            await deferLater(self.clock, JOIN_WAIT, lambda: None)
        return failure

    def _start(
        self,
        csr: CheckedCSR | bytes,
        order_id: str,
        refund: Callable[[], None] | None,
        replaces: str | None,
        resume_url: str | None,
        renewal: bool,
        settle: Callable[[], Deferred[None]] | None = None,
        request_key: str | None = None,
        profile: str | None = None,
        tried: frozenset[str] = frozenset(),
    ) -> Issuance:
        """The one path every order takes: run, translate failures, cache, track.

        ``csr`` is checked already, or (a resumed order) the DER to check when its turn
        comes, with its ``request_key`` and ``profile`` on record.
        """
        if refund is not None:
            refund = _once(refund)
        if isinstance(csr, CheckedCSR):
            run = Deferred.fromCoroutine(
                self._run(csr, order_id, replaces, resume_url, renewal, refund, tried)
            )
            key = csr.request_key
        else:
            assert request_key is not None
            run = self._resumed(csr, order_id, replaces, resume_url or "", profile)
            key = request_key
        if settle is not None:
            run.addBoth(lambda result: settle().addCallback(lambda _: result))

        def failed(failure: Failure) -> Failure:
            if refund is not None:
                refund()
            return translate(failure)

        d = run.addCallbacks(lambda chain: self._cached(key, chain), failed)
        shared = SharedResult(d)
        entry = (order_id, shared)
        self._inflight[key] = entry

        def forget(_: object) -> None:
            # SharedResult consumed the result; the next identical CSR starts afresh.
            if self._inflight.get(key) is entry:
                del self._inflight[key]

        d.addBoth(forget)
        return Issuance(order_id, shared.wait())

    async def _run(
        self,
        csr: CheckedCSR,
        order_id: str,
        replaces: str | None = None,
        resume_url: str | None = None,
        renewal: bool = False,
        refund: Callable[[], None] | None = None,
        tried: frozenset[str] = frozenset(),
    ) -> CachedChain:
        try:
            await self.ensure_account()
        except Exception as e:
            # An account this CA cannot find now is a reason of its own, as a refusal is.
            other = self._next_ca(tried) if not resume_url and another_ca_may_issue(e) else None
            if other is None:
                if tried:  # the order row a CA before this one made: it ends here
                    self.ledger.order_failed(order_id, str(e))
                raise
            if refund is not None:
                refund()
            return await other._fall_back(csr, order_id, renewal, tried | {self.ca}, e)
        schedule = PollSchedule(
            self.poll_interval, self.poll_max, self.clock.seconds() + self.order_timeout
        )
        if resume_url is None:
            try:
                await self.ledger.order_started(order_id, csr, replaces, self.ca)
            except OrderRunningElsewhere as e:  # placed on another instance just now
                log.info("joining order {id} of another instance", id=e.order_id)
                if refund is not None:  # no order of ours: its budgets are not spent
                    refund()
                cert = await wait_for_certificate(
                    self.clock, self.ledger.order_with_chain, e.order_id, self.order_timeout
                )
                return CachedChain(cert.chain, cert.not_before, cert.not_after)
        reached: set[str] = set()

        def passed(point: str) -> None:
            reached.add(point)
            self.checkpoint(point)

        run = OrderRun(
            self.acme,
            csr.names,
            csr.der,
            self.ledger.responder(self.responder, order_id),
            schedule,
            self._options(csr, strict=not renewal),
            replaces,
            on_order=self.ledger.order_created(order_id),
            csr_spki=csr.spki_der,
            watch=self._watch if self._zone_watch is not None else None,
            checkpoint=passed,
            settle=self.settle,
        )
        started = self.clock.seconds()
        self.metrics.orders_in_flight.inc()
        fallback: tuple[Issuer, Exception] | None = None
        try:
            chain = None
            if resume_url:  # "" is an order recorded before the CA had made it
                chain = await self._resume_order(run, resume_url)
                if chain is None:
                    chain = await self._order_again(run, csr)
            if chain is None:
                chain = await obtain_chain(run)
            row = await self.ledger.order_valid(order_id, csr, chain, renewal, self.ca)
        except Exception as e:
            if isinstance(e, AuthorizationFailed):  # the CA counts it against the identifier
                self.admission.authorization_failed(e.identifier)
            log.warn("order for {names} failed: {err}", names=",".join(csr.names), err=str(e))
            self.metrics.orders.labels(type(e).__name__).inc()
            # Another CA only for an order this CA cannot be issuing: not one resumed (it
            # was at the CA already) nor one whose finalize was sent (it may still issue).
            handed_on = not resume_url and "after-finalize" not in reached
            other = self._next_ca(tried) if handed_on and another_ca_may_issue(e) else None
            if other is None:
                self.ledger.order_failed(order_id, str(e))
                raise
            fallback = (other, e)
        finally:
            self.metrics.orders_in_flight.dec()
        if fallback is not None:
            if refund is not None:  # this CA issued nothing: only its order counts
                refund()
            other, error = fallback
            return await other._fall_back(csr, order_id, renewal, tried | {self.ca}, error)
        assert chain is not None
        self.admission.authorizations_valid(csr.names)  # no failures in a row any more
        self.metrics.orders.labels("valid").inc()
        self.metrics.issuance_seconds.observe(self.clock.seconds() - started)
        return CachedChain(chain.pem, row.not_before, row.not_after)

    def _next_ca(self, tried: frozenset[str]) -> Issuer | None:
        """The first other CA not in ``tried`` (nor this one)."""
        return next((o for o in self.others if o.ca not in tried and o.ca != self.ca), None)

    def _issuer_of(self, ca: str | None) -> Issuer:
        """The issuer of the CA ``ca`` (a directory URL as rows record it); this one for
        None or a CA no longer configured."""
        if ca is None or ca == self.ca:
            return self
        return next((o for o in self.others if o.ca == ca), self)

    async def _fall_back(
        self,
        csr: CheckedCSR,
        order_id: str,
        renewal: bool,
        tried: frozenset[str],
        error: Exception,
    ) -> CachedChain:
        """Run the order another CA failed (``error``, a reason of its own) at this one,
        within this CA's budgets; else hand it on, or fail with ``error``."""
        try:
            self.breaker.check()
            issued_before = await self.ledger.names_issued(csr.names)
            refund = _once(await self.admission.decide_order(csr.names, not issued_before))
        except (CAUnavailable, RateLimited) as refused:
            other = self._next_ca(tried | {self.ca})
            if other is None:
                self.ledger.order_failed(order_id, str(error))
                raise error from refused
            return await other._fall_back(csr, order_id, renewal, tried | {self.ca}, error)
        except Exception:
            self.ledger.order_failed(order_id, str(error))  # no CA has the order
            raise
        log.info(
            "ordering {names} from {ca}: {err}", names=",".join(csr.names), ca=self.ca, err=error
        )
        self.metrics.orders.labels("fallback").inc()
        try:
            return await self._run(csr, order_id, None, None, renewal, refund, tried)
        except Exception as e:
            refund()
            if another_ca_may_issue(e):  # this CA failed for its own reason too: the first's
                raise error from e
            raise
        except BaseException:
            refund()
            raise

    def _watch(self, identifier: str) -> Deferred[float]:
        assert self._zone_watch is not None
        after = min(POLL_AFTER_LOOKUP, self.poll_interval)
        return self._zone_watch(identifier).addCallback(lambda _: self.clock.seconds() + after)

    async def _resume_order(self, run: OrderRun, url: str) -> IssuedChain | None:
        """Finish an order a crashed run left; None when it is to be ordered afresh.

        That is when the CA no longer knows the order, or it (or one of its authorizations)
        is or goes invalid for a reason the crash can explain: the CA looked up a
        challenge record while csrproxy was down.  A problem a fresh order would meet
        again (:data:`NOT_FROM_A_CRASH`) fails the order.
        """
        log.info("resuming order {order} for {names}", order=url, names=",".join(run.names))
        try:
            return await complete_order(run, url)
        except (OrderFailed, AuthorizationFailed, ACMEProblem) as e:
            if problem_type(e) in NOT_FROM_A_CRASH:
                raise
            log.info("order {order} cannot be finished ({err}); ordering afresh", order=url, err=e)
            return None

    async def _order_again(self, run: OrderRun, csr: CheckedCSR) -> IssuedChain:
        """The one fresh order for a resumed order that failed: a new order at the CA,
        charged to the order budgets like any (refused with :class:`RateLimited`)."""
        issued_before = await self.ledger.names_issued(csr.names)
        refund = await self.admission.decide_order(csr.names, not issued_before, run.replaces)
        try:
            return await obtain_chain(run)
        except BaseException:
            refund()
            raise

    def _resumed(
        self, der: bytes, order_id: str, replaces: str | None, resume_url: str, profile: str | None
    ) -> Deferred[CachedChain]:
        try:
            csr = check_csr(der, key_types=CSR_KEY_TYPES, max_names=10_000).with_profile(profile)
        except Exception as e:  # a row this version cannot use must not come back each start
            log.error("order {id} cannot be resumed: {err}", id=order_id, err=str(e))
            self.ledger.order_failed(order_id, f"not resumable: {e}")
            return fail(e)
        return Deferred.fromCoroutine(self._run(csr, order_id, replaces, resume_url, False))

    def _options(self, csr: CheckedCSR, strict: bool = True) -> OrderOptions:
        """The configured order options, with the profile the request asked for: required
        (``strict``), or for a renewal asked for when the CA still offers it (else the
        renewal goes without, warned once, rather than failing until the certificate ends)."""
        if csr.profile is None:
            return self.order_options
        return dataclasses.replace(self.order_options, profile=csr.profile, strict_profile=strict)

    def _cached(self, request_key: str, chain: CachedChain) -> str:
        self.cache.put(request_key, chain)
        return chain.pem


def _once(call: Callable[[], None]) -> Callable[[], None]:
    """``call`` that runs the first time only (a refund is given back once)."""
    called = [False]

    def once() -> None:
        if not called[0]:
            called[0] = True
            call()

    return once


class _Joined(Exception):
    """A refused request that joined the identical order of another instance instead."""

    def __init__(self, issuance: Issuance) -> None:
        super().__init__("joined")
        self.issuance = issuance


def _handed_on(issuance: Issuance) -> None:
    """A refusal that another CA's order (or its refusal) answers instead."""
    raise _Joined(issuance)


def _refused(failure: Failure) -> Issuance | Failure:
    """A refused admission as the Issuance that fails with it (a cancelled wait stays one)."""
    if isinstance(failure.value, _Joined):
        return failure.value.issuance
    if failure.check(CancelledError):
        return failure
    return Issuance(None, fail(failure))
