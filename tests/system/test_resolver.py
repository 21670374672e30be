"""Orders validated through a real validating resolver, as Let's Encrypt's are (issue 17).

pebble asks only Unbound (``-dnsserver``), hardened as Let's Encrypt's validators are
(0x20, strict QNAME minimisation, ``harden-below-nxdomain``, TTLs capped at 60 s, the
validator on); Unbound stubs one zone to a ``twistd csrproxy`` serving it from its own
DNS and another to PowerDNS, which a second daemon writes through its API. Unlike the
authoritative servers the other system tests ask, Unbound caches: what it handed the CA
stays for its TTL, whatever the zone says since.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from csrproxy.testing.powerdns import PowerDNS, start_powerdns
from csrproxy.testing.unbound import UNBOUND, Unbound, start_unbound
from tests.conftest import ZONE, need
from tests.support.api import post_sign
from tests.support.keys import EC256, EC256_B, make_csr

pytestmark = pytest.mark.integration

PDNS_ZONE = "pdns-resolver.example.test"

# A wildcard and its base name share one TXT RRset with two values. An order that answers
# a challenge before both are served races the resolver's cache and loses only sometimes,
# so each test places several orders: before csrproxy published every value before
# answering any, 1 in 5 to 1 in 12 failed through the built-in DNS (all 40 passed in up
# to 1 run in 30), 3 to 4 in 5 through PowerDNS (all 8 in under 1 in 1,000). Each daemon
# stays within the default budgets (45 new names, 60 requests per client).
BUILTIN_ORDERS = 40
PDNS_ORDERS = 8


@dataclass
class Setup:
    work: Path
    pebble: Pebble
    unbound: Unbound
    pdns: PowerDNS
    daemon: Csrproxy  # the built-in DNS backend, for ZONE


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    for binary in ("/usr/bin/pebble", "/usr/sbin/pdns_server", UNBOUND):
        need(binary)
    work = tmp_path_factory.mktemp("resolver")
    dns_port = free_udp_tcp_port()
    with start_powerdns(str(work), PDNS_ZONE, [("@", "A", "127.0.0.1")]) as pdns:
        stubs = {ZONE: f"127.0.0.1:{dns_port}", PDNS_ZONE: pdns.dns_server}
        with (
            start_unbound(str(work), stubs) as unbound,
            start_pebble(str(work / "pebble"), unbound.dns_server) as pebble,
        ):
            policy = {"names": [f"{{label}}.{ZONE}", f"*.{{label}}.{ZONE}"]}
            with start_csrproxy(
                str(work / "csrproxy"),
                pebble,
                dns_port,
                ZONE,
                # pebble does not check CAA; the identity is what the record would name.
                overrides={"policy": policy, "dns": {"caa_identities": ["pebble.test"]}},
            ) as daemon:
                unbound.wait_serving()
                yield Setup(work, pebble, unbound, pdns, daemon)


@pytest.fixture(scope="module")
def pdns_daemon(setup: Setup) -> Iterator[Csrproxy]:
    """A daemon writing PDNS_ZONE's challenges through the PowerDNS API."""
    pdns = setup.pdns
    overrides: dict[str, dict[str, Any]] = {
        "dns": {"backend": "powerdns", "listen": []},
        # to_toml writes one flat table per key: "dns.powerdns" becomes [dns.powerdns].
        "dns.powerdns": {
            "api_url": pdns.api_url,
            "api_key": pdns.api_key,
            "check_servers": [pdns.dns_server],
            "check_timeout": 10,
        },
        "policy": {"names": [f"{{label}}.{PDNS_ZONE}", f"*.{{label}}.{PDNS_ZONE}"]},
    }
    with start_csrproxy(
        str(setup.work / "csrproxy-pdns"),
        setup.pebble,
        pdns.dns_port,
        PDNS_ZONE,
        overrides=overrides,
    ) as daemon:
        yield daemon


def sans(pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem)
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return sorted(ext.value.get_values_for_type(x509.DNSName))


def timed_sign(daemon: Csrproxy, csr: bytes) -> tuple[int, bytes, float]:
    started = time.monotonic()
    code, body = post_sign(daemon, csr)
    return code, body, time.monotonic() - started


def test_two_orders_for_one_name_back_to_back(setup: Setup) -> None:
    # A new key for the same name right after the first certificate (a key rotation, a
    # client retrying): a new order whose TXT value the resolver has not seen, while it
    # still holds the first order's. Before csrproxy waited out its own answers' TTL, the
    # CA read the first value: "unauthorized: Correct value not found for DNS challenge".
    name = f"again.{ZONE}"
    code, body, first = timed_sign(setup.daemon, make_csr([name], EC256))
    assert code == 200, body
    code, body, second = timed_sign(setup.daemon, make_csr([name], EC256_B))
    print(f"back to back: first order {first:.2f} s, second {second:.2f} s ({code})")
    assert code == 200, body
    assert sans(body) == [name]
    assert x509.load_pem_x509_certificate(body).public_key() == EC256_B.public_key()


def wildcard_and_base(daemon: Csrproxy, zone: str, orders: int, what: str) -> None:
    took = []
    for i in range(orders):
        base = f"w{i}.{zone}"
        code, body, seconds = timed_sign(daemon, make_csr([f"*.{base}", base]))
        took.append(seconds)
        if code != 200:
            print(f"wildcard+base, {what}: order {i + 1} failed after {seconds:.2f} s")
        assert code == 200, body
        assert sans(body) == sorted([base, f"*.{base}"])
    print(
        f"wildcard+base, {what}: {orders} orders, {sum(took) / orders:.2f} s average,"
        f" {max(took):.2f} s longest"
    )


def test_wildcard_and_base_through_powerdns(pdns_daemon: Csrproxy) -> None:
    wildcard_and_base(pdns_daemon, PDNS_ZONE, PDNS_ORDERS, "PowerDNS")


def test_wildcard_and_base_through_the_builtin_dns(setup: Setup) -> None:
    wildcard_and_base(setup.daemon, ZONE, BUILTIN_ORDERS, "built-in DNS")


def caa_through(unbound: Unbound, name: str) -> tuple[int, list[tuple[int, str, str]]]:
    """``(rcode, [(flags, tag, value)])`` of ``name``'s CAA records, asked of Unbound."""
    import dns.message
    import dns.query
    import dns.rdatatype

    query = dns.message.make_query(name, dns.rdatatype.CAA)
    answer: Any = dns.query.udp(query, "127.0.0.1", 5, unbound.port)
    records = [
        (int(r.flags), r.tag.decode(), r.value.decode())
        for rrset in answer.answer
        if rrset.rdtype == dns.rdatatype.CAA
        for r in rrset
    ]
    return int(answer.rcode()), records


def test_caa_at_the_apex_names_our_account_and_dns_01(setup: Setup) -> None:
    # RFC 8657: only csrproxy's account at this CA, only by dns-01.
    rcode, records = caa_through(setup.unbound, ZONE)
    assert rcode == 0, rcode
    assert {tag for _, tag, _ in records} >= {"issue", "issuewild"}, records
    account_prefix = setup.pebble.directory.removesuffix("/dir") + "/"
    for flags, tag, value in records:
        if tag not in ("issue", "issuewild"):
            continue
        params = dict(p.strip().split("=", 1) for p in value.split(";")[1:] if "=" in p)
        assert flags == 0 and value.startswith("pebble.test;"), records
        assert params.get("accounturi", "").startswith(account_prefix), records
        assert params.get("validationmethods") == "dns-01", records
