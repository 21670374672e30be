"""What `twistd csrproxy` builds: the stack the project chose, wired, so no shortcut slips in.

Every HTTP request the server makes goes through treq's HTTPClient over one Agent with a
persistent pool and verifying TLS; the DNS listeners are twisted.names protocols made by a
DNSServerFactory subclass.
"""

from __future__ import annotations

import base64
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.application.service import IService, IServiceCollection
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import capturedLogs, globalLogPublisher
from twisted.names import dns as names_dns
from twisted.names.common import ResolverBase
from twisted.names.server import DNSServerFactory
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool

from csrproxy import tap
from csrproxy.challenges.powerdns import PowerDNSPublisher
from csrproxy.config import parse_config
from csrproxy.dns.cookies import COOKIE_SECRET, ServerCookies
from csrproxy.dns.notify import ZoneNotifier
from csrproxy.dns.protocols import DNSDatagramProtocol
from csrproxy.dns.rrl import ResponseRateLimiter
from csrproxy.dns.server import DNSServerService
from csrproxy.dns.zone import ChallengeZone
from csrproxy.dns.zones import Zones
from csrproxy.errors import ConfigError
from csrproxy.http import BytesProducer, VerifyingPolicy
from csrproxy.issuance.room import new_names_room
from csrproxy.service import AccountService, StateService, serve_caa, zone_status

CONFIG = """
[acme]
directory = "https://127.0.0.1:14000/dir"

[api]
listen = ["tcp:0:interface=127.0.0.1"]

[dns]
zone = "go.example.test"
listen = ["127.0.0.1:0"]
nameservers = ["ns1.go.example.test"]
records = ["@ A 127.0.0.1"]
{dns}

[policy]
names = ["{{label}}.go.example.test"]

[state]
dir = "{state}"
"""


def walk(service: IService) -> Iterator[IService]:
    yield service
    collection = IServiceCollection(service, None)
    if collection is not None:
        for child in collection:
            yield from walk(child)


class BuildCase(SynchronousTestCase):
    """Builds the daemon from CONFIG, as ``twistd csrproxy`` does."""

    def build(self, extra: str = "", dns: str = "") -> IService:
        work = tempfile.mkdtemp(prefix="csrproxy-test-wiring-")
        self.addCleanup(shutil.rmtree, work, True)
        path = f"{work}/csrproxy.toml"
        with open(path, "w") as f:
            f.write(CONFIG.format(state=f"{work}/state", dns=dns) + extra)
        # makeService takes SIGHUP over (ignored until the daemon's handler runs).
        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
        options = tap.Options()
        options.parseOptions(["--config", path])
        return tap.makeService(options)


