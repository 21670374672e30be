"""NSID (RFC 5001) and DNS cookies (RFC 7873, RFC 9018 server cookies): answered,
checked, refreshed, never carried to another client by the caches, and a valid server
cookie bypassing response rate limiting."""

from __future__ import annotations

import struct
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.dns.cookies import (
    COOKIE,
    DEFAULT_ROTATION,
    MAX_AGE,
    MAX_AHEAD,
    MIN_ROTATION,
    NSID,
    MalformedCookie,
    ServerCookies,
    nsid_bytes,
)
from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.rrl import ResponseRateLimiter
from csrproxy.dns.zone import ChallengeZone
from csrproxy.testing.dns import ReplyRecorder

ORIGIN = "go.example.test"
CHALLENGE = "_acme-challenge.demo." + ORIGIN
SECRET = bytes(range(16))
CLIENT = b"\x01\x02\x03\x04\x05\x06\x07\x08"
OTHER = b"\x11\x12\x13\x14\x15\x16\x17\x18"
# Clock() starts at 0; a real-looking epoch keeps the timestamps ordinary.
START = 1_800_000_000.0


def make_zone() -> ChallengeZone:
    zone = ChallengeZone(
        ORIGIN, ["ns1." + ORIGIN], ["@ A 127.0.0.1", "* A 127.0.0.1"],
        serial=1_000,
        clock=lambda: 2_000.0,
    )
    zone.add_txt(CHALLENGE, "token")
    return zone


def query(
    name: str = CHALLENGE, rdtype: str = "TXT", cookie: bytes | None = None, nsid: bool = False
) -> bytes:
    options: list[dns.edns.Option] = []
    if cookie is not None:
        options.append(dns.edns.GenericOption(dns.edns.OptionType.COOKIE, cookie))
    if nsid:
        options.append(dns.edns.GenericOption(dns.edns.OptionType.NSID, b""))
    wire: bytes = dns.message.make_query(name, rdtype, use_edns=0, options=options).to_wire()
    return wire


def options_of(reply: bytes) -> dict[int, bytes]:
    message = dns.message.from_wire(reply)
    return {int(option.otype): option.to_wire() for option in message.options}


class Peer:
    def __init__(self, host: str) -> None:
        self.host = host


class Transport:
    def __init__(self, host: str) -> None:
        self.peer = Peer(host)

    def getPeer(self) -> Peer:
        return self.peer


