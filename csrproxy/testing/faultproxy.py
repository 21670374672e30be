"""A fault-injecting HTTPS reverse proxy in front of pebble (which never answers rateLimited,
Retry-After or 5xx), so an ACME client's retry paths run end to end against a real CA.

Requests go to pebble **with the client's Host header**: pebble builds its URLs from Host and
checks the JWS ``url`` against it, so its URLs already name the proxy and signatures stay valid.
Upstream base URLs left in bodies or ``Location``/``Link`` headers are rewritten anyway.

Fault plan: ordered rules ``METHOD:PATH_REGEX:ACTION[:ARG][:count=N][:after=N][:nonce=0]``
(METHOD may be ``*``; the regex is ``re.search``ed in the path).  Each request takes the first
matching rule not used up: its first ``after`` matches pass, then it fires ``count`` times
(``count=0``: forever).  Actions: ``rateLimited[:S]`` 429, ``rateLimited-date[:S]`` 429 with
Retry-After as an HTTP-date (1 s resolution), ``serverInternal[:S]`` 500, ``badNonce`` 400 -
problem+json with ``Retry-After: S`` if S is given, a fresh ``Replay-Nonce`` from a HEAD of
pebble's newNonce (a real CA sends one; ``nonce=0`` leaves it out) and ``Link: rel="index"``;
``503[:S]`` plain-text body, Retry-After S (default 1), no nonce, like a load balancer;
``drop-before`` aborts the connection without forwarding; ``drop-after`` forwards, waits for
pebble's answer, then aborts (the ambiguous failure); ``delay:S`` forwards after S seconds.

Control: ``GET /_faults/counts`` -> ``{"requests": {"POST /order-plz": n}, "injected":
{"POST /order-plz rateLimited": n}}`` (path kind = first path segment); ``POST /_faults/rules``
(JSON list of rule strings/objects) appends, ``DELETE /_faults/rules`` clears, ``POST
/_faults/reset`` zeroes counters.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from io import BytesIO
from typing import Any, Self, cast

import treq
from OpenSSL import SSL
from twisted.internet import ssl as tssl
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.task import deferLater
from twisted.web import client as webclient
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from csrproxy.testing.pebble import Pebble

PROBLEMS = {
    "rateLimited": (429, "rateLimited"),
    "rateLimited-date": (429, "rateLimited"),
    "serverInternal": (500, "serverInternal"),
    "badNonce": (400, "badNonce"),
}
ACTIONS = {*PROBLEMS, "503", "drop-before", "drop-after", "delay"}
HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"upgrade",
    b"transfer-encoding",
    b"content-length",
}


@dataclass
class Rule:
    method: str  # "GET", "POST", "HEAD" or "*"
    path: str  # regex searched in the request path
    action: str
    arg: float | None = None
    count: int = 1  # times it fires; 0 = unlimited
    after: int = 0  # matching requests let through before it fires
    nonce: bool = True  # add a fresh Replay-Nonce to problem answers
    seen: int = field(default=0, compare=False)
    fired: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; known: {sorted(ACTIONS)}")
        self.method = self.method.upper()
        self._re = re.compile(self.path)

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any]) -> Rule:
        """``'POST:/order-plz:rateLimited:1:count=1'`` or ``{"method": ..., "path": ...}``."""
        if not isinstance(spec, str):
            return cls(**{k: v for k, v in spec.items() if k not in ("seen", "fired")})
        parts = spec.split(":")
        opts: dict[str, int] = {}
        while (
            parts and "=" in parts[-1] and parts[-1].split("=", 1)[0] in ("count", "after", "nonce")
        ):
            k, v = parts.pop().split("=", 1)
            opts[k] = int(v)
        # the action is the first action name with at most one part (its ARG) after it
        idx = [i for i in range(2, len(parts)) if parts[i] in ACTIONS and len(parts) - i <= 2]
        if not idx:
            raise ValueError(f"bad fault rule {spec!r}: want METHOD:PATH:ACTION[:ARG][:count=N]")
        i = idx[0]
        arg = float(parts[i + 1]) if len(parts) > i + 1 else None
        return cls(
            parts[0].upper(),
            ":".join(parts[1:i]),
            parts[i],
            arg,
            count=opts.get("count", 1),
            after=opts.get("after", 0),
            nonce=bool(opts.get("nonce", 1)),
        )

    def take(self, method: bytes, path: str) -> bool:
        """Does this rule fire for this request?  (Updates its counters.)"""
        if self.count and self.fired >= self.count:
            return False
        if self.method not in ("*", method.decode()) or not self._re.search(path):
            return False
        self.seen += 1
        if self.seen <= self.after:
            return False
        self.fired += 1
        return True


def path_kind(path: str) -> str:
    return "/" + path.lstrip("/").split("/", 1)[0]


@implementer(IOpenSSLContextFactory)
class _ServerTLS:
    """Server TLS from PEM files (``PrivateCertificate.options()`` warns with pyOpenSSL 25)."""

    def __init__(self, cert: str, key: str) -> None:
        self._ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._ctx.use_certificate_chain_file(cert)
        self._ctx.use_privatekey_file(key)

    def getContext(self) -> SSL.Context:
        return self._ctx


class FaultProxy(Resource):
    """The proxy as a twisted.web resource; ``listen()`` serves it over HTTPS on 127.0.0.1."""

    isLeaf = True

    def __init__(
        self,
        reactor: Any,
        upstream: str,
        ca_cert: str,
        cert: str,
        key: str,
        rules: Sequence[str | Rule] = (),
        timeout: float = 60,
    ) -> None:
        Resource.__init__(self)
        self.reactor = reactor
        self.upstream = upstream.rstrip("/").encode()  # https://127.0.0.1:PEBBLEPORT
        with open(ca_cert, "rb") as f:
            trust = tssl.Certificate.loadPEM(f.read())
        self._tls = _ServerTLS(cert, key)
        self.pool = webclient.HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 20
        policy = webclient.BrowserLikePolicyForHTTPS(trustRoot=trust)
        self.agent: webclient.Agent = webclient.Agent(reactor, policy, pool=self.pool)
        self.timeout = timeout
        self.rules: list[Rule] = []
        self.requests: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.port: Any = None  # IListeningPort
        for r in rules:
            self.add_rule(r)

    @classmethod
    def for_pebble(cls, reactor: Any, pebble: Pebble, rules: Sequence[str | Rule] = ()) -> Self:
        """In front of a test kit pebble, serving with pebble's own HTTPS cert."""
        return cls(
            reactor,
            pebble.directory.rsplit("/", 1)[0],
            pebble.ca_cert,
            pebble.cert_path,
            pebble.key_path,
            rules,
        )

    def add_rule(self, rule: str | Rule | Mapping[str, Any]) -> Rule:
        r = rule if isinstance(rule, Rule) else Rule.parse(rule)
        self.rules.append(r)
        return r

    def clear_rules(self) -> None:
        self.rules.clear()

    def counts(self) -> dict[str, dict[str, int]]:
        return {"requests": dict(self.requests), "injected": dict(self.injected)}

    def listen(self, port: int = 0) -> int:
        """Start serving on 127.0.0.1:``port`` (0: any free port); returns the port."""
        self.port = self.reactor.listenSSL(port, Site(self), self._tls, interface="127.0.0.1")
        return int(self.port.getHost().port)

    @property
    def base_url(self) -> str:
        assert self.port is not None, "listen() first"
        return f"https://127.0.0.1:{self.port.getHost().port}"

    @property
    def directory(self) -> str:
        return self.base_url + "/dir"

    def stop(self) -> Deferred[Any]:
        """Stop listening and close upstream connections."""
        ds: list[Deferred[Any]] = [self.pool.closeCachedConnections()]
        if self.port is not None:
            ds.append(maybeDeferred(self.port.stopListening))
        return gatherResults(ds)

    def render(self, request: Request) -> int | bytes:
        method = request.method
        path = request.path.decode("latin-1")
        if path.startswith("/_faults/"):
            return self._control(request, method, path)
        self.requests[f"{method.decode()} {path_kind(path)}"] += 1
        rule = next((r for r in self.rules if r.take(method, path)), None)
        if rule is not None:
            self.injected[f"{method.decode()} {path_kind(path)} {rule.action}"] += 1
        self._handle(request, rule).addErrback(self._fail, request)
        return NOT_DONE_YET

    def _control(self, request: Request, method: bytes, path: str) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        if path == "/_faults/counts":
            return json.dumps(self.counts()).encode()
        if path == "/_faults/rules" and method == b"POST":
            for r in json.load(request.content):  # type: ignore[arg-type]
                self.add_rule(r)
        elif path == "/_faults/rules" and method == b"DELETE":
            self.clear_rules()
        elif path == "/_faults/reset" and method == b"POST":
            self.requests.clear()
            self.injected.clear()
        elif path != "/_faults/rules":
            request.setResponseCode(404)
            return b'{"error": "not found"}'
        return json.dumps([asdict(r) for r in self.rules]).encode()

    @inlineCallbacks
    def _handle(self, request: Request, rule: Rule | None) -> Any:
        action = rule.action if rule else None
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        if action == "drop-before":
            self._abort(request)
            return
        if action in PROBLEMS or action == "503":
            assert rule is not None
            yield self._problem(request, rule)
            return
        if action == "delay":
            assert rule is not None
            yield deferLater(self.reactor, rule.arg or 0, lambda: None)
        host = request.getHeader(b"host") or b""
        body = request.content.read() if request.content else b""
        resp, data = yield self._upstream(request.method, request.uri, request.requestHeaders, body)
        if action == "drop-after":
            self._abort(request)
            return
        if gone:
            return
        base = b"https://" + host
        for k, vs in resp.headers.getAllRawHeaders():
            if k.lower() not in HOP:
                request.responseHeaders.setRawHeaders(
                    k, [v.replace(self.upstream, base) for v in vs]
                )
        _reply(request, resp.code, data.replace(self.upstream, base))

    @inlineCallbacks
    def _upstream(self, method: bytes, uri: bytes, headers: Headers, body: bytes) -> Any:
        out = Headers()
        for k, vs in headers.getAllRawHeaders():
            if k.lower() not in HOP:
                out.setRawHeaders(k, vs)
        producer = webclient.FileBodyProducer(BytesIO(body)) if body else None
        d = self.agent.request(method, self.upstream + uri, out, producer)
        d.addTimeout(self.timeout, self.reactor)
        resp: IResponse = yield d
        data: bytes = b"" if method == b"HEAD" else (yield treq.content(resp))
        return resp, data

    @inlineCallbacks
    def _problem(self, request: Request, rule: Rule) -> Any:
        host = request.getHeader(b"host") or b""
        hdrs = Headers()
        if rule.action == "503":
            code, body, ctype = 503, b"503 Service Unavailable (injected)\n", b"text/plain"
            retry: float | None = 1 if rule.arg is None else rule.arg
        else:
            code, kind = PROBLEMS[rule.action]
            body = json.dumps(
                {
                    "type": f"urn:ietf:params:acme:error:{kind}",
                    "status": code,
                    "detail": f"injected by csrproxy.testing.faultproxy ({rule.action})",
                }
            ).encode()
            ctype, retry = b"application/problem+json", rule.arg
            if rule.nonce:
                try:
                    resp, _ = yield self._upstream(
                        b"HEAD", b"/nonce-plz", Headers({b"host": [host]}), b""
                    )
                    for n in resp.headers.getRawHeaders(b"replay-nonce") or []:
                        hdrs.addRawHeader(b"replay-nonce", n)
                except Exception:  # no nonce then; the client must fetch one
                    pass
            hdrs.addRawHeader(b"link", b"<https://" + host + b'/dir>;rel="index"')
        if retry is not None:
            hdrs.addRawHeader(
                b"retry-after",
                (
                    email.utils.formatdate(time.time() + retry, usegmt=True)
                    if rule.action == "rateLimited-date"
                    else str(round(retry))
                ).encode(),
            )
        hdrs.addRawHeader(b"content-type", ctype)
        for k, vs in hdrs.getAllRawHeaders():
            request.responseHeaders.setRawHeaders(k, vs)
        _reply(request, code, body)

    def _abort(self, request: Request) -> None:
        transport = cast(Any, request.channel.transport if request.channel else None)
        if transport is not None:
            transport.abortConnection()

    def _fail(self, failure: Any, request: Request) -> None:
        body = json.dumps(
            {
                "type": "urn:ietf:params:acme:error:serverInternal",
                "status": 502,
                "detail": f"faultproxy upstream error: {failure.value!r}",
            }
        ).encode()
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/problem+json"])
        _reply(request, 502, body)


