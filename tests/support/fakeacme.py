"""A fake ACME CA as a Klein app, driven in memory through treq's RequestTraversalAgent.

It verifies every JWS (signature, nonce, url, kid/jwk) like a real CA and
keeps counters, and it has knobs for the failures a real CA produces.  Like
pebble and Boulder it answers ``accountDoesNotExist`` to a ``kid`` it does not
know, and ``restart()`` forgets everything, as pebble does when it restarts.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from josepy.b64 import b64decode, b64encode
from josepy.jwa import ES256, ES384, HS256, RS256, JWASignature
from josepy.jwk import JWK
from klein import Klein
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from csrproxy.http import client_over

BASE = "https://ca.test"
ERR = "urn:ietf:params:acme:error:"
ALGS: dict[str, JWASignature] = {"ES256": ES256, "ES384": ES384, "RS256": RS256}


@dataclass
class Authz:
    id: str
    identifier: str
    wildcard: bool
    status: str = "pending"
    token: str = ""
    challenge_status: str = "pending"
    error: dict[str, Any] | None = None


@dataclass
class Order:
    id: str
    account: str
    names: list[str]
    authz_ids: list[str]
    status: str = "pending"
    cert_id: str | None = None
    error: dict[str, Any] | None = None


@dataclass
class Faults:
    """Knobs: each counter is consumed once per matching request."""

    bad_nonce: int = 0
    #: Authorizations for these identifiers go invalid when answered.
    invalid_names: set[str] = field(default_factory=set)
    #: Answer newOrder with this many rateLimited problems first.
    rate_limited: int = 0
    retry_after: str | None = None
    service_unavailable: int = 0
    #: Polls of an authorization that still say "pending" after the challenge was answered.
    pending_polls: int = 0
    #: Polls of an order that still say "processing" after finalize.
    processing_polls: int = 0
    poll_retry_after: str | None = None
    #: New authorizations are created already valid (the CA reused them).
    authz_reuse: bool = False
    #: newAccount needs an externalAccountBinding with this kid -> HMAC key.
    eab_keys: dict[str, bytes] | None = None
    #: The directory lists these profiles in meta.profiles.
    profiles: tuple[str, ...] = ()
    #: The directory offers renewalInfo (ARI).
    ari: bool = False
    #: Alternate chains offered with Link rel="alternate".
    alternates: int = 0
    #: newOrder answers this problem type (e.g. rejectedIdentifier), every time.
    reject_orders: str | None = None
    #: Fields set in every order / authorization document (None removes one): a broken CA.
    order_fields: dict[str, Any] = field(default_factory=dict)
    authz_fields: dict[str, Any] = field(default_factory=dict)
    #: The certificate URL answers this body instead of the chain.
    cert_body: bytes | None = None


class FakeCA:
    app = Klein()

    def __init__(self) -> None:
        self.faults = Faults()
        self.accounts: dict[str, dict[str, Any]] = {}  # kid -> {"jwk":..., "thumbprint":...}
        self.orders: dict[str, Order] = {}
        self.authzs: dict[str, Authz] = {}
        self.certs: dict[str, str] = {}
        self.nonces: set[str] = set()
        self.requests: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self._ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake Root")])
        self.published_check: Any = None  # callable(identifier, expected_value) -> bool
        self._authz_polls: Counter[str] = Counter()
        self._order_polls: Counter[str] = Counter()
        self.revoked: dict[int, int] = {}
        self.ari_queries: list[str] = []
        self.order_payloads: list[dict[str, Any]] = []
        #: Bumped by forget_accounts(): an account registered again gets a new URL.
        self._epoch = 0

    # -- knobs ----------------------------------------------------------------

    def forget_accounts(self) -> None:
        """Forget every account: requests signed with their kid get accountDoesNotExist."""
        self.accounts.clear()
        self._epoch += 1

    def restart(self) -> None:
        """Forget everything, as pebble does at a restart: accounts, orders, authorizations,
        certificates and nonces (the counters stay)."""
        self.forget_accounts()
        self.orders.clear()
        self.authzs.clear()
        self.certs.clear()
        self.nonces.clear()

    # -- helpers ------------------------------------------------------------

    def client(self) -> tuple[HTTPClient, RequestTraversalAgent]:
        agent = RequestTraversalAgent(self.app.resource())
        return client_over(agent), agent

    def _next(self) -> str:
        return str(next(self._ids))

    def _nonce(self, request: IRequest) -> None:
        n = b64encode(next(self._ids).to_bytes(8, "big") + b"fake").decode()
        self.nonces.add(n)
        request.setHeader(b"Replay-Nonce", n.encode())

    def _problem(
        self, request: IRequest, status: int, kind: str, detail: str, retry_after: str | None = None
    ) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/problem+json")
        if retry_after is not None:
            request.setHeader(b"Retry-After", retry_after.encode())
        self._nonce(request)
        return json.dumps({"type": ERR + kind, "detail": detail, "status": status}).encode()

    def _json(self, request: IRequest, doc: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        self._nonce(request)
        return json.dumps(doc).encode()

    def _verify(self, request: IRequest, url: str, new_account: bool = False) -> tuple[Any, str]:
        """Check the JWS; returns (payload or None for POST-as-GET, account kid or '')."""
        assert request.content is not None
        jws = json.loads(request.content.read())
        protected = json.loads(b64decode(jws["protected"]))
        assert protected["url"] == url, (protected["url"], url)
        nonce = protected.get("nonce")
        if nonce not in self.nonces:
            raise _BadNonce()
        self.nonces.discard(nonce)
        if self.faults.bad_nonce > 0:
            self.faults.bad_nonce -= 1
            raise _BadNonce()
        if new_account:
            assert "jwk" in protected and "kid" not in protected
            jwk = cast(JWK, JWK.from_json(protected["jwk"]))
            kid = f"{BASE}/acct/{self._epoch}-{b64encode(jwk.thumbprint()).decode()[:16]}"
        else:
            kid = protected["kid"]
            if kid not in self.accounts:
                raise _NoAccount(kid)
            jwk = self.accounts[kid]["jwk"]
        sig = b64decode(jws["signature"])
        signed = f"{jws['protected']}.{jws['payload']}".encode()
        if not ALGS[protected["alg"]].verify(jwk.key, signed, sig):
            raise _Unauthorized("bad signature")
        payload = json.loads(b64decode(jws["payload"])) if jws["payload"] else None
        return payload, kid

    def _guard(self, request: IRequest, url: str, new_account: bool = False) -> Any:
        try:
            return self._verify(request, url, new_account)
        except _BadNonce:
            return self._problem(request, 400, "badNonce", "bad nonce")
        except _NoAccount as e:
            return self._problem(request, 400, "accountDoesNotExist", f"account {e} not found")
        except _Unauthorized as e:
            return self._problem(request, 403, "unauthorized", str(e))

    def _missing(self, request: IRequest, what: str) -> bytes:
        return self._problem(request, 404, "malformed", f"no such {what}")

    # -- routes ---------------------------------------------------------------

    @app.route("/dir", methods=["GET"])
    def directory(self, request: IRequest) -> bytes:
        self.requests["directory"] += 1
        if self.faults.service_unavailable > 0:
            self.faults.service_unavailable -= 1
            return self._problem(request, 503, "serverInternal", "down", self.faults.retry_after)
        doc: dict[str, Any] = {
            "newNonce": BASE + "/nonce",
            "newAccount": BASE + "/account",
            "newOrder": BASE + "/order",
            "revokeCert": BASE + "/revoke",
            "keyChange": BASE + "/keychange",
            "meta": {"termsOfService": BASE + "/tos"},
        }
        if self.faults.profiles:
            doc["meta"]["profiles"] = {p: f"the {p} profile" for p in self.faults.profiles}
        if self.faults.ari:
            doc["renewalInfo"] = BASE + "/renewal-info"
        return self._json(request, doc)

    @app.route("/nonce", methods=["HEAD", "GET"])
    def new_nonce(self, request: IRequest) -> bytes:
        self.requests["newNonce"] += 1
        self._nonce(request)
        return b""

    @app.route("/account", methods=["POST"])
    def new_account(self, request: IRequest) -> bytes:
        self.requests["newAccount"] += 1
        got = self._guard(request, BASE + "/account", new_account=True)
        if isinstance(got, bytes):
            return got
        payload, kid = got
        if kid in self.accounts:
            request.setHeader(b"Location", kid.encode())
            return self._json(request, self._account_doc(kid))
        if payload.get("onlyReturnExisting"):
            return self._problem(request, 400, "accountDoesNotExist", "no account")
        assert payload.get("termsOfServiceAgreed") is True
        assert request.content is not None
        request.content.seek(0)
        protected = json.loads(b64decode(json.loads(request.content.read())["protected"]))
        if self.faults.eab_keys is not None:
            problem = self._check_eab(request, payload.get("externalAccountBinding"), protected)
            if problem is not None:
                return problem
        self.accounts[kid] = {
            "jwk": JWK.from_json(protected["jwk"]),
            "contact": payload.get("contact") or [],
        }
        request.setHeader(b"Location", kid.encode())
        return self._json(request, self._account_doc(kid), 201)

    def _account_doc(self, kid: str) -> dict[str, Any]:
        return {"status": "valid", "contact": self.accounts[kid]["contact"]}

    def _check_eab(self, request: IRequest, eab: Any, outer: dict[str, Any]) -> bytes | None:
        if not isinstance(eab, dict):
            return self._problem(request, 400, "externalAccountRequired", "EAB required")
        inner = json.loads(b64decode(eab["protected"]))
        keys = self.faults.eab_keys or {}
        if inner.get("alg") != "HS256" or inner.get("kid") not in keys:
            return self._problem(request, 400, "malformed", "unknown EAB kid")
        if inner.get("url") != BASE + "/account":
            return self._problem(request, 400, "malformed", "EAB url mismatch")
        if json.loads(b64decode(eab["payload"])) != outer["jwk"]:
            return self._problem(request, 400, "malformed", "EAB payload is not the account key")
        signed = f"{eab['protected']}.{eab['payload']}".encode()
        if not HS256.verify(keys[inner["kid"]], signed, b64decode(eab["signature"])):
            return self._problem(request, 400, "unauthorized", "EAB MAC does not verify")
        return None

    @app.route("/acct/<aid>", methods=["POST"])
    def account(self, request: IRequest, aid: str) -> bytes:
        self.requests["account"] += 1
        kid = f"{BASE}/acct/{aid}"
        got = self._guard(request, kid)
        if isinstance(got, bytes):
            return got
        payload, signer = got
        assert signer == kid
        if payload and "contact" in payload:
            self.accounts[kid]["contact"] = payload["contact"]
        return self._json(request, self._account_doc(kid))

    @app.route("/keychange", methods=["POST"])
    def key_change(self, request: IRequest) -> bytes:
        self.requests["keyChange"] += 1
        got = self._guard(request, BASE + "/keychange")
        if isinstance(got, bytes):
            return got
        inner, kid = got
        protected = json.loads(b64decode(inner["protected"]))
        new = cast(JWK, JWK.from_json(protected["jwk"]))
        signed = f"{inner['protected']}.{inner['payload']}".encode()
        if protected.get("url") != BASE + "/keychange" or not ALGS[protected["alg"]].verify(
            new.key, signed, b64decode(inner["signature"])
        ):
            return self._problem(request, 400, "malformed", "bad inner JWS")
        body = json.loads(b64decode(inner["payload"]))
        assert body["account"] == kid
        assert body["oldKey"] == self.accounts[kid]["jwk"].to_partial_json()
        self.accounts[kid]["jwk"] = new
        return self._json(request, self._account_doc(kid))

    @app.route("/revoke", methods=["POST"])
    def revoke(self, request: IRequest) -> bytes:
        self.requests["revoke"] += 1
        got = self._guard(request, BASE + "/revoke")
        if isinstance(got, bytes):
            return got
        payload, _ = got
        cert = x509.load_der_x509_certificate(b64decode(payload["certificate"]))
        self.revoked[cert.serial_number] = int(payload.get("reason", 0))
        request.setResponseCode(200)
        self._nonce(request)
        return b""

    @app.route("/renewal-info/<certid>", methods=["GET"])
    def renewal_info(self, request: IRequest, certid: str) -> bytes:
        self.requests["renewalInfo"] += 1
        self.ari_queries.append(certid)
        request.setHeader(b"Retry-After", b"21600")
        return self._json(
            request,
            {
                "suggestedWindow": {
                    "start": "2026-12-01T00:00:00Z",
                    "end": "2026-12-02T00:00:00Z",
                }
            },
        )

    @app.route("/order", methods=["POST"])
    def new_order(self, request: IRequest) -> bytes:
        self.requests["newOrder"] += 1
        got = self._guard(request, BASE + "/order")
        if isinstance(got, bytes):
            return got
        if self.faults.rate_limited > 0:
            self.faults.rate_limited -= 1
            return self._problem(request, 429, "rateLimited", "slow down", self.faults.retry_after)
        if self.faults.reject_orders:
            return self._problem(request, 400, self.faults.reject_orders, "refused by policy")
        payload, kid = got
        self.order_payloads.append(payload)
        names = [i["value"] for i in payload["identifiers"]]
        authz_ids = []
        for name in names:
            aid = self._next()
            base = name[2:] if name.startswith("*.") else name
            a = Authz(aid, base, name.startswith("*."), token=f"tok{aid}")
            if self.faults.authz_reuse:
                a.status = a.challenge_status = "valid"
            self.authzs[aid] = a
            authz_ids.append(aid)
        oid = self._next()
        self.orders[oid] = Order(oid, kid, names, authz_ids)
        request.setHeader(b"Location", f"{BASE}/orders/{oid}".encode())
        return self._json(request, self._order_doc(self.orders[oid]), 201)

    def _order_doc(self, o: Order) -> dict[str, Any]:
        if o.status == "pending" and all(self.authzs[a].status == "valid" for a in o.authz_ids):
            o.status = "ready"
        doc: dict[str, Any] = {
            "status": o.status,
            "identifiers": [{"type": "dns", "value": n} for n in o.names],
            "authorizations": [f"{BASE}/authz/{a}" for a in o.authz_ids],
            "finalize": f"{BASE}/orders/{o.id}/finalize",
        }
        if o.cert_id:
            doc["certificate"] = f"{BASE}/cert/{o.cert_id}"
        if o.error:
            doc["error"] = o.error
        return _patched(doc, self.faults.order_fields)

    def _authz_doc(self, a: Authz) -> dict[str, Any]:
        ch: dict[str, Any] = {
            "type": "dns-01",
            "url": f"{BASE}/chall/{a.id}",
            "token": a.token,
            "status": a.challenge_status,
        }
        if a.error:
            ch["error"] = a.error
        doc: dict[str, Any] = {
            "status": a.status,
            "identifier": {"type": "dns", "value": a.identifier},
            "challenges": [ch],
        }
        if a.wildcard:
            doc["wildcard"] = True
        return _patched(doc, self.faults.authz_fields)

    @app.route("/authz/<aid>", methods=["POST"])
    def authz(self, request: IRequest, aid: str) -> bytes:
        self.requests["authz"] += 1
        got = self._guard(request, f"{BASE}/authz/{aid}")
        if isinstance(got, bytes):
            return got
        if aid not in self.authzs:
            return self._missing(request, "authorization")
        a = self.authzs[aid]
        if a.status == "processing":
            self._authz_polls[aid] += 1
            if self._authz_polls[aid] > self.faults.pending_polls:
                self._validate(a)
            elif self.faults.poll_retry_after:
                request.setHeader(b"Retry-After", self.faults.poll_retry_after.encode())
        doc = self._authz_doc(a)
        if doc.get("status") == "processing":
            doc["status"] = "pending"
        return self._json(request, doc)

    def validate_answered(self) -> None:
        """Validate every answered challenge now, as a real CA does in its own time."""
        for a in self.authzs.values():
            if a.status == "processing":
                self._validate(a)

    def _validate(self, a: Authz) -> None:
        ok = a.identifier not in self.faults.invalid_names
        if ok and self.published_check is not None:
            ok = self.published_check(a.identifier, self.key_authz_digest(a))
        if ok:
            a.status = a.challenge_status = "valid"
        else:
            a.status = a.challenge_status = "invalid"
            a.error = {"type": ERR + "unauthorized", "detail": f"no TXT for {a.identifier}"}

    def key_authz_digest(self, a: Authz) -> str:
        (acct,) = [v for v in self.accounts.values()]
        thumb = b64encode(acct["jwk"].thumbprint()).decode()
        d = hashes.Hash(hashes.SHA256())
        d.update(f"{a.token}.{thumb}".encode())
        return b64encode(d.finalize()).decode()

    @app.route("/chall/<aid>", methods=["POST"])
    def challenge(self, request: IRequest, aid: str) -> bytes:
        self.requests["challenge"] += 1
        got = self._guard(request, f"{BASE}/chall/{aid}")
        if isinstance(got, bytes):
            return got
        if aid not in self.authzs:
            return self._missing(request, "challenge")
        a = self.authzs[aid]
        if a.challenge_status != "pending":
            return self._problem(request, 400, "malformed", "challenge not pending")
        a.status = "processing"
        a.challenge_status = "processing"
        return self._json(request, self._authz_doc(a)["challenges"][0])

    @app.route("/orders/<oid>", methods=["POST"])
    def order(self, request: IRequest, oid: str) -> bytes:
        self.requests["order"] += 1
        got = self._guard(request, f"{BASE}/orders/{oid}")
        if isinstance(got, bytes):
            return got
        if oid not in self.orders:
            return self._missing(request, "order")
        o = self.orders[oid]
        if o.status == "processing":
            self._order_polls[oid] += 1
            if self._order_polls[oid] > self.faults.processing_polls:
                o.status = "valid"
        return self._json(request, self._order_doc(o))

    @app.route("/orders/<oid>/finalize", methods=["POST"])
    def finalize(self, request: IRequest, oid: str) -> bytes:
        self.requests["finalize"] += 1
        got = self._guard(request, f"{BASE}/orders/{oid}/finalize")
        if isinstance(got, bytes):
            return got
        payload, _ = got
        if oid not in self.orders:
            return self._missing(request, "order")
        o = self.orders[oid]
        if self._order_doc(o).get("status") != "ready":
            return self._problem(request, 403, "orderNotReady", f"order is {o.status}")
        csr = x509.load_der_x509_csr(b64decode(payload["csr"]))
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if sorted(sans.get_values_for_type(x509.DNSName)) != sorted(o.names):
            return self._problem(request, 400, "badCSR", "names differ from the order")
        o.cert_id = self._next()
        self.certs[o.cert_id] = self._issue(csr, o.names)
        o.status = "processing" if self.faults.processing_polls else "valid"
        request.setHeader(b"Location", f"{BASE}/orders/{oid}".encode())
        return self._json(request, self._order_doc(o))

    def _issue(self, csr: x509.CertificateSigningRequest, names: list[str]) -> str:
        now = datetime.datetime.now(datetime.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._ca_name)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        return leaf.public_bytes(serialization.Encoding.PEM).decode()

    @app.route("/cert/<cid>", methods=["POST"])
    def cert(self, request: IRequest, cid: str) -> bytes:
        self.requests["cert"] += 1
        got = self._guard(request, f"{BASE}/cert/{cid}")
        if isinstance(got, bytes):
            return got
        if cid.partition("-alt")[0] not in self.certs:
            return self._missing(request, "certificate")
        request.setHeader(b"Content-Type", b"application/pem-certificate-chain")
        self._nonce(request)
        if self.faults.cert_body is not None:
            return self.faults.cert_body
        base, _, alt = cid.partition("-alt")
        for i in range(1, self.faults.alternates + 1):
            if str(i) != alt:
                link = f'<{BASE}/cert/{base}-alt{i}>;rel="alternate"'
                request.responseHeaders.addRawHeader(b"Link", link.encode())
        return self.certs[base].encode() + self._chain_pem(int(alt) if alt else 0)

    def _chain_pem(self, variant: int) -> bytes:
        """An intermediate issued by root 'Fake Root <variant>' (the top issuer CN differs)."""
        now = datetime.datetime.now(datetime.UTC)
        root = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Fake Root {variant}")])
        inter = (
            x509.CertificateBuilder()
            .subject_name(self._ca_name)
            .issuer_name(root)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=900))
            .sign(self._ca_key, hashes.SHA256())
        )
        return inter.public_bytes(serialization.Encoding.PEM)


def _patched(doc: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    for key, value in fields.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


class _BadNonce(Exception):
    pass


class _Unauthorized(Exception):
    pass


class _NoAccount(Exception):
    pass


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class FlakyHTTP(HTTPClient):
    """An HTTP client that fails chosen requests the ways networks do."""

    def __init__(self, inner: HTTPClient) -> None:
        self.inner = inner
        #: [method or "*", url substring, "refuse" | "drop-after" | "hold", times left];
        #: a held request goes on when release() is called (or times out meanwhile).
        self.rules: list[list[Any]] = []
        self.held: list[tuple[Any, str, Any, dict[str, Any]]] = []
        self.sent: Counter[str] = Counter()
        #: Every request asked of this client, failed ones included.
        self.tried = 0

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionLost, ConnectionRefusedError
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseFailed, readBody

        self.tried += 1

        for rule in self.rules:
            if rule[3] > 0 and rule[0] in (method, "*") and rule[1] in str(url):
                rule[3] -= 1
                if rule[2] == "refuse":
                    return fail(ConnectionRefusedError())
                if rule[2] == "hold":
                    held: Deferred[Any] = Deferred()
                    self.held.append((held, method, url, kwargs))
                    return held
                d = self.inner.request(method, url, **kwargs)
                d.addCallback(readBody)

                def lost(_: object) -> None:
                    raise ResponseFailed([Failure(ConnectionLost())])

                return d.addCallback(lost)
        self.sent[f"{method} {url}"] += 1
        return self.inner.request(method, url, **kwargs)

    def release(self) -> None:
        """Send the held requests on (those not timed out meanwhile)."""
        held, self.held = self.held, []
        for d, method, url, kwargs in held:
            if not d.called:
                self.sent[f"{method} {url}"] += 1
                self.inner.request(method, url, **kwargs).chainDeferred(d)
