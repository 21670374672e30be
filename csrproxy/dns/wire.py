"""The byte-level path from a query packet to a response packet.

Common queries (opcode QUERY, one question, no records but an optional OPT) are
parsed with a few slices and answered from a cache of precomputed response
bodies keyed by (lowercase qname, qtype, qclass); only the id, flags and the
question as asked (letter case preserved, RFC 5452 / 0x20) are patched in.
Everything else goes through a strict full parse. Compression pointers in the
response point into the echoed question, so one body serves every letter case.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from csrproxy.dns import records as rr
from csrproxy.dns.zone import BADVERS, FORMERR, NOTIMP, Lookup

UDP_DEFAULT = 512
# The DNS flag day 2020 value: no IP fragmentation on common paths.
UDP_MAX = 1232
TCP_MAX = 65535
CACHE_LIMIT = 8192

_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"
_NO_RECORDS = b"\x00\x00"
_ONE_RECORD = b"\x00\x01"
_PLAIN_COUNTS = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_EDNS_COUNTS = b"\x00\x01\x00\x00\x00\x00\x00\x01"
_OPT_HEAD = b"\x00\x00\x29"
# Our OPT: root owner, type 41, payload size 1232, ext-rcode 0, version 0, DO clear / set.
_OPT = b"\x00\x00\x29" + struct.pack("!H", UDP_MAX) + b"\x00\x00\x00\x00\x00\x00"
_OPT_DO = b"\x00\x00\x29" + struct.pack("!H", UDP_MAX) + b"\x00\x00\x80\x00\x00\x00"
_OPT_BADVERS = b"\x00\x00\x29" + struct.pack("!H", UDP_MAX) + b"\x01\x00\x00\x00\x00\x00"

# (flags high byte, flags low byte, the four counts without and with an OPT, body after
# the question)
Entry = tuple[int, int, bytes, bytes, bytes]


class Authority(Protocol):
    """What the responder needs from a zone."""

    @property
    def version(self) -> int: ...

    def lookup(self, qname: bytes, qtype: int, qclass: int = 1) -> Lookup: ...


class MalformedError(Exception):
    """The packet is not a well-formed DNS message."""


@dataclass(frozen=True)
class ParsedQuery:
    """The parts of a fully parsed query the responder uses."""

    question_end: int  # 0 without a question
    name_end: int  # offset of the zero byte ending the qname
    questions: int
    other_records: int  # answer + authority records
    edns: tuple[int, int, bool] | None  # (payload size, version, DO)


def _options_ok(packet: bytes, pos: int, end: int) -> bool:
    while pos < end:
        if pos + 4 > end:
            return False
        pos += 4 + (packet[pos + 2] << 8 | packet[pos + 3])
    return pos == end


def _skip_name(packet: bytes, pos: int) -> int:
    # Pointers end a name; they are never followed, so loops cannot happen.
    total = 0
    while True:
        if pos >= len(packet):
            raise MalformedError("name runs past the end")
        length = packet[pos]
        if length & 0xC0 == 0xC0:
            if pos + 2 > len(packet):
                raise MalformedError("truncated pointer")
            return pos + 2
        if length & 0xC0:
            raise MalformedError("reserved label type")
        total += length + 1
        if total > 255:
            raise MalformedError("name longer than 255 bytes")
        pos += length + 1
        if length == 0:
            return pos


def parse_query(packet: bytes) -> ParsedQuery:
    """Parse a whole query strictly; raises ``MalformedError``."""
    if len(packet) < 12:
        raise MalformedError("short header")
    qd, an, ns, ar = struct.unpack_from("!HHHH", packet, 4)
    if qd > 1:
        raise MalformedError("more than one question")
    pos, name_end, question_end = 12, 0, 0
    if qd:
        length = packet[12] if len(packet) > 12 else 0
        while length:
            if length > 63:
                raise MalformedError("compressed or bad label in the question")
            pos += length + 1
            if pos >= len(packet) or pos > 12 + 254:
                raise MalformedError("bad question name")
            length = packet[pos]
        if len(packet) <= pos:
            raise MalformedError("no question")
        name_end = pos
        pos += 5
        question_end = pos
        if pos > len(packet):
            raise MalformedError("truncated question")
    edns = None
    for index in range(an + ns + ar):
        owner = pos
        pos = _skip_name(packet, pos)
        if pos + 10 > len(packet):
            raise MalformedError("truncated record")
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", packet, pos)
        pos += 10
        if pos + rdlen > len(packet):
            raise MalformedError("truncated rdata")
        if rtype == rr.OPT:
            if index < an + ns or edns is not None or packet[owner] != 0:
                raise MalformedError("misplaced OPT")
            if not _options_ok(packet, pos, pos + rdlen):
                raise MalformedError("bad EDNS options")
            edns = (rclass, (ttl >> 16) & 0xFF, bool(ttl & 0x8000))
        pos += rdlen
    if pos != len(packet):
        raise MalformedError("trailing bytes")
    return ParsedQuery(question_end, name_end, qd, an + ns, edns)


def udp_limit(announced: int | None, cap: int) -> int:
    """The largest UDP response allowed: 512, or the EDNS size clamped to [512, cap]."""
    if announced is None:
        return UDP_DEFAULT
    return max(UDP_DEFAULT, min(announced, cap))


class Responder:
    """Turns query packets into response packets for one zone.

    ``respond(packet, udp_cap)`` returns the response, or ``None`` when nothing
    must be sent (a response packet, or less than a header). ``udp_cap`` is our
    UDP payload ceiling; ``None`` means TCP. ``on_rcode`` sees every answered rcode.
    """

    def __init__(self, zone: Authority, on_rcode: Callable[[int], None] | None = None) -> None:
        self._zone = zone
        self._on_rcode = on_rcode
        self._cache: dict[bytes, Entry] = {}
        self._version = zone.version

    def respond(self, packet: bytes, udp_cap: int | None) -> bytes | None:
        if self._version != self._zone.version:
            self._cache.clear()
            self._version = self._zone.version
        # Fast path. A cache hit proves the question well formed: keys are made only from
        # validated questions, and lowercasing never touches a length byte (all < 0x40).
        if len(packet) > 16 and not packet[2] & 0xF8:  # QR clear, opcode QUERY
            counts = packet[4:12]
            if counts == _PLAIN_COUNTS:
                entry = self._cache.get(packet[12:-4].lower() + packet[-4:])
                if entry is not None and (udp_cap is None or len(packet) + len(entry[4]) <= 512):
                    high, low, plain, _, body = entry
                    if self._on_rcode is not None:
                        self._on_rcode(low)
                    flags = bytes((high | packet[2] & 0x01, low | packet[3] & 0x10))
                    return b"".join((packet[:2], flags, plain, packet[12:], body))
            elif (
                counts == _EDNS_COUNTS
                and packet[-11:-8] == _OPT_HEAD
                and packet[-2:] == _NO_RECORDS
                and not packet[-5]
            ):
                entry = self._cache.get(packet[12:-15].lower() + packet[-15:-11])
                if entry is not None:
                    size = len(packet) + len(entry[4])
                    if (
                        udp_cap is None
                        or size <= 512
                        or size <= udp_limit(packet[-8] << 8 | packet[-7], udp_cap)
                    ):
                        high, low, _, edns, body = entry
                        if self._on_rcode is not None:
                            self._on_rcode(low)
                        flags = bytes((high | packet[2] & 0x01, low | packet[3] & 0x10))
                        opt = _OPT_DO if packet[-4] & 0x80 else _OPT
                        return b"".join((packet[:2], flags, edns, packet[12:-11], body, opt))
        return self._respond_parsed(packet, udp_cap)

    def _respond_parsed(self, packet: bytes, udp_cap: int | None) -> bytes | None:
        if len(packet) < 12 or packet[2] & 0x80:
            return None  # never answer a response: no reflection loops
        if packet[2] & 0x78 or packet[4:10] != _ONE_QUESTION:
            return self._respond_slow(packet, udp_cap)
        pos = 12
        try:
            length = packet[12]
            while length:
                if length > 63:
                    return self._respond_slow(packet, udp_cap)
                pos += length + 1
                length = packet[pos]
        except IndexError:
            return self._respond_slow(packet, udp_cap)
        qend = pos + 5
        size = len(packet)
        if packet[10:12] == _NO_RECORDS:
            if qend != size or pos > 12 + 254:
                return self._respond_slow(packet, udp_cap)
            return self._answer(packet, pos, b"", UDP_DEFAULT if udp_cap else TCP_MAX)
        # The one common additional record: a version 0 OPT.
        if (
            packet[10:12] != _ONE_RECORD
            or size < qend + 11
            or packet[qend : qend + 3] != b"\x00\x00\x29"
            or packet[qend + 6]
            or qend + 11 + (packet[qend + 9] << 8 | packet[qend + 10]) != size
            or not _options_ok(packet, qend + 11, size)
            or pos > 12 + 254
        ):
            return self._respond_slow(packet, udp_cap)
        opt = _OPT_DO if packet[qend + 7] & 0x80 else _OPT
        if udp_cap is None:
            return self._answer(packet, pos, opt, TCP_MAX)
        return self._answer(
            packet, pos, opt, udp_limit(packet[qend + 3] << 8 | packet[qend + 4], udp_cap)
        )

    def _answer(self, packet: bytes, name_end: int, opt: bytes, limit: int) -> bytes:
        qend = name_end + 5
        key = packet[12 : name_end + 1].lower() + packet[name_end + 1 : qend]
        entry = self._cache.get(key)
        if entry is None:
            entry = self._compute(key, name_end - 11)
        high, low, plain, edns, body = entry
        high |= packet[2] & 0x01  # RD is copied
        if self._on_rcode is not None:
            self._on_rcode(low)
        low |= packet[3] & 0x10  # CD is copied
        counts = edns if opt else plain
        if qend + len(body) + len(opt) <= limit:
            return b"".join((packet[:2], bytes((high, low)), counts, packet[12:qend], body, opt))
        # RFC 2181 9: it does not fit, so send nothing but TC and let the client use TCP.
        arcount = _ONE_RECORD if opt else _NO_RECORDS
        header = bytes((high | 0x02, low)) + _ONE_QUESTION + arcount
        return b"".join((packet[:2], header, packet[12:qend], opt))

    def _compute(self, key: bytes, name_length: int) -> Entry:
        qname = key[:name_length]
        qtype, qclass = struct.unpack_from("!HH", key, name_length)
        lookup = self._zone.lookup(qname, qtype, qclass)
        message = bytearray(12) + key
        table = {qname[offset:]: 12 + offset for offset in rr.suffix_offsets(qname)}
        for owner, record in lookup.answer:
            rr.encode_record(record, owner, message, table)
        for owner, record in lookup.authority:
            rr.encode_record(record, owner, message, table)
        high = 0x84 if lookup.authoritative else 0x80
        counts = struct.pack("!HHH", 1, len(lookup.answer), len(lookup.authority))
        body = bytes(message[12 + len(key) :])
        entry = (high, lookup.rcode, counts + _NO_RECORDS, counts + _ONE_RECORD, body)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()  # a flood of distinct names must not grow memory
        self._cache[key] = entry
        return entry

    def _respond_slow(self, packet: bytes, udp_cap: int | None) -> bytes:
        try:
            query = parse_query(packet)
        except MalformedError:
            return self._error(packet, FORMERR, b"", b"")
        question = packet[12 : query.question_end]
        opt = b""
        if query.edns is not None:
            opt = _OPT_DO if query.edns[2] else _OPT
        if packet[2] & 0x78:
            return self._error(packet, NOTIMP, question, opt)
        if query.edns is not None and query.edns[1] != 0:
            # RFC 6891 6.1.3: BADVERS (16) lives in the OPT's extended rcode.
            return self._error(packet, BADVERS, question, _OPT_BADVERS)
        if query.questions != 1 or query.other_records:
            return self._error(packet, FORMERR, question, opt)
        if udp_cap is None:
            limit = TCP_MAX
        else:
            limit = udp_limit(query.edns[0] if query.edns else None, udp_cap)
        return self._answer(packet, query.name_end, opt, limit)

    def _error(self, packet: bytes, rcode: int, question: bytes, opt: bytes) -> bytes:
        """A response with no records: QR, the query's opcode and RD, and ``rcode``."""
        if self._on_rcode is not None:
            self._on_rcode(rcode)
        high = 0x80 | (packet[2] & 0x79)
        counts = struct.pack("!HHHH", 1 if question else 0, 0, 0, 1 if opt else 0)
        return b"".join((packet[:2], bytes((high, rcode & 0x0F)), counts, question, opt))
