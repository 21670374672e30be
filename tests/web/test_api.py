"""The HTTP API in memory: Klein through StubTreq, a real issuer and zone, the fake CA."""

from __future__ import annotations

import json
import time
from ipaddress import ip_network
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from csrproxy.acme.client import ACMEClient
from csrproxy.challenges.zone import ZonePublisher, challenge_name
from csrproxy.dns.zone import ChallengeZone
from csrproxy.issuance.admission import Admission, Budgets
from csrproxy.issuance.csr import check_csr
from csrproxy.issuance.ledger import CertificateIds, CertificateRow, Ledger
from csrproxy.issuance.orders import OrderBook
from csrproxy.issuance.policy import NamePolicy
from csrproxy.metrics import Metrics
from csrproxy.names import key_label
from csrproxy.web.api import SigningAPI
from csrproxy.web.auth import ClientGate, parse_tokens, token_hash
from csrproxy.web.health import Health, free_space_probe
from csrproxy.web.problems import problem_document
from csrproxy.web.status import StatusPage
from tests.acme.test_client import ACCOUNT_KEY
from tests.support.fakeacme import BASE, FakeCA
from tests.support.issuers import make_issuer
from tests.support.keys import (
    EC256,
    EC256_B,
    EC384,
    EC521,
    RSA1024,
    RSA2048_E3,
    make_csr,
    tamper,
)
from tests.support.renewals import InlineStore

ZONE = "go.example.test"
URL = "http://api.test"
NO_BUDGETS = Budgets(0, 0, 0, 0, 0, 0)


def spki(key: Any) -> bytes:
    der: bytes = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


class APITestCase(SynchronousTestCase):
    patterns = [f"{{label}}.{ZONE}", f"{{key}}.{ZONE}"]

    def setUp(self) -> None:
        self.clock = Clock()
        self.ca = FakeCA()
        http, self.agent = self.ca.client()
        self.zone = ChallengeZone(ZONE, [f"ns1.{ZONE}"], ["@ A 127.0.0.1"])
        self.ca.published_check = lambda ident, value: (
            value in self.zone.txt_values(challenge_name(ident))
        )
        self.metrics = Metrics()
        acme = ACMEClient(
            self.clock, http, BASE + "/dir", ACCOUNT_KEY, on_request=self.metrics.acme_request
        )
        self.acme = acme
        self.store_ok = True
        self.build()

    def build(
        self,
        budgets: Budgets = NO_BUDGETS,
        gate: ClientGate | None = None,
        subject: str | None = None,
        sync_timeout: float = 50.0,
        profiles: tuple[str, ...] = (),
        status: StatusPage | None = None,
    ) -> None:
        self.admission = Admission(
            self.clock.seconds, budgets, ZONE.split(".", 1)[1], self.metrics.refusal
        )
        self.issuer = make_issuer(
            self.clock,
            self.acme,
            ZonePublisher(self.zone),
            admission=self.admission,
            metrics=self.metrics,
        )
        self.api = SigningAPI(
            self.issuer,
            self.issuer.ledger,
            NamePolicy(self.patterns if subject is None else [], subject),
            OrderBook(self.clock, lambda f: problem_document(f.value)),
            self.metrics,
            gate or ClientGate(),
            clock=self.clock,
            health=Health(
                [
                    ("account", lambda: (self.issuer.ready, "account")),
                    ("store", lambda: (self.store_ok, "store")),
                ]
            ),
            max_body=8192,
            sync_timeout=sync_timeout,
            profiles=profiles,
            status=status,
        )
        # StubTreq writes bodies synchronously (no cooperator on the global reactor).
        self.client: Any = StubTreq(self.api.app.resource())

    def drive(self, d: Deferred[Any], limit: float = 120) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        t = 0.0
        while not out and t < limit:
            self.agent.flush()
            self.client.flush()
            self.clock.advance(0.01)
            t += 0.01
        self.assertTrue(out, "no answer")
        return out[0]

    def request(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, Headers, bytes]:
        hdrs = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})
        resp = self.drive(self.client.request(method, URL + path, data=body, headers=hdrs))
        return resp.code, resp.headers, self.drive(resp.content())

    def post(self, body: bytes, ctype: str = "application/pkcs10", **headers: str) -> Any:
        return self.request("POST", "/v1/sign", body, Content_Type=ctype, **headers)

    def problem(self, code: int, headers: Headers, body: bytes) -> dict[str, Any]:
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/problem+json"])
        doc: dict[str, Any] = json.loads(body)
        self.assertEqual(doc["status"], code)
        self.assertTrue(doc["type"].startswith("https://csrproxy.dev/problems/"), doc)
        self.assertTrue(doc["detail"])
        return doc


