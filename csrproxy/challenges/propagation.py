"""Checking over DNS that a published TXT value is really served before the CA looks.

A record accepted by an API (PowerDNS) is not necessarily served yet: caches,
secondaries and database replication all lag.  :class:`PropagationChecker`
asks each authoritative server directly, backing off between tries, until
every one of them answers the value, or fails at a deadline.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.client import Resolver
from twisted.python.failure import Failure

from csrproxy.challenges.txtquery import TXTQuerier
from csrproxy.challenges.zone import challenge_name
from csrproxy.errors import ConfigError, PublishError

log = Logger()

Server = tuple[str, int]

#: ``query(server, name, timeout)``: the TXT values (each record's strings joined) that
#: ``server`` answers for ``name`` over UDP; an empty list for NXDOMAIN/NODATA.
TXTQuery = Callable[[Server, str, float], "Deferred[list[str]]"]


def udp_txt_query(reactor: Any) -> TXTQuerier:
    """A :data:`TXTQuery` over UDP on ``reactor``: a :class:`TXTQuerier` (one UDP port per
    address family, nothing cached; ``close()`` it when done)."""
    return TXTQuerier(reactor)


def parse_server(
    text: str, default_port: int = 53, key: str = "dns.powerdns.check_servers"
) -> Server:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address, as ``(host, port)``;
    a bad one raises ``ConfigError(key, ...)``."""
    spec = text.strip()
    host, port = spec, str(default_port)
    if spec.startswith("["):
        end = spec.find("]")
        host, rest = spec[1:end], spec[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise ConfigError(key, f"bad server {text!r}")
        port = rest[1:] or port
    elif spec.count(":") == 1:
        host, port = spec.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"bad server {text!r}: want host:port or [v6]:port")
    return host, int(port)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _resolve_servers(
    check_servers: Sequence[str], zone: str, resolver: Any | None, key: str
) -> list[Server]:
    if check_servers:
        wanted = [parse_server(s, key=key) for s in check_servers]
    else:
        if resolver is None:
            raise ConfigError(
                key, "empty, and no resolver to find the zone's NS"
            )
        try:
            answers, _, _ = await resolver.lookupNameservers(zone.rstrip("."))
        except Exception as e:
            raise ConfigError(
                key, f"empty, and the NS of {zone} cannot be found: {e}"
            ) from e
        wanted = sorted(
            {(str(rr.payload.name), 53) for rr in answers if rr.type == dns.NS},
        )
        if not wanted:
            raise ConfigError(key, f"empty, and {zone} has no NS records")
    out: list[Server] = []
    for host, port in wanted:
        if _is_address(host):
            address = host
        elif resolver is None:
            raise ConfigError(key, f"cannot resolve {host}: no resolver")
        else:
            try:
                address = str(await resolver.getHostByName(host))
            except Exception as e:
                raise ConfigError(
                    key, f"cannot resolve {host}: {e}"
                ) from e
        if (address, port) not in out:
            out.append((address, port))
    return out


def resolve_check_servers(
    check_servers: Sequence[str],
    zone: str,
    resolver: Any | None = None,
    key: str = "dns.powerdns.check_servers",
) -> Deferred[list[Server]]:
    """The ``(address, port)`` pairs to check: ``check_servers`` (``host:port``) with host
    names resolved, or, when empty, the addresses of ``zone``'s NS names on port 53.

    ``resolver`` is an ``twisted.internet.interfaces.IResolver`` (e.g.
    :func:`system_resolver`); it is only needed when a name must be looked up.
    Fails with :class:`ConfigError` naming ``key``.
    """
    return Deferred.fromCoroutine(_resolve_servers(check_servers, zone, resolver, key))


def system_resolver(reactor: Any) -> Any:
    """The host's resolver (``/etc/hosts``, a cache, ``/etc/resolv.conf``'s servers), as
    ``twisted.names.client.createResolver`` makes it on POSIX, but running on ``reactor``.

    ``createResolver`` takes no reactor: its resolvers would use the global one.
    """
    from twisted.names import cache, hosts, resolve

    return resolve.ResolverChain(
        [
            hosts.Resolver(b"/etc/hosts"),
            cache.CacheResolver(reactor=reactor),
            Resolver(b"/etc/resolv.conf", reactor=reactor),
        ]
    )


class PropagationChecker:
    """Waits until every server in ``servers`` answers a TXT value.

    ``servers`` is a list of ``(address, port)``, or a function giving a
    Deferred list (e.g. ``lambda: resolve_check_servers(...)``), called on
    first use and again after it failed. ``on_served(seconds)`` is called with the
    time each value took to be served by them all (the time the check adds).
    """

    def __init__(
        self,
        clock: IReactorTime,
        query: TXTQuery,
        servers: Sequence[Server] | Callable[[], Deferred[list[Server]]],
        *,
        timeout: float,
        first_delay: float = 0.05,
        max_delay: float = 2.0,
        query_timeout: float = 1.0,
        backend: str = "powerdns",
        on_served: Callable[[float], None] | None = None,
    ) -> None:
        self.clock = clock
        self.on_served = on_served
        self.query = query
        self._find_servers: Callable[[], Deferred[list[Server]]] | None = None
        self.servers: list[Server] | None = None
        if callable(servers):
            self._find_servers = servers
        else:
            self.servers = list(servers)
        self.timeout = timeout
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.query_timeout = query_timeout
        self.backend = backend

    def wait_served(self, name: str, value: str) -> Deferred[None]:
        """Fires when every server answers ``value`` among the TXT values of ``name``;
        fails with :class:`PublishError` naming the lagging servers after ``timeout``."""
        if self.servers is None:
            return Deferred.fromCoroutine(self._find_then_wait(name, value))
        if not self.servers:
            return succeed(None)
        return _Wait(self, self.servers, name.rstrip("."), value).result

    async def _find_then_wait(self, name: str, value: str) -> None:
        assert self._find_servers is not None
        try:
            servers = list(await self._find_servers())
        except Exception as e:
            raise PublishError(
                self.backend, f"cannot find the servers to check {name} on: {e}"
            ) from e
        if self.servers is None:
            log.info(
                "checking challenge values on {servers}",
                servers=", ".join(_show(s) for s in servers),
                backend=self.backend,
            )
            self.servers = servers
        await self.wait_served(name, value)


