"""The HTTPS client for the CA: pooled keep-alive connections, verified certificates.

The CA's certificate chain and host name (or IP address) are always
verified; ``[acme] ca_certs`` adds CAs to the system trust store, it does not
replace it.  TLS contexts are built once (loading the system store is the
costly part) and shared by all connections.

:class:`CAHTTPClient` is a treq ``HTTPClient`` for any caller that wants treq,
and offers :meth:`CAHTTPClient.exchange`, the lean path the ACME transport
takes for its requests (:mod:`csrproxy.acme.fasthttp`).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from csrproxy.acme.fasthttp import Answer, ConnectionPool


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
    """TLS for every CA connection: the chain to a trusted root and the host name.

    One connection creator (and so one TLS context) per host and port, made on first use.
    """

    def __init__(self, cafile: str | None) -> None:
        self.trust: Any = SystemPlusFileTrust(cafile) if cafile else platformTrust()
        self._creators: dict[tuple[str, int], IOpenSSLClientConnectionCreator] = {}

    def creator(self, hostname: str, port: int) -> IOpenSSLClientConnectionCreator:
        key = (hostname, port)
        creator = self._creators.get(key)
        if creator is None:
            creator = self._creators[key] = optionsForClientTLS(hostname, trustRoot=self.trust)
        return creator

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return self.creator(hostname.decode("ascii"), port)


def ca_context(cafile: str | None) -> ssl.SSLContext:
    """The lean client's TLS context: system trust store plus ``cafile``; chain and host
    name (or IP address) checked."""
    context = ssl.create_default_context()  # CERT_REQUIRED, check_hostname, TLS >= 1.2
    if cafile:
        context.load_verify_locations(cafile)
    return context


class CAHTTPClient(HTTPClient):
    """treq's client, plus :meth:`exchange` on a lean keep-alive connection pool."""

    def __init__(self, agent: Any, pool: ConnectionPool) -> None:
        super().__init__(agent)
        self.pool = pool

    def exchange(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: float,
    ) -> Deferred[Answer]:
        """One request: ``(status, headers, body)``, or a :class:`~csrproxy.acme.fasthttp.
        HTTPFailure` telling whether it may have been sent."""
        return self.pool.request(method, url, body, headers, timeout)


def make_http_client(reactor: Any, cafile: str | None, max_per_host: int = 20) -> CAHTTPClient:
    policy = VerifyingPolicy(cafile)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = 120
    agent = Agent(reactor, contextFactory=policy, pool=pool)
    fast = ConnectionPool(reactor, ca_context(cafile), max_per_host=max_per_host)
    return CAHTTPClient(agent, fast)