class SignTests(APITestCase):
    def test_sign_returns_chain(self) -> None:
        code, headers, body = self.post(make_csr([f"a.{ZONE}"]))
        self.assertEqual(code, 200, body)
        self.assertEqual(
            headers.getRawHeaders("content-type"), ["application/pem-certificate-chain"]
        )
        leaf = x509.load_pem_x509_certificates(body)[0]
        self.assertIn(f"a.{ZONE}", str(leaf.extensions))
        self.assertEqual(self.zone.challenge_names(), ())

    def test_json_body(self) -> None:
        pem = make_csr([f"b.{ZONE}"], EC256_B).decode()
        code, _, body = self.post(json.dumps({"csr": pem}).encode(), "application/json")
        self.assertEqual(code, 200, body)

    def test_key_pattern_name(self) -> None:
        name = f"{key_label(spki(EC384))}.{ZONE}"
        code, _, body = self.post(make_csr([name], EC384))
        self.assertEqual(code, 200, body)

    def test_bad_input_matrix_never_reaches_the_ca(self) -> None:
        import ipaddress as ip

        ok = f"a.{ZONE}"
        bc = (x509.BasicConstraints(ca=True, path_length=None), True)
        cases: list[tuple[str, bytes, int, str]] = [
            ("empty", b"", 400, "bad-csr"),
            ("garbage", b"this is not a csr", 400, "bad-csr"),
            ("tampered signature", tamper(make_csr([ok])), 400, "bad-csr"),
            ("RSA 1024", make_csr([ok], RSA1024), 403, "key-not-allowed"),
            ("exponent 3", make_csr([ok], RSA2048_E3), 400, "bad-csr"),
            ("P-521", make_csr([ok], EC521), 403, "key-not-allowed"),
            (
                "IP SAN",
                make_csr([ok], san=[x509.DNSName(ok), x509.IPAddress(ip.ip_address("10.0.0.1"))]),
                400,
                "bad-csr",
            ),
            ("U-label", make_csr([f"bücher.{ZONE}"], cn=None), 400, "bad-csr"),
            ("trailing dot", make_csr([f"a.{ZONE}."], cn=None), 400, "bad-csr"),
            ("underscore", make_csr([f"_x.{ZONE}"], cn=None), 400, "bad-csr"),
            ("101 SANs", make_csr([f"n{i}.{ZONE}" for i in range(101)]), 400, "bad-csr"),
            ("CA:TRUE", make_csr([ok], extensions=[bc]), 400, "bad-csr"),
            ("CN outside SANs", make_csr([ok], cn=f"b.{ZONE}"), 400, "bad-csr"),
            ("no SAN", make_csr([ok], san=[]), 400, "bad-csr"),
            ("name outside policy", make_csr(["a.example.org"]), 403, "name-not-allowed"),
            ("two labels deep", make_csr([f"a.b.{ZONE}"]), 403, "name-not-allowed"),
            (
                "another key's name",
                make_csr([f"{key_label(spki(EC384))}.{ZONE}"]),
                403,
                "name-not-allowed",
            ),
        ]
        for body in (b"{]", b'{"csr": 5}', b"[1]", b'{"pem": "x"}', b'"str"'):
            cases.append((f"wrong JSON {body!r}", body, 400, "bad-csr"))
        for what, body, status, kind in cases:
            code, headers, content = self.post(body)
            self.assertEqual(code, status, (what, content))
            doc = self.problem(code, headers, content)
            self.assertTrue(doc["type"].endswith("/" + kind), (what, doc))
        self.assertEqual(self.ca.requests["newOrder"], 0)

    def test_offending_names_listed(self) -> None:
        code, headers, body = self.post(make_csr(["a.other.test", f"b.{ZONE}"]))
        self.assertEqual(code, 403)
        self.assertEqual(self.problem(code, headers, body)["names"], ["a.other.test"])

    def test_body_too_large(self) -> None:
        code, headers, body = self.post(b"x" * 9000)
        self.assertEqual(code, 413)
        self.problem(code, headers, body)

    def test_ca_refusal_is_502_problem(self) -> None:
        self.ca.faults.invalid_names = {f"bad.{ZONE}"}
        code, headers, body = self.post(make_csr([f"bad.{ZONE}"]))
        self.assertEqual(code, 502)
        self.assertIn("unauthorized", self.problem(code, headers, body)["acme_type"])
        self.assertEqual(self.zone.challenge_names(), ())

    def test_ca_rate_limited_is_429_with_its_retry_after(self) -> None:
        self.drive(self.issuer.ensure_account())
        self.ca.faults.rate_limited = 1
        self.ca.faults.retry_after = "3600"
        code, headers, body = self.post(make_csr([f"r.{ZONE}"]))
        self.assertEqual(code, 429, body)
        self.assertEqual(headers.getRawHeaders("retry-after"), ["3600"])
        self.assertTrue(self.problem(code, headers, body)["type"].endswith("/ca-error"))

    def test_ten_identical_requests_share_one_order(self) -> None:
        csr = make_csr([f"same.{ZONE}"])
        ds = [self.client.post(URL + "/v1/sign", data=csr) for _ in range(10)]
        codes = [self.drive(d).code for d in ds]
        self.assertEqual(codes, [200] * 10)
        self.assertEqual(self.ca.requests["newOrder"], 1)

    def test_different_csrs_run_concurrently(self) -> None:
        ds = [self.client.post(URL + "/v1/sign", data=make_csr([f"p{i}.{ZONE}"])) for i in range(3)]
        self.agent.flush()
        self.client.flush()
        self.clock.advance(0.01)
        self.agent.flush()
        self.assertEqual(self.ca.requests["newOrder"], 3, "orders ran one after another")
        self.assertEqual([self.drive(d).code for d in ds], [200] * 3)

    def test_second_post_is_served_from_the_cache(self) -> None:
        csr = make_csr([f"cached.{ZONE}"])
        first = self.post(csr)
        second = self.post(csr)
        self.assertEqual((first[0], second[0]), (200, 200))
        self.assertEqual(first[2], second[2])
        self.assertEqual(self.ca.requests["newOrder"], 1)
        # A different key for the same name is a different request: a new order.
        self.assertEqual(self.post(make_csr([f"cached.{ZONE}"], EC256_B))[0], 200)
        self.assertEqual(self.ca.requests["newOrder"], 2)

    def test_cache_not_used_once_half_the_life_is_gone(self) -> None:
        csr = make_csr([f"aging.{ZONE}"])
        self.assertEqual(self.post(csr)[0], 200)
        # The fake CA issues for 90 days from now; move past the half-way point.
        self.clock.advance(time.time() + 46 * 86400)
        self.assertEqual(self.post(csr)[0], 200)
        self.assertEqual(self.ca.requests["newOrder"], 2)

    def test_client_disconnect_does_not_cancel_the_order(self) -> None:
        from csrproxy.issuance.csr import check_csr
        from tests.support.issuers import issue_now

        d = issue_now(self.issuer, check_csr(make_csr([f"c.{ZONE}"])), "client").chain
        d.cancel()
        self.failureResultOf(d)
        again = issue_now(self.issuer, check_csr(make_csr([f"c.{ZONE}"])), "client")
        self.drive(again.chain)
        self.assertEqual(self.ca.requests["newOrder"], 1, "the order was restarted")


