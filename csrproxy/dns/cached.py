"""Cached replies: the memo's and the answer cache's entries, built once and patched
byte by byte for each query they answer.

- the memo: the query bytes after the id, lowercased (one table per transport),
  map to the query twisted parsed and the reply sent for it. A hit parses nothing:
  it is used only when the header and everything after the question name are
  the stored query's byte for byte (so only the name's letter case may differ),
  and gets the id and the question's letter case (0x20) patched in; any other
  query with the same key is parsed as a miss.
- the answer cache: (lowercase name, type, class, EDNS and DO) map to the reply
  encoded once by ``dns.Message`` with a lowercase question; the id, RD, CD and
  the question's letter case (0x20) of each query are patched in.

Neither holds EDNS options that depend on the query (NSID, COOKIE): the OPT of a
cached reply is stored empty and last, and each reply gets this query's options
patched into it. A query with a COOKIE option is never memoized (its server cookie
depends on the client's address and the time); a query whose OPT holds only a COOKIE
is memoized as the same query without it, and a hit patches the client's cookie in.
Both also hold the reply's response-rate-limiting account (``rrl.account_of``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping

from twisted.names import dns

from csrproxy.dns.cookies import COOKIE, OPTIONS_ROOM
from csrproxy.dns.messages import UDP_DEFAULT, QueryMessage, Reply, truncated
from csrproxy.dns.rrl import account_of

# Larger replies (TCP only) are encoded afresh each time; with the factory's
# CACHE_ENTRIES this bounds the answer cache to about 20 MB and each memo (key, query,
# reply) to about 25 MB.
CACHE_REPLY_BYTES = 2048
MEMO_QUERY_BYTES = 512

# (rcode, the full reply, the reply when it does not fit: TC, question and OPT only,
# its RRL account)
Entry = tuple[int, bytes, bytes, bytes]
# (rcode, the offset after the question, the query's header after the id, its bytes from
# the question's type on, the reply's header after the id, its bytes after the question,
# the reply's RRL account, whether the query's last record was an OPT without options
# and the reply's is too)
Memo = tuple[int, int, bytes, bytes, bytes, bytes, bytes, bool]

# An OPT's RDATA holding one COOKIE option of 8 bytes (a first query) or 24 (with an
# RFC 9018 server cookie), by option length.
_COOKIE_RDATA = {n: struct.pack("!HHH", n + 4, COOKIE, n) for n in (24, 8)}


def patched(packet: bytes, end: int, header: bytes, rest: bytes) -> bytes:
    """A reply to the query ``packet``: its id, the reply's ``header`` (flags and counts),
    its question (``packet[12:end]``: its letter case), then ``rest``, what followed a
    question equal to this one up to case; owner names compressed against it take this case.
    """
    return b"".join((packet[:2], header, packet[12:end], rest))


def with_options(reply: bytes, options: bytes) -> bytes:
    """``reply`` with ``options`` as the RDATA of its OPT, the last record, empty before."""
    return b"".join((reply[:-2], struct.pack("!H", len(options)), options))


def cookie_stripped(packet: bytes) -> tuple[bytes, bytes] | None:
    """When the last record is an OPT holding only a COOKIE: the packet with that OPT
    empty, and the cookie; else None."""
    size = len(packet)
    for length, rdata in _COOKIE_RDATA.items():
        start = size - length - 15  # the OPT's owner (root), type, class, TTL, RDATA
        if (
            start > 12
            and packet.startswith(rdata, start + 9)
            and packet[start : start + 3] == b"\x00\x00\x29"
        ):
            return packet[: start + 9] + b"\0\0", packet[size - length :]
    return None


def memo_lookup(
    memo: Mapping[bytes, Memo], packet: bytes, strip_cookie: bool
) -> tuple[Memo | None, bytes, bytes | None]:
    """The memo hit for ``packet`` (None: parse it), the query looked up and its cookie.

    With ``strip_cookie``, a miss is looked up again as the same query with an empty OPT
    when its OPT held only a COOKIE (a resolver's usual query); the cookie is then
    returned, to be patched into the reply.
    """
    asked, cookie = packet, None
    hit = memo.get(packet[2:].lower())
    if hit is None and strip_cookie:
        stripped = cookie_stripped(packet)
        if stripped is not None:
            asked, cookie = stripped
            hit = memo.get(asked[2:].lower())
    if hit is not None:
        header, tail, bare = hit[2], hit[3], hit[7]
        # Equal header, type, class and records (the key makes the lengths equal): the
        # same query up to the name's case, parsed alike. Else (a key collision) parse.
        if not (asked.startswith(header, 2) and asked.endswith(tail) and (cookie is None or bare)):
            hit = None
    return hit, asked, cookie


def memo_reply(hit: Memo, packet: bytes, option: bytes, udp: bool) -> bytes | None:
    """The memo's reply ``hit`` patched for ``packet``, with the COOKIE ``option`` (if
    any) in its OPT; None when that option would decide TC over UDP (parse it then)."""
    reply = patched(packet, hit[1], hit[4], hit[5])
    if not option:
        return reply
    # Every limit is at least 512; over that, parse and choose TC as a miss.
    if udp and len(reply) + len(option) > UDP_DEFAULT:
        return None
    return with_options(reply, option)


def memo_of(
    request: QueryMessage, rcode: int, data: bytes, reply: bytes, account: bytes, udp: bool
) -> tuple[bytes, Memo] | None:
    """The memo key and entry for ``reply`` (``data`` with the request's options), or
    None when it is not to be memoized."""
    packet, end = request.raw, request.questionEnd
    # Only well-formed queries (garbage would churn the memo for nothing) whose reply
    # echoes the question at the same offset, where a hit patches in its letter case.
    # A query whose OPT held only a COOKIE is memoized as the same query without it
    # (``bareQuery``), its reply without the cookie: a hit patches the client's in.
    # Only where the cookie did not decide TC (the fast path patches within 512).
    if request.memoable:
        query, rest = packet, reply[end:]
    elif request.bareQuery and (not udp or len(reply) <= UDP_DEFAULT):
        query, rest = request.bareQuery, data[end:]
    else:
        return None
    if not (
        end
        and len(packet) <= MEMO_QUERY_BYTES
        and len(reply) <= CACHE_REPLY_BYTES
        and reply[12:end] == packet[12:end]
    ):
        return None
    bare = (
        request.opt is not None
        and len(request.opt.options) == (0 if request.memoable else 1)
        and request.additional[-1].type == dns.OPT
    )
    return query[2:].lower(), (
        rcode,
        end,
        query[2:12],
        query[end - 4 :],
        reply[2:12],
        rest,
        account,
        bare,
    )


def account_of_reply(message: Reply, wildcard_owner: Callable[[bytes], bytes | None]) -> bytes:
    """The RRL account of ``message``: computed once per answer, then carried by the caches."""
    if message.rCode != dns.OK or not message.queries:
        return account_of(message.rCode, b"", None, None)
    name = message.queries[0].name.name.lower()
    first = message.answers[0].type if message.answers else None
    return account_of(dns.OK, name, first, wildcard_owner(name))


def entry_of(message: Reply, account: bytes) -> Entry:
    """The answer cache's entry for ``message``, with its RRL ``account``."""
    # The same records behind a lowercase question and a zero id, RD and CD clear:
    # the owner names compress against the question, so one entry serves any case.
    canonical = Reply(message.request, answer=1, auth=message.auth, rCode=message.rCode)
    canonical.queries = [
        dns.Query(query.name.name.lower(), query.type, query.cls) for query in message.queries
    ]
    canonical.answers = message.answers
    canonical.authority = message.authority
    canonical.additional = message.additional
    full = canonical.toStr()
    # Cut too when this query's EDNS options may not fit in 512 (patched in later).
    cut = truncated(canonical).toStr() if len(full) > UDP_DEFAULT - OPTIONS_ROOM else full
    return message.rCode, full, cut, account


def served(request: QueryMessage, entry: Entry) -> bytes | None:
    """``entry`` patched for ``request`` (its options not yet in); None if its question
    does not match."""
    full, cut = entry[1], entry[2]
    data = full if len(full) + len(request.replyOptions) <= request.limit else cut
    packet, end = request.raw, request.questionEnd
    name_end = end - 4
    if (
        packet[12:name_end].lower() != data[12:name_end]
        or packet[name_end:end] != data[name_end:end]
    ):
        return None
    flags = bytes((data[2] | packet[2] & 0x01, data[3] | packet[3] & 0x10))  # RD, CD
    return patched(packet, end, flags + data[4:12], data[end:])
