"""The ACME client against real pebble: fault rates, EAB, long and alternate chains, a
fault-injecting proxy, and the number of requests one certificate costs."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from csrproxy.client import Obtained, obtain_certificate
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.faultprocess import start_faultproxy
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from tests.conftest import ZONE
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration

HMAC_B64 = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


@contextmanager
def stack(
    tmp: Path,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    eab_keys: Mapping[str, str] | None = None,
) -> Iterator[tuple[Pebble, Csrproxy]]:
    dns_port = free_udp_tcp_port()
    with (
        start_pebble(
            str(tmp / "pebble"), f"127.0.0.1:{dns_port}", env=env, eab_keys=eab_keys
        ) as pebble,
        start_csrproxy(str(tmp / "csrproxy"), pebble, dns_port, ZONE, overrides=overrides) as d,
    ):
        yield pebble, d


def issue_many(
    daemon: Csrproxy, tmp: Path, names: Sequence[str], root: bytes | None, concurrency: int = 5
) -> list[Obtained]:
    def one(name: str) -> Obtained:
        return obtain_certificate(daemon.url, tmp / name, [name], root_pem=root)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, names))


def acme_counts(daemon: Csrproxy) -> dict[str, float]:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(
        r'^csrproxy_acme_requests_total\{endpoint="([^"]+)",status="(\d+)"\} (\S+)$', text, re.M
    ):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def test_twenty_certificates_under_nonce_rejection_and_authz_reuse(tmp_path: Path) -> None:
    env = {"PEBBLE_WFE_NONCEREJECT": "50", "PEBBLE_AUTHZREUSE": "50"}
    with stack(tmp_path, env) as (pebble, daemon):
        root = pebble.root_pem()
        # Repeat a few names so that pebble has valid authorizations to reuse.
        names = [f"n{i % 12}.{ZONE}" for i in range(20)]
        first = issue_many(daemon, tmp_path / "a", names[:12], root)
        second = issue_many(daemon, tmp_path / "b", names[12:], root)
    assert len(first) + len(second) == 20


def test_eab_required(tmp_path: Path) -> None:
    keys = {"kid-1": HMAC_B64}
    with stack(
        tmp_path / "with",
        eab_keys=keys,
        overrides={"acme": {"eab_kid": "kid-1", "eab_hmac_key": HMAC_B64}},
    ) as (pebble, daemon):
        [got] = issue_many(daemon, tmp_path / "with", [f"eab.{ZONE}"], pebble.root_pem())
        assert got.names == [f"eab.{ZONE}"]
    # Without EAB the CA refuses the account: csrproxy never becomes ready, and says why.
    dns_port = free_udp_tcp_port()
    with (
        start_pebble(str(tmp_path / "p2"), f"127.0.0.1:{dns_port}", eab_keys=keys) as pebble,
        pytest.raises(RuntimeError),
    ):
        start_csrproxy(str(tmp_path / "without"), pebble, dns_port, ZONE, timeout=6)
    log = (tmp_path / "without" / "csrproxy.log").read_text()
    assert "externalAccountRequired" in log


def _issuer_cn(cert: x509.Certificate) -> str:
    return str(cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_long_chain_and_preferred_alternate(tmp_path: Path) -> None:
    env = {"PEBBLE_CHAIN_LENGTH": "3", "PEBBLE_ALTERNATE_ROOTS": "2"}
    dns_port = free_udp_tcp_port()
    with start_pebble(str(tmp_path / "pebble"), f"127.0.0.1:{dns_port}", env=env) as pebble:
        alt_root = x509.load_pem_x509_certificate(pebble.root_pem(2))
        alt_cn = str(alt_root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        with start_csrproxy(str(tmp_path / "d1"), pebble, dns_port, ZONE) as daemon:
            [default] = issue_many(daemon, tmp_path / "d", [f"chain.{ZONE}"], pebble.root_pem(0))
        # The full chain, in order, up to root 0 (checked by the client): leaf + 3 intermediates.
        assert len(default.chain) == 4
        for child, parent in zip(default.chain, default.chain[1:], strict=False):
            assert child.issuer == parent.subject
        with start_csrproxy(
            str(tmp_path / "d2"),
            pebble,
            dns_port,
            ZONE,
            overrides={"acme": {"preferred_chain": alt_cn}},
        ) as daemon:
            [preferred] = issue_many(daemon, tmp_path / "p", [f"chain2.{ZONE}"], pebble.root_pem(2))
        assert _issuer_cn(preferred.chain[-1]) == alt_cn


def test_retries_through_a_fault_injecting_proxy(tmp_path: Path) -> None:
    dns_port = free_udp_tcp_port()
    rules = [
        "POST:/order-plz:rateLimited:1",
        "POST:/finalize-order/:serverInternal",
        "POST:/my-order/:rateLimited-date:1",
        "POST:/certZ/:503",
        "HEAD:/nonce-plz:503",
        "POST:/chalZ/:drop-after",
        "POST:/authZ/:drop-after:count=2",
    ]
    with start_pebble(str(tmp_path / "pebble"), f"127.0.0.1:{dns_port}") as pebble:
        proxy = start_faultproxy(str(tmp_path / "proxy"), pebble, rules)
        try:
            with start_csrproxy(
                str(tmp_path / "d"),
                pebble,
                dns_port,
                ZONE,
                overrides={"acme": {"directory": proxy.directory}},
            ) as daemon:
                [got] = issue_many(daemon, tmp_path / "c", [f"faults.{ZONE}"], pebble.root_pem())
                assert got.names == [f"faults.{ZONE}"]
                injected = proxy.injected()
                counts = proxy.counts()
        finally:
            proxy.stop()
    assert sum(injected.values()) >= 5, injected
    assert counts.get("POST /finalize-order/", 0) <= 2, counts


def test_a_ca_rate_limit_past_the_deadline_is_answered_with_its_retry_after(
    tmp_path: Path,
) -> None:
    """The CA's rateLimited refusal (here the fault proxy's) with a Retry-After longer than
    the order may wait: the client hears 429 and the CA's Retry-After."""
    dns_port = free_udp_tcp_port()
    with start_pebble(str(tmp_path / "pebble"), f"127.0.0.1:{dns_port}") as pebble:
        proxy = start_faultproxy(
            str(tmp_path / "proxy"), pebble, ["POST:/order-plz:rateLimited:7200:count=0"]
        )
        try:
            with start_csrproxy(
                str(tmp_path / "d"),
                pebble,
                dns_port,
                ZONE,
                overrides={"acme": {"directory": proxy.directory}},
            ) as daemon:
                req = urllib.request.Request(
                    daemon.url + "/v1/sign", data=make_csr([f"limited.{ZONE}"]), method="POST"
                )
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(req, timeout=90)
        finally:
            proxy.stop()
    assert refused.value.code == 429
    retry_after = int(refused.value.headers["Retry-After"])
    assert 7100 <= retry_after <= 7200, retry_after
    doc = json.loads(refused.value.read())
    assert doc["acme_type"].endswith(":rateLimited"), doc


def test_requests_per_certificate(tmp_path: Path) -> None:
    """One single-name certificate costs the floor of RFC 8555 requests (see README)."""
    with stack(tmp_path) as (pebble, daemon):
        root = pebble.root_pem()
        issue_many(daemon, tmp_path / "warm", [f"warm.{ZONE}"], root)
        before = acme_counts(daemon)
        issue_many(daemon, tmp_path / "one", [f"one.{ZONE}"], root, concurrency=1)
        after = acme_counts(daemon)
    used = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    used = {k: v for k, v in used.items() if v}
    assert used.get("directory", 0) == 0
    assert used.get("newNonce", 0) == 0
    assert used["newOrder"] == 1 and used["authz"] == 1 and used["challenge"] == 1
    assert used["finalize"] == 1 and used["certificate"] == 1
    assert used["authz-poll"] >= 1
    # newOrder, authz, challenge, authz polls, finalize, order polls, certificate
    total = sum(used.values())
    assert total <= 9, used
    print(f"ACME requests for one certificate: {total} {used}")
