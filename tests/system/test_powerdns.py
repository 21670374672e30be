"""PowerDNSPublisher and PropagationChecker against a real pdns_server on loopback.

The tests run in trial's reactor (like the DNS server's real-socket tests);
PowerDNS is a child process started by ``csrproxy.testing.powerdns`` on free ports
with its caches off, and queried over UDP.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
from cryptography import x509
from treq.client import HTTPClient
from twisted.internet.defer import DeferredList
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from csrproxy.challenges.powerdns import PowerDNSPublisher
from csrproxy.challenges.powerdns_errors import PowerDNSAPIError
from csrproxy.challenges.propagation import CheckedPublisher, PropagationChecker, udp_txt_query
from csrproxy.config import PowerDNSConfig
from csrproxy.errors import PublishError
from csrproxy.http import client_over
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.ports import free_port
from csrproxy.testing.powerdns import PowerDNS, start_powerdns
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration

ZONE = "pdns.example.test"
V1 = "x" * 43
V2 = "y" * 43


def the_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def need_pdns() -> None:
    if shutil.which("pdns_server") is None and shutil.which("/usr/sbin/pdns_server") is None:
        pytest.fail("pdns_server is not installed: run `make system-deps` (make test does)")


class PowerDNSIntegration(TestCase):
    pdns: ClassVar[PowerDNS]
    work: ClassVar[str]

    @classmethod
    def setUpClass(cls) -> None:
        need_pdns()
        cls.work = tempfile.mkdtemp(prefix="pdns-it-")
        cls.pdns = start_powerdns(cls.work, ZONE, [("@", "A", "127.0.0.1")], caches=False)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.pdns.stop()
        shutil.rmtree(cls.work, ignore_errors=True)

    def http(self) -> HTTPClient:
        reactor = the_reactor()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        return client_over(cast(Any, Agent)(reactor, pool=pool))

    def publisher(self, pdns: PowerDNS | None = None, **kw: Any) -> PowerDNSPublisher:
        pdns = pdns or self.pdns
        values: dict[str, Any] = {
            "api_url": pdns.api_url,
            "api_key": pdns.api_key,
            "zone": ZONE,
            "ttl": 5,
            "api_timeout": 10.0,
        }
        values.update(kw)
        return PowerDNSPublisher(the_reactor(), self.http(), PowerDNSConfig(**values))

    def checker(self, timeout: float = 10.0) -> PropagationChecker:
        reactor = the_reactor()
        query = udp_txt_query(reactor)
        self.addCleanup(query.close)
        return PropagationChecker(
            reactor,
            query,
            [("127.0.0.1", self.pdns.dns_port)],
            timeout=timeout,
        )

    def challenge_rrsets(self) -> list[dict[str, Any]]:
        return [r for r in self.pdns.rrsets() if r["name"].startswith("_acme-challenge.")]

    async def test_two_values_on_one_name_then_gone(self) -> None:
        publisher = self.publisher()
        name = f"_acme-challenge.www.{ZONE}"
        # A wildcard and its base name: the same record name, published concurrently.
        results = await DeferredList(
            [publisher.publish(f"www.{ZONE}", V1), publisher.publish(f"www.{ZONE}", V2)],
            consumeErrors=True,
        )
        self.assertEqual([ok for ok, _ in results], [True, True], results)
        rcode, answers = self.pdns.query(name)
        self.assertEqual((rcode, sorted(answers)), (0, [V1.encode(), V2.encode()]))
        [rrset] = self.challenge_rrsets()
        self.assertEqual(rrset["ttl"], 5)
        self.assertEqual(sorted(r["content"] for r in rrset["records"]), [f'"{V1}"', f'"{V2}"'])

        await publisher.unpublish(f"www.{ZONE}", V1)
        self.assertEqual(self.pdns.query(name), (0, [V2.encode()]))
        await publisher.unpublish(f"www.{ZONE}", V2)
        self.assertEqual(self.challenge_rrsets(), [])
        self.assertEqual(self.pdns.query(name)[1], [])
        self.assertEqual(publisher.live_names, frozenset())

    async def test_checked_publish_is_served_when_it_fires(self) -> None:
        publisher = CheckedPublisher(self.publisher(), self.checker())
        await publisher.publish(f"api.{ZONE}", V1)
        self.assertEqual(self.pdns.query(f"_acme-challenge.api.{ZONE}"), (0, [V1.encode()]))
        await publisher.unpublish(f"api.{ZONE}", V1)
        self.assertEqual(self.challenge_rrsets(), [])

    async def test_checker_fails_for_a_value_not_served(self) -> None:
        reactor = the_reactor()
        start = reactor.seconds()
        with self.assertRaises(PublishError) as caught:
            await self.checker(timeout=0.5).wait_served(f"_acme-challenge.none.{ZONE}", V1)
        self.assertIn(f"not served by 127.0.0.1:{self.pdns.dns_port}", caught.exception.detail)
        self.assertLess(reactor.seconds() - start, 2.0)

    async def test_remove_names_cleans_leftovers(self) -> None:
        self.pdns.set_txt(f"_acme-challenge.old.{ZONE}", [V1, V2])
        await self.publisher().remove_names(
            [f"_acme-challenge.old.{ZONE}.", f"_acme-challenge.never.{ZONE}"]
        )
        self.assertEqual(self.challenge_rrsets(), [])

    async def test_bad_key_and_unknown_zone(self) -> None:
        with self.assertRaises(PowerDNSAPIError) as caught:
            await self.publisher(api_key="wrong").publish(f"k.{ZONE}", V1)
        self.assertEqual(caught.exception.reason, "bad-key")
        self.assertNotIn("wrong", caught.exception.detail)
        with self.assertRaises(PowerDNSAPIError) as caught:
            await self.publisher(zone="absent.test").publish("k.absent.test", V1)
        self.assertEqual(caught.exception.reason, "no-zone")
        self.assertEqual(self.challenge_rrsets(), [])


class StoppedPowerDNS(TestCase):
    async def test_unreachable_within_deadline(self) -> None:
        need_pdns()
        reactor = the_reactor()
        work = tempfile.mkdtemp(prefix="pdns-stopped-")
        self.addCleanup(shutil.rmtree, work, True)
        pdns = start_powerdns(work, ZONE)
        pdns.stop()
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = client_over(cast(Any, Agent)(reactor, pool=pool))
        config = PowerDNSConfig(
            api_url=pdns.api_url, api_key=pdns.api_key, zone=ZONE, api_timeout=2.0
        )
        publisher = PowerDNSPublisher(reactor, http, config)
        start = reactor.seconds()
        with self.assertRaises(PowerDNSAPIError) as caught:
            await publisher.publish(f"www.{ZONE}", V1)
        elapsed = reactor.seconds() - start
        self.assertEqual(caught.exception.reason, "unreachable")
        self.assertEqual(caught.exception.status, 503)
        self.assertIn("unreachable", caught.exception.detail)
        self.assertLessEqual(elapsed, 2.5)
        self.assertGreater(elapsed, 1.0)  # it did retry

    async def test_api_port_without_listener(self) -> None:
        reactor = the_reactor()
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = client_over(cast(Any, Agent)(reactor, pool=pool))
        config = PowerDNSConfig(
            api_url=f"http://127.0.0.1:{free_port()}", api_key="k", zone=ZONE, api_timeout=0.5
        )
        with self.assertRaises(PublishError):
            await PowerDNSPublisher(reactor, http, config).publish(f"www.{ZONE}", V1)


# ---- end to end: twistd csrproxy publishing through PowerDNS, pebble validating against it

E2E_ZONE = "pdns-e2e.example.test"


e2e = pytest.mark.integration


def powerdns_overrides(pdns: PowerDNS, **extra: Any) -> dict[str, dict[str, Any]]:
    # to_toml writes one flat table per key: "dns.powerdns" becomes [dns.powerdns].
    return {
        "dns": {"backend": "powerdns", "listen": []},
        "dns.powerdns": {
            "api_url": pdns.api_url,
            "api_key": pdns.api_key,
            "ttl": 5,
            "check_servers": [pdns.dns_server],
            "check_timeout": 10,
            **extra,
        },
        "policy": {"names": [f"{{label}}.{E2E_ZONE}", f"*.{{label}}.{E2E_ZONE}"]},
    }


@pytest.fixture(scope="module")
def e2e_pdns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PowerDNS]:
    need_pdns()
    work = tmp_path_factory.mktemp("pdns-e2e")
    with start_powerdns(str(work), E2E_ZONE, [("@", "A", "127.0.0.1")]) as pdns:
        yield pdns


@pytest.fixture(scope="module")
def e2e_pebble(tmp_path_factory: pytest.TempPathFactory, e2e_pdns: PowerDNS) -> Iterator[Pebble]:
    work = tmp_path_factory.mktemp("pebble-pdns")
    with start_pebble(str(work), e2e_pdns.dns_server) as pebble:
        yield pebble


@pytest.fixture(scope="module")
def e2e_daemon(
    tmp_path_factory: pytest.TempPathFactory, e2e_pdns: PowerDNS, e2e_pebble: Pebble
) -> Iterator[Csrproxy]:
    work = tmp_path_factory.mktemp("csrproxy-pdns")
    with start_csrproxy(
        str(work),
        e2e_pebble,
        e2e_pdns.dns_port,
        E2E_ZONE,
        overrides=powerdns_overrides(e2e_pdns),
    ) as daemon:
        yield daemon


def _challenges(pdns: PowerDNS) -> list[dict[str, Any]]:
    return [r for r in pdns.rrsets() if r["name"].startswith("_acme-challenge.")]


def _sans(pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem)
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return sorted(ext.value.get_values_for_type(x509.DNSName))


def _post(daemon: Csrproxy, body: bytes, timeout: float = 90) -> tuple[int, bytes, str]:
    req = urllib.request.Request(daemon.url + "/v1/sign", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


@e2e
def test_e2e_issues_through_powerdns(e2e_daemon: Csrproxy, e2e_pdns: PowerDNS) -> None:
    name = f"www.{E2E_ZONE}"
    code, body, _ = _post(e2e_daemon, make_csr([name]))
    assert code == 200, body[:500]
    assert _sans(body) == [name]
    assert _challenges(e2e_pdns) == []


@e2e
def test_e2e_wildcard_and_base_in_one_order(e2e_daemon: Csrproxy, e2e_pdns: PowerDNS) -> None:
    base = f"both.{E2E_ZONE}"
    code, body, _ = _post(e2e_daemon, make_csr([base, f"*.{base}"]))
    assert code == 200, body[:500]
    assert _sans(body) == sorted([base, f"*.{base}"])
    assert _challenges(e2e_pdns) == []


@e2e
def test_e2e_powerdns_stopped_gives_503(
    tmp_path: Path, e2e_pebble: Pebble, e2e_daemon: Csrproxy
) -> None:
    # Its own PowerDNS and daemon: stopping the shared one would break the other tests.
    pdns = start_powerdns(str(tmp_path / "pdns"), E2E_ZONE)
    with start_csrproxy(
        str(tmp_path / "csrproxy"),
        e2e_pebble,
        pdns.dns_port,
        E2E_ZONE,
        overrides=powerdns_overrides(pdns, api_timeout=2),
    ) as daemon:
        pdns.stop()
        start = time.monotonic()
        code, body, ctype = _post(daemon, make_csr([f"down.{E2E_ZONE}"]), timeout=60)
        elapsed = time.monotonic() - start
        assert code == 503, body[:500]
        assert ctype.startswith("application/problem+json")
        doc = json.loads(body)
        assert doc["type"].endswith("/dns-publish")
        assert "powerdns" in doc["detail"]
        assert pdns.api_key not in body.decode()
        assert elapsed < 30
        with urllib.request.urlopen(daemon.url + "/v1/health", timeout=5) as resp:
            assert resp.status == 200  # still serving
        assert pdns.api_key not in daemon.log.read_text()


@e2e
def test_e2e_kill_after_challenge_leaves_nothing_in_powerdns(
    tmp_path: Path, e2e_pebble: Pebble, e2e_pdns: PowerDNS
) -> None:
    """kill -9 with a challenge record in PowerDNS: the restart removes it and finishes."""
    work = str(tmp_path / "csrproxy")
    name = f"crash.{E2E_ZONE}"
    csr = make_csr([name])
    first = start_csrproxy(
        work,
        e2e_pebble,
        e2e_pdns.dns_port,
        E2E_ZONE,
        overrides=powerdns_overrides(e2e_pdns),
        env={"CSRPROXY_CRASH_AT": "after-challenge"},
    )
    with pytest.raises(OSError):
        _post(first, csr)
    assert first.proc.wait(30) == -9
    assert _challenges(e2e_pdns), "the crash should have left the record behind"
    with start_csrproxy(
        work,
        e2e_pebble,
        e2e_pdns.dns_port,
        E2E_ZONE,
        overrides=powerdns_overrides(e2e_pdns),
    ) as second:
        code, body, _ = _post(second, csr)
        assert code == 200, body[:500]
        assert _sans(body) == [name]
        assert _challenges(e2e_pdns) == []


@e2e
def test_e2e_original_environment_only(
    tmp_path: Path, e2e_pebble: Pebble, e2e_pdns: PowerDNS
) -> None:
    """Started like csr-proxy 0.1.0: CSR_PROXY_* variables, no configuration file."""
    import os
    import subprocess

    from csrproxy.testing.daemon import twistd_argv, wait_ready

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSR_PROXY_")}
    env.update(
        {
            "CSR_PROXY_ACME_DIRECTORY": e2e_pebble.directory,
            "CSR_PROXY_EMAIL": f"admin@{E2E_ZONE}",
            "CSR_PROXY_SUBJ": f"CN={E2E_ZONE}",
            "CSR_PROXY_PDNS_API_URL": e2e_pdns.api_url,
            "CSR_PROXY_PDNS_API_KEY": e2e_pdns.api_key,
            "CSR_PROXY_API_HOST": "127.0.0.1",
            "CSR_PROXY_API_PORT": str(port),
            "CSR_PROXY_STATE_PATH": str(tmp_path / "state.json"),
            # The original trusted the CA through the environment too.
            "SSL_CERT_FILE": e2e_pebble.ca_cert,
        }
    )
    argv = [a for a in twistd_argv(tmp_path / "unused.toml") if a not in ("--config",)]
    argv = argv[: argv.index("csrproxy") + 1]
    log = tmp_path / "csrproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    daemon = Csrproxy(proc, f"http://127.0.0.1:{port}", tmp_path / "unused.toml", log)
    try:
        assert wait_ready(daemon, 30), daemon.log_tail()
        code, body, _ = _post(daemon, make_csr([E2E_ZONE]))
        assert code == 200, body[:500]
        assert _sans(body) == [E2E_ZONE]
        assert _challenges(e2e_pdns) == []
        # A subject other than CSR_PROXY_SUBJ is refused before any order.
        code, body, _ = _post(daemon, make_csr([f"other.{E2E_ZONE}"]))
        assert code == 403, body[:500]
        assert e2e_pdns.api_key not in log.read_text()
    finally:
        daemon.stop()
