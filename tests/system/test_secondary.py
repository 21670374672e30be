"""A real secondary carries the zone and answers the CA (issue 15).

Knot DNS (Debian ``knot``) runs as a secondary of csrproxy's zone on loopback, with a
TSIG key; csrproxy NOTIFYs it of every change and it transfers the zone (IXFR, AXFR
when it has nothing). pebble asks only Knot (``-dnsserver``), so every certificate
below was validated through the secondary. A transfer without the key, or with a wrong
one, is refused; with the secondary stopped, orders fail within ``check_timeout`` with
a ``dns-publish`` problem naming it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.knot import TSIG_NAME, Knot, available, secondary_port, start_knot
from csrproxy.testing.pebble import start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from tests.conftest import ZONE
from tests.support.api import post_sign
from tests.support.keys import make_csr

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="knotd is not installed"),
]

CHECK_TIMEOUT = 5.0


class Setup:
    def __init__(self, daemon: Csrproxy, knot: Knot, dns_port: int, secret: str) -> None:
        self.daemon = daemon
        self.knot = knot
        self.dns_port = dns_port
        self.secret = secret


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("secondary")
    knot_port, dns_port = secondary_port(), free_udp_tcp_port()
    secret = base64.b64encode(os.urandom(32)).decode()
    with (
        start_pebble(str(work / "pebble"), f"127.0.0.1:{knot_port}") as pebble,
        start_knot(
            str(work), ZONE, f"127.0.0.1:{dns_port}", port=knot_port, tsig_secret=secret
        ) as knot,
    ):
        # Checked where NOTIFY goes: Knot's address and port (the default of `check`).
        dns = {
            "secondaries": [knot.secondary_config()],
            "check_timeout": CHECK_TIMEOUT,
            "caa_identities": ["letsencrypt.org"],  # pebble is no CA csrproxy knows
        }
        overrides = {"dns": dns}
        with start_csrproxy(
            str(work / "csrproxy"), pebble, dns_port, ZONE, overrides=overrides
        ) as daemon:
            knot.wait_serving()
            yield Setup(daemon, knot, dns_port, secret)


def sign(daemon: Csrproxy, name: str) -> tuple[int, bytes]:
    return post_sign(daemon, make_csr([name]))


def metric(daemon: Csrproxy, pattern: str) -> float:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{pattern} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_twenty_certificates_validated_through_the_secondary(setup: Setup) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: sign(setup.daemon, f"sec{i}.{ZONE}"), range(20)))
    elapsed = time.monotonic() - started
    for code, body in results:
        assert code == 200, body[:500]
        assert body.startswith(b"-----BEGIN CERTIFICATE-----")
    label = 'backend="builtin"'
    checks = metric(setup.daemon, rf"csrproxy_challenge_check_seconds_count\{{{label}\}}")
    total = metric(setup.daemon, rf"csrproxy_challenge_check_seconds_sum\{{{label}\}}")
    assert checks >= 20, checks
    print(f"20 certificates through Knot in {elapsed:.1f}s; check {total / checks:.3f}s avg")
    log = Path(setup.knot.log_path).read_text()
    # Knot followed the changes by incremental transfer (not only the first AXFR).
    assert re.search(r"IXFR, incoming, remote [^,]+, finished", log), log[-2000:]


def transfer(setup: Setup, keyring: dict[Any, Any] | None) -> Any:
    import dns.message
    import dns.query
    import dns.rdatatype

    query = dns.message.make_query(ZONE, dns.rdatatype.AXFR)
    if keyring is not None:
        query.use_tsig(keyring)
    return dns.query.tcp(query, "127.0.0.1", timeout=5, port=setup.dns_port)


def test_a_transfer_without_the_key_or_with_a_wrong_one_is_refused(setup: Setup) -> None:
    import dns.rcode
    import dns.tsig
    import dns.tsigkeyring

    assert transfer(setup, None).rcode() == dns.rcode.REFUSED
    wrong = dns.tsigkeyring.from_text({TSIG_NAME: base64.b64encode(os.urandom(32)).decode()})
    with pytest.raises(dns.tsig.PeerBadSignature):
        transfer(setup, wrong)
    other = dns.tsigkeyring.from_text({"other-key": setup.secret})
    with pytest.raises(dns.tsig.PeerBadKey):
        transfer(setup, other)
    right = dns.tsigkeyring.from_text({TSIG_NAME: setup.secret})
    reply = transfer(setup, right)
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer


def test_the_secondary_serves_the_apex_caa_with_our_account(setup: Setup) -> None:
    import dns.message
    import dns.query

    with urllib.request.urlopen(setup.daemon.url + "/v1/health", timeout=5) as resp:
        account = json.loads(resp.read())["account"]
    value = f'"letsencrypt.org; accounturi={account}; validationmethods=dns-01"'
    wanted = [f"0 issue {value}", f"0 issuewild {value}"]
    found: list[str] = []
    pause = threading.Event()
    deadline = time.monotonic() + 10  # NOTIFY, then Knot's IXFR
    while found != wanted and time.monotonic() < deadline:
        query = dns.message.make_query(ZONE, "CAA")
        answer = dns.query.udp(query, "127.0.0.1", port=setup.knot.port, timeout=2)
        found = sorted(rdata.to_text() for rrset in answer.answer for rdata in rrset)
        pause.wait(0.05)
    assert found == wanted


def test_with_the_secondary_stopped_orders_fail_within_check_timeout(setup: Setup) -> None:
    setup.knot.stop()
    started = time.monotonic()
    code, body = sign(setup.daemon, f"stopped.{ZONE}")
    elapsed = time.monotonic() - started
    assert code == 503, body
    problem = json.loads(body)
    assert problem["type"].endswith("/dns-publish"), problem
    assert f"127.0.0.1:{setup.knot.port}" in problem["detail"], problem
    assert elapsed < CHECK_TIMEOUT + 5, elapsed
