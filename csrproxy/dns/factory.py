"""Answering DNS queries for our zones: twisted.names' server factory, made authoritative.

``ZoneServerFactory`` subclasses ``twisted.names.server.DNSServerFactory``. Queries
are decoded by ``dns.Message`` (held to what a query must be by
``messages.QueryMessage``) and replies encoded by ``dns.Message``, EDNS through
``dns._OPTHeader``. Where the stock factory answers wrongly for an
authoritative server, an override says so.

Two caches keep the common case cheap (``cached``: a memo of query bytes, and an
answer cache); both are dropped whenever any zone's ``version`` changes, and each is
cleared when it reaches ``CACHE_ENTRIES``. Both also hold the reply's
response-rate-limiting account, so a UDP reply from either is checked by the limiter
(``rrl``, when given) without looking at the zone again; TCP replies never are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.names import dns, server
from twisted.python.failure import Failure

from csrproxy.dns.answered import AnswerLog
from csrproxy.dns.cached import (
    CACHE_REPLY_BYTES,
    Entry,
    Memo,
    account_of_reply,
    entry_of,
    memo_lookup,
    memo_of,
    memo_reply,
    served,
    with_options,
)
from csrproxy.dns.cookies import BADCOOKIE, MalformedCookie, ServerCookies, reply_options
from csrproxy.dns.limits import TCPLimits
from csrproxy.dns.messages import (
    AnswerKey,
    QueryMessage,
    Reply,
    reply_limit,
    response_to,
    truncated,
    with_opt,
)
from csrproxy.dns.protocols import DNSStreamProtocol, ReplyWriter, peer_host
from csrproxy.dns.rrl import DROP, SLIP, ResponseRateLimiter, slipped
from csrproxy.dns.transfer import ZoneTransfers
from csrproxy.dns.zone import ChallengeZone, NameNotFound
from csrproxy.dns.zones import Zones

log = Logger()

# The DNS flag day 2020 value: no IP fragmentation on common paths.
UDP_MAX = 1232
# Each cache holds at most this many entries and is cleared when full, so a flood of
# distinct queries costs a refill, never memory.
CACHE_ENTRIES = 8192
# Types that are never questions (RFC 6891, 2930, 8945).
META_TYPES = frozenset((0, dns.OPT, dns.TKEY, dns.TSIG))


class ZoneServerFactory(server.DNSServerFactory):
    """Answers queries for ``zone`` (a :class:`ChallengeZone`, or the :class:`Zones` of
    several, each answered by its own rules) as its authoritative server.

    The protocols hand every packet to :meth:`packetReceived`; ``on_rcode`` sees
    the rcode of every reply sent. ``udp_max`` is our EDNS UDP payload size.
    TCP connections are tracked in ``connections`` and held to ``tcp``, their caps and
    deadlines (a :class:`TCPLimits`, its defaults unless given). UDP replies pass
    ``rrl`` (a :class:`ResponseRateLimiter`) when given: dropped, sent truncated, or sent.
    An empty NSID option is answered with ``nsid`` when given; COOKIE options are
    answered with server cookies by ``cookies`` (a :class:`ServerCookies`) when given,
    and a reply to a valid server cookie bypasses ``rrl``. With ``require_cookies``, a UDP
    query with a COOKIE but no valid server cookie is answered BADCOOKIE (RFC 7873 5.2.3,
    5.2.4) with a fresh one; queries without a COOKIE and TCP queries are answered.
    Every reply sent for a challenge name is noted in ``answer_log`` when given.
    """

    protocol = DNSStreamProtocol

    def __init__(
        self,
        reactor: Any,
        zone: ChallengeZone | Zones,
        on_rcode: Callable[[int], None] | None = None,
        *,
        udp_max: int = UDP_MAX,
        tcp: TCPLimits | None = None,
        rrl: ResponseRateLimiter | None = None,
        nsid: bytes | None = None,
        cookies: ServerCookies | None = None,
        require_cookies: bool = False,
        transfers: ZoneTransfers | None = None,
        answer_log: AnswerLog | None = None,
    ) -> None:
        self.zones = Zones.of(zone)
        super().__init__(authorities=list(self.zones))
        self.canRecurse = False
        self.reactor = reactor
        self.zone = zone
        self.on_rcode = on_rcode
        self.udp_max = udp_max
        self.tcp = tcp if tcp is not None else TCPLimits(reactor)
        self.rrl = rrl
        self.nsid = nsid
        self.cookies = cookies
        self.require_cookies = require_cookies
        self.transfers = (
            transfers if transfers is not None else ZoneTransfers(reactor, self.zones, {})
        )
        self.answer_log = answer_log
        self.connections: set[Any] = set()  # type: ignore[assignment]
        self._version = self.zones.version
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
        if self._version != self.zones.version:
            self._forget()
        memo = self._udp_memo if address is not None else self._tcp_memo
        hit, asked, cookie = memo_lookup(memo, packet, self.cookies is not None)
        if hit is not None:
            rcode, end, account = hit[0], hit[1], hit[6]
            exempt, option, badcookie = False, b"", False
            if cookie is not None:
                assert self.cookies is not None
                option, exempt = self.cookies.option(cookie, peer_host(protocol, address))
                badcookie = not exempt and self.require_cookies and address is not None
            # BADCOOKIE is parsed and answered below.
            reply = None if badcookie else memo_reply(hit, packet, option, address is not None)
            if reply is not None:
                self._deliver(protocol, address, rcode, reply, account, end, exempt)
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
        message.limit = reply_limit(message.opt, address is None, self.udp_max)
        try:
            self.messageReceived(message, protocol, address)
        except Exception:
            self._crashed(Failure())

    def _forget(self) -> None:
        self._udp_memo.clear()
        self._tcp_memo.clear()
        self._answers.clear()
        self._version = self.zones.version

    # -- DNSServerFactory overrides -------------------------------------------

    def messageReceived(self, message: Any, proto: Any, address: Any = None) -> None:
        """Dispatch a decoded query, in the order of the checks a query must pass.

        Stock: answers responses too, lets any opcode but QUERY reply with the query
        itself (QR clear), ignores EDNS versions, and sends every question to the
        resolver. Here: responses are never answered (no reflection loops), other
        opcodes get NOTIMP, EDNS version >= 1 BADVERS, QDCOUNT != 1 and meta types
        FORMERR, AXFR and IXFR go to ``transfers`` (TSIG, configured secondaries only;
        REFUSED when it does not answer) as does a TSIG-signed SOA query from a secondary,
        ``allowQuery`` decides REFUSED, then records in the answer or authority section
        are FORMERR (after the transfer check, so IXFR may carry its SOA), MAILA/MAILB
        NOTIMP, and the rest is a query for the zone.
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
        if message.opt is not None and message.opt.options:
            # RFC 7873: FORMERR for a COOKIE of a forbidden length (5.2.2), BADCOOKIE
            # when required and no valid server cookie came (5.2.3, 5.2.4).
            rcode = self._edns_options(message, proto, address)
            if rcode:
                self.sendReply(proto, self._error(message, rcode), address)
                return
        if len(message.queries) != 1:
            self.sendReply(proto, self._error(message, dns.EFORMAT, False), address)
            return
        query = message.queries[0]
        if query.type in META_TYPES:
            self.sendReply(proto, self._error(message, dns.EFORMAT), address)
        elif query.type in (dns.AXFR, dns.IXFR) and query.cls == dns.IN:
            message.memoable = False
            if not self._signed(message, proto, address):
                self.sendReply(proto, self._error(message, dns.EREFUSED), address)
        elif (
            query.type == dns.SOA
            and query.cls == dns.IN
            and message.additional
            and message.additional[-1].type == dns.TSIG
            and self._signed(message, proto, address)
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

    def _signed(self, message: QueryMessage, proto: Any, address: Any) -> bool:
        # AXFR, IXFR, or a secondary's signed SOA query (its refresh check), answered by
        # ``transfers``; False: not answered (a transfer is then REFUSED, SOA answered as
        # usual).
        frame = self._error(message, dns.OK)
        host = peer_host(proto, address)
        if message.queries[0].type in (dns.AXFR, dns.IXFR):
            packets = self.transfers.answer(message, frame, host, address is None)
        else:
            packets = self.transfers.soa(message, frame, host)
        if packets is None:
            return False
        message.memoable = False
        # Signed messages go out as they are: neither cached nor rate limited (the peer
        # is a configured secondary, and a TSIG reply must not be patched).
        if self.on_rcode is not None:
            self.on_rcode(packets[0])
        for data in packets[1]:
            proto.writeReply(data, address)
        return True

    def _edns_options(self, message: QueryMessage, proto: Any, address: Any) -> int:
        """Set the reply's NSID and COOKIE options for ``message``; the rcode answering it
        instead (FORMERR: a malformed COOKIE; BADCOOKIE: required over UDP), else 0."""
        assert message.opt is not None
        try:
            message.replyOptions, valid = reply_options(
                message.opt.options, self.nsid, self.cookies, peer_host(proto, address)
            )
        except MalformedCookie:
            return dns.EFORMAT
        if valid is not None:
            message.memoable = False
            message.rrlExempt = valid
            if not valid and self.require_cookies and address is not None:
                message.bareQuery = b""  # its BADCOOKIE answers no query without a cookie
                return BADCOOKIE
        return dns.OK

    def allowQuery(self, message: Any, protocol: Any, address: Any) -> bool:
        """REFUSED for classes but IN and ANY, names outside every zone, and AXFR and IXFR
        (those in class IN that ``transfers`` answers never get here).

        Stock allows anything with a question, so out-of-zone names got NXDOMAIN and
        AXFR the whole zone.
        """
        query = message.queries[0]
        return (
            query.cls in (dns.IN, dns.ANY)
            and query.type not in (dns.AXFR, dns.IXFR)
            and self.zones.contains(query.name.name)
        )

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> Any:
        """Serve from the answer cache, or ask the name's zone as stock does and cache its
        answer.

        The zone is asked directly: the stock ``ResolverChain`` drops the class and
        logs every query of a type it has no lookup method for (CAA, HTTPS...).
        """
        query = message.queries[0]
        dnssec = None if message.opt is None else bool(message.opt.dnssecOK)
        key = (query.name.name.lower(), query.type, query.cls, dnssec)
        entry = self._answers.get(key)
        if entry is not None and self._serve(message, protocol, address, entry):
            return None
        message.cacheKey = key
        return (
            self.zones.query(query)
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
        return response_to(message, rCode, answers, authority, additional)

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:
        """Encode with ``dns.Message``, with the OPT echoed and TC when it does not fit.

        Stock encodes with twisted's ``maxSize`` (which cuts bytes) or no limit at all.
        An answer from the zone is encoded once with a lowercase question, cached,
        and patched for this query; anything else is encoded as it stands.
        """
        request: QueryMessage = message.request
        if request.opt is not None:
            with_opt(message, request.opt, self.udp_max)
        if message.cacheable and request.cacheKey is not None:
            entry = entry_of(message, account_of_reply(message, self.zones.wildcard_owner))
            if len(entry[1]) <= CACHE_REPLY_BYTES:
                if len(self._answers) >= CACHE_ENTRIES:
                    self._answers.clear()
                self._answers[request.cacheKey] = entry
            if self._serve(request, protocol, address, entry):
                return
        full = message.toStr()
        if len(full) + len(request.replyOptions) > request.limit:
            full = truncated(message).toStr()
        account = account_of_reply(message, self.zones.wildcard_owner)
        self._send(request, protocol, address, message.rCode, full, account)

    # -- building and sending replies -------------------------------------------

    def _error(self, message: QueryMessage, rcode: int, question: bool = True) -> Reply:
        reply = self._responseFromMessage(message, rcode)
        reply.cacheable = False
        if not question:
            reply.queries = []
        return reply

    def _serve(self, request: QueryMessage, protocol: Any, address: Any, entry: Entry) -> bool:
        """Send ``entry`` patched for ``request``; False if its question does not match."""
        reply = served(request, entry)
        if reply is None:
            return False
        self._send(request, protocol, address, entry[0], reply, entry[3])
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
        # Our OPT is the last record, its RDATA empty: this query's options go there.
        reply = with_options(data, request.replyOptions) if request.replyOptions else data
        memoized = memo_of(request, rcode, data, reply, account, address is not None)
        if memoized is not None:
            memo = self._udp_memo if address is not None else self._tcp_memo
            if len(memo) >= CACHE_ENTRIES:
                memo.clear()
            memo[memoized[0]] = memoized[1]
        self._deliver(
            protocol, address, rcode, reply, account, request.questionEnd, request.rrlExempt
        )

    def _deliver(
        self,
        protocol: Any,
        address: Any,
        rcode: int,
        data: bytes,
        account: bytes,
        end: int,
        exempt: bool,
    ) -> None:
        # UDP replies pass the rate limiter unless ``exempt`` (a valid server cookie).
        if address is not None and self.rrl is not None and not exempt:
            decision = self.rrl.check(address[0], account)
            if decision == DROP:
                return
            if decision == SLIP:
                data = slipped(data, end)
        if self.answer_log is not None and rcode in (dns.OK, dns.ENAME):
            # What a cache may keep: answers and NXDOMAIN (not REFUSED outside our zones).
            self.answer_log.answered_reply(data)
        if self.on_rcode is not None:
            self.on_rcode(rcode)
        protocol.writeReply(data, address)

    def _crashed(self, reason: Failure) -> None:
        self._crashes += 1
        if self._crashes & (self._crashes - 1) == 0:  # 1, 2, 4, 8...: a bug must not flood
            log.failure(
                "answering a DNS query failed ({count} so far)", reason, count=self._crashes
            )
