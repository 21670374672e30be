"""The daemon's one HTTP client: treq over a keep-alive Agent, certificates verified.

Every request the server makes (ACME, ARI, PowerDNS) goes through the treq
``HTTPClient`` built here: one ``twisted.web.client.Agent`` with one persistent
``HTTPConnectionPool``.  TLS is Twisted's ``optionsForClientTLS`` (pyOpenSSL and
service-identity): the chain must reach a trusted root and the certificate must
name the host (or IP address) asked for.  ``[acme] ca_certs`` adds CAs to the
system trust store, it does not replace it.  Connection creators (and so TLS
contexts, whose trust store is the costly part) are made once per host and port.
"""

from __future__ import annotations

from typing import Any, cast

from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

#: Keep-alive connections kept per host (scheme, host, port): the CA's concurrency.
MAX_PER_HOST = 20
#: Idle kept-alive connections are closed after this many seconds.
IDLE_TIMEOUT = 120


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
    """TLS for every connection: the chain to a trusted root and the host name.

    One connection creator per host and port, made on first use; the map is bounded by
    the hosts the configuration names (the CA, its ARI host, PowerDNS).
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


@implementer(IBodyProducer)
class BytesProducer:
    """A request body written in one go.

    treq's default producer for bytes is a ``FileBodyProducer``, which writes through a
    cooperator on the global reactor, a turn of the reactor later; a body we already hold
    needs neither.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _quiet_factory(quiescent: Any, description: str) -> Any:
    # twisted.web's connection factory logs "Starting/Stopping factory" for every
    # connection: one log line per connection is what a log must never have.
    factory = HTTPConnectionPool._factory(quiescent, description)
    factory.noisy = False
    return factory


class QuietConnectionPool(HTTPConnectionPool):
    """twisted.web's persistent pool, without a log line per connection."""

    _factory = staticmethod(_quiet_factory)  # type: ignore[assignment]

    def __init__(self, reactor: Any, persistent: bool = True) -> None:
        cast(Any, super()).__init__(reactor, persistent)


def make_pool(reactor: Any, max_per_host: int = MAX_PER_HOST) -> HTTPConnectionPool:
    """The keep-alive pool: at most ``max_per_host`` idle connections kept per host."""
    pool = QuietConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = IDLE_TIMEOUT
    pool.retryAutomatically = True  # GET/HEAD on a kept-alive connection the server closed
    return pool


#: The largest answer body read from any peer (the CA's chains are a few KiB).
MAX_BODY = 16 * 1024 * 1024


class BodyTooLarge(Exception):
    """A peer sent more than the body limit; the connection was dropped."""


class _BoundedBody(Protocol):
    """Collects a response body up to ``limit`` bytes; drops the connection beyond it."""

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            cast(Any, self.transport).stopProducing()
            self.finished.errback(BodyTooLarge(f"answer body over {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


def read_body(response: IResponse, limit: int = MAX_BODY) -> Deferred[bytes]:
    """The whole body of ``response``, at most ``limit`` bytes; cancelling drops the connection.

    Raises :class:`BodyTooLarge` past the limit, twisted.web's ``ResponseFailed`` when the
    connection broke before the end.
    """
    protocol: _BoundedBody

    def cancel(_: Deferred[bytes]) -> None:
        if protocol.transport is not None:
            cast(Any, protocol.transport).stopProducing()

    finished: Deferred[bytes] = Deferred(cancel)
    protocol = _BoundedBody(finished, limit)
    response.deliverBody(protocol)
    return finished


def make_http_client(
    reactor: Any, cafile: str | None, pool: HTTPConnectionPool | None = None
) -> HTTPClient:
    """treq's client over one Agent and one persistent connection pool.

    Pass ``pool`` to close its connections later (``closeCachedConnections``).
    """
    if pool is None:
        pool = make_pool(reactor)
    return client_over(Agent(reactor, contextFactory=VerifyingPolicy(cafile), pool=pool))


def client_over(agent: IAgent) -> HTTPClient:
    """The treq client the daemon uses, over any agent (the tests' in-memory one too)."""
    return HTTPClient(agent, data_to_body_producer=BytesProducer)
