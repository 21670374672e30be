"""The API's listening service: Twisted's endpoint service, failing start-up with one line."""

from __future__ import annotations

from typing import Any, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from csrproxy.errors import ListenError

log = Logger()


class APIListener(StreamServerEndpointService):
    """Twisted's endpoint service for one API endpoint string, failing with one clear line.

    It binds in privilegedStartService (Twisted's behaviour); a bad string or a port that
    cannot bind raises :class:`ListenError` naming the endpoint. ``port`` is the listening
    port once bound (readiness).
    """

    def __init__(self, reactor: Any, description: str, factory: Any) -> None:
        super().__init__(None, factory)
        self.reactor = reactor
        self.description = description
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        if self._waitingForPort is not None:
            return
        try:
            self.endpoint = serverFromString(self.reactor, self.description)
        except (ValueError, TypeError, KeyError) as e:
            raise ListenError(self.description, f"bad endpoint string ({e})") from e
        self._raiseSynchronously = True
        try:
            super().privilegedStartService()
        except Exception as e:
            raise ListenError(self.description, str(e)) from e
        bound: list[IListeningPort] = []
        cast(Deferred[IListeningPort], self._waitingForPort).addCallback(self._bound, bound)
        if not bound:
            # Every endpoint the API can be given binds at once; one that does not would
            # leave the daemon "ready" without a port.
            raise ListenError(self.description, "the endpoint did not bind at once")

    def _bound(self, port: IListeningPort, bound: list[IListeningPort]) -> IListeningPort:
        self.port = port
        bound.append(port)
        log.info("API listening on {endpoint}", endpoint=self.description)
        return port

    def stopService(self) -> Deferred[None] | None:
        self.port = None
        d: Deferred[None] | None = super().stopService()
        return d
