"""DNS messages as the server sees them: a query held to what a query must be, a reply.

Both are ``twisted.names.dns.Message`` subclasses; the decoding and encoding are
twisted's. ``QueryMessage`` adds the checks the stock decoder skips, ``Reply`` the
link to its query and a whole encoding.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from twisted.names import dns

TCP_MAX = 65535
# The largest UDP reply to a query without EDNS (RFC 1035 4.2.1).
UDP_DEFAULT = 512

# The answer cache's key: (lowercase name, type, class, DO bit or None without EDNS).
AnswerKey = tuple[bytes, int, int, bool | None]


class MalformedQuery(ValueError):
    """The packet is not a well-formed DNS query."""


class QueryMessage(dns.Message):
    """A query decoded by ``dns.Message``, held to what a query must be.

    ``dns.Message`` stops quietly where the data ends, ignores trailing bytes,
    follows compression pointers in the question and reads label lengths 64 to
    191 as labels; ``fromStr`` raises :class:`MalformedQuery` (or the decoder's
    own error) for all of these, and for more than one OPT or an OPT not owned
    by the root. After it: ``raw`` is the packet, ``opt`` the query's
    ``_OPTHeader`` (None without EDNS), ``questionEnd`` the offset after the
    question (0 unless there is exactly one), ``limit`` the largest reply the
    transport takes, and ``cacheKey`` the answer-cache key once it is answered
    from the zone. The factory sets ``replyOptions`` (EDNS options its reply's OPT
    carries, encoded), ``memoable`` (False when the reply depends on the client, as a
    server cookie does) and ``rrlExempt`` (a valid server cookie came with it);
    ``bareQuery`` is the packet with its OPT emptied when that OPT held only a COOKIE.
    """

    raw = b""
    opt: dns._OPTHeader | None = None
    questionEnd = 0
    limit = TCP_MAX
    cacheKey: AnswerKey | None = None
    replyOptions = b""
    memoable = True
    rrlExempt = False
    bareQuery = b""

    def lookupRecordType(self, type: int) -> Any:
        # A query's records are never read past the OPT header: RDATA stays bytes, and
        # each record takes exactly its RDLENGTH (and no decoder logs about a bad one).
        return dns.UnknownRecord

    def fromStr(self, str: bytes) -> None:
        self.raw = data = str
        strio = BytesIO(data)
        self.decode(strio)
        found = (len(self.queries), len(self.answers), len(self.authority), len(self.additional))
        if found != struct.unpack_from("!4H", data, 4):
            raise MalformedQuery("the message ends before its last record")
        if strio.tell() != len(data):
            raise MalformedQuery("bytes after the last record")
        if len(self.queries) == 1:
            self.questionEnd = 12 + question_length(data, self.queries[0])
        opts = [record for record in self.additional if record.type == dns.OPT]
        if opts:
            if len(opts) > 1 or opts[0].name.name:
                raise MalformedQuery("more than one OPT, or an OPT not at the root")
            self.opt = dns._OPTHeader.fromRRHeader(opts[0])  # EOFError for bad options


def question_length(data: bytes, query: dns.Query) -> int:
    # The question as twisted encodes it (uncompressed) must be the bytes received: no
    # pointers, no dots inside labels. The answer echoes it byte for byte (0x20).
    out = BytesIO()
    query.encode(out)
    wire = out.getvalue()
    if (
        data[12 : 12 + len(wire)] != wire
        or len(wire) - 4 > 255
        or any(len(label) > 63 for label in query.name.name.split(b"."))
    ):
        raise MalformedQuery("the question name is compressed or malformed")
    return len(wire)


class Reply(dns.Message):
    """A response to ``request``, encoded in full (``maxSize`` 0).

    ``dns.Message`` with a ``maxSize`` cuts the encoded bytes at that size, which
    leaves a broken message; :func:`truncated` cuts a reply to TC, question and OPT.
    """

    def __init__(self, request: QueryMessage, **kwargs: Any) -> None:
        super().__init__(maxSize=0, **kwargs)
        self.request = request
        self.cacheable = request.cacheKey is not None


def truncated(message: Reply) -> Reply:
    """``message`` cut to TC, the question and the OPT (RFC 2181 9: it does not fit, and
    the client asks again over TCP)."""
    cut = Reply(
        message.request,
        id=message.id,
        answer=1,
        opCode=message.opCode,
        auth=message.auth,
        trunc=1,
        recDes=message.recDes,
        checkingDisabled=message.checkingDisabled,
        rCode=message.rCode,
    )
    cut.queries = message.queries
    cut.additional = [record for record in message.additional if record.type == dns.OPT]
    return cut


def reply_limit(opt: dns._OPTHeader | None, tcp: bool, udp_max: int) -> int:
    """The largest reply to a query with ``opt``: ``TCP_MAX`` over TCP, else 512 without
    EDNS and the client's UDP payload size within 512 and our ``udp_max`` with it."""
    if tcp:
        return TCP_MAX
    if opt is None:
        return UDP_DEFAULT
    limit: int = max(UDP_DEFAULT, min(opt.udpPayloadSize, udp_max))
    return limit


def response_to(
    message: QueryMessage,
    rCode: int = dns.OK,
    answers: list[dns.RRHeader] | None = None,
    authority: list[dns.RRHeader] | None = None,
    additional: list[dns.RRHeader] | None = None,
) -> Reply:
    """The response frame to ``message``: QR, the opcode, RD and CD copied, its question,
    the records given, AA when any of them is in the zone's authority."""
    reply = Reply(
        message,
        id=message.id,
        answer=1,
        opCode=message.opCode,
        recDes=message.recDes,
        checkingDisabled=message.checkingDisabled,
        rCode=rCode,
    )
    reply.queries = message.queries[:]
    reply.answers = answers or []
    reply.authority = authority or []
    reply.additional = additional or []
    reply.auth = any(record.auth for record in reply.answers + reply.authority)
    return reply


def with_opt(reply: Reply, opt: dns._OPTHeader, udp_max: int) -> None:
    """Append to ``reply`` the OPT answering the query's ``opt``: our ``udp_max``, the
    reply's extended rcode, the query's DO bit, no options (those are patched in)."""
    # twisted encodes an ``_OPTHeader`` among the RRHeaders of the additional section.
    record: Any = dns._OPTHeader(
        udpPayloadSize=udp_max,
        extendedRCODE=reply.rCode >> 4,
        version=0,
        dnssecOK=opt.dnssecOK,
    )
    reply.additional = [*reply.additional, record]
