"""A restart costs the CA nothing it does not need, and loses nothing (issue 14).

After certificates were issued (sync and async), a restart asks the CA only for the account
set-up (directory, nonce, account look-up), resumes nothing, still serves every certificate
and async order of the earlier run, and keeps the admission budgets spent — after SIGTERM
and after kill -9.  A second daemon on the same state directory is refused.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from tests.conftest import ZONE
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration

#: What a restart may ask of the CA: the account set-up, nothing per certificate or order.
ACCOUNT_SETUP = {"directory", "newNonce", "newAccount"}


@pytest.fixture(scope="module")
def dns_port() -> int:
    return free_udp_tcp_port()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory, dns_port: int) -> Iterator[Pebble]:
    with start_pebble(str(tmp_path_factory.mktemp("pebble")), f"127.0.0.1:{dns_port}") as p:
        yield p


def request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def acme_requests(daemon: Csrproxy) -> dict[str, float]:
    text = request(daemon.url + "/metrics")[1].decode()
    counts: dict[str, float] = {}
    pattern = r'^csrproxy_acme_requests_total\{endpoint="([^"]+)",status="\d+"\} (\S+)$'
    for m in re.finditer(pattern, text, re.M):
        counts[m.group(1)] = counts.get(m.group(1), 0.0) + float(m.group(2))
    return counts


def wait_valid(daemon: Csrproxy, order_id: str) -> None:
    pause = threading.Event()
    for _ in range(600):
        code, body, _ = request(f"{daemon.url}/v1/orders/{order_id}")
        if code == 200 and json.loads(body)["status"] != "processing":
            assert json.loads(body)["status"] == "valid", body
            return
        pause.wait(0.05)
    raise AssertionError(f"order {order_id} did not end")


def test_a_restart_asks_the_ca_for_the_account_only(
    tmp_path: Path, pebble: Pebble, dns_port: int
) -> None:
    work = str(tmp_path / "csrproxy")
    issued: dict[str, bytes] = {}
    with start_csrproxy(work, pebble, dns_port, ZONE) as first:
        for i in range(4):
            code, chain, headers = request(first.url + "/v1/sign", make_csr([f"restart{i}.{ZONE}"]))
            assert code == 200, chain
            issued[headers["csrproxy-certificate-id"]] = chain
        code, body, headers = request(
            first.url + "/v1/sign",
            make_csr([f"restart-async.{ZONE}"]),
            {"Prefer": "respond-async"},
        )
        assert code == 202, body
        order_id = json.loads(body)["id"]
        wait_valid(first, order_id)
    log_before = (tmp_path / "csrproxy" / "csrproxy.log").read_text()

    with start_csrproxy(work, pebble, dns_port, ZONE) as second:
        # Give recovery, the renewal pass and the ARI workers a moment to do anything.
        threading.Event().wait(3)
        asked = acme_requests(second)
        assert set(asked) <= ACCOUNT_SETUP, asked
        assert sum(asked.values()) <= 3, asked
        for cid, chain in issued.items():
            code, got, _ = request(f"{second.url}/v1/certificates/{cid}")
            assert (code, got) == (200, chain)
        code, body, _ = request(f"{second.url}/v1/orders/{order_id}")
        assert code == 200 and json.loads(body)["status"] == "valid", body
        code, got, _ = request(f"{second.url}/v1/orders/{order_id}/certificate")
        assert code == 200 and got.startswith(b"-----BEGIN CERTIFICATE-----")
    log_after = (tmp_path / "csrproxy" / "csrproxy.log").read_text()[len(log_before) :]
    assert "resuming" not in log_after, log_after


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_budgets_stay_spent_across_a_restart(
    tmp_path: Path, pebble: Pebble, dns_port: int, how: str
) -> None:
    work = str(tmp_path / "csrproxy")
    overrides = {"policy": {"orders_per_3h": 2}}
    with start_csrproxy(work, pebble, dns_port, ZONE, overrides=overrides) as first:
        for i in range(2):
            code, body, _ = request(first.url + "/v1/sign", make_csr([f"budget{i}.{ZONE}"]))
            assert code == 200, body
        code, body, _ = request(first.url + "/v1/sign", make_csr([f"budget2.{ZONE}"]))
        assert code == 429, body
        first.proc.send_signal(getattr(signal, how))
        first.proc.wait(30)
    with start_csrproxy(work, pebble, dns_port, ZONE, overrides=overrides) as second:
        code, body, headers = request(second.url + "/v1/sign", make_csr([f"budget3.{ZONE}"]))
        assert code == 429, body
        assert json.loads(body)["reason"] == "orders", body
        assert int(headers["retry-after"]) > 60
        assert acme_requests(second).get("newOrder", 0) == 0


def test_a_second_daemon_on_the_same_state_directory_is_refused(
    tmp_path: Path, pebble: Pebble, dns_port: int
) -> None:
    work = str(tmp_path / "csrproxy")
    with start_csrproxy(work, pebble, dns_port, ZONE):
        other = str(tmp_path / "other")
        Path(other).mkdir()
        # The same state directory, another working directory (config, log, pid file).
        state = str(tmp_path / "csrproxy" / "state")
        with pytest.raises(RuntimeError) as e:
            start_csrproxy(
                other, pebble, free_udp_tcp_port(), ZONE, overrides={"state": {"dir": state}}
            )
        assert "uses" in str(e.value), str(e.value)