class ProfileRequestTests(APITestCase):
    def test_an_allowed_profile_offered_by_the_ca_is_ordered(self) -> None:
        self.ca.faults.profiles = ("classic", "shortlived")
        self.build(profiles=("shortlived", "tlsserver"))
        pem = make_csr([f"p.{ZONE}"]).decode()
        body = json.dumps({"csr": pem, "profile": "shortlived"}).encode()
        code, _, out = self.post(body, "application/json")
        self.assertEqual(code, 200, out)
        self.assertEqual(self.ca.order_payloads[-1]["profile"], "shortlived")
        # The query parameter does the same for a PEM or DER body.
        code, _, out = self.request(
            "POST",
            "/v1/sign?profile=shortlived",
            make_csr([f"q.{ZONE}"]),
            Content_Type="application/pkcs10",
        )
        self.assertEqual(code, 200, out)
        self.assertEqual(self.ca.order_payloads[-1]["profile"], "shortlived")
        # Allowed here but not offered by the CA: 400, no order.
        orders = self.ca.requests["newOrder"]
        body = json.dumps({"csr": pem, "profile": "tlsserver"}).encode()
        doc = self.problem(*self.post(body, "application/json"))
        self.assertTrue(doc["type"].endswith("/profile-not-allowed"), doc)
        self.assertIn("does not offer", doc["detail"])
        self.assertEqual(self.ca.requests["newOrder"], orders)

    def test_a_profile_the_operator_does_not_allow_is_refused(self) -> None:
        pem = make_csr([f"p.{ZONE}"]).decode()
        for asked in ("shortlived", 7):
            body = json.dumps({"csr": pem, "profile": asked}).encode()
            code, headers, out = self.post(body, "application/json")
            self.assertEqual(code, 400, out)
            doc = self.problem(code, headers, out)
            self.assertTrue(doc["type"].endswith(("/profile-not-allowed", "/bad-request")), doc)
        self.assertEqual(self.ca.requests["newOrder"], 0)


class StatusRouteTests(APITestCase):
    def test_off_by_default(self) -> None:
        code, _, body = self.request("GET", "/status")
        self.assertEqual(code, 404, body)

    def test_a_status_token_sees_the_page_and_nobody_else(self) -> None:
        from tests.web.test_status import TOKEN, snapshot

        page = StatusPage(parse_tokens(token_hash(TOKEN) + "\n"), lambda: succeed(snapshot()))
        self.build(status=page)
        code, headers, body = self.request("GET", "/status")
        self.assertEqual(code, 401, body)
        self.assertEqual(
            headers.getRawHeaders("www-authenticate"), ['Basic realm="csrproxy status"']
        )
        code, headers, body = self.request("GET", "/status", Authorization=f"Bearer {TOKEN}")
        self.assertEqual(code, 200, body)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        csp = headers.getRawHeaders("content-security-policy") or [""]
        self.assertIn("default-src 'none'", csp[0])
        self.assertIn("frame-ancestors 'none'", csp[0])
        self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])
        self.assertIn(b"<h2>Readiness</h2>", body)