class WiringTests(BuildCase):
    def test_acme_goes_through_treq_over_one_pooled_agent(self) -> None:
        top = self.build()
        account = next(s for s in walk(top) if isinstance(s, AccountService))
        http: Any = account.issuer.acme.transport.http
        self.assertIsInstance(http, HTTPClient)
        self.assertIs(http._data_to_body_producer, BytesProducer)
        agent = http._agent
        self.assertIsInstance(agent, Agent)
        self.assertIsInstance(agent._pool, HTTPConnectionPool)
        self.assertTrue(agent._pool.persistent)
        self.assertIsInstance(agent._endpointFactory._policyForHTTPS, VerifyingPolicy)
        self.assertFalse(hasattr(http, "exchange"), "a second HTTP path is back")

    def test_dns_is_served_by_twisted_names(self) -> None:
        top = self.build()
        dns_service = next(s for s in walk(top) if isinstance(s, DNSServerService))
        self.assertIsInstance(dns_service.factory, DNSServerFactory)
        datagram = DNSDatagramProtocol(dns_service.factory)
        self.assertIsInstance(datagram, names_dns.DNSDatagramProtocol)
        self.assertIsInstance(dns_service.factory.buildProtocol(None), names_dns.DNSProtocol)
        self.assertIsInstance(dns_service.zone, Zones)
        self.assertIsInstance(dns_service.zone.first, ResolverBase)
        self.assertIsInstance(dns_service.factory.rrl, ResponseRateLimiter)  # on by default

    def test_notify_only_with_secondaries(self) -> None:
        self.assertEqual([s for s in walk(self.build()) if isinstance(s, ZoneNotifier)], [])
        secret = base64.b64encode(bytes(32)).decode()
        top = self.build(
            f'[[dns.secondaries]]\naddress = "192.0.2.53"\ntsig_name = "xfr"\n'
            f'tsig_secret = "{secret}"\n'
        )
        [notifier] = [s for s in walk(top) if isinstance(s, ZoneNotifier)]
        dns_service = next(s for s in walk(top) if isinstance(s, DNSServerService))
        self.assertIs(notifier.zone, dns_service.zone.first)
        self.assertEqual([(t.host, t.port) for t in notifier.targets], [("192.0.2.53", 53)])

    def test_dns_cookies_on_with_the_secret_from_the_state_database(self) -> None:
        top = self.build()
        dns_service = next(s for s in walk(top) if isinstance(s, DNSServerService))
        state = next(s for s in walk(top) if isinstance(s, StateService))
        cookies = dns_service.factory.cookies
        self.assertIsInstance(cookies, ServerCookies)
        assert cookies is not None
        self.assertEqual(state.store.db.existing_secret(COOKIE_SECRET), cookies.secret)
        self.assertEqual(cookies.rotation, 86400)
        self.assertFalse(dns_service.factory.require_cookies)

    def test_dns_cookie_rotation_and_require_passed_on(self) -> None:
        top = self.build(dns="cookie_rotation = 7200\nrequire_cookies = true\n")
        dns_service = next(s for s in walk(top) if isinstance(s, DNSServerService))
        cookies = dns_service.factory.cookies
        assert cookies is not None
        self.assertEqual(cookies.rotation, 7200)
        self.assertTrue(dns_service.factory.require_cookies)
        self.assertIsNone(dns_service.factory.nsid)


