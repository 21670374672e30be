"""Answering DNS queries for one zone: twisted.names' server factory, made authoritative.

``ZoneServerFactory`` subclasses ``twisted.names.server.DNSServerFactory``. Queries
are decoded by ``dns.Message`` (held to what a query must be by
``messages.QueryMessage``) and replies encoded by ``dns.Message``, EDNS through
``dns._OPTHeader``. Where the stock factory answers wrongly for an
authoritative server, an override says so.

Two caches keep the common case cheap; both are dropped whenever the zone's
``version`` changes, and each is cleared when it reaches ``CACHE_ENTRIES``:

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
depends on the client's address and the time).

Both also hold the reply's response-rate-limiting account (``rrl.account_of``), so
a UDP reply from either is checked by the limiter (``rrl``, when given) without
looking at the zone again; TCP replies never are.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.names import dns, server
from twisted.python.failure import Failure

from csrproxy.dns.cookies import (
    COOKIE,
    NSID,
    OPTIONS_ROOM,
    MalformedCookie,
    ServerCookies,
    option_bytes,
)
from csrproxy.dns.limits import TCPLimits
from csrproxy.dns.messages import TCP_MAX, AnswerKey, QueryMessage, Reply
from csrproxy.dns.protocols import DNSStreamProtocol
from csrproxy.dns.rrl import DROP, SLIP, ResponseRateLimiter, account_of, slipped
from csrproxy.dns.transfer import ZoneTransfers
from csrproxy.dns.zone import ChallengeZone, NameNotFound

log = Logger()

UDP_DEFAULT = 512
# The DNS flag day 2020 value: no IP fragmentation on common paths.
UDP_MAX = 1232
# Each cache holds at most this many entries and is cleared when full, so a flood of
# distinct queries costs a refill, never memory.
CACHE_ENTRIES = 8192
# Larger replies (TCP only) are encoded afresh each time; with CACHE_ENTRIES this bounds
# the answer cache to about 20 MB and each memo (key, query, reply) to about 25 MB.
CACHE_REPLY_BYTES = 2048
MEMO_QUERY_BYTES = 512
# Types that are never questions (RFC 6891, 2930, 8945).
META_TYPES = frozenset((0, dns.OPT, dns.TKEY, dns.TSIG))

# (rcode, the full reply, the reply when it does not fit: TC, question and OPT only,
# its RRL account)
Entry = tuple[int, bytes, bytes, bytes]
# (rcode, the offset after the question, the query's header after the id, its bytes from
# the question's type on, the reply's header after the id, its bytes after the question,
# the reply's RRL account, whether the query's last record was an OPT without options
# and the reply's is too)
Memo = tuple[int, int, bytes, bytes, bytes, bytes, bytes, bool]


class ReplyWriter(Protocol):
    """What the factory needs of a protocol: send one reply (``address`` None for TCP)."""

    def writeReply(self, data: bytes, address: Any) -> None: ...


class ZoneServerFactory(server.DNSServerFactory):
    """Answers queries for ``zone`` (a :class:`ChallengeZone`) as its authoritative server.

    The protocols hand every packet to :meth:`packetReceived`; ``on_rcode`` sees
    the rcode of every reply sent. ``udp_max`` is our EDNS UDP payload size.
    TCP connections are tracked in ``connections`` and held to ``tcp``, their caps and
    deadlines (a :class:`TCPLimits`, its defaults unless given). UDP replies pass
    ``rrl`` (a :class:`ResponseRateLimiter`) when given: dropped, sent truncated, or sent.
    An empty NSID option is answered with ``nsid`` when given; COOKIE options are
    answered with server cookies by ``cookies`` (a :class:`ServerCookies`) when given,
    and a reply to a valid server cookie bypasses ``rrl``.
    """

    protocol = DNSStreamProtocol

    def __init__(
        self,
        reactor: Any,
        zone: ChallengeZone,
        on_rcode: Callable[[int], None] | None = None,
        *,
        udp_max: int = UDP_MAX,
        tcp: TCPLimits | None = None,
        rrl: ResponseRateLimiter | None = None,
        nsid: bytes | None = None,
        cookies: ServerCookies | None = None,
        transfers: ZoneTransfers | None = None,
    ) -> None:
        super().__init__(authorities=[zone])
        self.canRecurse = False
        self.reactor = reactor
        self.zone = zone
        self.on_rcode = on_rcode
        self.udp_max = udp_max
        self.tcp = tcp if tcp is not None else TCPLimits(reactor)
        self.rrl = rrl
        self.nsid = nsid
        self.cookies = cookies
        self.transfers = transfers if transfers is not None else ZoneTransfers(reactor, zone, {})
        self.connections: set[Any] = set()  # type: ignore[assignment]
        self._version = zone.version
        self._udp_memo: dict[bytes, Memo] = {}
        self._tcp_memo: dict[bytes, Memo] = {}
        self._answers: dict[AnswerKey, Entry] = {}
        self._crashes = 0

    # -- TCP connections ---------------------------------------------------

    def connectionMade(self, protocol: Any) -> None:
        self.connections.add(protocol)

    def connectionLost(self, protocol: Any) -> None:
        self.connections.discard(protocol)

    # -- from packet to message ---------------------------------------------

    def packetReceived(self, packet: bytes, protocol: ReplyWriter, address: Any) -> None:
        """Answer one query packet; ``address`` is the UDP peer, None over TCP."""
        if self._version != self.zone.version:
            self._forget()
        memo = self._udp_memo if address is not None else self._tcp_memo
        asked = packet
        hit = memo.get(packet[2:].lower())
        cookie = None
        if hit is None and self.cookies is not None:
            # A resolver's usual query: an OPT holding only a COOKIE. Look up the same
            # query with an empty OPT, and patch this client's cookie into its reply.
            stripped = _cookie_stripped(packet)
            if stripped is not None:
                asked, cookie = stripped
                hit = memo.get(asked[2:].lower())
        if hit is not None:
            rcode, end, header, tail, reply_header, reply_rest, account, bare = hit
            # Equal header, type, class and records (the key makes the lengths equal): the
            # same query up to the name's case, parsed alike. Else (a key collision) parse.
            if asked.startswith(header, 2) and asked.endswith(tail) and (cookie is None or bare):
                reply = _patched(packet, end, reply_header, reply_rest)
                exempt = False
                if cookie is not None:
                    assert self.cookies is not None
                    data, exempt = self.cookies.answer(cookie, _host(protocol, address))
                    option = option_bytes(COOKIE, data)
                    # Every limit is at least 512; over that, parse and choose TC as a miss.
                    if address is None or len(reply) + len(option) <= UDP_DEFAULT:
                        reply = b"".join((reply[:-2], struct.pack("!H", len(option)), option))
                    else:
                        hit = None
                if hit is not None:
                    if address is not None and self.rrl is not None and not exempt:
                        decision = self.rrl.check(address[0], account)
                        if decision == DROP:
                            return
                        if decision == SLIP:
                            reply = slipped(reply, end)
                    if self.on_rcode is not None:
                        self.on_rcode(rcode)
                    protocol.writeReply(reply, address)
                    return
        if len(packet) < 12:
            return  # not even a header: nobody to answer
        message = QueryMessage()
        if cookie is not None:
            message.bareQuery = asked
        try:
            message.fromStr(packet)
        except Exception:
            # twisted read the header before it gave up; answer FORMERR from it, and
            # log nothing: any peer can send garbage.
            if not message.answer:
                self.sendReply(protocol, self._error(message, dns.EFORMAT, False), address)
            return
        if address is None:
            message.limit = TCP_MAX
        elif message.opt is None:
            message.limit = UDP_DEFAULT
        else:
            message.limit = max(UDP_DEFAULT, min(message.opt.udpPayloadSize, self.udp_max))
        try:
            self.messageReceived(message, protocol, address)
        except Exception:
            self._crashed(Failure())

    def _forget(self) -> None:
        self._udp_memo.clear()
        self._tcp_memo.clear()
        self._answers.clear()
        self._version = self.zone.version

    # -- DNSServerFactory overrides -------------------------------------------

    def messageReceived(self, message: Any, proto: Any, address: Any = None) -> None:
        """Dispatch a decoded query, in the order of the checks a query must pass.

        Stock: answers responses too, lets any opcode but QUERY reply with the query
        itself (QR clear), ignores EDNS versions, and sends every question to the
        resolver. Here: responses are never answered (no reflection loops), other
        opcodes get NOTIMP, EDNS version >= 1 BADVERS, QDCOUNT != 1 and meta types
        FORMERR, AXFR goes to ``transfers`` (TSIG, configured secondaries only) as does a
        TSIG-signed SOA query from a secondary, ``allowQuery`` decides REFUSED, then
        records in the answer or authority section are FORMERR (after the transfer check,
        so IXFR with its SOA is REFUSED), MAILA/MAILB NOTIMP, and the rest is a query for the zone.
        """
        if message.answer:
            return
        if message.opCode != dns.OP_QUERY:
            self.handleOther(message, proto, address)
            return
        if message.opt is not None and message.opt.version != 0:
            # RFC 6891 6.1.3: BADVERS (16) lives in the OPT's extended rcode.
            self.sendReply(proto, self._error(message, dns.EBADVERSION), address)
            return
        if (
            message.opt is not None
            and message.opt.options
            and not self._edns_options(message, proto, address)
        ):
            # RFC 7873 5.2.2: a COOKIE option of a forbidden length.
            self.sendReply(proto, self._error(message, dns.EFORMAT), address)
            return
        if len(message.queries) != 1:
            self.sendReply(proto, self._error(message, dns.EFORMAT, False), address)
            return
        query = message.queries[0]
        if query.type in META_TYPES:
            self.sendReply(proto, self._error(message, dns.EFORMAT), address)
        elif query.type == dns.AXFR and query.cls == dns.IN:
            message.memoable = False
            self._transfer(message, proto, address)
        elif (
            query.type == dns.SOA
            and query.cls == dns.IN
            and message.additional
            and message.additional[-1].type == dns.TSIG
            and self._signed_soa(message, proto, address)
        ):
            return  # a secondary's refresh check, answered signed
        elif not self.allowQuery(message, proto, address):
            self.sendReply(proto, self._error(message, dns.EREFUSED), address)
        elif message.answers or message.authority:
            self.sendReply(proto, self._error(message, dns.EFORMAT), address)
        elif query.type in (dns.MAILA, dns.MAILB):
            self.sendReply(proto, self._error(message, dns.ENOTIMP), address)
        else:
            self.handleQuery(message, proto, address)

    def _transfer(self, message: QueryMessage, proto: Any, address: Any) -> None:
        # AXFR (``transfer.ZoneTransfers``): the messages to send, or REFUSED.
        reply = self._responseFromMessage(message, dns.OK)
        reply.cacheable = False
        packets = self.transfers.answer(message, reply, _host(proto, address), address is None)
        if packets is None:
            self.sendReply(proto, self._error(message, dns.EREFUSED), address)
            return
        self._write_signed(packets, proto, address)

    def _signed_soa(self, message: QueryMessage, proto: Any, address: Any) -> bool:
        # A secondary's signed refresh check gets a signed SOA; False: answer as usual.
        reply = self._responseFromMessage(message, dns.OK)
        packets = self.transfers.soa(message, reply, _host(proto, address))
        if packets is None:
            return False
        message.memoable = False
        self._write_signed(packets, proto, address)
        return True

    def _write_signed(self, packets: tuple[int, list[bytes]], proto: Any, address: Any) -> None:
        # Signed messages go out as they are: neither cached nor rate limited (the peer
        # is a configured secondary, and a TSIG reply must not be patched).
        rcode, datas = packets
        if self.on_rcode is not None:
            self.on_rcode(rcode)
        for data in datas:
            proto.writeReply(data, address)

    def _edns_options(self, message: QueryMessage, proto: Any, address: Any) -> bool:
        """Set the reply's NSID and COOKIE options for ``message``; False if malformed."""
        out = []
        assert message.opt is not None
        cookie_seen = False
        for option in message.opt.options:
            if option.code == NSID and self.nsid is not None and not option.data:
                out.append(option_bytes(NSID, self.nsid))
            elif option.code == COOKIE and self.cookies is not None and not cookie_seen:
                cookie_seen = True
                try:
                    data, valid = self.cookies.answer(option.data, _host(proto, address))
                except MalformedCookie:
                    return False
                out.append(option_bytes(COOKIE, data))
                message.memoable = False
                message.rrlExempt = valid
        message.replyOptions = b"".join(out)
        return True

    def allowQuery(self, message: Any, protocol: Any, address: Any) -> bool:
        """REFUSED for classes but IN and ANY, names outside the zone, IXFR and AXFR but
        the ``transfers`` answer.

        Stock allows anything with a question, so out-of-zone names got NXDOMAIN and
        AXFR the whole zone.
        """
        query = message.queries[0]
        return (
            query.cls in (dns.IN, dns.ANY)
            and query.type not in (dns.AXFR, dns.IXFR)
            and self.zone.contains(query.name.name)
        )

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> Any:
        """Serve from the answer cache, or ask the zone as stock does and cache its answer.

        The zone is asked directly: the stock ``ResolverChain`` drops the class and
        logs every query of a type it has no lookup method for (CAA, HTTPS...).
        """
        query = message.queries[0]
        key = (query.name.name.lower(), query.type, query.cls, _do_bit(message.opt))
        entry = self._answers.get(key)
        if entry is not None and self._serve(message, protocol, address, entry):
            return None
        message.cacheKey = key
        return (
            self.zone.query(query)
            .addCallback(self.gotResolverResponse, protocol, message, address)
            .addErrback(self.gotResolverError, protocol, message, address)
            .addErrback(self._crashed)
        )

    def handleOther(self, message: Any, protocol: Any, address: Any) -> None:
        """NOTIMP for every opcode but QUERY. Stock replies with the query itself (QR 0)."""
        self.sendReply(protocol, self._error(message, dns.ENOTIMP), address)

    def gotResolverError(self, failure: Failure, protocol: Any, message: Any, address: Any) -> None:
        """NXDOMAIN with AA and the SOA; REFUSED outside the zone; else SERVFAIL.

        Stock answers NXDOMAIN without AA or SOA, for names outside the zone too.
        """
        if failure.check(NameNotFound):
            missing: NameNotFound = failure.value  # type: ignore[assignment]
            reply = self._responseFromMessage(
                message, dns.ENAME, missing.answers, missing.authority
            )
        elif failure.check(dns.DomainError):
            reply = self._error(message, dns.EREFUSED)
        else:
            self._crashed(failure)
            reply = self._error(message, dns.ESERVER)
        self.sendReply(protocol, reply, address)

    def _responseFromMessage(
        self,
        message: Any,
        rCode: int = dns.OK,
        answers: list[dns.RRHeader] | None = None,
        authority: list[dns.RRHeader] | None = None,
        additional: list[dns.RRHeader] | None = None,
    ) -> Reply:
        """The response frame: QR, the opcode, RD and CD copied, AA with in-zone records.

        Stock copies neither RD nor CD and sets AA only for positive answers.
        """
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

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:
        """Encode with ``dns.Message``, with the OPT echoed and TC when it does not fit.

        Stock encodes with twisted's ``maxSize`` (which cuts bytes) or no limit at all.
        An answer from the zone is encoded once with a lowercase question, cached,
        and patched for this query; anything else is encoded as it stands.
        """
        request: QueryMessage = message.request
        if request.opt is not None:
            message.additional = [
                *message.additional,
                dns._OPTHeader(
                    udpPayloadSize=self.udp_max,
                    extendedRCODE=message.rCode >> 4,
                    version=0,
                    dnssecOK=request.opt.dnssecOK,
                ),
            ]
        if message.cacheable and request.cacheKey is not None:
            entry = self._entry(message)
            if len(entry[1]) <= CACHE_REPLY_BYTES:
                if len(self._answers) >= CACHE_ENTRIES:
                    self._answers.clear()
                self._answers[request.cacheKey] = entry
            if self._serve(request, protocol, address, entry):
                return
        full = message.toStr()
        if len(full) + len(request.replyOptions) > request.limit:
            full = _truncated(message).toStr()
        self._send(request, protocol, address, message.rCode, full, self._account(message))

    # -- building and sending replies -------------------------------------------

    def _error(self, message: QueryMessage, rcode: int, question: bool = True) -> Reply:
        reply = self._responseFromMessage(message, rcode)
        reply.cacheable = False
        if not question:
            reply.queries = []
        return reply

    def _entry(self, message: Reply) -> Entry:
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
        cut = _truncated(canonical).toStr() if len(full) > UDP_DEFAULT - OPTIONS_ROOM else full
        return message.rCode, full, cut, self._account(message)

    def _account(self, message: Reply) -> bytes:
        # The RRL account: computed once per answer, then carried by the caches.
        if message.rCode != dns.OK or not message.queries:
            return account_of(message.rCode, b"", None, None)
        name = message.queries[0].name.name.lower()
        first = message.answers[0].type if message.answers else None
        return account_of(dns.OK, name, first, self.zone.wildcard_owner(name))

    def _serve(self, request: QueryMessage, protocol: Any, address: Any, entry: Entry) -> bool:
        """Send ``entry`` patched for ``request``; False if its question does not match."""
        rcode, full, cut, account = entry
        data = full if len(full) + len(request.replyOptions) <= request.limit else cut
        packet, end = request.raw, request.questionEnd
        name_end = end - 4
        if (
            packet[12:name_end].lower() != data[12:name_end]
            or packet[name_end:end] != data[name_end:end]
        ):
            return False
        flags = bytes((data[2] | packet[2] & 0x01, data[3] | packet[3] & 0x10))  # RD, CD
        reply = _patched(packet, end, flags + data[4:12], data[end:])
        self._send(request, protocol, address, rcode, reply, account)
        return True

    def _send(
        self,
        request: QueryMessage,
        protocol: Any,
        address: Any,
        rcode: int,
        data: bytes,
        account: bytes,
    ) -> None:
        packet, end = request.raw, request.questionEnd
        options = request.replyOptions
        reply = data
        if options:
            # Our OPT is the last record, its RDATA empty (RDLENGTH the last two bytes).
            reply = b"".join((data[:-2], struct.pack("!H", len(options)), options))
        # Only well-formed queries (garbage would churn the memo for nothing) whose reply
        # echoes the question at the same offset, where a hit patches in its letter case.
        # A query whose OPT held only a COOKIE is memoized as the same query without it
        # (``bareQuery``), its reply without the cookie: a hit patches the client's in.
        # Only where the cookie did not decide TC (the fast path patches within 512).
        if request.memoable:
            query, rest = packet, reply[end:]
        elif request.bareQuery and (address is None or len(reply) <= UDP_DEFAULT):
            query, rest = request.bareQuery, data[end:]
        else:
            query = b""
        if (
            end
            and query
            and len(packet) <= MEMO_QUERY_BYTES
            and len(reply) <= CACHE_REPLY_BYTES
            and reply[12:end] == packet[12:end]
        ):
            memo = self._udp_memo if address is not None else self._tcp_memo
            if len(memo) >= CACHE_ENTRIES:
                memo.clear()
            memo[query[2:].lower()] = (
                rcode,
                end,
                query[2:12],
                query[end - 4 :],
                reply[2:12],
                rest,
                account,
                request.opt is not None
                and len(request.opt.options) == (0 if request.memoable else 1)
                and request.additional[-1].type == dns.OPT,
            )
        data = reply
        if address is not None and self.rrl is not None and not request.rrlExempt:
            decision = self.rrl.check(address[0], account)
            if decision == DROP:
                return
            if decision == SLIP:
                data = slipped(data, end)
        if self.on_rcode is not None:
            self.on_rcode(rcode)
        protocol.writeReply(data, address)

    def _crashed(self, reason: Failure) -> None:
        self._crashes += 1
        if self._crashes & (self._crashes - 1) == 0:  # 1, 2, 4, 8...: a bug must not flood
            log.failure(
                "answering a DNS query failed ({count} so far)", reason, count=self._crashes
            )


