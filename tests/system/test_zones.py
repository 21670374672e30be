"""Several zones (``[dns] zones``) served by one ``twistd csrproxy`` (issue 17).

csrproxy is authoritative for two zones; Knot DNS (when installed) is a secondary of
both, and pebble asks only Knot, so each certificate below was validated through a zone
transfer of its own zone. ``dig`` shows both zones' SOA at csrproxy and at Knot; health
and metrics list each zone, and ``GET /v1/name`` hands out a name in the first zone.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from csrproxy.names import key_label
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.knot import Knot, secondary_port, start_knot
from csrproxy.testing.knot import available as knot_available
from csrproxy.testing.pebble import start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from tests.conftest import need
from tests.support.api import post_sign
from tests.support.keys import EC256, make_csr

pytestmark = pytest.mark.integration

FIRST, SECOND = "go.example.test", "go-other.example.test"
ZONES = [FIRST, SECOND]
# The daemon runs this checkout's code, not whichever csrproxy the venv has installed.


@dataclass
class Setup:
    daemon: Csrproxy
    dns_port: int
    knot: Knot | None


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    need("/usr/bin/pebble")
    work = tmp_path_factory.mktemp("zones")
    dns_port = free_udp_tcp_port()
    dns: dict[str, Any] = {
        "zones": ZONES,
        "caa_identities": ["pebble.test"],  # pebble does not check CAA
    }
    policy = {"names": [f"{{label}}.{z}" for z in ZONES] + [f"{{key}}.{z}" for z in ZONES]}
    with_knot = knot_available()
    knot_port = secondary_port() if with_knot else 0
    asked = f"127.0.0.1:{knot_port}" if with_knot else f"127.0.0.1:{dns_port}"
    with start_pebble(str(work / "pebble"), asked) as pebble:
        if not with_knot:
            with start_csrproxy(
                str(work / "csrproxy"),
                pebble,
                dns_port,
                FIRST,
                overrides={"dns": dns, "policy": policy},
            ) as daemon:
                yield Setup(daemon, dns_port, None)
            return
        secret = base64.b64encode(os.urandom(32)).decode()
        with start_knot(
            str(work),
            FIRST,
            f"127.0.0.1:{dns_port}",
            port=knot_port,
            tsig_secret=secret,
            also=[SECOND],
        ) as knot:
            dns["secondaries"] = [knot.secondary_config()]
            dns["check_timeout"] = 10.0
            with start_csrproxy(
                str(work / "csrproxy"),
                pebble,
                dns_port,
                FIRST,
                overrides={"dns": dns, "policy": policy},
            ) as daemon:
                knot.wait_serving()
                yield Setup(daemon, dns_port, knot)


def get(daemon: Csrproxy, path: str, body: bytes | None = None) -> Any:
    req = urllib.request.Request(daemon.url + path, data=body, method="GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        data = resp.read()
    return data.decode() if path == "/metrics" else json.loads(data)


def dig_soa(port: int, zone: str) -> str:
    return subprocess.run(
        ["dig", "+norec", "-p", str(port), "@127.0.0.1", zone, "SOA"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout


def test_one_certificate_in_each_zone(setup: Setup) -> None:
    for name in (f"first.{FIRST}", f"second.{SECOND}"):
        code, body = post_sign(setup.daemon, make_csr([name]))
        assert code == 200, body[:500]
        leaf = x509.load_pem_x509_certificate(body)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
    # A name in neither zone is refused by policy before any order.
    code, _ = post_sign(setup.daemon, make_csr(["x.example.test"]))
    assert code == 403


def test_dig_shows_the_soa_of_both_zones(setup: Setup) -> None:
    ports = [setup.dns_port] + ([setup.knot.port] if setup.knot is not None else [])
    for port in ports:
        for zone in ZONES:
            out = dig_soa(port, zone)
            assert "status: NOERROR" in out, out
            assert re.search(
                rf"^{re.escape(zone)}\.\s+\d+\s+IN\s+SOA\s+ns1\.{FIRST}\.", out, re.M
            ), out
    assert "status: REFUSED" in dig_soa(setup.dns_port, "example.test")


def test_health_and_metrics_per_zone(setup: Setup) -> None:
    health = get(setup.daemon, "/v1/health")
    assert [z["origin"] for z in health["zones"]] == ZONES
    assert all(z["serial"] > 0 and z["records"] >= 3 for z in health["zones"])
    text = get(setup.daemon, "/metrics")
    for zone in ZONES:
        assert f'csrproxy_dns_zone_serial{{zone="{zone}"}}' in text
        assert f'csrproxy_dns_zone_challenges{{zone="{zone}"}} 0.0' in text


def test_name_handed_out_in_the_first_zone_and_kept(setup: Setup) -> None:
    pem = EC256.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    label = key_label(
        EC256.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert get(setup.daemon, "/v1/name", pem)["names"] == [f"{{label}}.{FIRST}", f"{label}.{FIRST}"]
    kept = get(setup.daemon, f"/v1/name?current={label}.{SECOND}", pem)
    assert kept["names"] == [f"{label}.{SECOND}"]
