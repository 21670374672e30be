"""RFC 8555 documents parsed into typed messages: realistic answers, and malformed ones."""

from __future__ import annotations

import copy
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.messages import (
    Account,
    Authorization,
    CertificateChain,
    Challenge,
    Directory,
    Identifier,
    Order,
    Status,
    problem_from_json,
)
from csrproxy.acme.problems import ACMEProtocolError

CA = "https://acme.example.test"
ERR = "urn:ietf:params:acme:error:"

#: Let's Encrypt's directory, as of 2025 (ARI and profiles included).
DIRECTORY: dict[str, Any] = {
    "keyChange": f"{CA}/acme/key-change",
    "meta": {
        "caaIdentities": ["letsencrypt.org"],
        "profiles": {
            "classic": "https://letsencrypt.org/docs/profiles#classic",
            "tlsserver": "https://letsencrypt.org/docs/profiles#tlsserver",
        },
        "termsOfService": f"{CA}/documents/LE-SA-v1.5-February-24-2025.pdf",
        "website": "https://letsencrypt.org",
    },
    "newAccount": f"{CA}/acme/new-acct",
    "newNonce": f"{CA}/acme/new-nonce",
    "newOrder": f"{CA}/acme/new-order",
    "renewalInfo": f"{CA}/acme/renewal-info",
    "revokeCert": f"{CA}/acme/revoke-cert",
    "sVtMeHnZrTg": "https://community.letsencrypt.org/t/adding-random-entries-to-the-directory/33417",
}

#: RFC 8555 §7.1.3's example order, with absolute URLs.
ORDER: dict[str, Any] = {
    "status": "pending",
    "expires": "2016-01-05T14:09:07.99Z",
    "notBefore": "2016-01-01T00:00:00Z",
    "notAfter": "2016-01-08T00:00:00Z",
    "identifiers": [
        {"type": "dns", "value": "www.example.org"},
        {"type": "dns", "value": "example.org"},
    ],
    "authorizations": [f"{CA}/acme/authz/PAniVnsZcis", f"{CA}/acme/authz/r4HqLzrSrpI"],
    "finalize": f"{CA}/acme/order/TOlocE8rfgo/finalize",
}

#: RFC 8555 §7.1.4's example authorization, with a dns-01 challenge added.
AUTHZ: dict[str, Any] = {
    "status": "pending",
    "expires": "2016-01-02T14:09:30Z",
    "identifier": {"type": "dns", "value": "www.example.org"},
    "challenges": [
        {
            "type": "http-01",
            "url": f"{CA}/acme/chall/prV_B7yEyA4",
            "status": "pending",
            "token": "DGyRejmCefe7v4NfDGDKfA",
        },
        {
            "type": "dns-01",
            "url": f"{CA}/acme/chall/Rg5dV14Gh1Q",
            "status": "pending",
            "token": "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA",
        },
    ],
}

#: RFC 8555 §6.7.1's example of a problem with subproblems.
PROBLEM: dict[str, Any] = {
    "type": ERR + "malformed",
    "detail": "Some of the identifiers requested were rejected",
    "subproblems": [
        {
            "type": ERR + "malformed",
            "detail": 'Invalid underscore in DNS name "_example.org"',
            "identifier": {"type": "dns", "value": "_example.org"},
        },
        {
            "type": ERR + "rejectedIdentifier",
            "detail": 'This CA will not issue for "example.net"',
            "identifier": {"type": "dns", "value": "example.net"},
        },
    ],
}


