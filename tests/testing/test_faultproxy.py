"""The fault-injecting proxy in front of pebble: rewrites, injected faults, request counts."""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from email.message import Message
from pathlib import Path
from typing import Any, cast

import pytest
import treq
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from twisted.internet import ssl as tssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial import unittest as trial
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from csrproxy.testing.faultprocess import FaultProxyProcess, start_faultproxy
from csrproxy.testing.faultproxy import FaultProxy, Rule, path_kind
from csrproxy.testing.pebble import PEBBLE_BIN, Pebble, start_pebble
from csrproxy.testing.ports import free_port

have_pebble = Path(PEBBLE_BIN).exists()


# ---------------------------------------------------------------------- rule parsing (no I/O)


def test_rule_parse_forms() -> None:
    r = Rule.parse("POST:/order-plz:rateLimited:1:count=1")
    assert (r.method, r.path, r.action, r.arg, r.count, r.after, r.nonce) == (
        "POST", "/order-plz", "rateLimited", 1.0, 1, 0, True)
    r = Rule.parse("*:^/(authZ|chalZ)/:serverInternal:count=0:after=2:nonce=0")
    assert (r.method, r.path, r.action, r.arg, r.count, r.after, r.nonce) == (
        "*", "^/(authZ|chalZ)/", "serverInternal", None, 0, 2, False)
    assert Rule.parse("get:/a:b:c:drop-after").path == "/a:b:c"  # colons inside the regex
    r = Rule.parse("GET:/x:rateLimited:503")  # an ARG that looks like an action
    assert (r.path, r.action, r.arg) == ("/x", "rateLimited", 503)
    assert Rule.parse({"method": "GET", "path": "/dir", "action": "503"}).count == 1
    for bad in ("POST:/x", "POST:/x:explode", "POST:/x:rateLimited:1:2:3"):
        with pytest.raises(ValueError):
            Rule.parse(bad)


def test_rule_after_and_count() -> None:
    r = Rule.parse("POST:/finalize-order/:serverInternal:count=2:after=1")
    fired = [r.take(b"POST", "/finalize-order/abc") for _ in range(5)]
    assert fired == [False, True, True, False, False]
    assert not Rule.parse("POST:/x:503").take(b"GET", "/x")
    assert path_kind("/my-order/123/x") == "/my-order"


# ---------------------------------------------------------------------- against pebble


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Pebble, FaultProxyProcess]]:
    if not have_pebble:
        pytest.skip("no pebble")
    work = tmp_path_factory.mktemp("fp")
    dns = f"127.0.0.1:{free_port('udp')}"  # nothing answers there: no validations here
    with start_pebble(str(work / "pebble"), dns) as p, \
            start_faultproxy(str(work / "proxy"), p) as fp:
        yield p, fp


@pytest.fixture
def fp(bed: tuple[Pebble, FaultProxyProcess]) -> FaultProxyProcess:
    bed[1].clear_rules()
    bed[1].reset_counts()
    return bed[1]


def _req(fp: FaultProxyProcess, method: str, url: str, body: bytes | None = None,
         ) -> tuple[int, Message[str, str], bytes]:
    ctx = ssl.create_default_context(cafile=fp.ca_cert)
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/jose+json"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _new_account_jws(key: ec.EllipticCurvePrivateKey, nonce: str, url: str) -> bytes:
    n = key.public_key().public_numbers()
    jwk = {"crv": "P-256", "kty": "EC", "x": _b64(n.x.to_bytes(32, "big")),
           "y": _b64(n.y.to_bytes(32, "big"))}
    protected = _b64(json.dumps({"alg": "ES256", "jwk": jwk, "nonce": nonce, "url": url}).encode())
    payload = _b64(json.dumps({"termsOfServiceAgreed": True}).encode())
    r, s = decode_dss_signature(key.sign(f"{protected}.{payload}".encode(),
                                         ec.ECDSA(hashes.SHA256())))
    sig = _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return json.dumps({"protected": protected, "payload": payload, "signature": sig}).encode()


@pytest.mark.integration
def test_directory_is_rewritten_to_the_proxy(fp: FaultProxyProcess,
                                             bed: tuple[Pebble, Any]) -> None:
    code, _, body = _req(fp, "GET", fp.directory)
    d = json.loads(body)
    assert code == 200
    urls = [v for v in d.values() if isinstance(v, str)]
    assert urls and all(u.startswith(fp.base_url + "/") for u in urls)
    assert fp.base_url != bed[0].directory.rsplit("/", 1)[0]
    assert fp.counts() == {"GET /dir": 1}
    assert fp.injected() == {}


