"""The Unbound launcher: it resolves a stub zone from PowerDNS, caches, and goes away."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from csrproxy.testing.powerdns import start_powerdns
from csrproxy.testing.unbound import UNBOUND, start_unbound, unbound_config
from tests.conftest import need

ZONE = "stub.example.test"


def test_config_has_the_hardening_and_each_stub() -> None:
    conf = unbound_config(
        "/w", 5300, {ZONE: "127.0.0.1:5301", "other.example": "127.0.0.1:5302"}, "/w/log", None
    )
    for line in (
        "use-caps-for-id: yes",
        "qname-minimisation-strict: yes",
        "harden-below-nxdomain: yes",
        "edns-buffer-size: 1232",
        "cache-max-ttl: 60",
        'module-config: "validator iterator"',
        'local-zone: "test." nodefault',
        'domain-insecure: "stub.example.test."',
        "stub-addr: 127.0.0.1@5301",
        "stub-addr: 127.0.0.1@5302",
        "outgoing-interface: 127.0.0.1",
    ):
        assert line in conf, line
    assert "trust-anchor-file" not in conf


@pytest.mark.integration
def test_resolves_from_powerdns_caches_and_stops(tmp_path: Path) -> None:
    need("/usr/sbin/pdns_server")
    need(UNBOUND)
    name = f"_acme-challenge.a1.{ZONE}"
    with start_powerdns(str(tmp_path), ZONE, [("@", "A", "127.0.0.1")]) as pdns:
        pdns.set_txt(name, ["first"], ttl=10)
        with start_unbound(str(tmp_path), {ZONE: pdns.dns_server}) as unbound:
            unbound.wait_serving()
            assert unbound.query(name) == (0, [b"first"])
            pdns.set_txt(name, ["second"], ttl=10)
            assert pdns.query(name) == (0, [b"second"])
            assert unbound.query(name) == (0, [b"first"])  # from its cache, for 10 s
            assert unbound.query(f"none.{ZONE}", "A")[0] == 3  # NXDOMAIN
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", unbound.port))  # gone with it
