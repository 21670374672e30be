"""End to end: twistd csrproxy, real pebble validating through our DNS server."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from cryptography import x509

from csrproxy.client import obtain_certificate
from csrproxy.testing.daemon import Csrproxy, to_toml, twistd_argv
from csrproxy.testing.pebble import Pebble
from tests.conftest import ZONE
from tests.support.api import post_sign
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration


def acme_requests(daemon: Csrproxy, endpoint: str) -> float:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for m in re.finditer(
        r'^csrproxy_acme_requests_total\{endpoint="([^"]+)",status="\d+"\} (\S+)$', text, re.M
    ):
        if m.group(1) == endpoint:
            total += float(m.group(2))
    return total


def query(port: int, name: str, rdtype: str, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(q, "127.0.0.1", port=port, timeout=5)


def test_issues_end_to_end(daemon: Csrproxy, pebble: Pebble, dns_port: int, tmp_path: Path) -> None:
    name = f"e2e.{ZONE}"
    result = obtain_certificate(daemon.url, tmp_path, [name], root_pem=pebble.root_pem())
    assert result.leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == [name]
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
    # Nothing left in the zone after the order (the "*" A record makes it NODATA).
    answer = query(dns_port, f"_acme-challenge.{name}", "TXT")
    assert answer.rcode() == dns.rcode.NOERROR
    assert not answer.answer
    assert answer.authority[0].rdtype == dns.rdatatype.SOA


def test_name_outside_policy_is_refused_without_an_order(daemon: Csrproxy) -> None:
    before = acme_requests(daemon, "newOrder")
    code, body = post_sign(daemon, make_csr(["www.example.org"]))
    assert code == 403
    doc = json.loads(body)
    assert doc["type"].endswith("/name-not-allowed")
    assert doc["names"] == ["www.example.org"]
    code, body = post_sign(daemon, b"not a csr")
    assert code == 400
    assert acme_requests(daemon, "newOrder") == before


def test_several_concurrent_csrs(daemon: Csrproxy, pebble: Pebble, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    names = [f"c{i}.{ZONE}" for i in range(6)]
    root = pebble.root_pem()
    with ThreadPoolExecutor(6) as pool:
        results = list(
            pool.map(
                lambda n: obtain_certificate(daemon.url, tmp_path / n, [n], root_pem=root), names
            )
        )
    assert [r.names for r in results] == [[n] for n in names]


def test_dns_soa_ns_with_aa(daemon: Csrproxy, dns_port: int) -> None:
    for tcp in (False, True):
        soa = query(dns_port, ZONE, "SOA", tcp)
        assert soa.flags & dns.flags.AA
        assert soa.answer[0].rdtype == dns.rdatatype.SOA
        ns = query(dns_port, ZONE, "NS", tcp)
        assert ns.flags & dns.flags.AA
        assert [str(r.target) for r in ns.answer[0]] == [f"ns1.{ZONE}."]
    assert query(dns_port, "example.org", "A").rcode() == dns.rcode.REFUSED


def test_dig_shows_aa(daemon: Csrproxy, dns_port: int) -> None:
    out = subprocess.run(
        ["dig", "+norec", "-p", str(dns_port), "@127.0.0.1", ZONE, "SOA"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert re.search(r"flags: qr aa", out), out


def run_twistd(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(twistd_argv(config), capture_output=True, text=True, timeout=60)


def base_config(tmp_path: Path, pebble: Pebble) -> dict[str, dict[str, object]]:
    return {
        "acme": {"directory": pebble.directory, "ca_certs": pebble.ca_cert},
        "api": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "dns": {"zone": ZONE, "listen": []},
        "policy": {"names": [f"{{label}}.{ZONE}"]},
        "state": {"dir": str(tmp_path / "state")},
    }


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda c: c["acme"].pop("directory"), "acme.directory"),
        (lambda c: c["dns"].update(listen="127.0.0.1:53"), "dns.listen"),
        (lambda c: c["policy"].update(nmaes=[]), "policy.nmaes"),
        (lambda c: c["dns"].update(listen=["127.0.0.1:notaport"]), "dns.listen"),
    ],
)
def test_bad_config_is_one_line(tmp_path: Path, pebble: Pebble, change: object, key: str) -> None:
    config = base_config(tmp_path, pebble)
    change(config)  # type: ignore[operator]
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    done = run_twistd(path)
    assert done.returncode != 0
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if key in line]
    assert errors, lines
    assert "Traceback" not in done.stderr + done.stdout


def test_unreadable_config_file(tmp_path: Path) -> None:
    done = run_twistd(tmp_path / "missing.toml")
    assert done.returncode != 0
    assert "cannot read configuration file" in done.stderr
    assert "Traceback" not in done.stderr


def test_port_in_use_names_the_endpoint(tmp_path: Path, pebble: Pebble) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = base_config(tmp_path, pebble)
        config["api"]["listen"] = [f"tcp:{port}:interface=127.0.0.1"]
        path = tmp_path / "c.toml"
        path.write_text(to_toml(config))
        done = run_twistd(path)
    assert done.returncode != 0
    assert f"tcp:{port}:interface=127.0.0.1" in done.stderr + done.stdout, done
    assert "Traceback" not in done.stderr + done.stdout