class AsyncTests(APITestCase):
    def test_respond_async_flow(self) -> None:
        self.ca.faults.pending_polls = 3
        d = self.client.post(
            URL + "/v1/sign",
            data=make_csr([f"async.{ZONE}"]),
            headers=Headers({b"Prefer": [b"respond-async, wait=5"]}),
        )
        resp = self.drive(d)
        self.assertEqual(resp.code, 202)
        location = resp.headers.getRawHeaders("location")[0]
        doc = json.loads(self.drive(resp.content()))
        self.assertEqual(doc["status"], "processing")
        self.assertEqual(location, f"/v1/orders/{doc['id']}")
        self.assertGreaterEqual(len(doc["id"]), 20)
        self.assertEqual(self.ca.requests["cert"], 0)
        code, headers, body = self.request("GET", location + "/certificate")
        self.assertEqual(code, 409)
        self.assertEqual(self.problem(code, headers, body)["order_status"], "processing")
        for _ in range(2000):
            self.clock.advance(0.01)
            self.agent.flush()
            if self.ca.requests["cert"]:
                break
        code, _, body = self.request("GET", location)
        self.assertEqual(json.loads(body)["status"], "valid")
        self.assertEqual(json.loads(body)["certificate"], location + "/certificate")
        code, headers, body = self.request("GET", location + "/certificate")
        self.assertEqual(code, 200)
        self.assertTrue(body.startswith(b"-----BEGIN CERTIFICATE-----"))

    def test_failed_async_order_shows_its_error(self) -> None:
        self.ca.faults.invalid_names = {f"nope.{ZONE}"}
        code, headers, _ = self.post(make_csr([f"nope.{ZONE}"]), Prefer="respond-async")
        self.assertEqual(code, 202)
        location = headers.getRawHeaders("location")[0]
        for _ in range(500):
            self.clock.advance(0.01)
            self.agent.flush()
        doc = json.loads(self.request("GET", location)[2])
        self.assertEqual(doc["status"], "invalid")
        self.assertTrue(doc["error"]["type"].endswith("/ca-error"))
        self.assertEqual(self.request("GET", location + "/certificate")[0], 409)

    def test_unknown_order_is_404(self) -> None:
        code, headers, body = self.request("GET", "/v1/orders/nope")
        self.assertEqual(code, 404)
        self.problem(code, headers, body)

    def test_sync_request_past_sync_timeout_gets_202(self) -> None:
        self.build(sync_timeout=0.5)
        self.ca.faults.pending_polls = 5  # about 2.5 s of polls
        code, headers, body = self.post(make_csr([f"slow.{ZONE}"]))
        self.assertEqual(code, 202, body)
        location = headers.getRawHeaders("location")[0]
        self.assertEqual(json.loads(body)["status"], "processing")
        for _ in range(3000):
            self.clock.advance(0.01)
            self.agent.flush()
        self.assertEqual(json.loads(self.request("GET", location)[2])["status"], "valid")
        self.assertEqual(self.ca.requests["newOrder"], 1)


class AdmissionTests(APITestCase):
    def test_order_budget_429_with_retry_after_before_any_order(self) -> None:
        self.build(Budgets(new_names_per_week=0, orders_per_3h=1, same_names_per_week=0,
                           client_requests_per_hour=0))  # fmt: skip
        self.assertEqual(self.post(make_csr([f"one.{ZONE}"]))[0], 200)
        code, headers, body = self.post(make_csr([f"two.{ZONE}"]))
        self.assertEqual(code, 429)
        doc = self.problem(code, headers, body)
        self.assertTrue(doc["type"].endswith("/rate-limited"))
        self.assertEqual(doc["reason"], "orders")
        self.assertEqual(headers.getRawHeaders("retry-after"), ["10800"])
        self.assertEqual(self.ca.requests["newOrder"], 1)
        # The cached certificate costs no budget.
        self.assertEqual(self.post(make_csr([f"one.{ZONE}"]))[0], 200)
        self.assertIn(b'reason="orders"', self.metrics.render())

    def test_new_names_budget_per_registered_domain(self) -> None:
        self.build(Budgets(new_names_per_week=2, orders_per_3h=0, same_names_per_week=0,
                           client_requests_per_hour=0))  # fmt: skip
        for i in range(2):
            self.assertEqual(self.post(make_csr([f"n{i}.{ZONE}"]))[0], 200)
        code, headers, body = self.post(make_csr([f"n9.{ZONE}"]))
        self.assertEqual(code, 429)
        self.assertEqual(self.problem(code, headers, body)["reason"], "new-names")
        # A renewal (same names, new key) is not a new name set.
        self.assertEqual(self.post(make_csr([f"n0.{ZONE}"], EC256_B))[0], 200)

    def test_failed_authorizations_refuse_the_name_before_any_order(self) -> None:
        self.build(Budgets(0, 0, 0, 0, failed_authorizations_per_hour=2,
                           consecutive_failed_authorizations=0))  # fmt: skip
        self.ca.faults.invalid_names = {f"bad.{ZONE}"}
        for _ in range(2):
            self.assertEqual(self.post(make_csr([f"bad.{ZONE}"]))[0], 502)
        placed = self.ca.requests["newOrder"]
        code, headers, body = self.post(make_csr([f"good.{ZONE}", f"bad.{ZONE}"]))
        self.assertEqual(code, 429)
        doc = self.problem(code, headers, body)
        self.assertEqual(doc["reason"], "failed-authorizations")
        self.assertIn(f"failed authorizations for bad.{ZONE} in an hour", doc["detail"])
        [retry_after] = headers.getRawHeaders("retry-after")
        self.assertTrue(1790 <= int(retry_after) <= 1800, retry_after)  # one failure's refill
        self.assertEqual(self.ca.requests["newOrder"], placed)
        self.assertIn(b'reason="failed-authorizations"', self.metrics.render())
        self.assertEqual(self.post(make_csr([f"good.{ZONE}"]))[0], 200)

    def test_a_paused_name_is_refused_without_retry_after(self) -> None:
        self.build(Budgets(0, 0, 0, 0, failed_authorizations_per_hour=0,
                           consecutive_failed_authorizations=2))  # fmt: skip
        name = f"p.{ZONE}"
        self.ca.faults.invalid_names = {name}
        self.assertEqual(self.post(make_csr([name]))[0], 502)
        self.ca.faults.invalid_names = set()
        self.assertEqual(self.post(make_csr([name]))[0], 200)  # valid: the count starts again
        self.ca.faults.invalid_names = {name}
        for _ in range(2):
            self.assertEqual(self.post(make_csr([name], EC256_B))[0], 502)
        placed = self.ca.requests["newOrder"]
        code, headers, body = self.post(make_csr([name], EC256_B))
        self.assertEqual(code, 429)
        doc = self.problem(code, headers, body)
        self.assertEqual(doc["reason"], "paused")
        self.assertIn(f"csrproxy-admin unpause {name}", doc["detail"])
        self.assertIsNone(headers.getRawHeaders("retry-after"))
        self.assertEqual(self.ca.requests["newOrder"], placed)

    def test_client_budget(self) -> None:
        self.build(Budgets(0, 0, 0, client_requests_per_hour=2))
        for i in range(2):
            self.assertEqual(self.post(make_csr([f"c{i}.{ZONE}"]))[0], 200)
        code, headers, body = self.post(make_csr([f"c9.{ZONE}"]))
        self.assertEqual(code, 429)
        self.assertEqual(self.problem(code, headers, body)["reason"], "client")
        self.assertEqual(self.ca.requests["newOrder"], 2)


