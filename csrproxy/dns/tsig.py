"""TSIG (RFC 8945): verifying a signed query and signing its responses, HMAC only.

twisted.names decodes and encodes the TSIG RR (``dns.Record_TSIG``) but computes no
MAC: that is this module's. A MAC covers the message as sent with the TSIG RR removed
and ARCOUNT one less, then the TSIG variables (RFC 8945 4.3.3); a response's MAC
is preceded by the request's MAC, and each later message of a multi-message answer
(AXFR) by the MAC of the one before, with only the timers as variables (4.3.1, 5.3.1).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from twisted.names import dns

ALGORITHMS: dict[str, Callable[[], Any]] = {
    "hmac-sha256": hashlib.sha256,
    "hmac-sha384": hashlib.sha384,
    "hmac-sha512": hashlib.sha512,
    "hmac-sha224": hashlib.sha224,
}
# RFC 8945 10: the fudge recommended.
FUDGE = 300
# TSIG error codes (RFC 8945 3) and the NOTAUTH rcode they travel with.
BADSIG, BADKEY, BADTIME = 16, 17, 18
NOTAUTH = 9
CLASS_ANY = 255


@dataclass(frozen=True)
class TSIGKey:
    """One key: ``name`` and ``algorithm`` as text (lowercase, no trailing dot)."""

    name: str
    algorithm: str
    secret: bytes = field(repr=False)

    def mac(self, data: bytes) -> bytes:
        return hmac.new(self.secret, data, ALGORITHMS[self.algorithm]).digest()


@dataclass
class Verdict:
    """What a signed query's TSIG said: ``error`` 0 when ``key`` verified it.

    ``owner`` and ``record`` are the query's TSIG (its key name and RDATA); ``mac``
    the request MAC a response covers (empty unless the MAC verified).
    """

    owner: bytes
    record: dns.Record_TSIG
    key: TSIGKey | None
    error: int
    mac: bytes = b""


def _wire(name: bytes) -> bytes:
    # A name in canonical wire form: lowercase, uncompressed.
    out = BytesIO()
    dns.Name(name.lower()).encode(out)
    return out.getvalue()


def split(packet: bytes) -> tuple[bytes, bytes, dns.Record_TSIG] | None:
    """``(the packet without its TSIG and ARCOUNT one less, key name, TSIG RDATA)`` when
    the last additional record is a TSIG, else None. Raises for a malformed packet."""
    counts = struct.unpack_from("!4H", packet, 4)
    if counts[3] == 0:
        return None
    strio = BytesIO(packet)
    strio.seek(12)
    for _ in range(counts[0]):
        dns.Query().decode(strio)
    for _ in range(sum(counts[1:]) - 1):
        header = dns.RRHeader()
        header.decode(strio)
        strio.seek(int(header.rdlength or 0), 1)
    start = strio.tell()
    header = dns.RRHeader()
    header.decode(strio)
    if header.type != dns.TSIG:
        return None
    end = strio.tell() + int(header.rdlength or 0)
    if end != len(packet):
        raise ValueError("bytes after the TSIG record")
    record = dns.Record_TSIG()
    record.decode(BytesIO(packet[strio.tell() : end]))
    unsigned = packet[:10] + struct.pack("!H", counts[3] - 1) + packet[12:start]
    return unsigned, header.name.name, record


def _algorithm(record: dns.Record_TSIG) -> bytes:
    assert record.algorithm is not None
    return bytes(record.algorithm.name)


def _variables(owner: bytes, record: dns.Record_TSIG) -> bytes:
    return b"".join(
        (
            _wire(owner),
            struct.pack("!HI", CLASS_ANY, 0),
            _wire(_algorithm(record)),
            _timers(record),
            struct.pack("!HH", record.error, len(record.otherData)),
            record.otherData,
        )
    )


def _timers(record: dns.Record_TSIG) -> bytes:
    return struct.pack("!Q", record.timeSigned)[2:] + struct.pack("!H", record.fudge)


def _with_id(message: bytes, original_id: int) -> bytes:
    return struct.pack("!H", original_id) + message[2:]


def verify(packet: bytes, keys: Mapping[bytes, TSIGKey], now: float) -> Verdict | None:
    """Check the TSIG of ``packet`` against ``keys`` (by lowercase wire-less name, as
    ``b"name.example"``); None when it carries none (RFC 8945 5.2 order: key, MAC, time)."""
    found = split(packet)
    if found is None:
        return None
    unsigned, owner, record = found
    key = keys.get(owner.lower())
    if key is None or _algorithm(record).lower().decode("ascii", "replace") != key.algorithm:
        return Verdict(owner, record, None, BADKEY)
    expected = key.mac(_with_id(unsigned, record.originalID) + _variables(owner, record))
    # No truncated MACs (RFC 8945 5.2.2.1 allows refusing them).
    if not hmac.compare_digest(expected, record.MAC):
        return Verdict(owner, record, key, BADSIG)
    if abs(int(now) - record.timeSigned) > record.fudge:
        return Verdict(owner, record, key, BADTIME, expected)
    return Verdict(owner, record, key, 0, expected)


def _append(message: bytes, owner: bytes, record: dns.Record_TSIG) -> bytes:
    rdata = BytesIO()
    record.encode(rdata)
    rr = _wire(owner) + struct.pack("!HHIH", dns.TSIG, CLASS_ANY, 0, len(rdata.getvalue()))
    (arcount,) = struct.unpack_from("!H", message, 10)
    return message[:10] + struct.pack("!H", arcount + 1) + message[12:] + rr + rdata.getvalue()


def unsigned_error(message: bytes, verdict: Verdict, now: float) -> bytes:
    """``message`` (a NOTAUTH reply) with an unsigned TSIG carrying ``verdict.error``
    (BADKEY, BADSIG: RFC 8945 5.3.2)."""
    record = dns.Record_TSIG(
        algorithm=_algorithm(verdict.record),
        timeSigned=int(now),
        fudge=verdict.record.fudge,
        MAC=b"",
        originalID=verdict.record.originalID,
        error=verdict.error,
    )
    return _append(message, verdict.owner, record)


class ResponseSigner:
    """Signs the messages of one response to a verified query, each covering the last.

    The first message's MAC covers the request's MAC and all the TSIG variables; each
    later one's the previous MAC and only the timers. A BADTIME reply carries our time
    in its other data (RFC 8945 5.2.3).
    """

    def __init__(self, verdict: Verdict, now: float) -> None:
        assert verdict.key is not None
        self.key = verdict.key
        self.owner = verdict.owner
        self.original_id = verdict.record.originalID
        self.now = int(now)
        self.error = verdict.error
        self._prior = verdict.mac
        self._first = True

    def sign(self, message: bytes) -> bytes:
        other = struct.pack("!Q", self.now)[2:] if self.error == BADTIME else b""
        record = dns.Record_TSIG(
            algorithm=self.key.algorithm.encode("ascii"),
            timeSigned=self.now,
            fudge=FUDGE,
            MAC=b"",
            originalID=self.original_id,
            error=self.error,
            otherData=other,
        )
        data = (
            struct.pack("!H", len(self._prior)) + self._prior + _with_id(message, self.original_id)
        )
        data += _variables(self.owner, record) if self._first else _timers(record)
        record.MAC = self.key.mac(data)
        self._prior = record.MAC
        self._first = False
        return _append(message, self.owner, record)


def sign_request(message: bytes, key: TSIGKey, now: float) -> bytes:
    """``message`` (a request we send, e.g. a NOTIFY) with a TSIG by ``key``: the MAC
    covers the message and all the TSIG variables, no prior MAC (RFC 8945 4.3.3)."""
    (message_id,) = struct.unpack_from("!H", message, 0)
    record = dns.Record_TSIG(
        algorithm=key.algorithm.encode("ascii"),
        timeSigned=int(now),
        fudge=FUDGE,
        MAC=b"",
        originalID=message_id,
    )
    owner = key.name.encode("ascii")
    record.MAC = key.mac(message + _variables(owner, record))
    return _append(message, owner, record)


def verify_response(
    packet: bytes, key: TSIGKey, request_macs: Sequence[bytes], now: float
) -> bool:
    """Whether ``packet`` is an answer signed by ``key`` to one of our requests whose MACs
    were ``request_macs`` (RFC 8945 4.3.3: the MAC covers the request's MAC, the answer
    and all the TSIG variables), with no TSIG error and within its fudge."""
    try:
        found = split(packet)
    except Exception:
        return False
    if found is None:
        return False
    unsigned, owner, record = found
    if owner.lower().rstrip(b".") != key.name.encode("ascii").lower().rstrip(b"."):
        return False
    if _algorithm(record).lower().decode("ascii", "replace") != key.algorithm:
        return False
    if record.error != 0 or abs(int(now) - record.timeSigned) > record.fudge:
        return False
    signed = _with_id(unsigned, record.originalID) + _variables(owner, record)
    return any(
        hmac.compare_digest(key.mac(struct.pack("!H", len(mac)) + mac + signed), record.MAC)
        for mac in request_macs
    )


def mac_of(packet: bytes) -> bytes:
    """The MAC of a packet we signed."""
    found = split(packet)
    assert found is not None
    return bytes(found[2].MAC)
