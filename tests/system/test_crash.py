"""kill -9 at each point of an order, restart, and check that nothing is lost or doubled.

The daemon SIGKILLs itself at the point named by CSRPROXY_CRASH_AT (csrproxy.crashpoints).
After a restart on the same state directory: one ACME account, the client's retry (sync)
or poll (async) gets a valid certificate, no order is placed again, no challenge record
is left, and the CSR has one certificate.  With a CA that looks records up seconds after
the answer, several async orders killed in flight all end valid after an immediate restart.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
from csrproxy.testing.faultprocess import FaultProxyProcess, start_faultproxy
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
        assert statuses == ["issued"], statuses


@pytest.fixture(scope="module")
def slow_dns_port() -> int:
    return free_udp_tcp_port()


@pytest.fixture(scope="module")
def slow_pebble(tmp_path_factory: pytest.TempPathFactory, slow_dns_port: int) -> Iterator[Pebble]:
    # Each of pebble's three look-ups waits 0, 1 or 2 s after the answer, as a real CA's
    # may: most land after csrproxy is back.
    env = {"PEBBLE_VA_NOSLEEP": "0", "PEBBLE_VA_SLEEPTIME": "3"}
    with start_pebble(
        str(tmp_path_factory.mktemp("slow-pebble")), f"127.0.0.1:{slow_dns_port}", env=env
    ) as p:
        yield p


@pytest.fixture(scope="module")
def slow_ca(
    tmp_path_factory: pytest.TempPathFactory, slow_pebble: Pebble
) -> Iterator[FaultProxyProcess]:
    proxy = start_faultproxy(str(tmp_path_factory.mktemp("slow-proxy")), slow_pebble)
    yield proxy
    proxy.stop()


def kill_when_answered(daemon: Csrproxy, challenges: int) -> None:
    """SIGKILL ``daemon`` as soon as its metrics count ``challenges`` answered challenges."""
    pause = threading.Event()
    for _ in range(1000):
        if acme_count(daemon, "challenge") >= challenges:
            break
        pause.wait(0.01)
    daemon.proc.kill()


@pytest.mark.parametrize("kill", ["at-first-answer", "after-every-answer"])
def test_immediate_restart_finishes_every_async_order(
    tmp_path: Path,
    slow_pebble: Pebble,
    slow_ca: FaultProxyProcess,
    slow_dns_port: int,
    kill: str,
) -> None:
    """Async orders killed after their challenge was answered, the CA's look-ups still to
    come and the CA slow to answer the first reads after the restart: every one ends valid,
    each ordered afresh at most once, and no challenge record is left."""
    n = 6
    names = [f"inflight{i}-{kill}.{ZONE}" for i in range(n)]
    csrs = [make_csr([name], ec.generate_private_key(ec.SECP256R1())) for name in names]
    work = str(tmp_path / "csrproxy")
    overrides = {"acme": {"directory": slow_ca.directory}}
    env = {"CSRPROXY_CRASH_AT": "after-challenge"} if kill == "at-first-answer" else {}
    slow_ca.clear_rules()
    first = start_csrproxy(work, slow_pebble, slow_dns_port, ZONE, overrides=overrides, env=env)
    together = threading.Barrier(n)

    def submit(csr: bytes) -> str | None:
        together.wait(10)
        try:
            code, _, headers = post(first.url, csr, prefer_async=True)
        except OSError:  # the daemon died first
            return None
        return headers["Location"].rsplit("/", 1)[1] if code == 202 else None

    with first:  # stopped whatever happens
        with ThreadPoolExecutor(n) as pool:
            accepted = [i for i in pool.map(submit, csrs) if i is not None]
        if kill == "after-every-answer":
            assert len(accepted) == n
            kill_when_answered(first, n)
        assert first.proc.wait(30) == -9, "did not die"
    assert len(accepted) >= 2, accepted

    # The resumed orders' first authorization reads take 1.5 s: the CA's look-ups come
    # before the resumed orders could publish anything themselves.
    slow_ca.add_rules([f"POST:/authZ/:delay:1.5:count={n}"])
    try:
        with start_csrproxy(work, slow_pebble, slow_dns_port, ZONE, overrides=overrides) as second:
            docs = [wait_valid(second, order_id) for order_id in accepted]
            assert [d["status"] for d in docs] == ["valid"] * len(accepted), docs
            # At most one fresh order for each order the crash interrupted.
            assert acme_count(second, "newOrder") <= len(accepted)
            for name in names:
                q = dns.message.make_query(f"_acme-challenge.{name}", "TXT")
                answer = dns.query.udp(q, "127.0.0.1", port=slow_dns_port, timeout=5)
                assert not answer.answer, f"a challenge record of {name} is still served"
    finally:
        slow_ca.clear_rules()
    with sqlite3.connect(tmp_path / "csrproxy" / "state" / "csrproxy.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM challenges").fetchone()[0] == 0
        statuses = dict(db.execute("SELECT id, status FROM orders").fetchall())
        assert all(statuses[i] == "issued" for i in accepted), statuses
