"""The in-memory authoritative zone: SOA, NS, static records and challenge TXT records."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.names import common, dns, error

from csrproxy.dns import records as rr
from csrproxy.dns.history import Change, ZoneHistory
from csrproxy.errors import ConfigError

SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 604800
# RFC 8482 section 4.2: the synthesised answer to ANY.
RFC8482_HINFO = (b"RFC8482", b"")
MAX_CNAME_CHAIN = 8
# A re-registered account is locked out while resolvers hold the old accounturi; Let's
# Encrypt caches for 60 s at most, so a longer CAA TTL buys nothing.
CAA_MAX_TTL = 60
# CAs named in the generated CAA (two records each): a primary and its fallbacks.
MAX_CAA_ISSUERS = 8

Records = list[dns.RRHeader]
Result = tuple[Records, Records, Records]
# A node: record type -> the records of that type (payloads carry their TTL).
Node = dict[int, tuple[Any, ...]]


def next_serial(serial: int, now: int) -> int:
    """The serial after ``serial``: the Unix time ``now`` when that is later (RFC 1982),
    else ``serial + 1``. A restart starts again from the time, so the serial only falls
    back when changes ran faster than one a second until the restart."""
    step = (now - serial) & 0xFFFFFFFF
    if 0 < step < 1 << 31:
        return now & 0xFFFFFFFF
    return (serial + 1) & 0xFFFFFFFF


def _set_change(before: tuple[Any, ...], after: tuple[Any, ...]) -> tuple[list[Any], list[Any]]:
    # The records deleted and added when the RRset ``before`` becomes ``after``, each
    # taken as a set of its distinct RDATA: a secondary holds one copy of each.
    old: dict[object, Any] = {}
    new: dict[object, Any] = {}
    for records, distinct in ((before, old), (after, new)):
        for record in records:
            distinct.setdefault(_rdata(record), record)
    return (
        [record for data, record in old.items() if data not in new],
        [record for data, record in new.items() if data not in old],
    )


def _rdata(record: Any) -> object:
    # What makes two records of one RRset the same record: their RDATA, not their TTL.
    if isinstance(record, dns.Record_TXT):
        return tuple(record.data)
    return (record.flags, record.tag, record.value)  # the apex CAA


class NameNotFound(dns.AuthoritativeDomainError):
    """NXDOMAIN inside the zone, with what the response still carries (RFC 2308, 6604).

    ``answers`` holds the CNAME chain that led to the missing name (often empty)
    and ``authority`` the SOA.
    """

    def __init__(self, name: bytes, answers: Records, authority: Records) -> None:
        super().__init__(name)
        self.name = name
        self.answers = answers
        self.authority = authority


class ChallengeZone(common.ResolverBase):
    """The in-memory authoritative zone: SOA, NS, static records, and challenge TXT records.

    An authority in twisted.names' sense: ``query`` and the ``lookup*`` methods
    return Deferreds (fired at once) of ``(answers, authority, additional)``
    lists of ``dns.RRHeader``, following ``authority.FileAuthority``'s rules
    with the conformance fixes: the SOA (TTL min(TTL, MINIMUM)) in the authority
    section of NODATA and of NXDOMAIN (a :class:`NameNotFound` failure), NODATA
    for empty non-terminals, RFC 4592 wildcards, in-zone CNAME chains, RFC 8482
    ANY; a name outside the zone, or a transfer, fails with ``DomainError``.

    ``origin`` is stored lowercase without the trailing dot. Static ``records`` are
    zone-file lines relative to the origin (``"@ A 127.0.0.1"``, ``"* 60 A 127.0.0.1"``,
    ``"@ CAA 0 issue \\"letsencrypt.org\\""``); a bad one raises
    ``ConfigError("dns.records", ...)``. Challenge TXT values are a multiset per name,
    served with ``challenge_ttl``; every change raises the SOA ``serial`` and ``version``,
    and is kept in ``history`` (the :class:`ZoneHistory` given, else one with the default
    bounds) as the change of the distinct TXT records at its name, for IXFR. The apex CAA
    records :meth:`set_caa` generates are served beside the static ones, and change alike.
    """

    def __init__(
        self,
        origin: str,
        nameservers: Sequence[str],
        records: Sequence[str],
        *,
        ttl: int = 300,
        challenge_ttl: int = 1,
        hostmaster: str | None = None,
        serial: int | None = None,
        clock: Callable[[], float] = time.time,
        history: ZoneHistory | None = None,
    ) -> None:
        super().__init__()
        self.history = history if history is not None else ZoneHistory()
        try:
            self._origin = rr.normalize_name(origin)
        except ValueError as e:
            raise ConfigError("dns.zone", str(e)) from None
        if not self._origin:
            raise ConfigError("dns.zone", "the zone must not be the root")
        self.origin = rr.name_text(self._origin)
        for key, value in (("dns.ttl", ttl), ("dns.challenge_ttl", challenge_ttl)):
            if not 0 <= value <= rr.MAX_TTL:
                raise ConfigError(key, f"TTL {value} is out of range")
        if not nameservers:
            raise ConfigError("dns.nameservers", "at least one nameserver is needed")
        self.ttl = ttl
        self.challenge_ttl = challenge_ttl
        self._clock = clock
        self._serial = int(clock()) & 0xFFFFFFFF if serial is None else serial
        self.version = 0
        self._serial_listeners: list[Callable[[int], None]] = []
        try:
            ns_names = [rr.normalize_name(name) for name in nameservers]
            self._rname = self._hostmaster(hostmaster)
        except ValueError as e:
            raise ConfigError("dns.nameservers", str(e)) from None
        self._mname = ns_names[0]
        static: dict[bytes, list[tuple[int, Any, str]]] = {}
        for name in ns_names:
            static.setdefault(self._origin, []).append((dns.NS, dns.Record_NS(name, ttl), ""))
        for line in records:
            try:
                owner, rtype, _, payload = rr.parse_record(line, self._origin, ttl)
            except ValueError as e:
                raise ConfigError("dns.records", f"{line}: {e}") from None
            if rtype == dns.NS and owner != self._origin:
                raise ConfigError(
                    "dns.records", f"{line}: delegations (NS below the apex) are not supported"
                )
            static.setdefault(owner, []).append((rtype, payload, line))
        self._static: dict[bytes, Node] = {}
        for owner, owned in static.items():
            node: dict[int, list[Any]] = {}
            first_line: dict[int, str] = {}
            for rtype, payload, line in owned:
                if payload not in node.get(rtype, []):
                    node.setdefault(rtype, []).append(payload)
                    first_line.setdefault(rtype, line)
            if dns.CNAME in node and (
                len(node) > 1 or len(node[dns.CNAME]) > 1 or owner == self._origin
            ):
                raise ConfigError(
                    "dns.records",
                    f"{first_line[dns.CNAME]}: a CNAME must be alone at its name (RFC 1034)",
                )
            self._static[owner] = {rtype: tuple(recs) for rtype, recs in node.items()}
        self._challenges: dict[bytes, list[str]] = {}
        self._caa: tuple[rr.Record_CAA, ...] = ()  # set_caa's, after the static ones
        self._nodes: dict[bytes, Node] = dict(self._static)
        self._existing: dict[bytes, int] = {}  # name -> number of nodes at or below it
        #: name (text, lowercase) -> the address it carries, for names of ``{ip}`` patterns
        #: (``NamePolicy.address_of``): answered A or AAAA with no record stored.
        self.addressed: Callable[[str], Any] | None = None
        for owner in self._static:
            self._count(owner, 1)
        self._update_soa()

    @staticmethod
    def _hostmaster(hostmaster: str | None) -> dns.Name | None:
        if hostmaster is None:
            return None
        local, at, domain = hostmaster.rpartition("@")
        if not at:
            return dns.Name(rr.normalize_name(hostmaster))
        # The mailbox's local part is one label, dots and all (RFC 1035 section 8).
        if not local or len(local) > 63 or not local.isascii():
            raise ValueError(f"bad hostmaster mailbox {hostmaster!r}")
        return rr.Mailbox(local.lower().encode("ascii"), rr.normalize_name(domain))

    # -- challenge records -------------------------------------------------

    @property
    def serial(self) -> int:
        """The SOA serial (Unix time at the latest); it increases (RFC 1982) on every change."""
        return self._serial

    def on_serial(self, listener: Callable[[int], None]) -> Callable[[], None]:
        """Call ``listener(serial)`` after every change of the serial; returns the call
        that stops it. Listeners run in the change's reactor turn: keep them short."""
        self._serial_listeners.append(listener)

        def stop() -> None:
            if listener in self._serial_listeners:
                self._serial_listeners.remove(listener)

        return stop

    def soa_header(self) -> dns.RRHeader:
        """The apex SOA as an answer record (TTL the zone's)."""
        return dns.RRHeader(self._origin, dns.SOA, dns.IN, self._soa.ttl, self._soa, auth=True)

    def soa_at(self, serial: int) -> dns.RRHeader:
        """The apex SOA as an answer record, with ``serial`` for its serial (IXFR's
        SOA records of older versions: every other field is the current SOA's)."""
        soa = copy.copy(self._soa)
        soa.serial = serial
        return dns.RRHeader(self._origin, dns.SOA, dns.IN, soa.ttl, soa, auth=True)

    def transfer_records(self) -> Records:
        """Every record of the zone for AXFR (RFC 5936): the SOA first, and not again."""
        out = [self.soa_header()]
        for owner, node in self._nodes.items():
            for rtype, found in node.items():
                if rtype != dns.SOA:
                    out.extend(
                        dns.RRHeader(owner, rtype, dns.IN, record.ttl, record, auth=True)
                        for record in found
                    )
        return out

    def add_txt(self, name: str, value: str) -> None:
        """Serve ``value`` as a TXT record at ``name`` (absolute, in the zone) until removed.

        The values form a multiset: adding a value twice needs two removals.
        Raises ``ValueError`` for a name outside the zone or one that owns a CNAME.
        """
        key = self._challenge_name(name)
        if dns.CNAME in self._static.get(key, {}):
            raise ValueError(f"{name} owns a CNAME and cannot hold TXT records")
        values = self._challenges.setdefault(key, [])
        values.append(value)
        if len(values) == 1 and key not in self._static:
            self._count(key, 1)
        self._refresh(key)

    def remove_txt(self, name: str, value: str) -> None:
        """Stop serving one copy of ``value`` at ``name``; a value not present is a no-op."""
        key = self._challenge_name(name)
        values = self._challenges.get(key)
        if not values or value not in values:
            return
        values.remove(value)
        if not values:
            del self._challenges[key]
            if key not in self._static:
                self._count(key, -1)
        self._refresh(key)

    def txt_values(self, name: str) -> tuple[str, ...]:
        """The challenge values currently served at ``name``."""
        return tuple(self._challenges.get(self._challenge_name(name), ()))

    def challenge_names(self) -> tuple[str, ...]:
        """The names that currently hold challenge TXT values."""
        return tuple(rr.name_text(key) for key in self._challenges)

    def _challenge_name(self, name: str) -> bytes:
        key = rr.normalize_name(name)
        if not rr.is_within(key, self._origin):
            raise ValueError(f"{name} is outside the zone {self.origin}")
        return key

    def _count(self, name: bytes, delta: int) -> None:
        while True:
            count = self._existing.get(name, 0) + delta
            if count:
                self._existing[name] = count
            else:
                self._existing.pop(name, None)
            if name == self._origin:
                return
            name = rr.parent(name)

    def _refresh(self, key: bytes) -> None:
        before = self._nodes.get(key, {}).get(dns.TXT, ())
        node = dict(self._static.get(key, {}))
        values = self._challenges.get(key)
        if values:
            txt = tuple(
                dns.Record_TXT(*rr.txt_strings(v.encode("utf-8")), ttl=self.challenge_ttl)
                for v in values
            )
            node[dns.TXT] = node.get(dns.TXT, ()) + txt
        if key == self._origin and self._caa:
            node[rr.CAA] = node.get(rr.CAA, ()) + self._caa
        if node:
            self._nodes[key] = node
        else:
            self._nodes.pop(key, None)
        self._changed(key, dns.TXT, before, node.get(dns.TXT, ()))

    def _changed(
        self, key: bytes, rtype: int, before: tuple[Any, ...], after: tuple[Any, ...]
    ) -> None:
        # The serial moves; history keeps the change of the RRset (key, rtype) for IXFR.
        old_serial = self._serial
        self._serial = next_serial(self._serial, int(self._clock()))
        deleted, added = _set_change(before, after)
        self.history.record(
            Change(
                old_serial,
                self._serial,
                tuple(dns.RRHeader(key, rtype, dns.IN, r.ttl, r, auth=True) for r in deleted),
                tuple(dns.RRHeader(key, rtype, dns.IN, r.ttl, r, auth=True) for r in added),
            )
        )
        self._update_soa()
        for listener in list(self._serial_listeners):
            listener(self._serial)

    def _update_soa(self) -> None:
        minimum = self.challenge_ttl
        soa = dns.Record_SOA(
            mname=self._mname,
            rname=b"hostmaster." + self._origin,
            serial=self._serial,
            refresh=SOA_REFRESH,
            retry=SOA_RETRY,
            expire=SOA_EXPIRE,
            minimum=minimum,
            ttl=self.ttl,
        )
        if self._rname is not None:
            soa.rname = self._rname
        self._soa = soa
        # RFC 2308 section 5: negative answers carry the SOA with TTL min(TTL, MINIMUM).
        self._negative_ttl = min(self.ttl, minimum)
        apex = dict(self._nodes.get(self._origin, {}))
        apex[dns.SOA] = (soa,)
        self._nodes[self._origin] = apex
        self.version += 1

    # -- CAA at the apex ----------------------------------------------------

    @property
    def caa_ttl(self) -> int:
        """The TTL of the generated CAA records: the zone's, at most ``CAA_MAX_TTL``."""
        return min(self.ttl, CAA_MAX_TTL)

    def set_caa(self, issuers: Sequence[tuple[str, str | None]]) -> None:
        """Serve at the apex, for each ``(identity, account_url)`` of ``issuers``, a CAA
        ``issue`` and an ``issuewild`` record (RFC 8659) allowing only that CA, only that
        account (RFC 8657 ``accounturi``; any account while the URL is None) and only
        dns-01: ``0 issue "letsencrypt.org; accounturi=URL; validationmethods=dns-01"``.

        Replaces what an earlier call set (an empty ``issuers`` serves none); a change
        raises the serial and is kept for IXFR, the same records again change nothing.
        Raises ``ValueError`` for a bad identity or URL (see
        :func:`~csrproxy.dns.records.caa_issuer_value`), for more than
        ``MAX_CAA_ISSUERS``, and when the static records hold an ``issue`` or
        ``issuewild`` at the apex: a CA allowed there unconditionally would undo the lock.
        """
        if len(issuers) > MAX_CAA_ISSUERS:
            raise ValueError(f"at most {MAX_CAA_ISSUERS} CAs in CAA, not {len(issuers)}")
        static = self._static.get(self._origin, {}).get(rr.CAA, ())
        if issuers and any(r.tag in (b"issue", b"issuewild") for r in static):
            raise ValueError(
                "the records hold a CAA issue or issuewild at the apex: csrproxy generates"
                " those (remove them, or set [dns] caa = false)"
            )
        records: list[rr.Record_CAA] = []
        for identity, account_url in issuers:
            value = rr.caa_issuer_value(identity, account_url)
            for tag in (b"issue", b"issuewild"):
                record = rr.Record_CAA(0, tag, value, self.caa_ttl)
                if record not in records:
                    records.append(record)
        if tuple(records) == self._caa:
            return
        self._caa = tuple(records)
        apex = dict(self._nodes[self._origin])
        before = apex.get(rr.CAA, ())
        after = static + self._caa
        if after:
            apex[rr.CAA] = after
        else:
            apex.pop(rr.CAA, None)
        self._nodes[self._origin] = apex
        self._changed(self._origin, rr.CAA, before, after)

    def caa_records(self) -> tuple[rr.Record_CAA, ...]:
        """The CAA records :meth:`set_caa` generated, served after the static ones."""
        return self._caa

    # -- answering ---------------------------------------------------------

    def contains(self, name: bytes) -> bool:
        """True when ``name`` (any letter case) is the origin or below it."""
        return rr.is_within(name.lower(), self._origin)

    def query(self, query: dns.Query, timeout: object = None) -> Deferred[Result]:
        # ResolverBase.query drops the class and logs every unknown type; ask directly.
        return maybeDeferred(self._lookup, query.name.name, query.cls, query.type, timeout)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object = None) -> Deferred[Result]:
        """Answer one question, as ``FileAuthority._lookup`` does, with the fixes above."""
        key = name.lower()
        if not rr.is_within(key, self._origin) or type in (dns.AXFR, dns.IXFR):
            return fail(error.DomainError(name))
        nxdomain, answers, authority = self._resolve(key, type, MAX_CNAME_CHAIN)
        if nxdomain:
            return fail(NameNotFound(name, answers, authority))
        return succeed((answers, authority, []))

    def _negative(self) -> Records:
        return [
            dns.RRHeader(self._origin, dns.SOA, dns.IN, self._negative_ttl, self._soa, auth=True)
        ]

    def _resolve(self, name: bytes, type: int, hops: int) -> tuple[bool, Records, Records]:
        node = self._nodes.get(name)
        if node is None:
            if name in self._existing:  # an empty non-terminal (an address name's challenge)
                node = self._addressed(name)
                if node is None:
                    return False, [], self._negative()
            else:
                node = self._addressed(name) or self._wildcard(name)
            if node is None:
                return True, [], self._negative()
        if type == dns.ALL_RECORDS:
            hinfo = dns.Record_HINFO(*RFC8482_HINFO, ttl=self.ttl)
            return False, [dns.RRHeader(name, dns.HINFO, dns.IN, self.ttl, hinfo, auth=True)], []
        found = node.get(type)
        if found:
            return (
                False,
                [
                    dns.RRHeader(name, type, dns.IN, record.ttl, record, auth=True)
                    for record in found
                ],
                [],
            )
        cname = node.get(dns.CNAME)
        if cname:
            record = cname[0]
            first = dns.RRHeader(name, dns.CNAME, dns.IN, record.ttl, record, auth=True)
            target = record.name.name
            if hops <= 0 or not rr.is_within(target, self._origin):
                return False, [first], []
            nxdomain, answers, authority = self._resolve(target, type, hops - 1)
            return nxdomain, [first, *answers], authority
        return False, [], self._negative()

    def _addressed(self, name: bytes) -> Node | None:
        """The node a name that carries its address has: its one A or AAAA record."""
        if self.addressed is None:
            return None
        address = self.addressed(rr.name_text(name))
        if address is None:
            return None
        if address.version == 4:
            return {dns.A: (dns.Record_A(str(address), self.ttl),)}
        return {dns.AAAA: (dns.Record_AAAA(str(address), self.ttl),)}

    def wildcard_owner(self, name: bytes) -> bytes | None:
        """The owner of the wildcard that answers ``name`` (lowercase), or None when
        ``name`` exists (a node or an empty non-terminal) or no wildcard covers it."""
        if name in self._nodes or name in self._existing or not rr.is_within(name, self._origin):
            return None
        if self.addressed is not None and self.addressed(rr.name_text(name)) is not None:
            # Every name an {ip} pattern answers is one response-rate-limiting account, as
            # a wildcard's names are: made-up addresses do not each get a fresh bucket.
            return b"{ip}." + self._origin
        owner = self._wildcard_name(name)
        return owner if owner in self._nodes else None

    def _wildcard(self, name: bytes) -> Node | None:
        return self._nodes.get(self._wildcard_name(name))

    def _wildcard_name(self, name: bytes) -> bytes:
        # RFC 4592: only the closest encloser's wildcard applies.
        encloser = rr.parent(name)
        while encloser not in self._existing:
            if encloser == self._origin or not encloser:
                break
            encloser = rr.parent(encloser)
        return b"*." + encloser
