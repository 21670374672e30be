"""The HTTP API in memory: Klein through StubTreq, a real issuer and zone, the fake CA."""

from __future__ import annotations

import json
from typing import Any

from cryptography import x509
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from csrproxy.acme.client import ACMEClient
from csrproxy.api import SigningAPI
from csrproxy.dns.publisher import ZonePublisher, challenge_name
from csrproxy.dns.zone import ChallengeZone
from csrproxy.issuer import Issuer
from csrproxy.policy import NamePolicy
from tests.fakeacme import BASE, FakeCA
from tests.keys import EC256_B, make_csr, tamper
from tests.test_acme import ACCOUNT_KEY

ZONE = "go.example.test"


class APITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ca = FakeCA()
        http, self.agent = self.ca.client()
        self.zone = ChallengeZone(ZONE, [f"ns1.{ZONE}"], ["@ A 127.0.0.1"])
        self.ca.published_check = lambda ident, value: (
            value in self.zone.txt_values(challenge_name(ident))
        )
        acme = ACMEClient(self.clock, http, BASE + "/dir", ACCOUNT_KEY)
        self.issuer = Issuer(
            self.clock,
            acme,
            ZonePublisher(self.zone),
            poll_interval=0.05,
            poll_max=1.0,
            order_timeout=60,
        )
        self.api = SigningAPI(self.issuer, NamePolicy([f"{{label}}.{ZONE}"]), max_body=8192)
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

    def post(self, body: bytes, ctype: str = "application/pkcs10") -> tuple[int, str, bytes]:
        resp = self.drive(
            self.client.post(
                "http://api.test/v1/sign",
                data=body,
                headers=Headers({b"Content-Type": [ctype.encode()]}),
            )
        )
        content = self.drive(resp.content())
        return resp.code, resp.headers.getRawHeaders("content-type", [""])[0], content

    def test_sign_returns_chain(self) -> None:
        code, ctype, body = self.post(make_csr([f"a.{ZONE}"]))
        self.assertEqual(code, 200, body)
        self.assertEqual(ctype, "application/pem-certificate-chain")
        leaf = x509.load_pem_x509_certificates(body)[0]
        self.assertIn(f"a.{ZONE}", str(leaf.extensions))
        self.assertEqual(self.zone.challenge_names(), ())

    def test_json_body(self) -> None:
        pem = make_csr([f"b.{ZONE}"], EC256_B).decode()
        code, _, body = self.post(json.dumps({"csr": pem}).encode(), "application/json")
        self.assertEqual(code, 200, body)

    def problem(self, body: bytes, ctype: str = "application/pkcs10") -> tuple[int, dict[str, Any]]:
        code, got_type, content = self.post(body, ctype)
        self.assertEqual(got_type, "application/problem+json")
        doc = json.loads(content)
        self.assertEqual(doc["status"], code)
        self.assertTrue(doc["type"].startswith("https://csrproxy.dev/problems/"))
        self.assertTrue(doc["detail"])
        return code, doc

    def test_bad_input_is_400_and_never_reaches_the_ca(self) -> None:
        for body in (b"", b"this is not a csr", tamper(make_csr([f"a.{ZONE}"])), b"{]"):
            code, doc = self.problem(body)
            self.assertEqual(code, 400, doc)
        self.assertEqual(self.ca.requests["newOrder"], 0)

    def test_name_outside_policy_is_403(self) -> None:
        code, doc = self.problem(make_csr(["a.other.test", f"b.{ZONE}"]))
        self.assertEqual(code, 403)
        self.assertEqual(doc["names"], ["a.other.test"])
        self.assertEqual(self.ca.requests["newOrder"], 0)

    def test_body_too_large(self) -> None:
        code, _ = self.problem(b"x" * 9000)
        self.assertEqual(code, 413)

    def test_ca_refusal_is_502_problem(self) -> None:
        self.ca.faults.invalid_names = {f"bad.{ZONE}"}
        code, doc = self.problem(make_csr([f"bad.{ZONE}"]))
        self.assertEqual(code, 502)
        self.assertIn("unauthorized", doc["acme_type"])
        self.assertEqual(self.zone.challenge_names(), ())

    def test_identical_requests_share_one_order(self) -> None:
        csr = make_csr([f"same.{ZONE}"])
        ds = [self.client.post("http://api.test/v1/sign", data=csr) for _ in range(5)]
        codes = [self.drive(d).code for d in ds]
        self.assertEqual(codes, [200] * 5)
        self.assertEqual(self.ca.requests["newOrder"], 1)

    def test_client_disconnect_does_not_cancel_the_order(self) -> None:
        from csrproxy.csr import check_csr

        d = self.issuer.issue(check_csr(make_csr([f"c.{ZONE}"])))
        d.cancel()
        self.failureResultOf(d)
        again = self.issuer.issue(check_csr(make_csr([f"c.{ZONE}"])))
        self.drive(again)
        self.assertEqual(self.ca.requests["newOrder"], 1, "the order was restarted")

    def test_health(self) -> None:
        resp = self.drive(self.client.get("http://api.test/v1/health"))
        self.assertEqual(resp.code, 503)
        self.drive(self.issuer.ensure_account())
        resp = self.drive(self.client.get("http://api.test/v1/health"))
        self.assertEqual(resp.code, 200)