class AccessTests(APITestCase):
    TOKEN = "s3cret-token"
    KEYED = "keyed-token"

    def tokens_gate(self) -> ClientGate:
        text = f"{token_hash(self.TOKEN)}\n{token_hash(self.KEYED)} {{key}}.{ZONE}\n"
        return ClientGate(parse_tokens(text))

    def test_tokens(self) -> None:
        self.build(gate=self.tokens_gate())
        csr = make_csr([f"t.{ZONE}"])
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            code, hdrs, body = self.post(csr, **headers)
            self.assertEqual(code, 401, headers)
            self.assertTrue(self.problem(code, hdrs, body)["type"].endswith("/unauthorized"))
        self.assertEqual(self.ca.requests["newOrder"], 0)
        self.assertEqual(self.post(csr, Authorization=f"Bearer {self.TOKEN}")[0], 200)

    def test_token_restricted_to_patterns(self) -> None:
        self.build(gate=self.tokens_gate())
        auth = {"Authorization": f"Bearer {self.KEYED}"}
        self.assertEqual(self.post(make_csr([f"t.{ZONE}"]), **auth)[0], 403)
        name = f"{key_label(spki(EC256))}.{ZONE}"
        self.assertEqual(self.post(make_csr([name]), **auth)[0], 200)

    def test_allow_from(self) -> None:
        # StubTreq's client is 127.0.0.1.
        self.build(gate=ClientGate(allow_from=[ip_network("10.0.0.0/8")]))
        code, headers, body = self.post(make_csr([f"a.{ZONE}"]))
        self.assertEqual(code, 403)
        self.assertTrue(self.problem(code, headers, body)["type"].endswith("/client-not-allowed"))
        self.build(gate=ClientGate(allow_from=[ip_network("127.0.0.0/8")]))
        self.assertEqual(self.post(make_csr([f"a.{ZONE}"]))[0], 200)

    def test_forwarded_for_only_from_trusted_proxy(self) -> None:
        allow = [ip_network("192.0.2.0/24")]
        self.build(gate=ClientGate(allow_from=allow))
        xff = {"X-Forwarded-For": "192.0.2.7"}
        self.assertEqual(self.post(make_csr([f"a.{ZONE}"]), **xff)[0], 403)
        trusted = [ip_network("127.0.0.1")]
        self.build(gate=ClientGate(allow_from=allow, trusted_proxies=trusted))
        self.assertEqual(self.post(make_csr([f"a.{ZONE}"]), **xff)[0], 200)


class SeedModeTests(APITestCase):
    def test_exact_subject(self) -> None:
        self.build(subject=f"CN={ZONE}")
        self.assertEqual(self.post(make_csr([ZONE]))[0], 200)
        code, headers, body = self.post(make_csr([f"a.{ZONE}"]))
        self.assertEqual(code, 403)
        self.assertTrue(self.problem(code, headers, body)["type"].endswith("/subject-not-allowed"))
        self.assertEqual(self.ca.requests["newOrder"], 1)


