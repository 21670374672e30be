"""The rows of the state database as dataclasses, and the conditions queries share."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: Statuses of an order that has not ended (``valid``: the CA issued, the chain is not
#: on record yet).
UNFINISHED = ("new", "pending", "ready", "processing", "valid")
#: Statuses of an order that has ended: its chain is on record, or it failed.
FINISHED = ("issued", "invalid")

#: The columns a renewal or ARI pass reads (never ``csr``: the renewal reads it by id).
_CURRENT = "superseded IS NULL AND revoked IS NULL"
_RENEWABLE = f"{_CURRENT} AND dormant = 0"


@dataclass
class OrderRow:
    id: str
    request_key: str
    csr: bytes
    names: list[str]
    status: str = "new"
    acme_url: str | None = None
    error: str | None = None
    certificate_id: str | None = None
    replaces: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    #: The instance running it and until when (a cluster's lease; schema 5).
    owner: str | None = None
    lease_until: float | None = None
    #: The certificate profile the request asked for (schema 6; None: the configured one).
    profile: str | None = None
    #: The directory URL of the CA it was placed with (schema 7; None: [acme]'s).
    ca: str | None = None


@dataclass
class CertificateRow:
    id: str
    request_key: str
    csr: bytes
    names: list[str]
    spki_sha256: str
    chain: str
    not_before: float
    not_after: float
    order_id: str | None = None
    acme_url: str | None = None
    created: float = field(default_factory=time.time)
    last_requested: float = field(default_factory=time.time)
    revoked: int | None = None
    #: The token (client id) whose POST /v1/sign last asked for it; None without tokens.
    signed_by: str | None = None
    #: Its names sorted and joined by "," (which sets of names were issued before).
    names_key: str | None = None
    #: When a newer certificate for the same request key was recorded; None: current.
    superseded: float | None = None
    #: When to renew it (None: not computed yet).
    renew_at: float | None = None
    #: 1 once a renewal pass found it due and its installation inactive, until it asks again.
    dormant: int = 0
    #: The CA's ARI window (RFC 9773), when it gave one.
    ari_start: float | None = None
    ari_end: float | None = None
    #: When to ask the CA's ARI endpoint for its window again (None: when convenient).
    ari_next: float | None = None
    #: The instance renewing it and until when (a cluster's lease; schema 5).
    lease_owner: str | None = None
    lease_until: float | None = None
    #: The certificate profile its request asked for (schema 6), which renewals ask again.
    profile: str | None = None
    #: The directory URL of the CA that issued it (schema 7; None: [acme]'s): renewals
    #: ask it first.
    ca: str | None = None


@dataclass
class ChallengeRow:
    id: int
    order_id: str
    name: str
    value: str
    backend: str
    created: float
    #: The instance that published it (None: written before schema 5).
    instance: str | None = None


def names_key(names: Iterable[str]) -> str:
    """A set of names as one string: sorted, lowercase, joined by ","."""
    return ",".join(sorted({n.lower() for n in names}))


def order_from_row(row: Any) -> OrderRow:
    d = dict(row)
    d["names"] = json.loads(d["names"])
    return OrderRow(**d)


def cert_from_row(row: Any) -> CertificateRow:
    d = dict(row)
    d["names"] = json.loads(d["names"])
    return CertificateRow(**d)
