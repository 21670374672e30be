"""Properties of every UDP reply, for random names, types, letter case and EDNS sizes."""

from __future__ import annotations

import struct
from typing import Any, cast

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.zone import ChallengeZone
from csrproxy.testing.dns import reply_to

ORIGIN = "go.example.test"
ZONE = ChallengeZone(
    ORIGIN,
    ["ns1." + ORIGIN, "ns2." + ORIGIN],
    [
        "@ A 127.0.0.1",
        "* A 127.0.0.1",
        "ns1 A 127.0.0.1",
        "www CNAME @",
        '@ CAA 0 issue "letsencrypt.org"',
        'big TXT "' + "x" * 250 + '" "' + "y" * 250 + '"',
        'big TXT "' + "z" * 250 + '"',
        "sub.deep AAAA ::1",
    ],
)
for _index in range(25):
    ZONE.add_txt("_acme-challenge.many." + ORIGIN, f"{_index:02d}" + "v" * 41)
ZONE.add_txt("_acme-challenge.one." + ORIGIN, "single")
SERVER = ZoneServerFactory(Clock(), ZONE)

labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_*", min_size=1, max_size=12)
in_zone_prefixes = st.sampled_from(
    [
        "",
        "www",
        "ns1",
        "big",
        "sub.deep",
        "deep",
        "_acme-challenge.many",
        "_acme-challenge.one",
        "many",
        "x.one",
        "nothing._acme-challenge.one",
    ]
) | st.lists(labels, min_size=1, max_size=4).map(".".join)
out_of_zone = st.sampled_from(["example.test", "test", "ago.example.test", "example.org", ""])
NOT_RANDOM = (41, 249, 250, 251, 252, 253, 254)
types = st.sampled_from(["A", "AAAA", "TXT", "SOA", "NS", "CAA", "MX", "ANY", "CNAME", "HINFO"]) | (
    # OPT, TKEY, TSIG, IXFR, AXFR, MAILB, MAILA: tested on their own.
    st.integers(min_value=1, max_value=65535).filter(lambda t: t not in NOT_RANDOM)
)


def random_case(draw: st.DrawFn, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if flip else c for c, flip in zip(name, flips, strict=True))


@st.composite
def questions(draw: st.DrawFn) -> tuple[str, bool]:
    if draw(st.booleans()):
        prefix = draw(in_zone_prefixes)
        name, inside = (prefix + "." + ORIGIN if prefix else ORIGIN), True
    else:
        name, inside = draw(out_of_zone), False
    return random_case(draw, name) or ".", inside


class UDPReplyProperties(SynchronousTestCase):
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        question=questions(),
        rdtype=types,
        edns=st.none() | st.integers(min_value=0, max_value=65535),
    )
    def test_every_udp_reply(
        self, question: tuple[str, bool], rdtype: str | int, edns: int | None
    ) -> None:
        name, inside = question
        query = dns.message.make_query(
            name,
            cast(Any, rdtype),
            use_edns=edns is not None,
            payload=edns if edns is not None else 1232,
        )
        wire = query.to_wire()
        reply = reply_to(SERVER, wire)
        assert reply is not None
        limit = 512 if edns is None else max(512, min(edns, 1232))
        self.assertLessEqual(len(reply), limit)
        self.assertEqual(reply[:2], wire[:2])
        # The question comes back byte for byte.
        question_end = 12 + len(query.question[0].name.to_wire() or b"") + 4
        self.assertEqual(reply[12:question_end], wire[12:question_end])
        response = dns.message.from_wire(reply)
        if not response.flags & dns.flags.TC:  # what fits is the same over TCP
            self.assertEqual(reply_to(SERVER, wire, tcp=True), reply)
        self.assertFalse(response.flags & dns.flags.RA)
        self.assertEqual(response.edns, -1 if edns is None else 0)
        if not inside:
            self.assertEqual(response.rcode(), dns.rcode.REFUSED)
            return
        self.assertTrue(response.flags & dns.flags.AA)
        truncated = bool(response.flags & dns.flags.TC)
        if truncated:
            self.assertEqual((response.answer, response.authority), ([], []))
            tcp = dns.message.from_wire(reply_to(SERVER, wire, tcp=True) or b"")
            self.assertFalse(tcp.flags & dns.flags.TC)
            self.assertTrue(tcp.answer)
            return
        negative = response.rcode() == dns.rcode.NXDOMAIN or not response.answer
        if negative:
            self.assertIn(response.rcode(), (dns.rcode.NXDOMAIN, dns.rcode.NOERROR))
            self.assertEqual([rrset.rdtype for rrset in response.authority], [dns.rdatatype.SOA])
        if dns.rdatatype.to_text(query.question[0].rdtype) == "ANY":
            self.assertLessEqual(len(response.answer), 1)

    @settings(max_examples=200, deadline=None)
    @given(packet=st.binary(min_size=0, max_size=300), prefix=st.sampled_from([b"", b"q"]))
    def test_random_bytes_never_raise(self, packet: bytes, prefix: bytes) -> None:
        if prefix:  # a plausible header in front makes the parser go deeper
            packet = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 1) + packet
        reply = reply_to(SERVER, packet)
        if reply is not None:
            self.assertTrue(reply[2] & 0x80)
            self.assertLessEqual(len(reply), 1232)
            self.assertEqual(reply[:2], packet[:2])