def _patched(packet: bytes, end: int, header: bytes, rest: bytes) -> bytes:
    # A reply to this query: its id, the reply's ``header`` (flags and counts), this query's
    # question (packet[12:end]: its letter case), then ``rest``, what followed a question
    # equal to this one up to case; owner names compressed against it take this case.
    return b"".join((packet[:2], header, packet[12:end], rest))


# An OPT's RDATA holding one COOKIE option of 8 bytes (a first query) or 24 (with an
# RFC 9018 server cookie), by option length.
_COOKIE_RDATA = {n: struct.pack("!HHH", n + 4, COOKIE, n) for n in (24, 8)}


def _cookie_stripped(packet: bytes) -> tuple[bytes, bytes] | None:
    # When the last record is such an OPT: the packet with it empty, and the cookie.
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


def _host(protocol: Any, address: Any) -> str:
    # The client's address: the UDP peer, or the TCP connection's.
    if address is not None:
        return str(address[0])
    transport = getattr(protocol, "transport", None)
    peer = transport.getPeer() if transport is not None else None
    return str(getattr(peer, "host", ""))


def _do_bit(opt: dns._OPTHeader | None) -> bool | None:
    return None if opt is None else bool(opt.dnssecOK)


def _truncated(message: Reply) -> Reply:
    # RFC 2181 9: it does not fit, so send only TC, the question and the OPT; the client
    # asks again over TCP.
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
