"""The in-memory authoritative zone: SOA, NS, static records and challenge TXT records."""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from csrproxy.dns import records as rr
from csrproxy.dns.records import NameRef, Record
from csrproxy.errors import ConfigError

if TYPE_CHECKING:
    from twisted.names import dns

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16

SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 604800
# RFC 8482 section 4.2: the synthesised answer to ANY.
RFC8482_HINFO = b"\x07RFC8482\x00"
MAX_CNAME_CHAIN = 8

Node = dict[int, tuple[Record, ...]]


@dataclass(frozen=True)
class Lookup:
    """What the zone says about one question: rcode, AA, and the records to send."""

    rcode: int
    authoritative: bool
    answer: tuple[tuple[bytes, Record], ...] = ()  # (owner as sent, record)
    authority: tuple[tuple[bytes, Record], ...] = ()


REFUSED_LOOKUP = Lookup(REFUSED, False)
NOTIMP_LOOKUP = Lookup(NOTIMP, False)
FORMERR_LOOKUP = Lookup(FORMERR, False)


class ChallengeZone:
    """The in-memory authoritative zone: SOA, NS, static records, and challenge TXT records.

    ``origin`` is stored lowercase without the trailing dot. Static ``records`` are
    zone-file lines relative to the origin (``"@ A 127.0.0.1"``, ``"* 60 A 127.0.0.1"``,
    ``"@ CAA 0 issue \\"letsencrypt.org\\""``); a bad one raises
    ``ConfigError("dns.records", ...)``. Challenge TXT values are a multiset per name,
    served with ``challenge_ttl``; every change raises the SOA ``serial`` and ``version``.
    """

    def __init__(
        self,
        origin: str,
        nameservers: Sequence[str],
        records: Sequence[str],
        *,
        ttl: int = 300,
        challenge_ttl: int = 10,
        hostmaster: str | None = None,
        serial: int | None = None,
    ) -> None:
        try:
            self._origin = rr.name_to_wire(origin)
        except ValueError as e:
            raise ConfigError("dns.zone", str(e)) from None
        if self._origin == rr.ROOT:
            raise ConfigError("dns.zone", "the zone must not be the root")
        self.origin = rr.wire_to_text(self._origin)
        for key, value in (("dns.ttl", ttl), ("dns.challenge_ttl", challenge_ttl)):
            if not 0 <= value <= rr.MAX_TTL:
                raise ConfigError(key, f"TTL {value} is out of range")
        if not nameservers:
            raise ConfigError("dns.nameservers", "at least one nameserver is needed")
        self.ttl = ttl
        self.challenge_ttl = challenge_ttl
        self._serial = int(time.time()) if serial is None else serial
        self.version = 0
        try:
            ns_names = [rr.name_to_wire(name) for name in nameservers]
            rname = self._hostmaster_wire(hostmaster)
        except ValueError as e:
            raise ConfigError("dns.nameservers", str(e)) from None
        self._mname = ns_names[0]
        self._rname = rname
        static: dict[bytes, list[Record]] = {}
        lines: dict[Record, str] = {}
        for name in ns_names:
            static.setdefault(self._origin, []).append(
                Record(self._origin, rr.NS, ttl, (NameRef(name),))
            )
        for line in records:
            try:
                record = rr.parse_record(line, self._origin, ttl)
            except ValueError as e:
                raise ConfigError("dns.records", f"{line}: {e}") from None
            if record.rtype == rr.NS and record.owner != self._origin:
                raise ConfigError(
                    "dns.records", f"{line}: delegations (NS below the apex) are not supported"
                )
            static.setdefault(record.owner, []).append(record)
            lines.setdefault(record, line)
        self._static: dict[bytes, Node] = {}
        for owner, owned in static.items():
            node: dict[int, list[Record]] = {}
            for record in owned:
                if record not in node.get(record.rtype, []):
                    node.setdefault(record.rtype, []).append(record)
            if rr.CNAME in node and (
                len(node) > 1 or len(node[rr.CNAME]) > 1 or owner == self._origin
            ):
                raise ConfigError(
                    "dns.records",
                    f"{lines[node[rr.CNAME][0]]}: a CNAME must be alone at its name (RFC 1034)",
                )
            self._static[owner] = {rtype: tuple(recs) for rtype, recs in node.items()}
        self._challenges: dict[bytes, list[str]] = {}
        self._nodes: dict[bytes, Node] = dict(self._static)
        self._existing: dict[bytes, int] = {}  # name -> number of nodes at or below it
        for owner in self._static:
            self._count(owner, 1)
        self._update_soa()

    @staticmethod
    def _hostmaster_wire(hostmaster: str | None) -> bytes | None:
        if hostmaster is None:
            return None
        local, at, domain = hostmaster.rpartition("@")
        if not at:
            return rr.name_to_wire(hostmaster)
        # The mailbox's local part is one label, dots and all (RFC 1035 section 8).
        if not local or len(local) > 63 or not local.isascii():
            raise ValueError(f"bad hostmaster mailbox {hostmaster!r}")
        return bytes([len(local)]) + local.lower().encode("ascii") + rr.name_to_wire(domain)

    # -- challenge records -------------------------------------------------

    @property
    def serial(self) -> int:
        """The SOA serial; it increases whenever challenge records change."""
        return self._serial

    def add_txt(self, name: str, value: str) -> None:
        """Serve ``value`` as a TXT record at ``name`` (absolute, in the zone) until removed.

        The values form a multiset: adding a value twice needs two removals.
        Raises ``ValueError`` for a name outside the zone or one that owns a CNAME.
        """
        wire = self._challenge_name(name)
        if rr.CNAME in self._static.get(wire, {}):
            raise ValueError(f"{name} owns a CNAME and cannot hold TXT records")
        values = self._challenges.setdefault(wire, [])
        values.append(value)
        if len(values) == 1 and wire not in self._static:
            self._count(wire, 1)
        self._refresh(wire)

    def remove_txt(self, name: str, value: str) -> None:
        """Stop serving one copy of ``value`` at ``name``; a value not present is a no-op."""
        wire = self._challenge_name(name)
        values = self._challenges.get(wire)
        if not values or value not in values:
            return
        values.remove(value)
        if not values:
            del self._challenges[wire]
            if wire not in self._static:
                self._count(wire, -1)
        self._refresh(wire)

    def txt_values(self, name: str) -> tuple[str, ...]:
        """The challenge values currently served at ``name``."""
        return tuple(self._challenges.get(self._challenge_name(name), ()))

    def challenge_names(self) -> tuple[str, ...]:
        """The names that currently hold challenge TXT values."""
        return tuple(rr.wire_to_text(wire) for wire in self._challenges)

    def _challenge_name(self, name: str) -> bytes:
        wire = rr.name_to_wire(name)
        if not rr.is_within(wire, self._origin):
            raise ValueError(f"{name} is outside the zone {self.origin}")
        return wire

    def _count(self, wire: bytes, delta: int) -> None:
        while True:
            count = self._existing.get(wire, 0) + delta
            if count:
                self._existing[wire] = count
            else:
                self._existing.pop(wire, None)
            if wire == self._origin:
                return
            wire = rr.parent(wire)

    def _refresh(self, wire: bytes) -> None:
        node = dict(self._static.get(wire, {}))
        values = self._challenges.get(wire)
        if values:
            txt = tuple(
                Record(wire, rr.TXT, self.challenge_ttl, (rr.character_strings(v.encode("utf-8")),))
                for v in values
            )
            node[rr.TXT] = node.get(rr.TXT, ()) + txt
        if node:
            self._nodes[wire] = node
        else:
            self._nodes.pop(wire, None)
        self._serial = (self._serial + 1) & 0xFFFFFFFF
        self._update_soa()

    def _update_soa(self) -> None:
        rname = self._rname or b"\x0ahostmaster" + self._origin
        minimum = self.challenge_ttl
        fields = struct.pack("!IIIII", self._serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, minimum)
        rdata = (NameRef(self._mname), NameRef(rname), fields)
        self._soa = Record(self._origin, rr.SOA, self.ttl, rdata)
        # RFC 2308 section 5: negative answers carry the SOA with TTL min(TTL, MINIMUM).
        self._negative_soa = (
            (self._origin, Record(self._origin, rr.SOA, min(self.ttl, minimum), rdata)),
        )
        apex = dict(self._nodes.get(self._origin, {}))
        apex[rr.SOA] = (self._soa,)
        self._nodes[self._origin] = apex
        self.version += 1

    # -- answering ---------------------------------------------------------

    def lookup(self, qname: bytes, qtype: int, qclass: int = 1) -> Lookup:
        """Answer one question; ``qname`` is the lowercase wire form of the name asked."""
        if qclass not in (1, 255):
            return REFUSED_LOOKUP
        if qtype in (0, rr.OPT, 249, 250):  # TKEY and TSIG are not questions
            return FORMERR_LOOKUP
        if not rr.is_within(qname, self._origin):
            return REFUSED_LOOKUP
        if qtype in (rr.AXFR, rr.IXFR):
            return REFUSED_LOOKUP
        if qtype in (rr.MAILA, rr.MAILB):
            return NOTIMP_LOOKUP
        return self._lookup(qname, qtype, MAX_CNAME_CHAIN)

    def _lookup(self, qname: bytes, qtype: int, hops: int) -> Lookup:
        node = self._nodes.get(qname)
        if node is None:
            if qname in self._existing:  # an empty non-terminal
                return Lookup(NOERROR, True, (), self._negative_soa)
            node = self._wildcard(qname)
            if node is None:
                return Lookup(NXDOMAIN, True, (), self._negative_soa)
        if qtype == rr.ANY:
            hinfo = Record(qname, rr.HINFO, self.ttl, (RFC8482_HINFO,))
            return Lookup(NOERROR, True, ((qname, hinfo),))
        found = node.get(qtype)
        if found:
            return Lookup(NOERROR, True, tuple((qname, record) for record in found))
        cname = node.get(rr.CNAME)
        if cname:
            first = ((qname, cname[0]),)
            target = cname[0].rdata[0]
            assert isinstance(target, NameRef)
            if hops <= 0 or not rr.is_within(target.wire, self._origin):
                return Lookup(NOERROR, True, first)
            rest = self._lookup(target.wire, qtype, hops - 1)
            return Lookup(rest.rcode, True, first + rest.answer, rest.authority)
        return Lookup(NOERROR, True, (), self._negative_soa)

    def _wildcard(self, qname: bytes) -> Node | None:
        # RFC 4592: only the closest encloser's wildcard applies.
        encloser = rr.parent(qname)
        while encloser not in self._existing:
            if encloser == self._origin or encloser == rr.ROOT:
                break
            encloser = rr.parent(encloser)
        return self._nodes.get(b"\x01*" + encloser)

    def answer(self, query: dns.Message, max_udp: int | None) -> bytes:
        """The response to ``query`` in wire form; ``max_udp=None`` means over TCP."""
        from csrproxy.dns.wire import Responder

        response = Responder(self).respond(query.toStr(), max_udp)
        if response is None:
            raise ValueError("a response (QR=1) is never answered")
        return response