@pytest.mark.integration
def test_rate_limited_new_account_then_passes(fp: FaultProxyProcess) -> None:
    d = json.loads(_req(fp, "GET", fp.directory)[2])
    fp.add_rules(["POST:^/sign-me-up$:rateLimited:2:count=1"])
    key = ec.generate_private_key(ec.SECP256R1())
    _, h, _ = _req(fp, "HEAD", d["newNonce"])
    code, h, body = _req(fp, "POST", d["newAccount"],
                         _new_account_jws(key, h["Replay-Nonce"], d["newAccount"]))
    assert code == 429
    assert h["Retry-After"] == "2"
    assert h["Content-Type"] == "application/problem+json"
    assert json.loads(body)["type"] == "urn:ietf:params:acme:error:rateLimited"
    assert h["Replay-Nonce"], "problem answers carry a fresh nonce"
    assert fp.directory in h["Link"]
    # the retry with the nonce from the 429 goes through to pebble, which accepts the JWS url
    code, h2, body = _req(fp, "POST", d["newAccount"],
                          _new_account_jws(key, h["Replay-Nonce"], d["newAccount"]))
    assert code == 201, body
    assert h2["Location"].startswith(fp.base_url + "/my-account/")
    assert fp.counts() == {"GET /dir": 1, "HEAD /nonce-plz": 1, "POST /sign-me-up": 2}
    assert fp.injected() == {"POST /sign-me-up rateLimited": 1}


@pytest.mark.integration
def test_other_faults(fp: FaultProxyProcess) -> None:
    fp.add_rules(["GET:^/dir$:rateLimited-date:3", "GET:^/dir$:503", "GET:/dir:serverInternal",
                  "GET:/dir:drop-before", "GET:/dir:drop-after",
                  {"method": "GET", "path": "/dir", "action": "delay", "arg": 0.3}])
    code, h, _ = _req(fp, "GET", fp.directory)
    assert code == 429
    when = email.utils.parsedate_to_datetime(h["Retry-After"]).timestamp()
    assert 1 <= when - time.time() <= 4
    code, h, body = _req(fp, "GET", fp.directory)
    assert (code, h["Retry-After"], h["Content-Type"]) == (503, "1", "text/plain")
    code, h, body = _req(fp, "GET", fp.directory)
    assert code == 500 and json.loads(body)["type"].endswith(":serverInternal")
    for _ in range(2):
        with pytest.raises((OSError, http.client.HTTPException)):
            _req(fp, "GET", fp.directory)
    t0 = time.monotonic()
    assert _req(fp, "GET", fp.directory)[0] == 200
    assert time.monotonic() - t0 >= 0.3
    assert _req(fp, "GET", fp.directory)[0] == 200  # plan used up: plain pass-through
    assert fp.counts() == {"GET /dir": 7}
    assert fp.injected() == {f"GET /dir {a}": 1 for a in (
        "rateLimited-date", "503", "serverInternal", "drop-before", "drop-after", "delay")}


class InProcess(trial.TestCase):
    """The same proxy inside the test's reactor (as csrproxy's own trial tests would use it)."""

    @pytest.mark.integration
    @inlineCallbacks
    def test_in_process_proxy(self) -> Generator[Deferred[Any], Any, None]:
        if not have_pebble:
            raise trial.SkipTest("no pebble")
        from twisted.internet import reactor

        work = tempfile.mkdtemp(prefix="faultproxy-")
        self.addCleanup(shutil.rmtree, work, True)
        peb = start_pebble(work, f"127.0.0.1:{free_port('udp')}")
        self.addCleanup(peb.stop)
        proxy = FaultProxy.for_pebble(reactor, peb, ["GET:^/dir$:serverInternal:1"])
        proxy.listen(0)
        self.addCleanup(proxy.stop)
        with open(peb.ca_cert, "rb") as f:
            trust = tssl.Certificate.loadPEM(f.read())
        pool: Any = cast(Any, HTTPConnectionPool)(reactor, persistent=False)
        agent: Any = cast(Any, Agent)(
            reactor, cast(Any, BrowserLikePolicyForHTTPS)(trustRoot=trust), pool=pool)
        resp = yield agent.request(b"GET", proxy.directory.encode())
        body = yield treq.content(resp)
        assert resp.code == 500
        assert resp.headers.getRawHeaders(b"retry-after") == [b"1"]
        assert resp.headers.getRawHeaders(b"replay-nonce")
        assert json.loads(body)["type"] == "urn:ietf:params:acme:error:serverInternal"
        resp = yield agent.request(b"GET", proxy.directory.encode())
        d = json.loads((yield treq.content(resp)))
        assert resp.code == 200 and d["newOrder"] == proxy.base_url + "/order-plz"
        assert proxy.counts() == {"requests": {"GET /dir": 2},
                                  "injected": {"GET /dir serverInternal": 1}}
        yield pool.closeCachedConnections()
