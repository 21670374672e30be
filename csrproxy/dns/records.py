"""Resource records of the zone: names in wire form, zone-file lines, RDATA encoding.

Names are kept as lowercase wire-format ``bytes`` (length-prefixed labels ending in
a zero byte): unambiguous for any label content and directly comparable to a query.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

A = 1
NS = 2
CNAME = 5
SOA = 6
PTR = 12
HINFO = 13
MX = 15
TXT = 16
AAAA = 28
SRV = 33
OPT = 41
IXFR = 251
AXFR = 252
MAILB = 253
MAILA = 254
ANY = 255
CAA = 257

TYPE_CODES = {
    "A": A, "NS": NS, "CNAME": CNAME, "PTR": PTR, "MX": MX, "TXT": TXT,
    "AAAA": AAAA, "SRV": SRV, "CAA": CAA,
}  # fmt: skip

MAX_TTL = 2**31 - 1
ROOT = b"\x00"


@dataclass(frozen=True)
class NameRef:
    """A domain name inside RDATA that may be compressed (RFC 1035 4.1.4, RFC 3597)."""

    wire: bytes


RDataPart = bytes | NameRef


@dataclass(frozen=True)
class Record:
    """One resource record: owner (lowercase wire name), type, TTL and RDATA parts."""

    owner: bytes
    rtype: int
    ttl: int
    rdata: tuple[RDataPart, ...]


def name_to_wire(name: str) -> bytes:
    """The lowercase wire form of a dotted ASCII name; a trailing dot is optional.

    Raises ``ValueError`` for empty labels, labels over 63 bytes, names over 255
    bytes or non-ASCII text (give IDNs in their ``xn--`` form).
    """
    text = name.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        return ROOT
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{name!r} is not ASCII (use the xn-- form)") from None
    out = bytearray()
    for label in raw.split(b"."):
        if not label:
            raise ValueError(f"{name!r} has an empty label")
        if len(label) > 63:
            raise ValueError(f"{name!r} has a label longer than 63 bytes")
        out.append(len(label))
        out += label
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"{name!r} is longer than 255 bytes")
    return bytes(out)


def wire_to_text(wire: bytes) -> str:
    """The dotted text of a wire name, without the trailing dot ("" for the root)."""
    return ".".join(label.decode("ascii", "backslashreplace") for label in split_labels(wire))


def split_labels(wire: bytes) -> list[bytes]:
    """The labels of an uncompressed wire name."""
    labels = []
    pos = 0
    while wire[pos]:
        length = wire[pos]
        labels.append(wire[pos + 1 : pos + 1 + length])
        pos += length + 1
    return labels


def suffix_offsets(wire: bytes) -> list[int]:
    """Offsets of every label start in a wire name, the root excluded."""
    offsets = []
    pos = 0
    while wire[pos]:
        offsets.append(pos)
        pos += wire[pos] + 1
    return offsets


def is_within(wire: bytes, origin: bytes) -> bool:
    """True when ``wire`` is ``origin`` or below it (label-aligned)."""
    if wire == origin:
        return True
    if not wire.endswith(origin):
        return False
    return (len(wire) - len(origin)) in suffix_offsets(wire)


def parent(wire: bytes) -> bytes:
    """The wire name one label up (the root stays the root)."""
    return wire[wire[0] + 1 :] if wire[0] else wire


def tokenize(line: str) -> list[tuple[bytes, bool]]:
    """Split a zone-file line into (token, was_quoted) pairs; ``;`` starts a comment.

    Inside and outside quotes, ``\\X`` is X and ``\\DDD`` is the byte DDD.
    """
    tokens: list[tuple[bytes, bool]] = []
    raw = line.encode("utf-8")
    pos, end = 0, len(raw)
    while pos < end:
        char = raw[pos]
        if char in b" \t\r\n":
            pos += 1
            continue
        if char == ord(";"):
            break
        quoted = char == ord('"')
        if quoted:
            pos += 1
        token = bytearray()
        while True:
            if pos >= end:
                if quoted:
                    raise ValueError("unterminated quoted string")
                break
            char = raw[pos]
            if quoted and char == ord('"'):
                pos += 1
                break
            if not quoted and char in b' \t\r\n;"':
                break
            if char == ord("\\"):
                digits = raw[pos + 1 : pos + 4]
                if len(digits) == 3 and digits.isdigit():
                    if int(digits) > 255:
                        raise ValueError(f"bad escape \\{digits.decode()}")
                    token.append(int(digits))
                    pos += 4
                    continue
                if pos + 1 >= end:
                    raise ValueError("dangling backslash")
                token.append(raw[pos + 1])
                pos += 2
                continue
            token.append(char)
            pos += 1
        tokens.append((bytes(token), quoted))
    return tokens


def resolve_name(text: str, origin: bytes) -> bytes:
    """A zone-file name: ``@`` is the origin, a trailing dot is absolute, else relative."""
    if text == "@":
        return origin
    if text.endswith("."):
        return name_to_wire(text)
    wire = name_to_wire(text)[:-1] + origin
    if len(wire) > 255:
        raise ValueError(f"{text!r} is too long below the origin")
    return wire


def character_strings(data: bytes) -> bytes:
    """``data`` as one or more <character-string>s of at most 255 bytes each."""
    if not data:
        return b"\x00"
    return b"".join(
        bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255)
    )


def parse_record(line: str, origin: bytes, default_ttl: int) -> Record:
    """Parse ``<owner> [<ttl>] [IN] <type> <rdata>`` relative to ``origin``.

    Raises ``ValueError`` saying what is wrong.
    """
    tokens = tokenize(line)
    if len(tokens) < 2:
        raise ValueError("expected '<name> [ttl] <type> <data>'")
    owner_token, owner_quoted = tokens[0]
    if owner_quoted:
        raise ValueError("the owner name must not be quoted")
    owner = resolve_name(owner_token.decode("ascii", "replace"), origin)
    if not is_within(owner, origin):
        raise ValueError(f"{wire_to_text(owner)} is outside the zone {wire_to_text(origin)}")
    ttl = default_ttl
    rest = tokens[1:]
    while rest and not rest[0][1]:
        word = rest[0][0].decode("ascii", "replace")
        if word.isdigit():
            ttl = int(word)
            if ttl > MAX_TTL:
                raise ValueError(f"TTL {ttl} is too large")
        elif word.upper() != "IN":
            break
        rest = rest[1:]
    if not rest:
        raise ValueError("missing record type")
    type_name = rest[0][0].decode("ascii", "replace").upper()
    if type_name not in TYPE_CODES:
        known = ", ".join(sorted(TYPE_CODES))
        raise ValueError(f"unsupported record type {type_name!r} (supported: {known})")
    rtype = TYPE_CODES[type_name]
    rdata = _parse_rdata(rtype, [token for token, _ in rest[1:]], origin)
    return Record(owner, rtype, ttl, rdata)


def _expect(args: list[bytes], count: int, what: str) -> list[str]:
    if len(args) != count:
        raise ValueError(f"expected {what}")
    return [arg.decode("ascii", "replace") for arg in args]


def _uint(text: str, bits: int, what: str) -> int:
    if not text.isdigit() or int(text) >= 1 << bits:
        raise ValueError(f"{what} must be an integer from 0 to {(1 << bits) - 1}")
    return int(text)


def _parse_rdata(rtype: int, args: list[bytes], origin: bytes) -> tuple[RDataPart, ...]:
    if rtype == A:
        (text,) = _expect(args, 1, "an IPv4 address")
        return (ipaddress.IPv4Address(text).packed,)
    if rtype == AAAA:
        (text,) = _expect(args, 1, "an IPv6 address")
        return (ipaddress.IPv6Address(text).packed,)
    if rtype in (CNAME, NS, PTR):
        (text,) = _expect(args, 1, "one domain name")
        return (NameRef(resolve_name(text, origin)),)
    if rtype == MX:
        pref, text = _expect(args, 2, "'<preference> <exchange>'")
        return (
            struct.pack("!H", _uint(pref, 16, "preference")),
            NameRef(resolve_name(text, origin)),
        )
    if rtype == SRV:
        prio, weight, port, text = _expect(args, 4, "'<priority> <weight> <port> <target>'")
        fields = struct.pack(
            "!HHH",
            _uint(prio, 16, "priority"),
            _uint(weight, 16, "weight"),
            _uint(port, 16, "port"),
        )
        # RFC 2782: the SRV target is never compressed.
        return (fields + resolve_name(text, origin),)
    if rtype == TXT:
        if not args:
            raise ValueError("expected at least one string")
        if any(len(arg) > 255 for arg in args):
            raise ValueError("a TXT string is longer than 255 bytes")
        return (b"".join(bytes([len(arg)]) + arg for arg in args),)
    if rtype == CAA:
        if len(args) != 3:
            raise ValueError("expected '<flags> <tag> <value>'")
        flags = _uint(args[0].decode("ascii", "replace"), 8, "flags")
        tag = args[1]
        if not (1 <= len(tag) <= 15 and tag.isalnum() and tag.isascii()):
            raise ValueError("the CAA tag must be 1 to 15 ASCII letters or digits")
        return (bytes([flags, len(tag)]) + tag.lower() + args[2],)
    raise ValueError(f"unsupported record type {rtype}")  # pragma: no cover


def encode_name(name: bytes, out: bytearray, table: dict[bytes, int]) -> None:
    """Append ``name`` to the message ``out``, compressed against ``table``.

    ``table`` maps name suffixes (lowercase wire) to their offsets in ``out``;
    new suffixes written here are added to it.
    """
    pos = 0
    while name[pos]:
        pointer = table.get(name[pos:])
        if pointer is not None:
            out += struct.pack("!H", 0xC000 | pointer)
            return
        if len(out) < 0x3FFF:
            table[name[pos:]] = len(out)
        end = pos + name[pos] + 1
        out += name[pos:end]
        pos = end
    out.append(0)


def encode_record(record: Record, owner: bytes, out: bytearray, table: dict[bytes, int]) -> None:
    """Append ``record`` (owned by ``owner``, which may differ for wildcards) to ``out``."""
    encode_name(owner, out, table)
    out += struct.pack("!HHI", record.rtype, 1, record.ttl)
    length_at = len(out)
    out += b"\x00\x00"
    for part in record.rdata:
        if isinstance(part, NameRef):
            encode_name(part.wire, out, table)
        else:
            out += part
    struct.pack_into("!H", out, length_at, len(out) - length_at - 2)
