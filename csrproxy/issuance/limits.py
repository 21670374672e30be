"""Let's Encrypt's limits as csrproxy applies them: which budgets a request pays (or is
checked against), each a :class:`Charge` naming its bucket, its size and the refusal's words.

Pure functions of the :class:`Budgets` (a budget of 0 is off: no charge).  Who pays what,
as the CA applies its limits: an ARI renewal (``replaces``) pays nothing; a renewal of a
set of names issued before pays only the same-names budget; a new set of names pays the
orders budget, the same-names budget and the new-names budget of every registered domain
among its names.  Every order is first checked against the failed-authorization budgets of
its identifiers (ARI renewals too for the pause: the CA refuses a paused identifier in any
order), which only failed authorizations spend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from csrproxy.issuance.domains import identifier_of, registered_domain

WEEK = 7 * 24 * 3600.0
THREE_HOURS = 3 * 3600.0
HOUR = 3600.0
#: The period of a budget that never refills (consecutive failures: only a valid
#: authorization or the operator resets it).
NEVER = math.inf

#: The persistent names of buckets: ``orders``, then ``<prefix>:<key>`` per keyed budget.
ORDERS = "orders"
SAME_NAMES = "same-names"  # key: the sorted names joined by ","
NEW_NAMES = "new-names"  # key: the registered domain
CLIENT = "client"  # key: the client id (its token's id, else its address)
FAILED_AUTHZ = "failed-authz"  # key: the identifier (lower case, no "*.")
CONSECUTIVE = "consecutive-failures"  # key: the identifier
#: The stamp of a reset row (consecutive failures): full since forever, so the ``budgets``
#: pruning rule removes it (:mod:`csrproxy.state.prune` keeps the other such rows).
RESET_STAMP = 0.0

#: The ``reason`` of each refusal (and the ``reason`` label of the refusal counter).
REASONS = {
    ORDERS: "orders",
    SAME_NAMES: "same-names",
    NEW_NAMES: "new-names",
    CLIENT: "client",
    FAILED_AUTHZ: "failed-authorizations",
    CONSECUTIVE: "paused",
}


@dataclass(frozen=True)
class Charge:
    """One token an admission takes: from the bucket ``name`` (``capacity`` per ``period``
    seconds), refused as ``reason`` with ``detail``.  With ``take`` False the bucket is only
    checked for a token (failed authorizations spend it, not orders)."""

    name: str
    reason: str
    detail: str
    capacity: float
    period: float
    take: bool = True


@dataclass(frozen=True)
class Budgets:
    """The limits; 0 turns a budget off.

    Let's Encrypt's published limits (2026) and the defaults here:

    - new orders per account: 300 per 3 h (refill 1 per 36 s); default 250, a margin for
      orders placed by other clients of the account and for clock differences;
    - new certificates per registered domain (Public Suffix List; an IPv4 address, an
      IPv6 /64): 50 per 7 days across all accounts; default 45, the same margin;
    - certificates for one exact set of names: 5 per 7 days, no override; default 5;
    - failed authorizations per identifier per account: 5 per hour; default 5;
    - consecutive failed authorizations per identifier per account: 1,152, then the CA
      pauses the identifier until it is unpaused; default 1,152 (the CA refills one a
      day; here only a valid authorization or ``csrproxy-admin unpause`` resets the count,
      which never pauses later than the CA would).

    An ARI renewal (``replaces``) is exempt from all of them; another renewal of a set
    of names issued before is exempt from the orders and registered-domain limits.
    """

    #: New certificates (a set of names never issued before) per registered domain per week.
    new_names_per_week: int = 45
    #: New orders per 3 hours (Let's Encrypt: 300 per account).
    orders_per_3h: int = 250
    #: Certificates for one exact set of names per week (Let's Encrypt: 5, no override).
    same_names_per_week: int = 5
    #: Sign requests per client (bearer token, else address) per hour.
    client_requests_per_hour: int = 60
    #: Failed authorizations per identifier per hour (Let's Encrypt: 5 per account).
    failed_authorizations_per_hour: int = 5
    #: Failed authorizations of one identifier in a row, then it is paused (Let's Encrypt:
    #: 1,152).
    consecutive_failed_authorizations: int = 1152


def registered_domain_of(name: str, registered: str = "") -> str:
    """``registered`` (an explicit override) when ``name`` is it or below it, else the
    name's registered domain by the Public Suffix List."""
    ident = identifier_of(name)
    if registered and (ident == registered or ident.endswith("." + registered)):
        return registered
    return registered_domain(ident)


