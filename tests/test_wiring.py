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
from typing import Any

from treq.client import HTTPClient
from twisted.application.service import IService, IServiceCollection
from twisted.names import dns as names_dns
from twisted.names.common import ResolverBase
from twisted.names.server import DNSServerFactory
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool

from csrproxy import tap
from csrproxy.dns.cookies import COOKIE_SECRET, ServerCookies
from csrproxy.dns.notify import ZoneNotifier
from csrproxy.dns.protocols import DNSDatagramProtocol
from csrproxy.dns.rrl import ResponseRateLimiter
from csrproxy.dns.server import DNSServerService
from csrproxy.http import BytesProducer, VerifyingPolicy
from csrproxy.service import AccountService, StateService

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


class WiringTests(SynchronousTestCase):
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
        self.assertIsInstance(dns_service.zone, ResolverBase)
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
        self.assertIs(notifier.zone, dns_service.zone)
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
