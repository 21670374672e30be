"""kill -9 at each point of an order, restart, and check that nothing is lost or doubled.

The daemon SIGKILLs itself at the point named by CSRPROXY_CRASH_AT (csrproxy.crashpoints).
After a restart on the same state directory: one ACME account, the client's retry (sync)
or poll (async) gets a valid certificate, no order is placed again, no challenge record
is left, and the CSR has one certificate.
"""

from __future__ import annotations

import json
import re
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from csrproxy.testing.crashpoints import POINTS
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from tests.conftest import ZONE
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def crash_dns_port() -> int:
    return free_udp_tcp_port()


@pytest.fixture(scope="module")
def crash_pebble(tmp_path_factory: pytest.TempPathFactory, crash_dns_port: int) -> Iterator[Pebble]:
    with start_pebble(str(tmp_path_factory.mktemp("pebble")), f"127.0.0.1:{crash_dns_port}") as p:
        yield p


def post(url: str, body: bytes, prefer_async: bool = False) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Prefer": "respond-async"} if prefer_async else {}
    req = urllib.request.Request(url + "/v1/sign", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def account_of(daemon: Csrproxy) -> str:
    return str(json.loads(get(daemon.url + "/v1/health")[1])["account"])


def acme_count(daemon: Csrproxy, endpoint: str) -> float:
    text = get(daemon.url + "/metrics")[1].decode()
    pattern = rf'^csrproxy_acme_requests_total\{{endpoint="{endpoint}",status="\d+"\}} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


def wait_valid(daemon: Csrproxy, order_id: str) -> dict[str, Any]:
    import threading

    pause = threading.Event()
    for _ in range(600):
        code, body = get(f"{daemon.url}/v1/orders/{order_id}")
        assert code == 200, body
        doc: dict[str, Any] = json.loads(body)
        if doc["status"] != "processing":
            return doc
        pause.wait(0.05)
    raise AssertionError(f"order {order_id} still processing")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("point", POINTS)
def test_crash_and_restart(
    tmp_path: Path,
    crash_pebble: Pebble,
    crash_dns_port: int,
    point: str,
    asynchronous: bool,
) -> None:
    name = f"{point}-{'a' if asynchronous else 's'}.{ZONE}"
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr([name], key)
    work = str(tmp_path / "csrproxy")

    first = start_csrproxy(
        work, crash_pebble, crash_dns_port, ZONE, env={"CSRPROXY_CRASH_AT": point}
    )
    account = account_of(first)
    order_id = None
    if asynchronous:
        code, body, headers = post(first.url, csr, prefer_async=True)
        assert code == 202, body
        order_id = headers["Location"].rsplit("/", 1)[1]
    else:
        with pytest.raises((ConnectionError, urllib.error.URLError, OSError)):
            post(first.url, csr)
    assert first.proc.wait(30) == -9, f"did not die at {point}"

    with start_csrproxy(work, crash_pebble, crash_dns_port, ZONE) as second:
        assert account_of(second) == account, "a second ACME account"
        if asynchronous:
            assert order_id is not None
            doc = wait_valid(second, order_id)
            assert doc["status"] == "valid", doc
            code, chain = get(f"{second.url}/v1/orders/{order_id}/certificate")
        else:
            code, chain, _ = post(second.url, csr)
        assert code == 200, chain
        leaf = x509.load_pem_x509_certificates(chain)[0]
        assert leaf.public_key() == key.public_key()
        # The retry joined the resumed order: nothing was ordered or finalized again.
        assert acme_count(second, "newOrder") == 0
        if point in ("after-finalize", "after-download"):
            assert acme_count(second, "finalize") == 0
        # No challenge record left, in the zone or on record.
        q = dns.message.make_query(f"_acme-challenge.{name}", "TXT")
        answer = dns.query.udp(q, "127.0.0.1", port=crash_dns_port, timeout=5)
        assert not answer.answer
    with sqlite3.connect(tmp_path / "csrproxy" / "state" / "csrproxy.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM challenges").fetchone()[0] == 0
        serials = {
            x509.load_pem_x509_certificates(row[0].encode())[0].serial_number
            for row in db.execute("SELECT chain FROM certificates")
        }
        assert len(serials) == 1, "the CSR has two certificates"
        statuses = [r[0] for r in db.execute("SELECT status FROM orders")]
        assert statuses == ["valid"], statuses
