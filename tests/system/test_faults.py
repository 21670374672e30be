"""The daemon against real pebble that goes away and comes back.

pebble forgets everything when it restarts (accounts, orders, nonces): it is restarted here
on the same ports, from the same configuration, so the directory URL csrproxy knows stays
the same.  csrproxy is never restarted.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from csrproxy.client import obtain_certificate
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import PEBBLE_BIN, PEBBLE_ENV_DEFAULTS, Pebble, start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from csrproxy.testing.processes import https_get, spawn
from tests.conftest import ZONE
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration


@contextmanager
def stack(tmp: Path) -> Iterator[tuple[Pebble, Csrproxy]]:
    dns_port = free_udp_tcp_port()
    with (
        start_pebble(str(tmp / "pebble"), f"127.0.0.1:{dns_port}") as pebble,
        start_csrproxy(str(tmp / "csrproxy"), pebble, dns_port, ZONE) as daemon,
    ):
        yield pebble, daemon


def start_again(pebble: Pebble) -> None:
    """Start a stopped pebble on its own ports and configuration (it remembers nothing)."""
    env = {**os.environ, **PEBBLE_ENV_DEFAULTS}
    argv = [PEBBLE_BIN, "-config", pebble.config_path, "-dnsserver", pebble.dns_server]
    proc = spawn(argv, pebble.log_path, env)
    ready = lambda: "newNonce" in json.loads(https_get(pebble.directory, pebble.ca_cert, 1))  # noqa: E731
    pebble.adopt(proc, ready, "pebble (restarted)", 20)


def sign(
    daemon: Csrproxy, csr: bytes, prefer_async: bool = False, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Prefer": "respond-async"} if prefer_async else {}
    req = urllib.request.Request(daemon.url + "/v1/sign", csr, headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def new_csr(label: str) -> bytes:
    return make_csr([f"{label}.{ZONE}"], ec.generate_private_key(ec.SECP256R1()))


def pause(seconds: float) -> None:
    threading.Event().wait(seconds)


def test_an_order_succeeds_after_pebble_restarted_and_forgot_the_account(tmp_path: Path) -> None:
    with stack(tmp_path) as (pebble, daemon):
        got = obtain_certificate(
            daemon.url, tmp_path / "before", [f"before.{ZONE}"], root_pem=pebble.root_pem()
        )
        assert got.names == [f"before.{ZONE}"]
        pebble.stop()
        start_again(pebble)
        # Its issuing root changed with the restart; csrproxy's directory URL did not.
        got = obtain_certificate(
            daemon.url, tmp_path / "after", [f"after.{ZONE}"], root_pem=pebble.root_pem()
        )
        assert got.names == [f"after.{ZONE}"]
        log = daemon.log.read_text()
    assert "does not know account" in log
    assert log.count("registered") >= 2, "the account was not registered again"


def test_ca_down_fails_fast_with_retry_after_and_recovers_on_its_own(tmp_path: Path) -> None:
    with stack(tmp_path) as (pebble, daemon):
        pebble.stop()
        # Orders already under way when the CA went: their failures open the breaker.
        waiting = []
        for i in range(5):
            code, headers, body = sign(daemon, new_csr(f"inflight{i}"), prefer_async=True)
            assert code == 202, body
            waiting.append(headers["Location"])
        for _ in range(100):
            if "CA circuit open" in daemon.log.read_text():
                break
            pause(0.1)
        # A new request now fails at once instead of waiting out sync_timeout (50 s).
        began = time.monotonic()
        code, headers, body = sign(daemon, new_csr("fast"))
        took = time.monotonic() - began
        assert code == 503, (code, body)
        assert took < 2.0, f"a refusal took {took:.1f}s"
        doc = json.loads(body)
        assert doc["status"] == 503, doc
        retry_after = int(headers["Retry-After"])
        assert 1 <= retry_after <= 10, headers

        start_again(pebble)
        # Retried as told, the sign request gets its chain once the probe found the CA back.
        deadline = time.monotonic() + 40
        csr = new_csr("recovered")
        while True:
            code, headers, body = sign(daemon, csr)
            if code == 200:
                break
            assert code == 503 and time.monotonic() < deadline, (code, body)
            pause(int(headers["Retry-After"]))
        assert body.startswith(b"-----BEGIN CERTIFICATE-----")
        # The orders that waited out the outage finish too (on the account registered again).
        for location in waiting:
            for _ in range(600):
                doc = get_json(daemon.url + location)
                if doc["status"] != "processing":
                    break
                pause(0.1)
            assert doc["status"] == "valid", doc