class ZonesWiringTests(BuildCase):
    """``[dns] zones``: every zone served, notified, locked by CAA and its serial kept."""

    ZONES = 'zones = ["go.example.test", "go-other.example.net"]\n'

    def test_every_zone_served_notified_and_locked(self) -> None:
        secret = base64.b64encode(bytes(32)).decode()
        top = self.build(
            f'[[dns.secondaries]]\naddress = "192.0.2.53"\ntsig_name = "xfr"\n'
            f'tsig_secret = "{secret}"\n',
            dns=self.ZONES + 'caa_identities = ["letsencrypt.org"]\n',
        )
        dns_service = next(s for s in walk(top) if isinstance(s, DNSServerService))
        zones = dns_service.zone
        self.assertEqual(zones.origins, ("go.example.test", "go-other.example.net"))
        notifiers = [s for s in walk(top) if isinstance(s, ZoneNotifier)]
        self.assertEqual([n.zone for n in notifiers], list(zones))
        for zone in zones:
            self.assertEqual([r.tag for r in zone.caa_records()], [b"issue", b"issuewild"])
            soa: Any = zone.soa_header().payload
            self.assertEqual(soa.mname.name, b"ns1.go.example.test")
        issuer: Any = next(s for s in walk(top) if isinstance(s, AccountService)).issuer
        issuer._on_account("https://ca.test/acct/1")
        for zone in zones:
            self.assertIn(b"accounturi=https://ca.test/acct/1", zone.caa_records()[0].value)

    def test_health_and_metrics_per_zone_and_the_budget_asked(self) -> None:
        top = self.build(dns=self.ZONES)
        issuer: Any = next(s for s in walk(top) if isinstance(s, AccountService)).issuer
        zones = next(s for s in walk(top) if isinstance(s, DNSServerService)).zone
        zones.add_txt("_acme-challenge.a.go-other.example.net", "v")
        text = issuer.metrics.render().decode()
        serials = {
            sample.labels["zone"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "csrproxy_dns_zone_serial"
            for sample in family.samples
        }
        self.assertEqual(serials, {zone.origin: zone.serial for zone in zones})
        self.assertIn('csrproxy_dns_zone_challenges{zone="go-other.example.net"} 1.0', text)
        self.assertIn('csrproxy_dns_zone_challenges{zone="go.example.test"} 0.0', text)

    def test_zone_status_and_room(self) -> None:
        class Budget:
            def __init__(self) -> None:
                self.asked: list[str] = []

            def new_names_room(self, name: str) -> float:
                self.asked.append(name)
                return 0.0 if name == "go.example.test" else 12.0

        budget = Budget()
        left = new_names_room(budget)
        self.assertEqual((left("go.example.test"), left("go-other.example.net")), (0.0, 12.0))
        self.assertIsNone(new_names_room(object())("go.example.test"))  # not there yet

        def broken(name: str) -> float:
            raise RuntimeError("no budget")

        broken_budget: Any = Budget()
        broken_budget.new_names_room = broken
        with capturedLogs() as logs:
            asking = new_names_room(broken_budget)
            for _ in range(3):
                self.assertIsNone(asking("go.example.test"))
        self.assertEqual(len(logs), 1)  # once, not per request
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        ns = ["ns1.go.example.test"]
        zones = Zones(
            [
                ChallengeZone("go.example.test", ns, []),
                ChallengeZone("go-other.example.net", ns, []),
            ]
        )
        status = zone_status(zones, left)()
        self.assertEqual([z["origin"] for z in status], ["go.example.test", "go-other.example.net"])
        self.assertEqual([z["room"] for z in status], [0.0, 12.0])
        self.assertEqual(status[0]["records"], 2)  # SOA and NS
        self.assertEqual(status[1]["serial"], list(zones)[1].serial)
        self.assertEqual(
            zone_status(zones, left, served=False)()[1],
            {"origin": "go-other.example.net", "room": 12.0},
        )


class CAAWiringTests(BuildCase):
    """The apex CAA follows the account the issuer finds (``serve_caa``)."""

    ACCOUNT = "https://127.0.0.1:14000/my-account/1"

    def parts(self, top: IService) -> tuple[Any, Any]:
        account = next(s for s in walk(top) if isinstance(s, AccountService))
        dns_service = next(s for s in walk(top) if isinstance(s, DNSServerService))
        return account.issuer, dns_service.zone.first

    def values(self, zone: Any) -> list[tuple[bytes, bytes]]:
        return [(r.tag, r.value) for r in zone.caa_records()]

    def test_any_account_until_known_then_ours(self) -> None:
        issuer, zone = self.parts(self.build(dns='caa_identities = ["letsencrypt.org"]\n'))
        open_value = b"letsencrypt.org; validationmethods=dns-01"
        self.assertEqual(self.values(zone), [(b"issue", open_value), (b"issuewild", open_value)])
        serial = zone.serial
        issuer._on_account(self.ACCOUNT)  # what the issuer calls when it finds the account
        locked = f"letsencrypt.org; accounturi={self.ACCOUNT}; validationmethods=dns-01"
        self.assertEqual(
            self.values(zone), [(b"issue", locked.encode()), (b"issuewild", locked.encode())]
        )
        self.assertNotEqual(zone.serial, serial)

    def test_unknown_ca_serves_none_and_warns_once(self) -> None:
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        issuer, zone = self.parts(self.build())  # pebble's loopback directory
        issuer._on_account(self.ACCOUNT)
        self.assertEqual(zone.caa_records(), ())
        warned = [e for e in events if "CAA" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)
        self.assertIn("caa_identities", warned[0]["log_format"])

    def test_off(self) -> None:
        issuer, zone = self.parts(self.build(dns='caa = false\ncaa_identities = ["pki.goog"]\n'))
        issuer._on_account(self.ACCOUNT)
        self.assertEqual(zone.caa_records(), ())

    def test_static_issue_at_the_apex_is_a_config_error(self) -> None:
        config = parse_config(
            {
                "acme": {"directory": "https://acme-v02.api.letsencrypt.org/directory"},
                "dns": {"zone": "go.example.test", "records": ['@ CAA 0 issue "letsencrypt.org"']},
                "policy": {"names": ["{label}.go.example.test"]},
                "state": {"dir": "/nonexistent"},
            }
        )
        zone = ChallengeZone("go.example.test", ["ns1.go.example.test"], config.dns.records)
        with self.assertRaises(ConfigError) as e:
            serve_caa(config, zone)
        self.assertEqual(e.exception.key, "dns.records")
        self.assertIsNone(serve_caa(replace(config, dns=replace(config.dns, caa=False)), zone))
        powerdns = replace(config.dns, backend="powerdns")
        self.assertIsNone(serve_caa(replace(config, dns=powerdns), zone))

    def test_powerdns_gets_the_rrset_once_the_account_is_known(self) -> None:
        class Publisher:
            def __init__(self) -> None:
                self.asked: list[Any] = []

            def set_caa(self, issuers: Any) -> Deferred[None]:
                self.asked.append(issuers)
                return succeed(None)

        config = parse_config(
            {
                "acme": {"directory": "https://acme.zerossl.com/v2/DV90"},
                "dns": {"zone": "go.example.test", "backend": "powerdns",
                        "powerdns": {"api_url": "http://127.0.0.1:8081", "api_key": "k"}},
                "policy": {"names": ["{label}.go.example.test"]},
                "state": {"dir": "/nonexistent"},
            }
        )  # fmt: skip
        zone = ChallengeZone("go.example.test", ["ns1.go.example.test"], [])
        publisher = Publisher()
        push = serve_caa(config, zone, cast(PowerDNSPublisher, publisher))
        assert push is not None
        self.assertEqual(publisher.asked, [])
        push(config.acme.directory, self.ACCOUNT)
        self.assertEqual(publisher.asked, [[("sectigo.com", self.ACCOUNT)]])
        self.assertEqual(zone.caa_records(), ())


class ARIFetcherTests(SynchronousTestCase):
    """A certificate's ARI window is asked of the CA that issued it."""

    def test_each_certificate_asks_its_own_ca(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from csrproxy.acme.client import ACMEClient
        from csrproxy.service import ari_fetcher
        from csrproxy.testing.tls import make_tls_files

        asked: list[str] = []

        class Client:
            def __init__(self, url: str) -> None:
                self.directory_url = url

            async def renewal_info(self, leaf: x509.Certificate) -> None:
                asked.append(self.directory_url)

        with tempfile.TemporaryDirectory() as tmp:
            cert = make_tls_files(tmp)[2]
            with open(cert, "rb") as f:
                pem = x509.load_pem_x509_certificate(f.read()).public_bytes(
                    serialization.Encoding.PEM
                )
        primary, second = Client("https://a.test/dir"), Client("https://b.test/dir")
        fetch = ari_fetcher(cast(ACMEClient, primary), [cast(ACMEClient, second)])
        for ca in (None, "https://b.test/dir", "https://gone.test/dir"):
            self.assertIsNone(self.successResultOf(fetch(pem.decode(), ca)))
        self.assertEqual(asked, ["https://a.test/dir", "https://b.test/dir", "https://a.test/dir"])


class FallbackWiringTests(BuildCase):
    def test_each_fallback_ca_is_an_issuer_of_its_own_linked_to_the_others(self) -> None:
        top = self.build(
            '\n[[acme.fallback]]\ndirectory = "https://second.test/dir"\n'
            'caa_identity = "second.test"\norders_per_3h = 7\n'
        )
        primary, second = [s.issuer for s in walk(top) if isinstance(s, AccountService)]
        self.assertEqual(second.ca, "https://second.test/dir")
        self.assertEqual((primary.others, second.others), ([second], [primary]))
        self.assertIs(second._inflight, primary._inflight, "one order per CSR, any CA")
        self.assertIs(second.ledger, primary.ledger)
        self.assertTrue(primary.acme.transport.fail_fast and second.acme.transport.fail_fast)
        self.assertIsNot(second.acme.key, primary.acme.key, "an account of its own")
        self.assertEqual(cast(Any, second.admission).budgets.orders_per_3h, 7)
        state = next(s for s in walk(top) if isinstance(s, StateService)).store.db
        key_files = sorted(p.name for p in state.path.parent.glob("account*.key"))
        self.assertEqual(len(key_files), 2, key_files)


class OpsMetricsWiringTests(BuildCase):
    def test_budget_room_and_pending_renewals_are_exported(self) -> None:
        from csrproxy.issuance.renewal import RenewalService
        from csrproxy.metrics import WatchedRenewals

        top = self.build()
        account = next(s for s in walk(top) if isinstance(s, AccountService))
        text = account.issuer.metrics.render().decode()
        # The zone's registered domain, its new-names budget untouched (45 a week).
        self.assertIn('csrproxy_zone_new_names_room{zone="go.example.test"} 45.0', text)
        self.assertIn("csrproxy_renewals_pending 0.0", text)
        renewal = next(s for s in walk(top) if isinstance(s, RenewalService))
        self.assertIsInstance(renewal.scheduler.source, WatchedRenewals)