class RouteTests(APITestCase):
    def test_name_from_csr_and_public_key(self) -> None:
        label = key_label(spki(EC256))
        want = [f"{{label}}.{ZONE}", f"{label}.{ZONE}"]
        code, _, body = self.request("GET", "/v1/name", make_csr([f"x.{ZONE}"]))
        self.assertEqual((code, json.loads(body)["names"]), (200, want))
        pem = EC256.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.assertEqual(json.loads(self.request("GET", "/v1/name", pem)[2])["names"], want)
        code, _, _ = self.request("GET", "/v1/name", b"nonsense")
        self.assertEqual(code, 400)
        code, _, _ = self.request("GET", "/v1/name", make_csr([f"x.{ZONE}"], RSA1024))
        self.assertEqual(code, 403)

    def test_unknown_route_and_wrong_method_are_problems(self) -> None:
        code, headers, body = self.request("GET", "/nope")
        self.assertEqual(code, 404)
        self.assertTrue(self.problem(code, headers, body)["type"].endswith("/not-found"))
        code, headers, body = self.request("GET", "/v1/sign")
        self.assertEqual(code, 405)
        self.assertTrue(self.problem(code, headers, body)["type"].endswith("/method-not-allowed"))
        self.assertEqual(headers.getRawHeaders("allow"), ["POST"])
        code, headers, body = self.request("DELETE", "/v1/health")
        self.assertEqual(code, 405)
        self.problem(code, headers, body)

    def test_health(self) -> None:
        code, _, body = self.request("GET", "/v1/health")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["checks"]["account"]["ok"], False)
        self.drive(self.issuer.ensure_account())
        code, _, body = self.request("GET", "/v1/health")
        self.assertEqual(code, 200)
        doc = json.loads(body)
        self.assertTrue(doc["ready"])
        self.assertTrue(doc["live"])
        self.assertEqual(set(doc["checks"]), {"account", "store"})

    def test_health_parts_and_liveness(self) -> None:
        self.drive(self.issuer.ensure_account())
        self.store_ok = False  # e.g. the state directory is full
        code, _, body = self.request("GET", "/v1/health/ready")
        self.assertEqual(code, 503)
        doc = json.loads(body)
        self.assertEqual(doc["checks"]["store"], {"ok": False, "detail": "store"})
        self.assertEqual(doc["checks"]["account"]["ok"], True)
        code, _, body = self.request("GET", "/v1/health/live")
        self.assertEqual((code, json.loads(body)), (200, {"live": True}))

    def test_free_space_probe(self) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            self.assertTrue(free_space_probe(d, lambda: True, minimum=1)()[0])
            ok, detail = free_space_probe(d, lambda: True, minimum=1 << 62)()
            self.assertFalse(ok)
            self.assertIn("free", detail)
            ok, detail = free_space_probe(d, lambda: False, minimum=1)()
            self.assertFalse(ok)
            self.assertIn("last write", detail)
            self.assertFalse(free_space_probe(d + "/gone", lambda: True)()[0])
            # Unhealthy with room again: a test write is asked for, at most every 10 s.
            tries: list[float] = []
            t = [100.0]
            probe = free_space_probe(
                d,
                lambda: False,
                minimum=1,
                retry_write=lambda: tries.append(t[0]),
                now=lambda: t[0],
            )
            probe()
            probe()
            t[0] += 10
            probe()
            self.assertEqual(tries, [100.0, 110.0])

    def test_metrics(self) -> None:
        self.post(make_csr([f"m.{ZONE}"]))
        self.post(b"junk")
        _, _, body = self.request("GET", "/metrics")
        text = body.decode()
        for needle in (
            'csrproxy_http_requests_total{route="/v1/sign",status="200"} 1.0',
            'csrproxy_http_requests_total{route="/v1/sign",status="400"} 1.0',
            'csrproxy_orders_total{outcome="valid"} 1.0',
            "csrproxy_issuance_seconds_bucket",
            'csrproxy_acme_requests_total{endpoint="newOrder"',
            "csrproxy_orders_in_flight 0.0",
            "csrproxy_admission_refusals_total",
        ):
            self.assertIn(needle, text)