class TCPRecorder(ReplyRecorder):
    """A TCP protocol double: its transport's peer is ``host``."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.transport = Transport(host)


class Server:
    def __init__(
        self,
        nsid: bytes | None = None,
        cookies: bool = True,
        require: bool = False,
        **limits: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.rrl = ResponseRateLimiter(self.clock, slip=0, **limits) if limits else None
        self.rcodes: list[int] = []
        self.factory = ZoneServerFactory(
            self.clock,
            make_zone(),
            self.rcodes.append,
            rrl=self.rrl,
            nsid=nsid,
            cookies=ServerCookies(SECRET, self.clock.seconds) if cookies else None,
            require_cookies=require,
        )

    def ask(self, packet: bytes, host: str = "192.0.2.1", tcp: bool = False) -> bytes | None:
        recorder = TCPRecorder(host) if tcp else ReplyRecorder()
        self.factory.packetReceived(packet, recorder, None if tcp else (host, 5353))
        if not recorder.replies:
            return None
        ((data, _),) = recorder.replies
        return data

    def cookie(self, packet: bytes, host: str = "192.0.2.1", tcp: bool = False) -> bytes:
        reply = self.ask(packet, host, tcp)
        assert reply is not None
        return options_of(reply)[COOKIE]


class NSIDTests(SynchronousTestCase):
    def test_answered_when_configured_and_asked(self) -> None:
        server = Server(nsid=b"ns1")
        for tcp in (False, True):
            for _ in range(2):  # the second from the caches
                reply = server.ask(query(nsid=True), tcp=tcp)
                assert reply is not None
                self.assertEqual(options_of(reply), {NSID: b"ns1"})
                self.assertEqual(dns.message.from_wire(reply).answer[0].to_text()[-7:], '"token"')

    def test_not_asked_not_sent(self) -> None:
        server = Server(nsid=b"ns1")
        reply = server.ask(query(nsid=True))
        reply = server.ask(query())
        assert reply is not None
        self.assertEqual(options_of(reply), {})

    def test_not_configured_not_sent(self) -> None:
        reply = Server().ask(query(nsid=True))
        assert reply is not None
        self.assertEqual(options_of(reply), {})

    def test_hex_or_text(self) -> None:
        self.assertEqual(nsid_bytes("ns1"), b"ns1")
        self.assertEqual(nsid_bytes("0x6e7331"), b"ns1")


class CookieTests(SynchronousTestCase):
    def test_client_cookie_gets_a_server_cookie(self) -> None:
        server = Server()
        cookie = server.cookie(query(cookie=CLIENT))
        self.assertEqual(len(cookie), 24)
        self.assertEqual(cookie[:8], CLIENT)
        self.assertEqual(cookie[8:12], b"\x01\0\0\0")
        self.assertEqual(struct.unpack("!I", cookie[12:16])[0], int(START))

    def test_valid_cookie_echoed_then_refreshed(self) -> None:
        server = Server()
        cookie = server.cookie(query(cookie=CLIENT))
        server.clock.advance(1000)
        self.assertEqual(server.cookie(query(cookie=cookie)), cookie)
        server.clock.advance(1000)  # older than half an hour: a new one
        refreshed = server.cookie(query(cookie=cookie))
        self.assertNotEqual(refreshed, cookie)
        self.assertEqual(struct.unpack("!I", refreshed[12:16])[0], int(START) + 2000)

    def test_stale_future_and_bad_cookies_replaced(self) -> None:
        server = Server()
        cookie = server.cookie(query(cookie=CLIENT))
        forged = cookie[:-1] + bytes((cookie[-1] ^ 1,))
        other_version = cookie[:8] + b"\x02" + cookie[9:]
        long_unknown = CLIENT + b"\x01" * 32
        for bad in (forged, other_version, long_unknown):
            self.assertEqual(server.cookie(query(cookie=bad)), cookie)  # same second
        cookies = ServerCookies(SECRET, server.clock.seconds)
        ahead = CLIENT + cookies.fresh(CLIENT, "192.0.2.1", int(START) + 301)
        self.assertEqual(cookies.answer(ahead, "192.0.2.1"), (cookie, False))
        near = CLIENT + cookies.fresh(CLIENT, "192.0.2.1", int(START) + 300)
        self.assertEqual(cookies.answer(near, "192.0.2.1"), (near, True))
        server.clock.advance(3601)
        renewed = server.cookie(query(cookie=cookie))
        self.assertNotEqual(renewed, cookie)
        self.assertEqual(cookies.answer(cookie, "192.0.2.1")[1], False)

    def test_timestamps_wrap_in_serial_arithmetic(self) -> None:
        clock = Clock()
        clock.advance((1 << 32) + 10)
        cookies = ServerCookies(SECRET, clock.seconds)
        old = CLIENT + cookies.fresh(CLIENT, "192.0.2.1", (1 << 32) - 100)
        self.assertEqual(cookies.answer(old, "192.0.2.1"), (old, True))

    def test_another_address_invalidates(self) -> None:
        server = Server()
        cookie = server.cookie(query(cookie=CLIENT))
        cookies = ServerCookies(SECRET, server.clock.seconds)
        self.assertTrue(cookies.answer(cookie, "192.0.2.1")[1])
        self.assertFalse(cookies.answer(cookie, "192.0.2.2")[1])
        self.assertNotEqual(server.cookie(query(cookie=cookie), host="192.0.2.2"), cookie)
        self.assertFalse(cookies.answer(cookie, "2001:db8::1")[1])

    def test_another_secret_invalidates(self) -> None:
        server = Server()
        cookie = server.cookie(query(cookie=CLIENT))
        cookies = ServerCookies(b"\xff" * 16, server.clock.seconds)
        self.assertFalse(cookies.answer(cookie, "192.0.2.1")[1])

    def test_malformed_formerr(self) -> None:
        server = Server()
        for length in (0, 1, 7, 9, 15, 41, 60):
            reply = server.ask(query(cookie=b"c" * length))
            assert reply is not None
            message = dns.message.from_wire(reply)
            self.assertEqual(message.rcode(), dns.rcode.FORMERR, length)
            self.assertEqual(options_of(reply), {})
        for length in (8, 16, 40):
            reply = server.ask(query(cookie=b"c" * length))
            assert reply is not None
            self.assertEqual(dns.message.from_wire(reply).rcode(), dns.rcode.NOERROR)
        with self.assertRaises(MalformedCookie):
            ServerCookies(SECRET, server.clock.seconds).answer(b"", "192.0.2.1")

    def test_off_when_not_configured(self) -> None:
        server = Server(cookies=False)
        reply = server.ask(query(cookie=b"c" * 3))
        assert reply is not None
        self.assertEqual(dns.message.from_wire(reply).rcode(), dns.rcode.NOERROR)
        self.assertEqual(options_of(reply), {})

    def test_over_tcp_with_the_connection_address(self) -> None:
        server = Server()
        cookie = server.cookie(query(cookie=CLIENT), host="192.0.2.7", tcp=True)
        self.assertEqual(server.cookie(query(cookie=cookie), host="192.0.2.7", tcp=True), cookie)
        self.assertEqual(server.cookie(query(cookie=cookie), host="192.0.2.7"), cookie)
        self.assertNotEqual(server.cookie(query(cookie=cookie), host="192.0.2.8", tcp=True), cookie)

    def test_with_nsid_both_answered(self) -> None:
        server = Server(nsid=b"ns1")
        reply = server.ask(query(cookie=CLIENT, nsid=True))
        assert reply is not None
        self.assertEqual(set(options_of(reply)), {COOKIE, NSID})


class RotationTests(SynchronousTestCase):
    """The secret of each period derived from the master: current and previous accepted."""

    def setUp(self) -> None:
        self.clock = Clock()
        # Ten seconds before a period ends.
        self.clock.advance((int(START) // DEFAULT_ROTATION + 1) * DEFAULT_ROTATION - 10)
        self.cookies = ServerCookies(SECRET, self.clock.seconds)

    def test_previous_period_valid_and_refreshed(self) -> None:
        cookie, valid = self.cookies.answer(CLIENT, "192.0.2.1")
        self.assertFalse(valid)
        self.assertEqual(self.cookies.answer(cookie, "192.0.2.1"), (cookie, True))
        self.clock.advance(20)  # the next period, the cookie 20 s old
        refreshed, valid = self.cookies.answer(cookie, "192.0.2.1")
        self.assertTrue(valid)
        self.assertNotEqual(refreshed, cookie)
        self.assertEqual(refreshed[:8], CLIENT)
        self.assertEqual(self.cookies.answer(refreshed, "192.0.2.1"), (refreshed, True))
        # Valid up to MAX_AGE, then replaced like any stale cookie.
        self.clock.advance(MAX_AGE - 20)
        self.assertTrue(self.cookies.answer(cookie, "192.0.2.1")[1])
        self.clock.advance(1)
        self.assertFalse(self.cookies.answer(cookie, "192.0.2.1")[1])

    def test_only_the_secret_of_the_timestamps_period_verifies(self) -> None:
        now = int(self.clock.seconds())
        for periods_ago in (1, 2):
            old = Clock()
            old.advance(self.clock.seconds() - periods_ago * DEFAULT_ROTATION)
            # A fresh timestamp under an older period's secret: the hash fails.
            forged = CLIENT + ServerCookies(SECRET, old.seconds).fresh(CLIENT, "192.0.2.1", now)
            self.assertFalse(self.cookies.answer(forged, "192.0.2.1")[1])

    def test_a_cookie_from_an_instance_whose_clock_is_ahead_is_valid(self) -> None:
        # Ten seconds before the period ends here; 200 s ahead there: its next period.
        ahead = Clock()
        ahead.advance(self.clock.seconds() + 200)
        other = ServerCookies(SECRET, ahead.seconds)
        cookie, _ = other.answer(CLIENT, "192.0.2.1")
        refreshed, valid = self.cookies.answer(cookie, "192.0.2.1")
        self.assertTrue(valid)
        self.assertNotEqual(refreshed, cookie)  # answered under our current secret
        self.assertTrue(other.answer(refreshed, "192.0.2.1")[1])  # which it still accepts
        too_far = Clock()
        too_far.advance(self.clock.seconds() + MAX_AHEAD + 1)
        early, _ = ServerCookies(SECRET, too_far.seconds).answer(CLIENT, "192.0.2.1")
        self.assertFalse(self.cookies.answer(early, "192.0.2.1")[1])

    def test_derived_from_the_master_alone(self) -> None:
        # Another instance (or this one restarted) with the same master agrees.
        cookie, _ = self.cookies.answer(CLIENT, "192.0.2.1")
        other = ServerCookies(bytes(SECRET), self.clock.seconds)
        self.assertEqual(other.answer(CLIENT, "192.0.2.1")[0], cookie)
        self.assertEqual(other.answer(cookie, "192.0.2.1"), (cookie, True))
        self.clock.advance(20)
        restarted = ServerCookies(SECRET, self.clock.seconds)
        self.assertTrue(restarted.answer(cookie, "192.0.2.1")[1])
        self.assertEqual(
            restarted.answer(CLIENT, "192.0.2.1")[0], self.cookies.answer(CLIENT, "192.0.2.1")[0]
        )
        self.assertEqual(other.key(7), self.cookies.key(7))
        self.assertNotEqual(other.key(7), other.key(8))
        self.assertNotEqual(ServerCookies(b"\xff" * 16, self.clock.seconds).key(7), other.key(7))

    def test_keys_derived_once_per_period(self) -> None:
        derived: list[int] = []
        key = self.cookies.key

        def counting(period: int) -> bytes:
            derived.append(period)
            return key(period)

        self.cookies.key = counting  # type: ignore[method-assign]
        for _ in range(100):
            self.cookies.answer(CLIENT, "192.0.2.1")
        period = int(self.clock.seconds()) // DEFAULT_ROTATION
        self.assertEqual(derived, [period - 1, period])
        self.clock.advance(20)
        for _ in range(100):
            self.cookies.answer(CLIENT, "192.0.2.1")
        self.assertEqual(derived, [period - 1, period, period + 1])
        self.clock.advance(5 * DEFAULT_ROTATION)  # a jump: both again
        self.cookies.answer(CLIENT, "192.0.2.1")
        self.assertEqual(derived[3:], [period + 5, period + 6])

    def test_rotation_configurable_with_a_floor(self) -> None:
        clock = Clock()
        clock.advance(MIN_ROTATION - 5)
        short = ServerCookies(SECRET, clock.seconds, rotation=MIN_ROTATION)
        cookie, _ = short.answer(CLIENT, "192.0.2.1")
        clock.advance(10)
        self.assertTrue(short.answer(cookie, "192.0.2.1")[1])
        stamp = struct.unpack_from("!I", cookie, 12)[0]
        self.assertNotEqual(short.fresh(CLIENT, "192.0.2.1", stamp), cookie[8:])  # a new secret
        with self.assertRaises(ValueError):
            ServerCookies(SECRET, clock.seconds, rotation=MIN_ROTATION - 1)


class RequireTests(SynchronousTestCase):
    """``require_cookies``: a UDP query with a COOKIE but no valid server cookie gets
    BADCOOKIE and a fresh server cookie (RFC 7873 5.2.3, 5.2.4), and the retry an answer."""

    def assertBadCookie(self, reply: bytes | None, host: str = "192.0.2.1") -> bytes:
        assert reply is not None
        message = dns.message.from_wire(reply)
        self.assertEqual(message.rcode(), dns.rcode.BADCOOKIE)
        self.assertEqual(reply[3] & 0x0F, 7)  # the header's low bits; the OPT's are 1
        self.assertEqual(message.ednsflags >> 24, 1)
        self.assertEqual(message.question[0].name.to_text(), CHALLENGE + ".")
        self.assertEqual((message.answer, message.authority), ([], []))
        self.assertTrue(message.flags & dns.flags.QR)
        cookie = options_of(reply)[COOKIE]
        self.assertTrue(ServerCookies(SECRET, lambda: START).answer(cookie, host)[1])
        return cookie

    def assertAnswered(self, reply: bytes | None) -> dns.message.Message:
        assert reply is not None
        message = dns.message.from_wire(reply)
        self.assertEqual(message.rcode(), dns.rcode.NOERROR)
        self.assertEqual(message.answer[0].to_text()[-7:], '"token"')
        return message

    def test_client_cookie_only_then_the_retry(self) -> None:
        server = Server(require=True)
        for _ in range(2):  # the second after the memo saw both
            cookie = self.assertBadCookie(server.ask(query(cookie=CLIENT)))
            self.assertEqual(cookie[:8], CLIENT)
            message = self.assertAnswered(server.ask(query(cookie=cookie)))
            self.assertEqual(options_of(message.to_wire())[COOKIE], cookie)
        self.assertEqual(server.rcodes, [23, 0, 23, 0])

    def test_bad_and_expired_server_cookies(self) -> None:
        server = Server(require=True)
        cookie = self.assertBadCookie(server.ask(query(cookie=CLIENT)))
        forged = cookie[:-1] + bytes((cookie[-1] ^ 1,))
        self.assertEqual(self.assertBadCookie(server.ask(query(cookie=forged))), cookie)
        self.assertBadCookie(server.ask(query(cookie=cookie), host="192.0.2.9"), "192.0.2.9")
        server.clock.advance(3601)
        reply = server.ask(query(cookie=cookie))
        assert reply is not None
        self.assertEqual(dns.message.from_wire(reply).rcode(), dns.rcode.BADCOOKIE)
        self.assertNotEqual(options_of(reply)[COOKIE], cookie)

    def test_no_cookie_or_tcp_answered(self) -> None:
        server = Server(require=True)
        for _ in range(2):
            self.assertAnswered(server.ask(query()))
            self.assertAnswered(server.ask(query(cookie=CLIENT), tcp=True))
            reply = server.ask(query(cookie=CLIENT), tcp=True)
            assert reply is not None
            self.assertEqual(len(options_of(reply)[COOKIE]), 24)
        # Malformed is still FORMERR.
        reply = server.ask(query(cookie=b"c" * 9))
        assert reply is not None
        self.assertEqual(dns.message.from_wire(reply).rcode(), dns.rcode.FORMERR)

    def test_memo_of_the_bare_query_never_answers_badcookie_nor_skips_it(self) -> None:
        server = Server(require=True)
        bare = self.assertAnswered(server.ask(query()))  # memoized
        for _ in range(3):
            self.assertBadCookie(server.ask(query(cookie=CLIENT)))
            self.assertEqual(self.assertAnswered(server.ask(query())).answer, bare.answer)
        self.assertEqual(len(server.factory._udp_memo), 1)
        # The memo's fast path still answers a valid cookie.
        cookie = self.assertBadCookie(server.ask(query(cookie=CLIENT)))
        self.assertAnswered(server.ask(query(cookie=cookie)))

    def test_off_by_default(self) -> None:
        reply = Server().ask(query(cookie=CLIENT))
        self.assertEqual(len(options_of(self.assertAnswered(reply).to_wire())[COOKIE]), 24)

    def test_badcookie_replies_are_rate_limited_as_errors(self) -> None:
        server = Server(require=True, errors_per_second=3)
        sent = sum(server.ask(query(cookie=CLIENT)) is not None for _ in range(10))
        self.assertEqual(sent, 3)


class CacheTests(SynchronousTestCase):
    def test_no_server_cookie_crosses_clients(self) -> None:
        server = Server()
        for tcp in (False, True):
            for rdtype in ("TXT", "A", "MX"):
                packet = query(rdtype=rdtype, cookie=CLIENT)
                first = server.cookie(packet, "192.0.2.1", tcp)
                # The same query bytes (same client cookie) from another address, and
                # another client cookie: each gets its own, computed afresh.
                second = server.cookie(packet, "198.51.100.1", tcp)
                third = server.cookie(query(rdtype=rdtype, cookie=OTHER), "192.0.2.1", tcp)
                self.assertEqual(len({first, second, third}), 3)
                cookies = ServerCookies(SECRET, server.clock.seconds)
                self.assertTrue(cookies.answer(second, "198.51.100.1")[1])
                self.assertTrue(cookies.answer(third, "192.0.2.1")[1])
                # A cookie-less query after them carries no cookie.
                plain = server.ask(query(rdtype=rdtype), "192.0.2.1", tcp)
                assert plain is not None
                self.assertEqual(options_of(plain), {})

    def test_cookie_queries_memoized_without_their_cookie(self) -> None:
        server = Server()
        for _ in range(3):
            first = server.cookie(query(cookie=CLIENT))
        ((key, entry),) = server.factory._udp_memo.items()
        self.assertEqual(key, query()[2:].lower())  # the same query without the cookie
        self.assertNotIn(CLIENT, b"".join(part for part in entry if isinstance(part, bytes)))
        self.assertNotIn(first[8:], b"".join(part for part in entry if isinstance(part, bytes)))
        server.ask(query())
        self.assertEqual(len(server.factory._udp_memo), 1)

    def test_truncated_reply_still_carries_the_cookie(self) -> None:
        zone = make_zone()
        for n in range(40):
            zone.add_txt("big." + ORIGIN, f"{n:02d}" + "x" * 60)
        clock = Clock()
        factory = ZoneServerFactory(clock, zone, cookies=ServerCookies(SECRET, clock.seconds))
        recorder = ReplyRecorder()
        factory.packetReceived(query("big." + ORIGIN, cookie=CLIENT), recorder, ("192.0.2.1", 1))
        ((reply, _),) = recorder.replies
        message = dns.message.from_wire(reply)
        self.assertTrue(message.flags & dns.flags.TC)
        self.assertLessEqual(len(reply), 1232)
        self.assertIn(COOKIE, options_of(reply))


class RateLimitTests(SynchronousTestCase):
    def test_valid_cookie_bypasses_rrl(self) -> None:
        server = Server(responses_per_second=5)
        cookie = server.cookie(query(cookie=CLIENT))  # 1 of 5 spent
        plain = query()
        self.assertEqual(sum(server.ask(plain) is not None for _ in range(10)), 4)
        # The same source, limited without a cookie, is answered with its server cookie.
        self.assertEqual(sum(server.ask(query(cookie=cookie)) is not None for _ in range(50)), 50)
        # A client cookie alone or a forged server cookie proves nothing.
        self.assertIsNone(server.ask(query(cookie=CLIENT)))
        self.assertIsNone(server.ask(query(cookie=cookie[:-1] + bytes((cookie[-1] ^ 1,)))))
        # A cookie made for another address does not exempt a spoofer.
        self.assertIsNone(server.ask(query(cookie=cookie), host="192.0.2.9"))


class MemoFastPathTests(SynchronousTestCase):
    """A query whose OPT holds only a COOKIE is answered from the memo of the same query
    without it, with this client's cookie patched in, never parsed."""

    def setUp(self) -> None:
        self.server = Server(responses_per_second=5)
        self.parsed: list[object] = []
        original = self.server.factory.messageReceived

        def counting(message: Any, proto: Any, address: Any = None) -> None:
            self.parsed.append(message)
            original(message, proto, address)

        self.server.factory.messageReceived = counting  # type: ignore[method-assign]

    def test_cookie_patched_into_the_memo_of_the_bare_query(self) -> None:
        server = self.server
        for tcp in (False, True):
            for rdtype in ("TXT", "A"):
                self.parsed.clear()
                bare = server.ask(query(rdtype=rdtype), "192.0.2.1", tcp)  # memoized
                assert bare is not None
                first = server.cookie(query(rdtype=rdtype, cookie=CLIENT), "192.0.2.1", tcp)
                second = server.cookie(query(rdtype=rdtype, cookie=first), "198.51.100.1", tcp)
                third = server.cookie(query(rdtype=rdtype, cookie=OTHER), "203.0.113.1", tcp)
                self.assertEqual(len(self.parsed), 1, (tcp, rdtype))
                cookies = ServerCookies(SECRET, server.clock.seconds)
                self.assertTrue(cookies.answer(first, "192.0.2.1")[1])
                self.assertNotEqual(second, first)  # not valid from another address
                self.assertTrue(cookies.answer(second, "198.51.100.1")[1])
                self.assertTrue(cookies.answer(third, "203.0.113.1")[1])
                # The same answer as the bare one, and as the parsed path gives.
                fast = server.ask(query(rdtype=rdtype, cookie=first), "192.0.2.1", tcp)
                assert fast is not None
                self.assertEqual(
                    dns.message.from_wire(fast).answer, dns.message.from_wire(bare).answer
                )
                fresh = Server()
                slow = fresh.ask(query(rdtype=rdtype, cookie=first), "192.0.2.1", tcp)
                self.assertEqual(fast[2:], slow[2:] if slow is not None else None)

    def test_a_resolver_always_sending_cookies_is_parsed_once(self) -> None:
        server = self.server
        hosts = ["192.0.2.1", "198.51.100.1", "203.0.113.1"]
        for tcp in (False, True):
            self.parsed.clear()
            got = {host: server.cookie(query(cookie=CLIENT), host, tcp) for host in hosts}
            got.update({host: server.cookie(query(cookie=got[host]), host, tcp) for host in hosts})
            self.assertEqual(len(self.parsed), 1)
            self.assertEqual(len(set(got.values())), 3)
            cookies = ServerCookies(SECRET, server.clock.seconds)
            for host, cookie in got.items():
                self.assertTrue(cookies.answer(cookie, host)[1])
            plain = server.ask(query(), "192.0.2.1", tcp)  # the memo's bare entry
            assert plain is not None
            self.assertEqual(options_of(plain), {})
            self.assertEqual(len(self.parsed), 1)

    def test_valid_cookie_bypasses_rrl_on_the_fast_path(self) -> None:
        server = self.server
        plain = query()
        self.assertEqual(sum(server.ask(plain) is not None for _ in range(10)), 5)
        cookies = ServerCookies(SECRET, server.clock.seconds)
        cookie = CLIENT + cookies.fresh(CLIENT, "192.0.2.1", int(START))
        self.parsed.clear()
        self.assertEqual(sum(server.ask(query(cookie=cookie)) is not None for _ in range(50)), 50)
        self.assertEqual(self.parsed, [])
        self.assertIsNone(server.ask(query(cookie=CLIENT)))
        self.assertIsNone(server.ask(query(cookie=cookie), host="192.0.2.9"))

    def test_near_the_size_limit_parsed_not_overrun(self) -> None:
        zone = make_zone()
        for n in range(6):
            zone.add_txt("mid." + ORIGIN, f"{n:02d}" + "x" * 60)
        clock = Clock()
        factory = ZoneServerFactory(clock, zone, cookies=ServerCookies(SECRET, clock.seconds))
        recorder = ReplyRecorder()
        name = "mid." + ORIGIN
        wire = dns.message.make_query(name, "TXT", use_edns=0, payload=512).to_wire()
        factory.packetReceived(wire, recorder, ("192.0.2.1", 1))
        bare = recorder.replies[-1][0]
        self.assertGreater(len(bare), 512 - 28)
        self.assertLessEqual(len(bare), 512)
        with_cookie = dns.message.make_query(
            name,
            "TXT",
            use_edns=0,
            payload=512,
            options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, CLIENT)],
        ).to_wire()
        factory.packetReceived(with_cookie, recorder, ("192.0.2.1", 1))
        reply = recorder.replies[-1][0]
        self.assertLessEqual(len(reply), 512)
        self.assertTrue(dns.message.from_wire(reply).flags & dns.flags.TC)
        self.assertIn(COOKIE, options_of(reply))