def _reply(request: Request, code: int, body: bytes) -> None:
    r: Any = request
    if r._disconnected or r.finished:
        return
    r.setResponseCode(code)
    r.setHeader(b"content-length", str(len(body)).encode())
    r.write(body)
    r.finish()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m csrproxy.testing.faultproxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--upstream", required=True, help="pebble base URL https://127.0.0.1:PORT")
    ap.add_argument("--ca-cert", required=True, help="CA that signed pebble's HTTPS cert")
    ap.add_argument("--cert", required=True, help="our HTTPS cert (PEM; 127.0.0.1 SAN)")
    ap.add_argument("--key", required=True, help="its key (PEM)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the port we listen on here once listening")
    ap.add_argument("--rule", action="append", default=[], help="METHOD:PATH:ACTION[:ARG][:k=v]")
    ap.add_argument("--rules-json", help="JSON list of rule strings or objects")
    a = ap.parse_args(argv)
    rules: list[Any] = list(a.rule) + (json.loads(a.rules_json) if a.rules_json else [])
    from twisted.internet import reactor

    proxy = FaultProxy(reactor, a.upstream, a.ca_cert, a.cert, a.key)
    for r in rules:
        proxy.add_rule(r)
    port = proxy.listen(a.port)
    if a.port_file:
        with open(a.port_file + ".tmp", "w") as f:
            f.write(f"{port}\n")
        os.replace(a.port_file + ".tmp", a.port_file)
    print(f"faultproxy {proxy.base_url} -> {a.upstream} rules={rules}", flush=True)
    cast(Any, reactor).run()


if __name__ == "__main__":
    main()