class FailingStore:
    """A store whose every write fails like a full disk."""

    class _AnyMethod:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    db = _AnyMethod()

    def run(self, method: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        from twisted.internet.defer import fail

        from csrproxy.state.store import StoreUnavailable

        return fail(StoreUnavailable("csrproxy cannot record state: database or disk is full"))


class StoreFailureTests(APITestCase):
    def test_full_disk_is_503_before_any_order(self) -> None:
        from csrproxy.issuance.ledger import Ledger

        self.issuer.ledger = Ledger(FailingStore())  # type: ignore[arg-type]
        code, headers, body = self.post(make_csr([f"full.{ZONE}"]))
        self.assertEqual(code, 503, body)
        doc = self.problem(code, headers, body)
        self.assertTrue(doc["type"].endswith("/state-unavailable"))
        self.assertEqual(self.ca.requests["newOrder"], 0)
        # The process keeps serving.
        code, _, _ = self.request("GET", "/v1/health")
        self.assertIn(code, (200, 503))

    def test_a_full_disk_that_still_reads_logs_no_line_per_request(self) -> None:
        from twisted.internet.defer import fail, succeed

        from csrproxy.issuance.ledger import Ledger
        from csrproxy.state.store import StoreUnavailable

        class ReadsOnly:
            """Reads work, every write fails (a full disk)."""

            class db:  # noqa: N801 - mimics Store.db's attribute access
                @staticmethod
                def sign_lookup(key: str, names: Any) -> tuple[None, bool]:
                    return None, False

                def __getattr__(self, name: str) -> Any:
                    return lambda *args, **kwargs: None

            db = db()  # type: ignore[misc,assignment]

            def run(self, method: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
                if getattr(method, "__name__", "") == "sign_lookup":
                    return succeed(method(*args, **kwargs))
                return fail(StoreUnavailable("csrproxy cannot record state: disk is full"))

        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.issuer.ledger = Ledger(ReadsOnly())  # type: ignore[arg-type]
        for i in range(20):
            code, _, body = self.post(make_csr([f"rofull{i}.{ZONE}"]))
            self.assertEqual(code, 503, body)
        self.assertEqual(self.ca.requests["newOrder"], 0)
        ns = ("csrproxy.issuance", "csrproxy.web", "csrproxy.state")
        lines = [e for e in events if str(e.get("log_namespace", "")).startswith(ns)]
        self.assertEqual([e.get("log_format") for e in lines], [])

    def test_failures_are_logged_once_a_second_in_summary(self) -> None:
        from csrproxy.issuance.ledger import Ledger

        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.issuer.ledger = Ledger(FailingStore())  # type: ignore[arg-type]
        for i in range(20):
            self.assertEqual(self.post(make_csr([f"full{i}.{ZONE}"]))[0], 503)
        lines = [e for e in events if e.get("log_namespace") == "csrproxy.web.api"]
        self.assertEqual(lines, [])
        self.clock.advance(1)
        lines = [e for e in events if e.get("log_namespace") == "csrproxy.web.connections"]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["total"], 20)

    def test_certificate_id_and_newest_chain(self) -> None:
        code, headers, body = self.post(make_csr([f"cid.{ZONE}"]))
        self.assertEqual(code, 200, body)
        [cid] = headers.getRawHeaders("csrproxy-certificate-id")
        self.assertIn(f"</v1/certificates/{cid}>", headers.getRawHeaders("link", [""])[0])
        code, headers, again = self.request("GET", f"/v1/certificates/{cid}")
        self.assertEqual((code, again), (200, body))
        self.assertGreater(int(headers.getRawHeaders("retry-after", ["0"])[0]), 0)
        code, _, _ = self.request("GET", "/v1/certificates/unknown")
        self.assertEqual(code, 404)


class ScopedReadTests(APITestCase):
    """Reads scoped like writes (issue 13): unguessable certificate ids, 404 outside a
    token's patterns, and only the installation's own requests move its activity clock.

    A read is in scope when the token's patterns allow the names with the certificate's
    own key label: tokens with the same patterns share a scope.
    """

    A = "token-a"  # {key}.ZONE: the installation of EC256
    B = "token-b"  # {key}.b.ZONE: another tenant
    ANY = "token-any"  # no patterns: any name
    NAMED = "token-named"  # only named.ZONE

    def tokens_gate(self) -> ClientGate:
        text = "\n".join(
            [
                f"{token_hash(self.A)} {{key}}.{ZONE}",
                f"{token_hash(self.B)} {{key}}.b.{ZONE}",
                token_hash(self.ANY),
                f"{token_hash(self.NAMED)} named.{ZONE}",
            ]
        )
        return ClientGate(parse_tokens(text))

    def setUp(self) -> None:
        super().setUp()
        self.build(gate=self.tokens_gate())
        self.name = f"{key_label(spki(EC256))}.{ZONE}"
        self.csr = make_csr([self.name])
        self.key = check_csr(self.csr).request_key

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def get(self, path: str, token: str) -> tuple[int, Headers, bytes]:
        return self.request("GET", path, None, Authorization=f"Bearer {token}")

    def use_ledger(self, ledger: Ledger) -> None:
        self.issuer.ledger = ledger
        self.api.certificates = ledger

    def sign_as_a(self) -> tuple[str, bytes]:
        code, headers, body = self.post(self.csr, **self.auth(self.A))
        self.assertEqual(code, 200, body)
        [cid] = headers.getRawHeaders("csrproxy-certificate-id")
        return cid, body

    def assert_about(self, when: float, expected: float) -> None:
        # Driving a request advances the clock by a little.
        self.assertTrue(expected <= when < expected + 1, (when, expected))

    def current(self) -> CertificateRow:
        row = self.successResultOf(self.issuer.ledger.current(self.key))
        assert row is not None
        return row

    def last_requested(self) -> float:
        return float(self.current().last_requested)

    def test_certificate_id_is_keyed_with_the_servers_secret(self) -> None:
        cid, _ = self.sign_as_a()
        self.assertNotEqual(cid, self.key)
        self.assertNotIn(cid, self.key)
        self.assertGreaterEqual(len(cid), 22)
        self.assertRegex(cid, r"^[A-Za-z0-9_-]+$")
        self.assertEqual(cid, self.issuer.ledger.ids.of(self.key))
        # Another secret, another id: nobody without this server's secret computes it.
        self.assertNotEqual(cid, CertificateIds.ephemeral().of(self.key))
        # The request key (computable from the certificate) is no longer an id.
        code, _, _ = self.get(f"/v1/certificates/{self.key}", self.A)
        self.assertEqual(code, 404)

    def test_other_token_gets_404_and_does_not_move_the_activity_clock(self) -> None:
        cid, body = self.sign_as_a()
        before = self.last_requested()
        self.clock.advance(3600)
        for token in (self.B, self.NAMED):
            code, headers, got = self.get(f"/v1/certificates/{cid}", token)
            self.assertEqual(code, 404, token)
            doc = self.problem(code, headers, got)
            self.assertTrue(doc["type"].endswith("/not-found"))
            unknown = self.get("/v1/certificates/" + "x" * 22, token)
            self.assertEqual(
                json.loads(unknown[2])["detail"].split()[:2], doc["detail"].split()[:2]
            )
        self.assertEqual(self.last_requested(), before)
        # A token whose patterns allow the names reads it; that is not the installation.
        code, _, got = self.get(f"/v1/certificates/{cid}", self.ANY)
        self.assertEqual((code, got), (200, body))
        self.assertEqual(self.last_requested(), before)

    def test_the_installations_own_read_moves_the_activity_clock(self) -> None:
        cid, body = self.sign_as_a()
        self.clock.advance(3600)
        code, _, got = self.get(f"/v1/certificates/{cid}", self.A)
        self.assertEqual((code, got), (200, body))
        self.assert_about(self.last_requested(), 3600)

    def test_a_sign_always_counts_and_makes_its_token_the_installations(self) -> None:
        cid, _ = self.sign_as_a()
        self.clock.advance(100)
        # Another token in scope posting the same CSR: the CSR's signature is the proof.
        self.assertEqual(self.post(self.csr, **self.auth(self.ANY))[0], 200)
        signed = self.last_requested()
        self.assert_about(signed, 100)
        self.assertEqual(self.current().signed_by, token_client(self.ANY))
        self.clock.advance(100)
        self.assertEqual(self.get(f"/v1/certificates/{cid}", self.A)[0], 200)
        self.assertEqual(self.last_requested(), signed, "A is no longer the one who signed")
        self.sign_as_a()
        self.clock.advance(100)
        self.get(f"/v1/certificates/{cid}", self.A)
        self.assert_about(self.last_requested(), 300)

    def test_without_tokens_a_read_with_the_id_counts(self) -> None:
        self.build()
        code, headers, _ = self.post(self.csr)
        self.assertEqual(code, 200)
        [cid] = headers.getRawHeaders("csrproxy-certificate-id")
        self.clock.advance(50)
        self.assertEqual(self.request("GET", f"/v1/certificates/{cid}")[0], 200)
        self.assert_about(self.last_requested(), 50)

    def wait_for(self, location: str, token: str) -> None:
        for _ in range(3000):
            self.clock.advance(0.01)
            self.agent.flush()
            if json.loads(self.get(location, token)[2])["status"] != ("processing"):
                return
        self.fail("the order did not end")

    def test_an_order_outside_the_tokens_scope_is_404(self) -> None:
        self.ca.faults.pending_polls = 3
        code, headers, _ = self.post(self.csr, Prefer="respond-async", **self.auth(self.A))
        self.assertEqual(code, 202)
        location = headers.getRawHeaders("location")[0]
        for token in (self.B, self.NAMED):
            for path in (location, location + "/certificate"):
                code, hdrs, body = self.get(path, token)
                self.assertEqual(code, 404, (token, path))
                self.assertTrue(self.problem(code, hdrs, body)["type"].endswith("/not-found"))
        self.wait_for(location, self.A)
        code, headers, body = self.get(location + "/certificate", self.A)
        self.assertEqual(code, 200)
        [cid] = headers.getRawHeaders("csrproxy-certificate-id", [])
        self.assertEqual(cid, self.issuer.ledger.ids.of(self.key))
        self.assertEqual(self.get(location, self.B)[0], 404)
        self.assertEqual(self.get(location, self.ANY)[0], 200)
        # The order's chain was signed for: A's token is the installation's.
        self.assertEqual(self.current().signed_by, token_client(self.A))

    def test_a_sync_request_turned_async_is_readable_by_its_keyed_token(self) -> None:
        self.build(gate=self.tokens_gate(), sync_timeout=0.5)
        self.ca.faults.pending_polls = 5
        code, headers, body = self.post(self.csr, **self.auth(self.A))
        self.assertEqual(code, 202, body)
        location = headers.getRawHeaders("location")[0]
        self.assertEqual(self.get(location, self.B)[0], 404)
        self.wait_for(location, self.A)
        self.assertEqual(self.get(location + "/certificate", self.A)[0], 200)

    def test_ids_signers_and_scope_survive_a_restart(self) -> None:
        import shutil
        import tempfile

        from csrproxy.state.database import StateDB

        path = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, path)
        db = StateDB(f"{path}/state.sqlite3")
        ledger = Ledger(InlineStore(db))  # type: ignore[arg-type]
        ledger.load()
        self.use_ledger(ledger)
        cid, body = self.sign_as_a()
        db.close()
        # A restart, and a second instance sharing the database: the same ids.
        for _ in range(2):
            again = StateDB(f"{path}/state.sqlite3")
            self.addCleanup(again.close)
            restarted = Ledger(InlineStore(again))  # type: ignore[arg-type]
            restarted.load()
            self.assertEqual(restarted.certificate_id(self.key), cid)
        self.use_ledger(restarted)
        self.assertEqual(self.current().signed_by, token_client(self.A))
        before = self.last_requested()
        self.clock.advance(7200)
        self.assertEqual(self.get(f"/v1/certificates/{cid}", self.B)[0], 404)
        self.assertEqual(self.last_requested(), before)
        code, _, got = self.get(f"/v1/certificates/{cid}", self.A)
        self.assertEqual((code, got), (200, body))
        stored = again.current_certificate(self.key)
        assert stored is not None
        self.assert_about(stored.last_requested, 7200)


def token_client(token: str) -> str:
    """The client id of ``token`` (what the ledger records as a certificate's signer)."""
    [parsed] = parse_tokens(token_hash(token))
    return parsed.client_id


class AddressNameOfferTests(APITestCase):
    patterns = [f"{{ip}}.{{key}}.{ZONE}"]

    def test_an_ip_pattern_is_offered_for_the_client_to_fill_in(self) -> None:
        code, _, body = self.request("GET", "/v1/name", make_csr([f"x.{ZONE}"]))
        self.assertEqual(code, 200, body)
        [name] = json.loads(body)["names"]
        self.assertTrue(name.startswith("{ip}.") and name.endswith(f".{ZONE}"), name)
