"""Names that carry their address, end to end: pebble issues ``10-0-0-5.<key>.<zone>`` (its
dns-01 answered below that name) and ``dig`` gets ``A 10.0.0.5`` computed from the name."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from csrproxy.names import key_label
from csrproxy.testing.daemon import start_csrproxy
from csrproxy.testing.pebble import start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from tests.conftest import ZONE, need
from tests.support.api import post_sign
from tests.support.keys import EC256, make_csr

pytestmark = pytest.mark.integration



def dig(port: int, name: str, rdtype: str) -> str:
    return subprocess.run(
        ["dig", "+short", "+norec", "-p", str(port), "@127.0.0.1", name, rdtype],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout.strip()  # fmt: skip


def test_an_address_name_is_issued_and_resolves_to_its_address(tmp_path: Path) -> None:
    need("/usr/bin/pebble")
    dns_port = free_udp_tcp_port()
    key = key_label(
        EC256.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    name, v6 = f"10-0-0-5.{key}.{ZONE}", f"fd00--7.{key}.{ZONE}"
    policy = {"names": [f"{{ip}}.{{key}}.{ZONE}", f"{{label}}.{ZONE}"]}
    with (
        start_pebble(str(tmp_path / "pebble"), f"127.0.0.1:{dns_port}") as pebble,
        start_csrproxy(
            str(tmp_path / "d"), pebble, dns_port, ZONE, overrides={"policy": policy}
        ) as daemon,
    ):
        assert dig(dns_port, name, "A") == "10.0.0.5"
        assert dig(dns_port, v6, "AAAA") == "fd00::7"
        assert dig(dns_port, f"8-8-8-8.{key}.{ZONE}", "A") == "127.0.0.1"  # the wildcard
        code, body = post_sign(daemon, make_csr([name, v6], EC256))
        assert code == 200, body
        leaf = x509.load_pem_x509_certificates(body)[0]
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted([name, v6])
        code, body = post_sign(daemon, make_csr([f"8-8-8-8.{key}.{ZONE}"], EC256))
        assert code == 403 and b"name-not-allowed" in body, body
