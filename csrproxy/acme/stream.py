"""A client connection on the reactor over a non-blocking socket, with TLS by the ssl module.

The lean HTTP client (:mod:`csrproxy.acme.fasthttp`) sends one small request and reads one
answer at a time; Twisted's TCP transport and memory-BIO TLS layer cost several Python
layers, two buffer copies through pyOpenSSL and an extra reactor turn per write.  Here a
write is one ``SSLSocket.send`` (encrypt and send in C), a read one ``recv``, and only what
the kernel does not take at once waits for the socket to become writable.

Certificates are checked by the ``ssl.SSLContext`` given (``check_hostname`` and
``CERT_REQUIRED``: the chain to a trusted root, and the host name or IP address).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

_BLOCKED = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def connect(
    reactor: Any,
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    protocol: Any,
) -> Deferred[None]:
    """Connect ``protocol`` to ``host:port`` (TLS when ``context`` is given).

    Fires once TCP is up and ``protocol.makeConnection`` was called (TLS then shakes hands
    and calls ``protocol.handshakeCompleted()``, or ``connectionLost`` with the reason);
    fails when no address could be reached.  Cancelling stops the attempt.
    """
    attempt = _Connector(reactor, host, port, context, protocol)
    return attempt.start()


class _Connector:
    """Resolve, then try each address in turn until one accepts."""

    def __init__(
        self, reactor: Any, host: str, port: int, context: ssl.SSLContext | None, protocol: Any
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.context = context
        self.protocol = protocol
        self.d: Deferred[None] = Deferred(self._cancel)
        self.stream: SocketStream | None = None
        self.cancelled = False

    def start(self) -> Deferred[None]:
        if isIPAddress(self.host) or isIPv6Address(self.host):
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self._try([(family, (self.host, self.port))], None)
        else:
            # Names are looked up in the reactor's thread pool (getaddrinfo blocks).
            lookup = deferToThreadPool(
                self.reactor,
                self.reactor.getThreadPool(),
                socket.getaddrinfo,
                self.host,
                self.port,
                0,
                socket.SOCK_STREAM,
            )
            lookup.addCallbacks(
                lambda infos: self._try([(i[0], i[4]) for i in infos], None),
                lambda f: self._fail(DNSLookupError(f"{self.host}: {f.getErrorMessage()}")),
            )
        return self.d

    def _try(self, addresses: list[tuple[int, Any]], last: BaseException | None) -> None:
        if self.cancelled:
            return
        if not addresses:
            self._fail(last or ConnectError(string=f"no address for {self.host}"))
            return
        family, address = addresses[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._try(addresses[1:], ConnectError(string=f"{address}: {errno.errorcode[code]}"))
            return
        self.stream = SocketStream(self.reactor, sock, self, addresses[1:])
        self.reactor.addWriter(self.stream)

    def connected(self, stream: SocketStream) -> None:
        self.stream = None
        self.d.callback(None)
        stream.start(self.protocol, self.context, self.host)

    def refused(self, stream: SocketStream, error: BaseException) -> None:
        self.stream = None
        self._try(stream.next_addresses, error)

    def _fail(self, error: BaseException) -> None:
        if not self.d.called:
            self.d.errback(Failure(error))

    def _cancel(self, d: Deferred[None]) -> None:
        self.cancelled = True
        if self.stream is not None:
            self.stream.close_quietly()
            self.stream = None


@implementer(IReadWriteDescriptor)
class SocketStream:
    """One connected socket: reads go to the protocol, writes are sent at once."""

    def __init__(
        self,
        reactor: Any,
        sock: socket.socket,
        connector: _Connector | None,
        next_addresses: list[tuple[int, Any]],
    ) -> None:
        self.reactor = reactor
        self.sock = sock
        self._fileno = sock.fileno()
        self.connector = connector
        self.next_addresses = next_addresses
        self.protocol: Any = None
        self.handshaking = False
        self.disconnecting = False
        self.connected = False
        self._pending = b""
        self._closed = False

    # ---- IReadWriteDescriptor
    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "SocketStream"

    def getHandle(self) -> socket.socket:
        return self.sock

    def doWrite(self) -> Any:
        if self.connector is not None:
            return self._connect_done()
        if self.handshaking:
            return self._handshake()
        return self._flush()

    def doRead(self) -> Any:
        if self.handshaking:
            return self._handshake()
        sock = self.sock
        while True:
            try:
                data = sock.recv(65536)
            except _BLOCKED:
                return None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return ConnectionDone("the server closed the connection")
            except OSError as e:
                return ConnectionLost(str(e))
            if not data:
                return ConnectionDone("the server closed the connection")
            self.protocol.dataReceived(data)
            if self._closed or not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                return None

    def connectionLost(self, reason: Failure) -> None:
        if self.connector is not None:
            # The reactor reports a refused connect as a hang-up, without calling doWrite.
            self._connect_done()
            return
        self._close(reason)

    # ---- the transport the protocol sees
    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        if self._pending:
            self._pending += data
            return
        self._pending = data
        why = self._flush()
        if why is not None:
            self._close(Failure(why))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if not self._pending:
            self._close(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._close(Failure(ConnectionLost("connection aborted")))

    # ---- internals
    def start(self, protocol: Any, context: ssl.SSLContext | None, host: str) -> None:
        self.protocol = protocol
        self.connected = True
        if context is not None:
            self.sock = context.wrap_socket(
                self.sock, server_hostname=host, do_handshake_on_connect=False
            )
            self.handshaking = True
        self.reactor.addReader(self)
        protocol.makeConnection(self)
        if self.handshaking and not self._closed:
            why = self._handshake()
            if why is not None:
                self._close(Failure(why))

    def _connect_done(self) -> Any:
        connector, self.connector = self.connector, None
        assert connector is not None
        self.reactor.removeWriter(self)
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._close(None)
            reason = f"{errno.errorcode.get(code, code)}: {os.strerror(code)}"
            connector.refused(self, ConnectError(string=reason))
            return None
        connector.connected(self)
        return None

    def _handshake(self) -> Any:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.reactor.removeWriter(self)
            return None
        except ssl.SSLWantWriteError:
            self.reactor.addWriter(self)
            return None
        except (ssl.SSLError, OSError) as e:
            return e
        self.handshaking = False
        self.reactor.removeWriter(self)
        self.protocol.handshakeCompleted()
        return None

    def _flush(self) -> Any:
        data = self._pending
        try:
            sent = self.sock.send(data)
        except _BLOCKED:
            sent = 0
        except OSError as e:
            return ConnectionLost(str(e))
        self._pending = data[sent:]
        if self._pending:
            self.reactor.addWriter(self)
        else:
            self.reactor.removeWriter(self)
            if self.disconnecting:
                self._close(Failure(ConnectionDone()))
        return None

    def close_quietly(self) -> None:
        """Drop a connection attempt (nobody is told)."""
        self.protocol = None
        self._close(None)

    def _close(self, reason: Failure | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.disconnecting = True
        self.connected = False
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)
        with contextlib.suppress(OSError):
            self.sock.close()
        protocol, self.protocol = self.protocol, None
        if protocol is not None and reason is not None:
            # Like Twisted's transports: the protocol hears of it on the next turn.
            self.reactor.callLater(0, protocol.connectionLost, reason)