class _Wait:
    """One ``wait_served``: a query loop per server and one deadline."""

    def __init__(
        self, checker: PropagationChecker, servers: list[Server], name: str, value: str
    ) -> None:
        self.checker = checker
        self.servers = servers
        self.name = name
        self.value = value
        self.clock = checker.clock
        self.started = self.clock.seconds()
        self.result: Deferred[None] = Deferred(lambda _: self._stop())
        self.pending = set(servers)
        self.last: dict[Server, str] = {}
        self.tries: dict[Server, int] = {}
        self.calls: dict[Server, IDelayedCall] = {}
        self.queries: dict[Server, Deferred[list[str]]] = {}
        self.deadline = self.clock.callLater(checker.timeout, self._expire)
        for server in servers:
            self._ask(server, checker.first_delay)

    def _ask(self, server: Server, delay: float) -> None:
        self.calls.pop(server, None)
        if self.result.called:
            return
        remaining = self.started + self.checker.timeout - self.clock.seconds()
        timeout = max(0.01, min(self.checker.query_timeout, remaining))
        self.tries[server] = self.tries.get(server, 0) + 1
        try:
            d = self.checker.query(server, self.name, timeout)
        except Exception:
            d = _failed()
        self.queries[server] = d
        d.addBoth(self._answered, server, delay)

    def _answered(self, answer: list[str] | Failure, server: Server, delay: float) -> None:
        self.queries.pop(server, None)
        if self.result.called:
            return
        if isinstance(answer, Failure):
            self.last[server] = f"error: {answer.getErrorMessage() or repr(answer.value)}"
        elif self.value in answer:
            self.pending.discard(server)
            log.debug(
                "{name} served by {server} after {tries} tries",
                name=self.name,
                server=_show(server),
                tries=self.tries[server],
                backend=self.checker.backend,
            )
            if not self.pending:
                self._stop()
                elapsed = self.clock.seconds() - self.started
                log.info(
                    "{name} served by all {count} servers after {elapsed:.2f}s",
                    name=self.name,
                    count=len(self.servers),
                    elapsed=elapsed,
                    backend=self.checker.backend,
                )
                if self.checker.on_served is not None:
                    self.checker.on_served(elapsed)
                self.result.callback(None)
            return
        else:
            self.last[server] = f"{len(answer)} other values" if answer else "no TXT record"
        self.calls[server] = self.clock.callLater(
            delay, self._ask, server, min(delay * 2, self.checker.max_delay)
        )

    def _expire(self) -> None:
        lagging = sorted(self.pending)
        self._stop()
        detail = "; ".join(
            f"{_show(s)} ({self.last.get(s, 'no answer')}, {self.tries.get(s, 0)} tries)"
            for s in lagging
        )
        servers = ", ".join(_show(s) for s in lagging)
        log.warn(
            "{name} not served by {servers} after {timeout}s",
            name=self.name,
            servers=servers,
            timeout=self.checker.timeout,
            backend=self.checker.backend,
        )
        self.result.errback(
            PublishError(
                self.checker.backend,
                f"TXT value for {self.name} not served by {servers} after "
                f"{self.checker.timeout:g}s: {detail}",
            )
        )

    def _stop(self) -> None:
        if self.deadline.active():
            self.deadline.cancel()
        for call in self.calls.values():
            if call.active():
                call.cancel()
        self.calls.clear()
        # In-flight queries end by themselves within their own (clamped) timeout.


def _failed() -> Deferred[list[str]]:
    d: Deferred[list[str]] = Deferred()
    d.errback(Failure())
    return d


def _show(server: Server) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ChallengePublisher(Protocol):
    """Publishes and removes the dns-01 TXT value for an identifier (a DNS name, no ``*.``).

    What ``acme.order`` calls a ``DNS01Responder``, declared here so challenges/ needs
    nothing of acme/.
    """

    def publish(self, identifier: str, value: str) -> Deferred[None]: ...

    def unpublish(self, identifier: str, value: str) -> Deferred[None]: ...


class CheckedPublisher:
    """A publisher whose ``publish`` fires only once the value is served over DNS."""

    def __init__(self, inner: ChallengePublisher, checker: PropagationChecker) -> None:
        self.inner = inner
        self.checker = checker
        self.backend: str = getattr(inner, "backend", checker.backend)

    def publish(self, identifier: str, value: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._publish(identifier, value))

    async def _publish(self, identifier: str, value: str) -> None:
        await self.inner.publish(identifier, value)
        await self.checker.wait_served(challenge_name(identifier), value)

    def unpublish(self, identifier: str, value: str) -> Deferred[None]:
        return self.inner.unpublish(identifier, value)


__all__ = [
    "ChallengePublisher",
    "CheckedPublisher",
    "PropagationChecker",
    "Server",
    "TXTQuery",
    "parse_server",
    "resolve_check_servers",
    "system_resolver",
    "udp_txt_query",
]
