"""A lean HTTP/1.1 client for the CA: pooled keep-alive connections, one Deferred a request.

Each request is written in one piece on an established (TLS-verified) connection and its
answer is parsed in place: status line, headers, then a ``Content-Length``, chunked or
close-delimited body.  Connections per host are bounded; requests beyond the bound wait
for a free one.  A connection the server closed while idle is found before it is used
(the socket is peeked for EOF) or, if the close races the request, a safe request (GET,
HEAD) is repeated once on a new connection; anything else that fails after it was written
is reported as such (:class:`ResponseNotReceived`), since the server may have acted on it.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from csrproxy.acme import stream

#: status, headers (lower-case names, values in order), body
Answer = tuple[int, dict[str, list[str]], bytes]

#: Methods that may be repeated on a new connection when a reused one closed under them.
SAFE_METHODS = frozenset({"GET", "HEAD"})
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024

_URL = re.compile(r"(?i)(https?)://([^/?#]*)([^#]*)")  # scheme, netloc, target
# A request target that needs no escaping (RFC 3986 characters, no controls or spaces).
_PLAIN_TARGET = re.compile(r"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]*")


class HTTPFailure(Exception):
    """A request that got no complete answer."""

    #: Whether the request may have reached the server.
    sent = True

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class RequestNotSent(HTTPFailure):
    """No connection could be made (TCP, TLS or certificate check): nothing was written."""

    sent = False


class ResponseNotReceived(HTTPFailure):
    """The request was written but no complete answer came: the server may have acted on it."""


class _Host:
    """The connections to one (scheme, host, port)."""

    def __init__(
        self,
        name: str,
        port: int,
        host_header: str,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.name = name
        self.port = port
        #: the TLS context (shared by all connections), None for http
        self.tls = tls
        self.host_header = host_header
        self.idle: list[_Connection] = []
        #: connecting, busy and idle connections
        self.total = 0
        self.waiting: deque[_Exchange] = deque()


# Exchange states
QUEUED, CONNECTING, SENT, DONE = range(4)


class _Exchange:
    """One request on its way: which state it is in, and how it ends."""

    __slots__ = ("conn", "connecting", "d", "data", "host", "method", "retried", "state", "timer")

    def __init__(self, method: str, data: bytes, host: _Host) -> None:
        self.method = method
        self.data = data
        self.host = host
        self.d: Deferred[Answer] = Deferred(self._cancel)
        self.timer: Any = None
        self.state = QUEUED
        self.conn: _Connection | None = None
        self.connecting: Deferred[Any] | None = None
        self.retried = False

    def succeed(self, answer: Answer) -> None:
        self.state = DONE
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.d.callback(answer)

    def fail(self, error: BaseException) -> None:
        self.state = DONE
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.d.errback(Failure(error))

    def _cancel(self, d: Deferred[Answer]) -> None:
        # Deferred.cancel errbacks with CancelledError after this returns.
        self.stop()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def timed_out(self) -> None:
        if self.state == DONE:
            return
        error: HTTPFailure
        if self.state == SENT:
            error = ResponseNotReceived("no answer in time", timed_out=True)
        elif self.state == CONNECTING:
            error = RequestNotSent("no connection in time", timed_out=True)
        else:
            error = RequestNotSent("no free connection in time", timed_out=True)
        self.stop()
        self.fail(error)

    def stop(self) -> None:
        """Give up wherever the request is; a connection with an answer pending is dropped."""
        state, self.state = self.state, DONE
        if state == QUEUED:
            with contextlib.suppress(ValueError):
                self.host.waiting.remove(self)
        elif state == CONNECTING:
            if self.connecting is not None and not self.connecting.called:
                self.connecting.cancel()
            elif self.conn is not None:
                self.conn.abort()
        elif state == SENT and self.conn is not None:
            self.conn.abort()


@implementer(IHandshakeListener)
class _Connection(Protocol):
    """One keep-alive connection and the parser of the answers on it."""

    def __init__(self, pool: ConnectionPool, host: _Host, opener: _Exchange) -> None:
        self.pool = pool
        self.host = host
        #: The request this connection was opened for, until it is ready.
        self.opener: _Exchange | None = opener
        self.exchange: _Exchange | None = None
        self.ready = False
        self.gone = False
        self.reusable = True
        self.answered = 0
        self.idle_since = 0.0
        self.sock: socket.socket | None = None
        self._reset()

    def _reset(self) -> None:
        self.buf = b""
        self.got_bytes = False
        self.status = 0
        self.headers: dict[str, list[str]] = {}
        self.body: list[bytes] = []
        self.body_size = 0
        #: bytes of body (or of the current chunk) still to come; -1 means until close
        self.remaining = 0
        self.parse: Callable[[], bool] = self._parse_head

    # ---- connection events
    def connectionMade(self) -> None:
        self.sock = _socket_of(self.transport)
        if self.host.tls is None:
            self._ready()

    def handshakeCompleted(self) -> None:
        # A host name mismatch aborts the connection inside the handshake and the TLS layer
        # still reports completion: connectionLost carries the verification error.
        if not getattr(self.transport, "disconnecting", False):
            self._ready()

    def _ready(self) -> None:
        self.ready = True
        opener, self.opener = self.opener, None
        if opener is not None and opener.state == CONNECTING:
            self.send(opener)
        else:
            self.pool._release(self)

    def alive(self) -> bool:
        """Still connected, and nothing unread from the server: an idle connection that has
        bytes waiting holds an EOF or a close alert (TLS session tickets come before the
        first answer), so it is not worth the risk."""
        if self.gone or getattr(self.transport, "disconnecting", True):
            return False
        if self.sock is not None:
            try:
                # The raw socket's recv (an SSLSocket's own refuses flags): TLS records count.
                socket.socket.recv(self.sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            return False
        return True

    def send(self, exchange: _Exchange) -> None:
        exchange.state = SENT
        exchange.conn = self
        self.exchange = exchange
        self.transport.write(exchange.data)  # type: ignore[union-attr]

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.reusable = False
        exchange, self.exchange = self.exchange, None
        opener, self.opener = self.opener, None
        self.pool._lost(self)
        if opener is not None and opener.state == CONNECTING:
            opener.fail(RequestNotSent(_why(reason)))
        if exchange is None or exchange.state != SENT:
            return
        if self.parse == self._parse_body_until_close and reason.check(ConnectionDone):
            # A body without a length ends with the connection; a reset is not an end.
            exchange.succeed((self.status, self.headers, b"".join(self.body)))
        elif (
            not self.got_bytes
            and self.answered
            and not exchange.retried
            and exchange.method in SAFE_METHODS
        ):
            # The server closed a kept-alive connection as this request went out: a safe
            # request is simply asked again, once, on a new connection.
            exchange.retried = True
            self.pool._dispatch(exchange, fresh=True)
        else:
            got = "an incomplete answer" if self.got_bytes else "no answer"
            exchange.fail(ResponseNotReceived(f"{got}: {_why(reason)}"))

    # ---- answers
    def dataReceived(self, data: bytes) -> None:
        if self.exchange is None:
            # Nothing was asked: a server that talks out of turn is not to be trusted.
            self.abort()
            return
        self.got_bytes = True
        self.buf = self.buf + data if self.buf else data
        try:
            while self.exchange is not None and self.parse():
                pass
        except _BadAnswer as e:
            exchange, self.exchange = self.exchange, None
            self.abort()
            if exchange is not None:
                exchange.fail(ResponseNotReceived(f"bad answer: {e}"))

    def _parse_head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                raise _BadAnswer("header section too long")
            return False
        head = self.buf[:end].decode("latin-1")
        self.buf = self.buf[end + 4 :]
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not (version.startswith("HTTP/1.") and code.isdigit() and len(code) == 3):
            raise _BadAnswer(f"bad status line {lines[0][:80]!r}")
        status = int(code)
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name[0] in " \t" or name[-1] in " \t":
                raise _BadAnswer(f"bad header line {line[:80]!r}")
            name = name.lower()
            if name in headers:
                headers[name].append(value.strip())
            else:
                headers[name] = [value.strip()]
        if 100 <= status < 200:
            return True  # an interim answer (103 Early Hints): the real one follows
        self.status, self.headers = status, headers
        tokens = ",".join(headers.get("connection", ())).lower()
        if "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens):
            self.reusable = False
        exchange = self.exchange
        assert exchange is not None
        if exchange.method == "HEAD" or status in (204, 304):
            return self._finish()
        if "transfer-encoding" in headers:
            codings = ",".join(headers["transfer-encoding"]).lower()
            if codings.rsplit(",", 1)[-1].strip() != "chunked":
                self.reusable = False
                self.remaining = -1
                self.parse = self._parse_body_until_close
                return True
            self.parse = self._parse_chunk_size
            return True
        if "content-length" in headers:
            lengths = {v.strip() for v in ",".join(headers["content-length"]).split(",")}
            length = lengths.pop() if len(lengths) == 1 else ""
            if not length.isdigit():
                raise _BadAnswer(f"bad Content-Length {headers['content-length']!r}")
            self.remaining = int(length)
            if self.remaining > MAX_BODY:
                raise _BadAnswer(f"body of {self.remaining} bytes is too large")
            self.parse = self._parse_body_length
            return True
        self.reusable = False
        self.remaining = -1
        self.parse = self._parse_body_until_close
        return True

    def _take(self, n: int) -> None:
        """Move up to ``n`` buffered bytes into the body."""
        piece = self.buf[:n] if len(self.buf) > n else self.buf
        self.buf = self.buf[len(piece) :]
        if piece:
            self.body.append(piece)
            self.body_size += len(piece)
            self.remaining -= len(piece)

    def _parse_body_length(self) -> bool:
        if self.remaining and self.buf:
            self._take(self.remaining)
        if self.remaining:
            return False
        return self._finish()

    def _parse_body_until_close(self) -> bool:
        if self.buf:
            self.body.append(self.buf)
            self.body_size += len(self.buf)
            self.buf = b""
            if self.body_size > MAX_BODY:
                raise _BadAnswer("body too large")
        return False

    def _parse_chunk_size(self) -> bool:
        end = self.buf.find(b"\r\n")
        if end < 0:
            if len(self.buf) > 1024:
                raise _BadAnswer("chunk size line too long")
            return False
        line = self.buf[:end].split(b";", 1)[0].strip()
        self.buf = self.buf[end + 2 :]
        try:
            size = int(line, 16)
        except ValueError:
            raise _BadAnswer(f"bad chunk size {line[:20]!r}") from None
        if size < 0:
            raise _BadAnswer(f"bad chunk size {line[:20]!r}")
        if self.body_size + size > MAX_BODY:
            raise _BadAnswer("body too large")
        self.remaining = size
        self.parse = self._parse_chunk_data if size else self._parse_trailers
        return True

    def _parse_chunk_data(self) -> bool:
        if self.remaining and self.buf:
            self._take(self.remaining)
        if self.remaining or len(self.buf) < 2:
            return False
        if self.buf[:2] != b"\r\n":
            raise _BadAnswer("chunk not followed by CRLF")
        self.buf = self.buf[2:]
        self.parse = self._parse_chunk_size
        return True

    def _parse_trailers(self) -> bool:
        end = self.buf.find(b"\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                raise _BadAnswer("trailer section too long")
            return False
        self.buf = self.buf[end + 2 :]
        return self._finish() if end == 0 else True

    def _finish(self) -> bool:
        exchange, self.exchange = self.exchange, None
        answer = (self.status, self.headers, b"".join(self.body))
        if self.buf:
            self.reusable = False  # bytes nobody asked for
        self.answered += 1
        self._reset()
        self.pool._release(self)
        if exchange is not None and exchange.state == SENT:
            exchange.succeed(answer)
        return False


class _BadAnswer(Exception):
    pass


def _why(reason: Failure) -> str:
    value = reason.value
    text = str(value) or type(value).__name__
    return text if len(text) < 300 else text[:300] + "..."


def _socket_of(transport: Any) -> socket.socket | None:
    """The TCP socket under a transport (through a TLS layer), for the idle EOF check."""
    for _ in range(3):
        if transport is None:
            return None
        get = getattr(transport, "getHandle", None)
        handle = get() if get is not None else None
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
    return None


class ConnectionPool:
    """Keep-alive HTTP/1.1 (and HTTPS) connections, at most ``max_per_host`` to each host.

    ``context`` verifies every HTTPS connection (it must require a certificate and check
    the host name, as ``ssl.create_default_context()`` does); it is made once, since
    loading the trust store is the costly part.  Timeouts run on ``clock``.
    """

    def __init__(
        self,
        reactor: Any,
        context: ssl.SSLContext,
        *,
        clock: Any = None,
        max_per_host: int = 20,
        idle_timeout: float = 60.0,
    ) -> None:
        if context.verify_mode != ssl.CERT_REQUIRED or not context.check_hostname:
            raise ValueError("the TLS context must verify certificates and host names")
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.context = context
        self.max_per_host = max_per_host
        self.idle_timeout = idle_timeout
        self._hosts: dict[tuple[str, str], _Host] = {}
        self._connections: set[_Connection] = set()
        self._closing: list[Deferred[None]] = []

    def request(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: float,
    ) -> Deferred[Answer]:
        """Ask once; fires with ``(status, headers, body)`` or fails with an HTTPFailure."""
        m = _URL.match(url)
        if m is None:
            raise ValueError(f"not an http(s) URL: {url!r}")
        scheme, netloc, target = m.groups()
        scheme = scheme.lower()
        host = self._hosts.get((scheme, netloc)) or self._host(scheme, netloc)
        if not target or target[0] != "/":
            target = "/" + target
        if not _PLAIN_TARGET.fullmatch(target):
            target = quote(target, safe="/?:@!$&'()*+,;=%~[]")
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {host.host_header}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"bad header {name!r}")
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        data = "".join(lines).encode("latin-1")
        if body:
            data += body
        exchange = _Exchange(method, data, host)
        exchange.timer = self.clock.callLater(timeout, exchange.timed_out)
        self._dispatch(exchange)
        return exchange.d

    def _host(self, scheme: str, netloc: str) -> _Host:
        parts = urlsplit(f"{scheme}://{netloc}")
        hostname = parts.hostname
        if not hostname:
            raise ValueError(f"no host in {netloc!r}")
        default = 443 if scheme == "https" else 80
        port = parts.port or default
        ascii_host = hostname.encode("idna").decode("ascii")
        shown = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
        host_header = shown if port == default else f"{shown}:{port}"
        tls = self.context if scheme == "https" else None
        host = self._hosts[(scheme, netloc)] = _Host(ascii_host, port, host_header, tls)
        return host

    def _dispatch(self, exchange: _Exchange, fresh: bool = False) -> None:
        host = exchange.host
        if not fresh:
            now = self.clock.seconds()
            while host.idle:
                conn = host.idle.pop()  # the most recently used: the least likely closed
                if now - conn.idle_since < self.idle_timeout and conn.alive():
                    conn.send(exchange)
                    return
                conn.close()
        if host.total < self.max_per_host:
            self._connect(host, exchange)
        else:
            exchange.state = QUEUED
            host.waiting.append(exchange)

    def _connect(self, host: _Host, exchange: _Exchange) -> None:
        host.total += 1
        exchange.state = CONNECTING
        conn = _Connection(self, host, opener=exchange)
        exchange.conn = conn
        self._connections.add(conn)

        def failed(reason: Failure) -> None:
            self._connections.discard(conn)
            conn.gone = True
            self._slot_freed(host)
            if exchange.state == CONNECTING:
                exchange.fail(RequestNotSent(f"cannot connect: {_why(reason)}"))

        d = stream.connect(self.reactor, host.name, host.port, host.tls, conn)
        exchange.connecting = d
        d.addCallbacks(lambda _: None, failed)

    def _release(self, conn: _Connection) -> None:
        """A connection is done with its request (or ready with none)."""
        host = conn.host
        if not conn.reusable or conn.gone:
            conn.close()
            return
        while host.waiting:
            exchange = host.waiting.popleft()
            if exchange.state == QUEUED:
                conn.send(exchange)
                return
        conn.idle_since = self.clock.seconds()
        host.idle.append(conn)
        if self._closing:
            conn.close()

    def _lost(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        host = conn.host
        with contextlib.suppress(ValueError):
            host.idle.remove(conn)
        self._slot_freed(host)

    def _slot_freed(self, host: _Host) -> None:
        host.total -= 1
        while host.waiting and host.total < self.max_per_host:
            exchange = host.waiting.popleft()
            if exchange.state == QUEUED:
                self._connect(host, exchange)
        if not self._connections and self._closing:
            closing, self._closing = self._closing, []
            for d in closing:
                d.callback(None)

    def close(self) -> Deferred[None]:
        """Close every connection; fires once all are gone (requests in flight fail)."""
        d: Deferred[None] = Deferred()
        if not self._connections:
            d.callback(None)
            return d
        self._closing.append(d)
        for conn in list(self._connections):
            opener = conn.opener
            if conn.transport is None and opener is not None and opener.connecting is not None:
                opener.connecting.cancel()  # still connecting: stop trying
            elif conn.exchange is not None or opener is not None:
                conn.abort()
            else:
                conn.close()
        return d
