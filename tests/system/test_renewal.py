"""Server-side renewal against pebble with 20-second certificates.

An installation that keeps asking (GET /v1/certificates/<id>) gets a renewed chain for the
same key without posting again; one that stopped asking is not renewed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from csrproxy.issuance.csr import check_csr
from csrproxy.testing.daemon import start_csrproxy
from csrproxy.testing.pebble import start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from tests.conftest import ZONE
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration

LIFETIME = 20  # seconds; renewal is due between 2/3 and 3/4 of it


def post(url: str, csr: bytes) -> tuple[bytes, str]:
    req = urllib.request.Request(url + "/v1/sign", data=csr, method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read(), resp.headers["CSRProxy-Certificate-Id"]


def newest(url: str, cid: str) -> x509.Certificate:
    with urllib.request.urlopen(f"{url}/v1/certificates/{cid}", timeout=30) as resp:
        return x509.load_pem_x509_certificates(resp.read())[0]


def test_active_installation_renewed_inactive_not(tmp_path: Path) -> None:
    dns_port = free_udp_tcp_port()
    with (
        start_pebble(
            str(tmp_path / "pebble"), f"127.0.0.1:{dns_port}", validity_seconds=LIFETIME
        ) as pebble,
        start_csrproxy(
            str(tmp_path / "csrproxy"),
            pebble,
            dns_port,
            ZONE,
            # Active means: asked within the last 8 seconds.
            overrides={"renewal": {"active_days": 8 / 86400, "interval": 0.5}},
        ) as daemon,
    ):
        active_key = ec.generate_private_key(ec.SECP256R1())
        idle_key = ec.generate_private_key(ec.SECP256R1())
        active_csr = make_csr([f"active.{ZONE}"], active_key)
        idle_csr = make_csr([f"idle.{ZONE}"], idle_key)
        chain, active_id = post(daemon.url, active_csr)
        first = x509.load_pem_x509_certificates(chain)[0]
        post(daemon.url, idle_csr)
        start = time.monotonic()
        pause = threading.Event()
        renewed = None
        while time.monotonic() - start < LIFETIME + 5:
            leaf = newest(daemon.url, active_id)  # also keeps the installation active
            if leaf.serial_number != first.serial_number:
                renewed = leaf
                break
            pause.wait(1.0)
        assert renewed is not None, "the active installation's certificate was not renewed"
        assert renewed.public_key() == active_key.public_key()
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        # Give the idle one the same time to be (wrongly) renewed.
        pause.wait(2.0)
    db = sqlite3.connect(tmp_path / "csrproxy" / "state" / "csrproxy.sqlite3")
    with db:
        counts = dict(
            db.execute("SELECT request_key, COUNT(*) FROM certificates GROUP BY request_key")
        )
    assert counts[check_csr(active_csr).request_key] == 2
    assert counts[check_csr(idle_csr).request_key] == 1, "an inactive installation was renewed"
