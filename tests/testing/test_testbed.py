"""The loopback testbed launchers: pebble and PowerDNS come up, answer, and go away."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from csrproxy.testing.pebble import PEBBLE_BIN, start_pebble
from csrproxy.testing.ports import free_port, free_udp_tcp_port
from csrproxy.testing.powerdns import start_powerdns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (shutil.which("pdns_server") and shutil.which("pdnsutil")
             and Path(PEBBLE_BIN).exists()),
        reason="pebble / PowerDNS not installed"),
]

ZONE = "go.example.test"


def _port_bindable(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _port(url: str) -> int:
    return int(url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def test_free_ports() -> None:
    p = free_udp_tcp_port()
    assert _port_bindable(p) and _port_bindable(p, socket.SOCK_DGRAM)
    assert 0 < free_port("udp") < 65536


def test_pebble_starts_serves_directory_and_root_then_stops(tmp_path: Path) -> None:
    nothing = f"127.0.0.1:{free_udp_tcp_port()}"
    with start_pebble(str(tmp_path), nothing, validity_seconds=3600) as peb:
        assert peb.directory.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=peb.ca_cert)
        with urllib.request.urlopen(peb.directory, context=ctx, timeout=5) as r:
            d = json.load(r)
        assert {"newNonce", "newAccount", "newOrder"} <= set(d)
        assert d["newOrder"].startswith(peb.directory.rsplit("/", 1)[0])
        root = x509.load_pem_x509_certificate(peb.root_pem())
        inter = x509.load_pem_x509_certificate(peb.intermediate_pem())
        assert inter.issuer == root.subject
        conf = json.loads(Path(peb.config_path).read_text())["pebble"]
        assert conf["certificateValidityPeriod"] == 3600
        assert conf["externalAccountBindingRequired"] is False
        ports = [_port(peb.directory), _port(peb.management)]
        # without a trusted CA the listener must be refused
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(peb.directory, context=ssl.create_default_context(), timeout=5)
    assert peb.proc is not None and peb.proc.returncode is not None
    peb.stop()  # idempotent
    assert all(_port_bindable(p) for p in ports)


def test_pebble_failure_reports_log_tail(tmp_path: Path) -> None:
    # an unparseable listen address makes pebble exit at once
    with pytest.raises(RuntimeError, match="pebble exited"):
        start_pebble(str(tmp_path), "127.0.0.1:1",
                             extra_config={"listenAddress": "127.0.0.1:notaport"}, timeout=10)


def test_powerdns_serves_zone_and_api_changes(tmp_path: Path) -> None:
    records = [("@", "A", "127.0.0.1"), ("ns1", "A", "127.0.0.1")]
    with start_powerdns(str(tmp_path), ZONE, records) as pdns:
        name = f"_acme-challenge.host.{ZONE}."
        assert pdns.query(name) == (3, [])  # NXDOMAIN before
        pdns.api("PATCH", pdns.zone_url, {"rrsets": [{
            "name": name, "type": "TXT", "ttl": 60, "changetype": "REPLACE",
            "records": [{"content": '"token-one"', "disabled": False}]}]})
        assert pdns.query(name) == (0, [b"token-one"])
        pdns.set_txt(name, ["a", "b"])
        rcode, txt = pdns.query(name.upper())  # case-insensitive
        assert rcode == 0 and sorted(txt) == [b"a", b"b"]
        sets = {(r["name"], r["type"]): r for r in pdns.rrsets()}
        assert sorted(x["content"] for x in sets[(name, "TXT")]["records"]) == ['"a"', '"b"']
        assert (f"ns1.{ZONE}.", "A") in sets
        assert pdns.query(ZONE, "A") == (0, [bytes([127, 0, 0, 1])])
        pdns.set_txt(name, [])
        assert pdns.query(name) == (3, [])
        assert pdns.query("example.org", "A")[0] == 5  # REFUSED outside the zone
        ports = [pdns.dns_port, _port(pdns.api_url)]
        conf = (Path(pdns.config_dir) / "pdns.conf").read_text()
        assert "cache-ttl=0" in conf and "disable-axfr=yes" in conf
    pdns.stop()
    assert all(_port_bindable(p) for p in ports)
    assert _port_bindable(ports[0], socket.SOCK_DGRAM)
