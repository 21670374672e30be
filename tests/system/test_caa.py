"""The locked subzone end to end: twistd csrproxy with pebble's account, asked by ``dig``.

pebble 2.4.0 does not check CAA, so it issues whatever the record says; what is checked
here is the exact record a CA that enforces RFC 8657 (Let's Encrypt) reads.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest

from csrproxy.client import obtain_certificate
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble
from tests.conftest import ZONE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def locked(
    tmp_path_factory: pytest.TempPathFactory, pebble: Pebble, dns_port: int
) -> Iterator[Csrproxy]:
    work = tmp_path_factory.mktemp("csrproxy-caa")
    # pebble's directory is on loopback: an unknown CA, so the identity is configured.
    overrides = {"dns": {"caa_identities": ["letsencrypt.org"]}}
    with start_csrproxy(str(work), pebble, dns_port, ZONE, overrides=overrides) as d:
        yield d


def account_url(daemon: Csrproxy) -> str:
    with urllib.request.urlopen(daemon.url + "/v1/health", timeout=10) as resp:
        url: str = json.loads(resp.read())["account"]
    assert url.startswith("https://127.0.0.1:")
    return url


def dig(port: int, *args: str) -> str:
    return subprocess.run(
        ["dig", "+norec", "-p", str(port), "@127.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout


def test_dig_shows_only_our_account_only_dns01(locked: Csrproxy, dns_port: int) -> None:
    value = f'"letsencrypt.org; accounturi={account_url(locked)}; validationmethods=dns-01"'
    short = dig(dns_port, "+short", ZONE, "CAA")
    assert sorted(short.splitlines()) == [f"0 issue {value}", f"0 issuewild {value}"], short
    full = dig(dns_port, ZONE, "CAA")
    assert "flags: qr aa" in full, full
    below = dig(dns_port, f"install.{ZONE}", "CAA")  # the climb: NODATA, not NXDOMAIN
    assert "status: NOERROR" in below and "ANSWER: 0" in below, below


def test_dnspython_reads_it_and_issuance_goes_on(
    locked: Csrproxy, pebble: Pebble, dns_port: int, tmp_path: Path
) -> None:
    query = dns.message.make_query(ZONE, "CAA")
    answer = dns.query.tcp(query, "127.0.0.1", port=dns_port, timeout=5)
    (rrset,) = answer.answer
    assert rrset.rdtype == dns.rdatatype.CAA
    assert {(r.flags, r.tag) for r in rrset} == {(0, b"issue"), (0, b"issuewild")}
    assert {r.value for r in rrset} == {
        f"letsencrypt.org; accounturi={account_url(locked)}; validationmethods=dns-01".encode()
    }
    name = f"caa.{ZONE}"
    result = obtain_certificate(locked.url, tmp_path, [name], root_pem=pebble.root_pem())
    assert result.names == [name]
