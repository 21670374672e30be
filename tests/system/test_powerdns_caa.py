"""The apex CAA RRset written into a real pdns_server, and what it then answers."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, ClassVar, cast

import dns.message
import dns.query
import dns.rdatatype
import pytest
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from csrproxy.challenges.powerdns import PowerDNSPublisher
from csrproxy.config import PowerDNSConfig
from csrproxy.http import client_over
from csrproxy.testing.powerdns import PowerDNS, start_powerdns
from tests.system.test_powerdns import need_pdns, the_reactor

pytestmark = pytest.mark.integration

ZONE = "caa.example.test"
ACCOUNT = "https://acme-v02.api.letsencrypt.org/acme/acct/42"


class PowerDNSCAATests(TestCase):
    pdns: ClassVar[PowerDNS]
    work: ClassVar[str]

    @classmethod
    def setUpClass(cls) -> None:
        need_pdns()
        cls.work = tempfile.mkdtemp(prefix="pdns-caa-")
        cls.pdns = start_powerdns(cls.work, ZONE, [("@", "A", "127.0.0.1")], caches=False)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.pdns.stop()
        shutil.rmtree(cls.work, ignore_errors=True)

    def publisher(self) -> PowerDNSPublisher:
        reactor = the_reactor()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = client_over(cast(Any, Agent)(reactor, pool=pool))
        config = PowerDNSConfig(
            api_url=self.pdns.api_url, api_key=self.pdns.api_key, zone=ZONE, ttl=5
        )
        return PowerDNSPublisher(reactor, http, config)

    def caa(self) -> list[str]:
        query = dns.message.make_query(ZONE, "CAA")
        answer = dns.query.udp(query, "127.0.0.1", port=self.pdns.dns_port, timeout=5)
        return sorted(
            rdata.to_text()
            for rrset in answer.answer
            if rrset.rdtype == dns.rdatatype.CAA
            for rdata in rrset
        )

    async def test_apex_caa_written_then_replaced(self) -> None:
        publisher = self.publisher()
        await publisher.set_caa([("letsencrypt.org", None)])
        open_value = '"letsencrypt.org; validationmethods=dns-01"'
        self.assertEqual(self.caa(), [f"0 issue {open_value}", f"0 issuewild {open_value}"])
        await publisher.set_caa([("letsencrypt.org", ACCOUNT)])
        value = f'"letsencrypt.org; accounturi={ACCOUNT}; validationmethods=dns-01"'
        self.assertEqual(self.caa(), [f"0 issue {value}", f"0 issuewild {value}"])
