"""Admission budgets counted once for every instance on a shared database (issue 16).

Each decision is one transaction on the store thread
(:func:`csrproxy.state.budgets.settle_budgets`): the rows of the buckets the request
costs are made if missing (full) and locked by one upsert, in the order of their names (no
deadlock between instances; a row the pruner deletes meanwhile is made again), refilled to the
caller's ``now`` with :class:`~csrproxy.issuance.admission.TokenBucket`'s arithmetic,
and either every one gives a token or none does.  Another instance deciding on one of
those rows waits for the commit, so a budget of N is N for the cluster.

The clock is the deciding instance's (reactor time, epoch seconds); instances are
expected NTP-synced.  A stamp ahead of ``now`` (a clock behind the others) counts from
``now``: a skew of s seconds refills at most ``s * capacity / period`` tokens early.

Bounds: one store call per decision, one transaction of four statements (the upsert,
the look at the rows only checked, the update of the rows taken from when admitted, the
commit), holding the locks only for it; the rows are the buckets (one per budget and key),
pruned by the ``budgets`` rule (:mod:`csrproxy.state.prune`) once untouched for a week,
like the rows the single-instance path persists (failures in a row: once reset).  A
failed authorization is one more store call; a valid order one more only for names this
instance knows to have failures in a row (it failed them, or its decision saw their row:
a failure elsewhere after the decision is not reset by it, a count too high, never too
low), at most :data:`MAX_FAILING` names remembered.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.issuance.admission import (
    CONSECUTIVE,
    NEW_NAMES,
    ORDERS,
    RESET_STAMP,
    Admission,
    BudgetRow,
    Charge,
    Refund,
    TokenBucket,
)
from csrproxy.issuance.limits import registered_domain_of
from csrproxy.state.budgets import settle_budgets
from csrproxy.state.store import Store

log = Logger()

#: What a decision comes back with: None when admitted, else the short charge and its wait.
Shortfall = tuple[Charge, float] | None
#: Names of failures-in-a-row buckets an instance remembers as not full (oldest forgotten).
MAX_FAILING = 100_000


def take_one(
    charges: Sequence[Charge], now: float, failing: list[str] | None = None
) -> Callable[[dict[str, BudgetRow]], tuple[list[BudgetRow], Shortfall]]:
    """The decision on locked rows: a token from every bucket of ``charges`` (those with
    ``take``; the others only need one), or none.  The failures-in-a-row buckets found not
    full are added to ``failing``."""

    def decide(locked: dict[str, BudgetRow]) -> tuple[list[BudgetRow], Shortfall]:
        buckets = []
        for c in charges:
            bucket = _bucket(c, locked, now)
            known = failing is not None and c.name in locked
            if known and c.name.startswith(CONSECUTIVE) and not bucket.full(now):
                assert failing is not None
                failing.append(c.name)
            wait = bucket.wait_for(1, now)
            if wait > 0:
                return [], (c, wait)
            if c.take:
                buckets.append((c.name, bucket))
        for _, bucket in buckets:
            bucket.take(1, now)
        return [(name, b.tokens, b.stamp) for name, b in buckets], None

    return decide


def take_regardless(
    charges: Sequence[Charge], now: float, paused: list[str] | None = None
) -> Callable[[dict[str, BudgetRow]], tuple[list[BudgetRow], None]]:
    """The decision on locked rows that takes a token from every bucket of ``charges``, even
    one already empty (a failure the CA counted is counted).  A failures-in-a-row bucket
    this empties (its identifier now paused) is added to ``paused``."""

    def decide(locked: dict[str, BudgetRow]) -> tuple[list[BudgetRow], None]:
        changed = []
        for c in charges:
            bucket = _bucket(c, locked, now)
            bucket.take(1, now)
            changed.append((c.name, bucket.tokens, bucket.stamp))
            if paused is not None and c.name.startswith(CONSECUTIVE) and 0 <= bucket.tokens < 1:
                paused.append(c.name.partition(":")[2])
        return changed, None

    return decide


def reset(
    charges: Sequence[Charge], now: float
) -> Callable[[dict[str, BudgetRow]], tuple[list[BudgetRow], None]]:
    """The decision on looked-at rows that makes each bucket of ``charges`` that has a row
    and is not full full again, stamped :data:`RESET_STAMP` (pruned as stale)."""

    def decide(found: dict[str, BudgetRow]) -> tuple[list[BudgetRow], None]:
        changed = []
        for c in charges:
            if c.name in found and not _bucket(c, found, now).full(now):
                changed.append((c.name, c.capacity, RESET_STAMP))
        return changed, None

    return decide


def give_one_back(
    charges: Sequence[Charge], now: float
) -> Callable[[dict[str, BudgetRow]], tuple[list[BudgetRow], None]]:
    """The decision on locked rows that gives a token back to every bucket of ``charges``."""

    def decide(locked: dict[str, BudgetRow]) -> tuple[list[BudgetRow], None]:
        changed = []
        for c in charges:
            bucket = _bucket(c, locked, now)
            bucket.give_back(1, now)
            changed.append((c.name, bucket.tokens, bucket.stamp))
        return changed, None

    return decide


def _bucket(charge: Charge, locked: dict[str, BudgetRow], now: float) -> TokenBucket:
    _, tokens, stamp = locked.get(charge.name, (charge.name, charge.capacity, now))
    return TokenBucket.restored(charge.capacity, charge.period, tokens, stamp, now)


def _log_paused(names: Sequence[str]) -> None:
    for name in names:
        log.warn("{name} paused: as many failed authorizations in a row as the CA allows",
                 name=name)  # fmt: skip


def _full(charges: Sequence[Charge], now: float) -> list[BudgetRow]:
    return [(c.name, c.capacity, now) for c in charges]


class ClusterAdmission:
    """:class:`~csrproxy.issuance.admission.AdmissionGate` over the shared ``budgets`` rows.

    ``rules`` says which buckets a request costs and words the refusals (and counts them
    through its ``on_refusal``); its own in-memory buckets are not used.
    """

    def __init__(self, store: Store, rules: Admission, scope: str = "") -> None:
        self.store = store
        self.rules = rules
        #: The prefix of its rows' names (a fallback CA's budgets; "" for [acme]'s).
        self.scope = scope
        #: Failures-in-a-row buckets known not full (a valid order resets only those).
        self._failing: OrderedDict[str, None] = OrderedDict()
        #: Registered domain -> until when its new-names budget refused this instance (a
        #: zone chooser's hint: :meth:`new_names_room`); at most MAX_FAILING domains.
        self._spent: dict[str, float] = {}

    def new_names_room(self, name: str) -> float:
        """0 while the new-names budget of ``name``'s registered domain last refused an
        order here and has no room yet; else what the rules say when nothing is known (the
        budget's capacity)."""
        until = self._spent.get(registered_domain_of(name, self.rules.registered_domain))
        if until is not None and until > self.rules.now():
            return 0.0
        return self.rules.new_names_room(name)

    def _remember_failing(self, names: Iterable[str]) -> None:
        for name in names:
            self._failing[name] = None
            self._failing.move_to_end(name)
        while len(self._failing) > MAX_FAILING:
            self._failing.popitem(last=False)

    def decide_client(self, client: str) -> Deferred[None]:
        charge = self.rules.client_charge(client)
        if charge is None:
            return succeed(None)
        return self._decide([charge])

    def decide_order(
        self, names: Iterable[str], new_names: bool, replaces: str | None = None
    ) -> Deferred[Refund]:
        charges = self.rules.charges(names, new_names, replaces)
        if not charges:
            return succeed(lambda: None)
        # Failed orders still count against the CA's order limit, not against certificates.
        refundable = [c for c in charges if c.take and c.name != ORDERS]
        return self._decide(charges).addCallback(lambda _: lambda: self._give_back(refundable))

    def authorization_failed(self, identifier: str) -> None:
        charges = self.rules.failure_charges(identifier)
        self._remember_failing(c.name for c in charges if c.name.startswith(CONSECUTIVE))
        if charges:
            now = self.rules.now()
            paused: list[str] = []
            self._settle("failed authorization not counted", charges,
                         _full(charges, now), take_regardless(charges, now, paused)
                         ).addCallback(lambda _: _log_paused(paused))  # fmt: skip

    def authorizations_valid(self, names: Iterable[str]) -> None:
        charges = [c for c in self.rules.reset_charges(names) if c.name in self._failing]
        for c in charges:
            del self._failing[c.name]
        if charges:
            now = self.rules.now()
            self._settle("failures in a row not reset", charges, [], reset(charges, now),
                         peek=[c.name for c in charges])  # fmt: skip

    def _settle(
        self,
        what: str,
        charges: list[Charge],
        full: list[BudgetRow],
        decide: Callable[[dict[str, BudgetRow]], tuple[list[BudgetRow], None]],
        peek: Sequence[str] = (),
    ) -> Deferred[None]:
        """A change nobody waits for; its failure is logged (the Deferred never fails)."""

        def failed(failure: Failure) -> None:
            log.warn(
                "admission budgets: {what} ({names}): {err}",
                what=what,
                names=",".join(c.name for c in charges),
                err=failure.getErrorMessage(),
            )

        return self.store.run_alone(
            settle_budgets, self.store.db, full, decide, peek, self.scope
        ).addErrback(
            failed
        )

    def _decide(self, charges: list[Charge]) -> Deferred[None]:
        now = self.rules.now()
        # Not the store's Deferred: a caller giving up (a client gone) must not lose the
        # decision, whose tokens are then given back (nothing was started with them).
        out: Deferred[None] = Deferred()

        failing: list[str] = []

        def decided(short: Shortfall) -> None:
            self._remember_failing(failing)
            if out.called:
                if short is None:
                    self._give_back([c for c in charges if c.take])
                return
            if short is None:
                out.callback(None)
            else:
                charge, wait = short
                prefix, _, key = charge.name.partition(":")
                if prefix == NEW_NAMES:
                    if len(self._spent) >= MAX_FAILING:
                        self._spent.clear()
                    self._spent[key] = now + wait
                out.errback(self.rules.refuse(charge.reason, wait, charge.detail))

        def failed(failure: Failure) -> None:
            if not out.called:
                out.errback(failure)

        taken = [c for c in charges if c.take]
        peek = [c.name for c in charges if not c.take]
        self.store.run_alone(
            settle_budgets,
            self.store.db,
            _full(taken, now),
            take_one(charges, now, failing),
            peek,
            self.scope,
        ).addCallbacks(decided, failed)
        return out

    def _give_back(self, charges: list[Charge]) -> None:
        if not charges:
            return
        now = self.rules.now()
        self._settle("not given back", charges, _full(charges, now), give_one_back(charges, now))