def order_charges(
    b: Budgets,
    names: Iterable[str],
    new_names: bool,
    replaces: str | None = None,
    registered: str = "",
) -> list[Charge]:
    """The buckets one order for ``names`` costs (or checks) a token of, in the order
    they are checked: see the module docstring for who pays what."""
    names = sorted(names)
    identifiers = sorted({identifier_of(n) for n in names})
    found: list[Charge] = []
    if b.consecutive_failed_authorizations:
        # Every order, ARI renewals too: the CA refuses a paused identifier in any order.
        found += [
            Charge(
                f"{CONSECUTIVE}:{ident}",
                REASONS[CONSECUTIVE],
                f"{ident} is paused after {b.consecutive_failed_authorizations} failed "
                "authorizations in a row; make its challenges pass, unpause it at the CA "
                f"(the link in the CA's refusal), then run `csrproxy-admin unpause {ident}`",
                b.consecutive_failed_authorizations,
                NEVER,
                take=False,
            )
            for ident in identifiers
        ]
    if replaces is not None:
        # An ARI renewal is exempt from every limit as long as the certificate it
        # replaces was not replaced already: the issuer renews only current
        # certificates (a successor issued here would be current instead); one
        # replaced through another client of the same account is not known here.
        return found
    if b.failed_authorizations_per_hour:
        found += [
            Charge(
                f"{FAILED_AUTHZ}:{ident}",
                REASONS[FAILED_AUTHZ],
                f"more than {b.failed_authorizations_per_hour} failed authorizations "
                f"for {ident} in an hour",
                b.failed_authorizations_per_hour,
                HOUR,
                take=False,
            )
            for ident in identifiers
        ]
    if new_names and b.orders_per_3h:
        # A renewal of a set issued before is exempt from the CA's orders limit.
        found.append(
            Charge(ORDERS, REASONS[ORDERS], f"more than {b.orders_per_3h} orders in 3 h",
                   b.orders_per_3h, THREE_HOURS)
        )  # fmt: skip
    if b.same_names_per_week:
        found.append(
            Charge(
                f"{SAME_NAMES}:{','.join(names)}",
                REASONS[SAME_NAMES],
                f"more than {b.same_names_per_week} certificates for "
                "this exact set of names in a week",
                b.same_names_per_week,
                WEEK,
            )
        )
    if new_names and b.new_names_per_week:
        found += [
            Charge(
                f"{NEW_NAMES}:{domain}",
                REASONS[NEW_NAMES],
                f"more than {b.new_names_per_week} new certificates for {domain} in a week",
                b.new_names_per_week,
                WEEK,
            )
            for domain in sorted({registered_domain_of(n, registered) for n in names})
        ]
    return found


def failure_charges(b: Budgets, identifier: str) -> list[Charge]:
    """The buckets one failed authorization of ``identifier`` takes a token of."""
    ident = identifier_of(identifier)
    found = []
    if b.failed_authorizations_per_hour:
        found.append(Charge(f"{FAILED_AUTHZ}:{ident}", REASONS[FAILED_AUTHZ], "",
                            b.failed_authorizations_per_hour, HOUR))  # fmt: skip
    if b.consecutive_failed_authorizations:
        found.append(Charge(f"{CONSECUTIVE}:{ident}", REASONS[CONSECUTIVE], "",
                            b.consecutive_failed_authorizations, NEVER))  # fmt: skip
    return found


def reset_charges(b: Budgets, names: Iterable[str]) -> list[Charge]:
    """The consecutive-failure buckets a valid authorization of each of ``names`` resets."""
    capacity = b.consecutive_failed_authorizations
    if not capacity:
        return []
    idents = sorted({identifier_of(n) for n in names})
    return [
        Charge(f"{CONSECUTIVE}:{i}", REASONS[CONSECUTIVE], "", capacity, NEVER, False)
        for i in idents
    ]


def client_charge(b: Budgets, client: str) -> Charge | None:
    """The bucket a sign request of ``client`` costs a token of (None: budget off)."""
    if not b.client_requests_per_hour:
        return None
    return Charge(
        f"{CLIENT}:{client}",
        REASONS[CLIENT],
        f"this client made more than {b.client_requests_per_hour} sign requests in the last hour",
        b.client_requests_per_hour,
        HOUR,
    )
