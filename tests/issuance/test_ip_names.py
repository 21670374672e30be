"""Names that carry their address: {ip} patterns in the policy and in the DNS answers."""

from __future__ import annotations

import ipaddress

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from twisted.internet.task import Clock

from csrproxy.addresses import parse_ranges
from csrproxy.config import parse_config
from csrproxy.dns.factory import ZoneServerFactory
from csrproxy.dns.zone import ChallengeZone
from csrproxy.errors import ConfigError, NameNotAllowed
from csrproxy.issuance.policy import NamePolicy
from csrproxy.names import NamePattern
from csrproxy.testing.dns import reply_to

ZONE = "go.example.test"
KEY = "a" * 32
PATTERN = f"{{ip}}.{{key}}.{ZONE}"


def policy(**kwargs: object) -> NamePolicy:
    return NamePolicy([PATTERN], zones=[ZONE], **kwargs)  # type: ignore[arg-type]


def test_a_private_address_of_the_csrs_own_key_is_allowed() -> None:
    p = policy()
    p.check([f"10-0-0-5.{KEY}.{ZONE}", f"fd00--1.{KEY}.{ZONE}"], KEY)
    for name in (f"8-8-8-8.{KEY}.{ZONE}", f"www.{KEY}.{ZONE}", f"10-0-0-5.{'b' * 32}.{ZONE}"):
        with pytest.raises(NameNotAllowed):
            p.check([name], KEY)


def test_ip_ranges_decide() -> None:
    p = policy(ip_ranges=parse_ranges(["198.51.100.0/24"]))
    p.check([f"198-51-100-7.{KEY}.{ZONE}"], KEY)
    with pytest.raises(NameNotAllowed):
        p.check([f"10-0-0-5.{KEY}.{ZONE}"], KEY)


def test_the_name_is_offered_with_ip_left_for_the_client() -> None:
    assert policy().offer(KEY) == [f"{{ip}}.{KEY}.{ZONE}"]
    assert policy().names_for_key(KEY) == []
    assert NamePattern.parse(PATTERN).labels[0] == "{ip}"


def ask(factory: ZoneServerFactory, name: str, rdtype: str) -> dns.message.Message:
    wire = reply_to(factory, dns.message.make_query(name, rdtype).to_wire())
    assert wire is not None
    return dns.message.from_wire(wire)


def test_the_dns_answers_the_address_from_the_name() -> None:
    zone = ChallengeZone(ZONE, [f"ns1.{ZONE}"], ["* A 127.0.0.1"], ttl=300)
    zone.addressed = policy().address_of
    factory = ZoneServerFactory(Clock(), zone)
    a = ask(factory, f"10-0-0-5.{KEY}.{ZONE}", "A")
    assert [r.address for r in a.answer[0]] == ["10.0.0.5"]
    assert a.answer[0].ttl == 300
    aaaa = ask(factory, f"fd00-0-0-0-0-0-0-1.{KEY}.{ZONE}", "AAAA")
    assert [ipaddress.ip_address(r.address) for r in aaaa.answer[0]] == [
        ipaddress.ip_address("fd00::1")
    ]
    # The other family: NODATA, not the wildcard's address.
    other = ask(factory, f"10-0-0-5.{KEY}.{ZONE}", "AAAA")
    assert other.rcode() == dns.rcode.NOERROR and other.answer == []
    # Outside ip_ranges, or a label not shaped like a key: the zone as before (wildcard).
    for name in (f"8-8-8-8.{KEY}.{ZONE}", f"10-0-0-5.short.{ZONE}"):
        assert [r.address for r in ask(factory, name, "A").answer[0]] == ["127.0.0.1"]
    # While its challenge is published the name is an empty non-terminal: still answered.
    zone.add_txt(f"_acme-challenge.10-0-0-5.{KEY}.{ZONE}", "value")
    assert [r.address for r in ask(factory, f"10-0-0-5.{KEY}.{ZONE}", "A").answer[0]] == [
        "10.0.0.5"
    ]


def test_config_ip_ranges() -> None:
    base = {
        "acme": {"directory": "https://ca.test/dir"},
        "dns": {"zone": ZONE},
        "policy": {"names": [PATTERN]},
        "state": {"dir": "/tmp/x"},
    }
    assert parse_config(base).policy.ip_ranges[0] == ipaddress.ip_network("10.0.0.0/8")
    base["policy"]["ip_ranges"] = ["192.0.2.0/24"]  # type: ignore[index]
    assert parse_config(base).policy.ip_ranges == (ipaddress.ip_network("192.0.2.0/24"),)
    base["policy"]["ip_ranges"] = ["nope"]  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"policy\.ip_ranges"):
        parse_config(base)
