"""The HTTPS client for the CA: pooled keep-alive connections, verified certificates.

The CA's certificate chain and host name (or IP address) are always
verified; ``[acme] ca_certs`` adds CAs to the system trust store, it does not
replace it.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


@implementer(IOpenSSLTrustRoot)
class SystemPlusFileTrust:
    """The system trust store plus the CAs in one PEM file."""

    def __init__(self, cafile: str) -> None:
        self.cafile = cafile

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        context.load_verify_locations(self.cafile)


@implementer(IPolicyForHTTPS)
class VerifyingPolicy:
    """TLS for every CA connection: the chain to a trusted root and the host name."""

    def __init__(self, cafile: str | None) -> None:
        self.trust: Any = SystemPlusFileTrust(cafile) if cafile else platformTrust()

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.trust)


def make_http_client(reactor: Any, cafile: str | None, max_per_host: int = 20) -> HTTPClient:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = 120
    agent = Agent(reactor, contextFactory=VerifyingPolicy(cafile), pool=pool)
    return HTTPClient(agent)
