"""The zone's records as twisted.names objects: names, zone-file lines, and CAA.

Names are twisted.names' dotted ``bytes``, lowercase, without the trailing dot
(``b""`` is the root). A configured name is checked label by label here, so a
name in the zone never holds a dot inside a label and the dotted form is exact.
Wire encoding is ``twisted.names.dns``'s: this module reads zone-file text into
its record classes, and adds the two it lacks (CAA, an SOA mailbox name) as
``IEncodable``s that plug into its encoder.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import IO

from twisted.names import dns
from twisted.python import util as tputil
from zope.interface import implementer

from csrproxy.names import is_issuer_domain

CAA = 257

TYPE_CODES = {
    "A": dns.A, "NS": dns.NS, "CNAME": dns.CNAME, "PTR": dns.PTR, "MX": dns.MX,
    "TXT": dns.TXT, "AAAA": dns.AAAA, "SRV": dns.SRV, "CAA": CAA,
}  # fmt: skip

MAX_TTL = 2**31 - 1


@implementer(dns.IEncodableRecord)
class Record_CAA(tputil.FancyEqMixin, tputil.FancyStrMixin):  # noqa: N801 (twisted's naming)
    """Certification Authority Authorization (RFC 8659), which twisted.names lacks.

    ``flags`` is the flags octet, ``tag`` the property tag (``b"issue"``) and
    ``value`` the property value as raw bytes.
    """

    TYPE = CAA
    fancybasename = "CAA"
    showAttributes = ("flags", "tag", "value", "ttl")
    compareAttributes = ("flags", "tag", "value", "ttl")

    def __init__(
        self, flags: int = 0, tag: bytes = b"", value: bytes = b"", ttl: int | None = None
    ) -> None:
        self.flags = flags
        self.tag = tag
        self.value = value
        self.ttl = ttl

    def encode(self, strio: IO[bytes], compDict: dict[bytes, int] | None = None) -> None:
        strio.write(struct.pack("!BB", self.flags, len(self.tag)) + self.tag + self.value)

    def decode(self, strio: IO[bytes], length: int | None = None) -> None:
        if length is None:
            raise ValueError("a CAA record needs its RDATA length")
        if length < 2:
            raise EOFError("CAA RDATA shorter than its flags and tag length")
        self.flags, tag_length = struct.unpack("!BB", dns.readPrecisely(strio, 2))
        if tag_length > length - 2:
            # twisted.names reads a record cut short as EOFError: so is a tag past RDATA.
            raise EOFError("CAA tag longer than its RDATA")
        self.tag = dns.readPrecisely(strio, tag_length)
        self.value = dns.readPrecisely(strio, length - 2 - tag_length)

    def __hash__(self) -> int:
        return hash((self.flags, self.tag, self.value))


# twisted.names' Message finds a record class by its type in this table (built from its
# own Record_* classes): with CAA in it, a CAA record a Message decodes is a Record_CAA,
# not an UnknownRecord. Messages are still twisted's; only this RDATA is ours.
dns.Message._recordTypes.setdefault(CAA, Record_CAA)

#: RFC 8657 section 4: a CA that honours CAA may validate only by the methods listed.
CAA_VALIDATION_METHODS = ("dns-01",)


def caa_issuer_value(identity: str, account_uri: str | None) -> bytes:
    """The value of a CAA ``issue``/``issuewild`` record naming ``identity`` (the CA's
    issuer domain name, RFC 8659 4.2), limited to ``account_uri`` when given and to
    dns-01 (RFC 8657): ``b"letsencrypt.org; accounturi=URL; validationmethods=dns-01"``.

    Raises ``ValueError`` for an identity that is not a domain name or a URI that cannot
    be a parameter value (RFC 8659: printable ASCII without ``;``)."""
    if not is_issuer_domain(identity):
        raise ValueError(f"{identity!r} is not a CA's domain name (RFC 8659 4.2)")
    parts = [identity]
    if account_uri is not None:
        if not account_uri or any(not 0x21 <= ord(c) <= 0x7E or c == ";" for c in account_uri):
            raise ValueError(f"{account_uri!r} cannot be a CAA accounturi (RFC 8657 3)")
        parts.append(f"accounturi={account_uri}")
    parts.append("validationmethods=" + ",".join(CAA_VALIDATION_METHODS))
    return "; ".join(parts).encode("ascii")


class Mailbox(dns.Name):
    """An SOA RNAME whose first label is a mailbox's local part, dots and all (RFC 1035 8).

    ``dns.Name`` keeps names dotted, so ``ops.team@example.org`` would become four
    labels; this writes ``ops.team`` as one, then the domain (compressible).
    """

    def __init__(self, local: bytes, domain: bytes) -> None:
        super().__init__(local + b"." + domain)
        self.local = local
        self.domain = dns.Name(domain)

    def encode(self, strio: IO[bytes], compDict: dict[bytes, int] | None = None) -> None:
        strio.write(bytes([len(self.local)]) + self.local)
        self.domain.encode(strio, compDict)


def normalize_name(name: str) -> bytes:
    """The lowercase dotted ``bytes`` form of an ASCII name; a trailing dot is optional.

    Raises ``ValueError`` for empty labels, labels over 63 bytes, names over 255
    bytes in wire form or non-ASCII text (give IDNs in their ``xn--`` form).
    """
    text = name.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        return b""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{name!r} is not ASCII (use the xn-- form)") from None
    for label in raw.split(b"."):
        if not label:
            raise ValueError(f"{name!r} has an empty label")
        if len(label) > 63:
            raise ValueError(f"{name!r} has a label longer than 63 bytes")
    if len(raw) + 2 > 255:
        raise ValueError(f"{name!r} is longer than 255 bytes")
    return raw


def name_text(name: bytes) -> str:
    """The dotted text of a name, without the trailing dot ("" for the root)."""
    return name.decode("ascii", "backslashreplace")


def is_within(name: bytes, origin: bytes) -> bool:
    """True when the lowercase ``name`` is ``origin`` or below it (label-aligned)."""
    return name == origin or not origin or name.endswith(b"." + origin)


def parent(name: bytes) -> bytes:
    """The name one label up (the root stays the root)."""
    return name.partition(b".")[2]


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
        return normalize_name(text)
    name = normalize_name(text) + b"." + origin
    if len(name) + 2 > 255:
        raise ValueError(f"{text!r} is too long below the origin")
    return name


def txt_strings(data: bytes) -> list[bytes]:
    """``data`` as the <character-string>s of one TXT record, at most 255 bytes each."""
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


def parse_record(
    line: str, origin: bytes, default_ttl: int
) -> tuple[bytes, int, int, dns.IEncodableRecord]:
    """Parse ``<owner> [<ttl>] [IN] <type> <rdata>`` relative to ``origin``.

    Returns ``(owner, type, ttl, payload)``, the payload a twisted.names record
    (``dns.Record_A`` ... or :class:`Record_CAA`) carrying ``ttl``. Raises
    ``ValueError`` saying what is wrong.
    """
    tokens = tokenize(line)
    if len(tokens) < 2:
        raise ValueError("expected '<name> [ttl] <type> <data>'")
    owner_token, owner_quoted = tokens[0]
    if owner_quoted:
        raise ValueError("the owner name must not be quoted")
    owner = resolve_name(owner_token.decode("ascii", "replace"), origin)
    if not is_within(owner, origin):
        raise ValueError(f"{name_text(owner)} is outside the zone {name_text(origin)}")
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
    payload = _parse_rdata(rtype, [token for token, _ in rest[1:]], origin, ttl)
    return owner, rtype, ttl, payload


def _expect(args: list[bytes], count: int, what: str) -> list[str]:
    if len(args) != count:
        raise ValueError(f"expected {what}")
    return [arg.decode("ascii", "replace") for arg in args]


def _uint(text: str, bits: int, what: str) -> int:
    if not text.isdigit() or int(text) >= 1 << bits:
        raise ValueError(f"{what} must be an integer from 0 to {(1 << bits) - 1}")
    return int(text)


def _parse_rdata(rtype: int, args: list[bytes], origin: bytes, ttl: int) -> dns.IEncodableRecord:
    if rtype == dns.A:
        (text,) = _expect(args, 1, "an IPv4 address")
        return dns.Record_A(str(ipaddress.IPv4Address(text)), ttl)
    if rtype == dns.AAAA:
        (text,) = _expect(args, 1, "an IPv6 address")
        return dns.Record_AAAA(str(ipaddress.IPv6Address(text)), ttl)
    if rtype in (dns.CNAME, dns.NS, dns.PTR):
        (text,) = _expect(args, 1, "one domain name")
        target = resolve_name(text, origin)
        if rtype == dns.CNAME:
            return dns.Record_CNAME(target, ttl)
        if rtype == dns.NS:
            return dns.Record_NS(target, ttl)
        return dns.Record_PTR(target, ttl)
    if rtype == dns.MX:
        pref, text = _expect(args, 2, "'<preference> <exchange>'")
        return dns.Record_MX(_uint(pref, 16, "preference"), resolve_name(text, origin), ttl)
    if rtype == dns.SRV:
        prio, weight, port, text = _expect(args, 4, "'<priority> <weight> <port> <target>'")
        # twisted.names writes the SRV target uncompressed, as RFC 2782 asks.
        return dns.Record_SRV(
            _uint(prio, 16, "priority"),
            _uint(weight, 16, "weight"),
            _uint(port, 16, "port"),
            resolve_name(text, origin),
            ttl,
        )
    if rtype == dns.TXT:
        if not args:
            raise ValueError("expected at least one string")
        if any(len(arg) > 255 for arg in args):
            raise ValueError("a TXT string is longer than 255 bytes")
        return dns.Record_TXT(*args, ttl=ttl)
    if rtype == CAA:
        if len(args) != 3:
            raise ValueError("expected '<flags> <tag> <value>'")
        flags = _uint(args[0].decode("ascii", "replace"), 8, "flags")
        tag = args[1]
        if not (1 <= len(tag) <= 15 and tag.isalnum() and tag.isascii()):
            raise ValueError("the CAA tag must be 1 to 15 ASCII letters or digits")
        return Record_CAA(flags, tag.lower(), args[2], ttl)
    raise ValueError(f"unsupported record type {rtype}")  # pragma: no cover
