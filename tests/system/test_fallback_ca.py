"""A second CA (``[[acme.fallback]]``) end to end: two pebbles, the first refusing.

The first CA is pebble behind the fault proxy answering every newOrder ``rateLimited``
with a Retry-After of a day (Let's Encrypt's answer once a limit is spent), then the
proxy stopped (the CA unreachable); the second is another pebble with a CA of its own.
The client gets its chain from the second, the certificate records it, a renewal asks it
first, and the zone's CAA names both CAs, each with its own account.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509

from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.faultprocess import FaultProxyProcess, start_faultproxy
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from tests.conftest import ZONE, need
from tests.support.api import post_sign
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration



@dataclass
class Two:
    first: Pebble
    proxy: FaultProxyProcess
    second: Pebble
    daemon: Csrproxy
    dns_port: int


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Two]:
    need("/usr/bin/pebble")
    work = tmp_path_factory.mktemp("fallback")
    dns_port = free_udp_tcp_port()
    dns = f"127.0.0.1:{dns_port}"
    with start_pebble(str(work / "a"), dns) as first, start_pebble(str(work / "b"), dns) as second:
        assert first.ca_cert != second.ca_cert
        proxy = start_faultproxy(str(work / "proxy"), first)
        try:
            overrides: dict[str, dict[str, Any]] = {
                "acme": {
                    "directory": proxy.directory,
                    "fallback": [
                        {
                            "directory": second.directory,
                            "ca_certs": second.ca_cert,
                            "caa_identity": "second.pebble.test",
                        }
                    ],
                },
                "dns": {"caa_identities": ["first.pebble.test"]},
            }
            with start_csrproxy(
                str(work / "d"), first, dns_port, ZONE, overrides=overrides
            ) as daemon:
                yield Two(first, proxy, second, daemon, dns_port)
        finally:
            proxy.stop()


def issued_by(chain: bytes, pebble: Pebble) -> bool:
    """True when ``chain``'s top certificate was signed by ``pebble``'s root."""
    top = x509.load_pem_x509_certificates(chain)[-1]
    return top.issuer == x509.load_pem_x509_certificate(pebble.root_pem()).subject


def sign(two: Two, name: str) -> tuple[int, bytes, float]:
    started = time.monotonic()
    code, body = post_sign(two.daemon, make_csr([name]))
    return code, body, time.monotonic() - started


def test_an_order_the_first_ca_rate_limits_is_issued_by_the_second(two: Two) -> None:
    code, body, first = sign(two, f"ok.{ZONE}")
    assert code == 200, body
    assert issued_by(body, two.first)
    two.proxy.add_rules(["POST:/order-plz:rateLimited:86400:count=0"])
    try:
        code, body, took = sign(two, f"limited.{ZONE}")
        print(f"first CA: {first:.2f} s; rate limited, issued by the second: {took:.2f} s")
        assert code == 200, body
        assert issued_by(body, two.second), "the second CA's chain"
        assert two.proxy.injected().get("POST /order-plz rateLimited", 0) >= 1
    finally:
        two.proxy.clear_rules()


def test_the_caa_names_both_cas_each_with_its_account(two: Two) -> None:
    # After the test above both accounts are known: each CA, its account, dns-01 only.
    out = subprocess.run(
        ["dig", "+norec", "+short", "-p", str(two.dns_port), "@127.0.0.1", ZONE, "CAA"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    lines = sorted(out.splitlines())
    assert len(lines) == 4 and all("validationmethods=dns-01" in x for x in lines), lines
    by_identity = {
        line.split('"')[1].split(";")[0]: line.split("accounturi=")[1].split(";")[0]
        for line in lines
    }
    assert sorted(by_identity) == ["first.pebble.test", "second.pebble.test"], lines
    assert by_identity["first.pebble.test"].startswith(two.proxy.base_url + "/")
    assert by_identity["second.pebble.test"].startswith(two.second.directory.removesuffix("dir"))
    assert {line.split()[1] for line in lines} == {"issue", "issuewild"}, lines


def test_with_the_first_ca_unreachable_the_second_issues(two: Two) -> None:
    # Last: the proxy, the first CA's only way in, stays stopped.
    two.proxy.stop()
    code, body, took = sign(two, f"down.{ZONE}")
    print(f"first CA unreachable, issued by the second: {took:.2f} s")
    assert code == 200, body
    assert issued_by(body, two.second)
    # Its breaker open now, the next order goes to the second CA without trying it.
    code, body, again = sign(two, f"down2.{ZONE}")
    print(f"then, the breaker open: {again:.2f} s")
    assert code == 200, body
    assert issued_by(body, two.second)