def changed(doc: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A deep copy of ``doc`` with ``fields`` set (None: removed)."""
    out = copy.deepcopy(doc)
    for key, value in fields.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


class StatusTests(SynchronousTestCase):
    def test_every_rfc_8555_status(self) -> None:
        for name in (
            "pending",
            "ready",
            "processing",
            "valid",
            "invalid",
            "deactivated",
            "expired",
            "revoked",
        ):
            self.assertEqual(Status.from_json(name, "x").value, name)

    def test_unknown_status_is_a_protocol_error(self) -> None:
        for bad in ("done", "VALID", "", None, 1, ["valid"]):
            with self.assertRaises(ACMEProtocolError) as cm:
                Status.from_json(bad, "order https://ca/1")
            self.assertIn("order https://ca/1: unknown status", str(cm.exception))


class DirectoryTests(SynchronousTestCase):
    def test_lets_encrypt_directory(self) -> None:
        d = Directory.from_json(DIRECTORY, f"{CA}/directory")
        self.assertEqual(d.url, f"{CA}/directory")
        self.assertEqual(d.new_nonce, f"{CA}/acme/new-nonce")
        self.assertEqual(d.new_account, f"{CA}/acme/new-acct")
        self.assertEqual(d.new_order, f"{CA}/acme/new-order")
        self.assertEqual(d.revoke_cert, f"{CA}/acme/revoke-cert")
        self.assertEqual(d.key_change, f"{CA}/acme/key-change")
        self.assertEqual(d.renewal_info, f"{CA}/acme/renewal-info")
        self.assertEqual(d.profiles, frozenset({"classic", "tlsserver"}))
        self.assertTrue(d.terms_of_service)
        self.assertFalse(d.external_account_required)

    def test_minimal_directory(self) -> None:
        d = Directory.from_json(
            {k: DIRECTORY[k] for k in ("newNonce", "newAccount", "newOrder")}, f"{CA}/dir"
        )
        self.assertIsNone(d.revoke_cert)
        self.assertIsNone(d.renewal_info)
        self.assertEqual(d.profiles, frozenset())

    def test_eab_required(self) -> None:
        doc = changed(DIRECTORY, meta={"externalAccountRequired": True})
        self.assertTrue(Directory.from_json(doc, f"{CA}/dir").external_account_required)

    def test_malformed_directories(self) -> None:
        cases: list[tuple[Any, str]] = [
            (["not", "an", "object"], "not a JSON object"),
            (changed(DIRECTORY, newOrder=None), "'newOrder' is missing, not an http(s) URL"),
            (changed(DIRECTORY, newNonce="/acme/new-nonce"), "'newNonce'"),
            (changed(DIRECTORY, newAccount=7), "'newAccount' is 7"),
            (changed(DIRECTORY, renewalInfo="ftp://x/ari"), "'renewalInfo'"),
            (changed(DIRECTORY, meta="v1"), "meta is 'v1', not a JSON object"),
            (changed(DIRECTORY, meta={"profiles": ["classic"]}), "profiles"),
            (changed(DIRECTORY, meta={"externalAccountRequired": "yes"}), "not a boolean"),
        ]
        for doc, message in cases:
            with self.assertRaises(ACMEProtocolError) as cm:
                Directory.from_json(doc, f"{CA}/dir")
            self.assertIn(f"directory {CA}/dir", str(cm.exception))
            self.assertIn(message, str(cm.exception))


class AccountTests(SynchronousTestCase):
    def test_account(self) -> None:
        doc = {
            "status": "valid",
            "contact": ["mailto:cert-admin@example.org", "mailto:admin@example.org"],
            "termsOfServiceAgreed": True,
            "orders": f"{CA}/acme/orders/rzGoeA",
        }
        a = Account.from_json(doc, f"{CA}/acme/acct/1")
        self.assertEqual(a.url, f"{CA}/acme/acct/1")
        self.assertIs(a.status, Status.VALID)
        self.assertEqual(a.contact, ("mailto:cert-admin@example.org", "mailto:admin@example.org"))
        self.assertEqual(Account.from_json({"status": "valid"}, "u").contact, ())

    def test_malformed_accounts(self) -> None:
        for doc in (
            {},
            {"status": "valid", "contact": "mailto:a@b"},
            {"status": "valid", "contact": [1]},
        ):
            with self.assertRaises(ACMEProtocolError):
                Account.from_json(doc, f"{CA}/acme/acct/1")


class OrderTests(SynchronousTestCase):
    URL = f"{CA}/acme/order/TOlocE8rfgo"

    def test_pending_order(self) -> None:
        o = Order.from_json(ORDER, self.URL)
        self.assertEqual(o.url, self.URL)
        self.assertIs(o.status, Status.PENDING)
        self.assertEqual(o.authorizations, tuple(ORDER["authorizations"]))
        self.assertEqual(o.finalize, ORDER["finalize"])
        self.assertEqual(
            o.identifiers,
            (Identifier("dns", "www.example.org"), Identifier("dns", "example.org")),
        )
        self.assertIsNone(o.certificate)
        self.assertIsNone(o.error)

    def test_valid_order(self) -> None:
        doc = changed(ORDER, status="valid", certificate=f"{CA}/acme/cert/mAt3xBGaobw")
        o = Order.from_json(doc, self.URL)
        self.assertIs(o.status, Status.VALID)
        self.assertEqual(o.certificate, f"{CA}/acme/cert/mAt3xBGaobw")

    def test_invalid_order_carries_its_problem(self) -> None:
        o = Order.from_json(changed(ORDER, status="invalid", error=PROBLEM), self.URL)
        assert o.error is not None
        self.assertEqual(o.error.short_type, "malformed")
        self.assertEqual(o.error.status, 403)
        self.assertEqual(
            [(s.short_type, s.identifier) for s in o.error.subproblems],
            [
                ("malformed", Identifier("dns", "_example.org")),
                ("rejectedIdentifier", Identifier("dns", "example.net")),
            ],
        )

    def test_embedded_problem_with_its_own_status(self) -> None:
        error = {"type": ERR + "badCSR", "detail": "key too small", "status": 400}
        o = Order.from_json(changed(ORDER, status="invalid", error=error), self.URL)
        assert o.error is not None
        self.assertEqual((o.error.short_type, o.error.status), ("badCSR", 400))

    def test_identifiers_are_optional(self) -> None:
        self.assertEqual(
            Order.from_json(changed(ORDER, identifiers=None), self.URL).identifiers, ()
        )

    def test_malformed_orders(self) -> None:
        cases: list[tuple[Any, str]] = [
            ("pending", "not a JSON object"),
            (changed(ORDER, status=None), "unknown status missing"),
            (changed(ORDER, status="complete"), "unknown status 'complete'"),
            (changed(ORDER, finalize=None), "'finalize' is missing"),
            (changed(ORDER, authorizations=None), "'authorizations' is missing, not a list"),
            (changed(ORDER, authorizations=f"{CA}/acme/authz/1"), "not a list"),
            (changed(ORDER, authorizations=["authz/1"]), "authorization 0 is 'authz/1'"),
            (changed(ORDER, authorizations=[None]), "authorization 0 is missing"),
            (changed(ORDER, status="valid", certificate=True), "'certificate' is True"),
            (changed(ORDER, error="it broke"), "error is 'it broke', not a JSON object"),
            (changed(ORDER, error={"type": ERR + "x", "status": "400"}), "is not a number"),
            (changed(ORDER, identifiers=[{"type": "dns"}]), "'value' is missing"),
        ]
        for doc, message in cases:
            with self.assertRaises(ACMEProtocolError) as cm:
                Order.from_json(doc, self.URL)
            self.assertIn(f"order {self.URL}", str(cm.exception))
            self.assertIn(message, str(cm.exception))


class AuthorizationTests(SynchronousTestCase):
    URL = f"{CA}/acme/authz/PAniVnsZcis"

    def test_pending_authorization(self) -> None:
        a = Authorization.from_json(AUTHZ, self.URL)
        self.assertEqual(a.url, self.URL)
        self.assertEqual(a.identifier, Identifier("dns", "www.example.org"))
        self.assertIs(a.status, Status.PENDING)
        self.assertFalse(a.wildcard)
        self.assertEqual([c.type for c in a.challenges], ["http-01", "dns-01"])
        dns = a.challenge("dns-01")
        self.assertEqual(
            dns,
            Challenge(
                "dns-01",
                f"{CA}/acme/chall/Rg5dV14Gh1Q",
                Status.PENDING,
                "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA",
            ),
        )
        self.assertIsNone(a.challenge("tls-alpn-01"))
        self.assertIsNone(a.problem)

    def test_wildcard(self) -> None:
        doc = changed(AUTHZ, wildcard=True, challenges=AUTHZ["challenges"][1:])
        self.assertTrue(Authorization.from_json(doc, self.URL).wildcard)

    def test_invalid_authorization_carries_the_challenge_error(self) -> None:
        doc = copy.deepcopy(AUTHZ)
        doc["status"] = "invalid"
        doc["challenges"][1]["status"] = "invalid"
        doc["challenges"][1]["error"] = {
            "type": ERR + "unauthorized",
            "detail": "No TXT record found at _acme-challenge.www.example.org",
            "status": 403,
        }
        a = Authorization.from_json(doc, self.URL)
        self.assertIs(a.status, Status.INVALID)
        assert a.problem is not None
        self.assertEqual(a.problem.short_type, "unauthorized")
        self.assertIn("No TXT record", a.problem.detail)

    def test_other_challenges_need_no_token(self) -> None:
        doc = changed(
            AUTHZ,
            challenges=[
                {"type": "email-reply-00", "url": f"{CA}/acme/chall/e", "status": "pending"},
                AUTHZ["challenges"][1],
            ],
        )
        self.assertIsNone(Authorization.from_json(doc, self.URL).challenges[0].token)

    def test_malformed_authorizations(self) -> None:
        dns = AUTHZ["challenges"][1]
        cases: list[tuple[Any, str]] = [
            (None, "is missing, not a JSON object"),
            (changed(AUTHZ, identifier=None), "identifier is missing"),
            (changed(AUTHZ, identifier={"type": "dns", "value": 3}), "'value' is 3"),
            (changed(AUTHZ, status="processed"), "unknown status 'processed'"),
            (changed(AUTHZ, challenges=None), "'challenges' is missing, not a list"),
            (changed(AUTHZ, challenges=[7]), "challenge 0 is 7, not a JSON object"),
            (changed(AUTHZ, challenges=[changed(dns, url=None)]), "'url' is missing"),
            (changed(AUTHZ, challenges=[changed(dns, url="chall/1")]), "'url' is 'chall/1'"),
            (changed(AUTHZ, challenges=[changed(dns, type=None)]), "'type' is missing"),
            (changed(AUTHZ, challenges=[changed(dns, status="ok")]), "unknown status 'ok'"),
            (changed(AUTHZ, challenges=[changed(dns, token=None)]), "is not base64url"),
            (changed(AUTHZ, challenges=[changed(dns, token="a.b")]), "token 'a.b'"),
            (changed(AUTHZ, challenges=[changed(dns, token="ünï")]), "is not base64url"),
            (changed(AUTHZ, challenges=[changed(dns, token=12)]), "'token' is 12"),
            (changed(AUTHZ, wildcard="true"), "'wildcard' is not a boolean"),
        ]
        for doc, message in cases:
            with self.assertRaises(ACMEProtocolError) as cm:
                Authorization.from_json(doc, self.URL)
            self.assertIn(f"authorization {self.URL}", str(cm.exception))
            self.assertIn(message, str(cm.exception))


class ProblemTests(SynchronousTestCase):
    def test_problem_with_subproblems(self) -> None:
        p = problem_from_json(PROBLEM, 400, retry_after=3.0, nonce="n", url=f"{CA}/acme/new-order")
        self.assertEqual((p.short_type, p.status, p.retry_after), ("malformed", 400, 3.0))
        self.assertEqual((p.nonce, p.url), ("n", f"{CA}/acme/new-order"))
        self.assertFalse(p.retryable)
        self.assertEqual(p.subproblems[1].identifier, Identifier("dns", "example.net"))
        self.assertEqual(p.subproblems[1].short_type, "rejectedIdentifier")

    def test_anything_the_ca_says_becomes_a_problem(self) -> None:
        p = problem_from_json("<html>Bad Gateway</html>", 502)
        self.assertEqual((p.type, p.detail, p.status), ("about:blank", "HTTP 502", 502))
        self.assertTrue(p.retryable)
        subs = {"type": ERR + "x", "subproblems": [1, {"identifier": "x"}, {"detail": 2}]}
        p = problem_from_json(subs, 400)
        self.assertEqual(
            [(s.type, s.detail, s.identifier) for s in p.subproblems],
            [("about:blank", "", None), ("about:blank", "2", None)],
        )

    def test_rate_limited_is_retryable(self) -> None:
        p = problem_from_json({"type": ERR + "rateLimited", "detail": "too many"}, 429)
        self.assertTrue(p.retryable)
        self.assertEqual(p.short_type, "rateLimited")


class CertificateChainTests(SynchronousTestCase):
    URL = f"{CA}/acme/cert/mAt3xBGaobw"
    PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

    def test_chain_and_alternates(self) -> None:
        c = CertificateChain.from_pem(self.PEM, self.URL, [f"{self.URL}/1", "/acme/cert/x/2"])
        self.assertEqual(c.pem, self.PEM.decode())
        self.assertEqual(c.alternates, (f"{self.URL}/1", f"{CA}/acme/cert/x/2"))

    def test_not_a_pem_chain(self) -> None:
        with self.assertRaises(ACMEProtocolError) as cm:
            CertificateChain.from_pem(b'{"status": "valid"}', self.URL)
        self.assertIn("did not return a PEM chain", str(cm.exception))

    def test_alternate_that_is_not_http(self) -> None:
        with self.assertRaises(ACMEProtocolError):
            CertificateChain.from_pem(self.PEM, self.URL, ["file:///etc/passwd"])
