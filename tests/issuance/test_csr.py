"""CSR parsing and checks, and name policy."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import time

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.errors import BadCSR, KeyNotAllowed, NameNotAllowed
from csrproxy.issuance.csr import check_csr, csr_bytes_from_body
from csrproxy.issuance.policy import NamePolicy
from csrproxy.names import CSR_KEY_TYPES, NamePattern, key_label
from tests.support.keys import EC256, EC384, EC521, RSA1024, RSA2048, RSA2048_E3, make_csr, tamper


class BodyTests(SynchronousTestCase):
    def test_pem_der_and_json(self) -> None:
        pem = make_csr(["a.go.example.test"])
        der = make_csr(["a.go.example.test"], pem=False)
        js = json.dumps({"csr": pem.decode()}).encode()
        for body, ctype in ((pem, None), (der, "application/pkcs10"), (js, "application/json")):
            checked = check_csr(csr_bytes_from_body(body, ctype))
            self.assertEqual(checked.names, ("a.go.example.test",))

    def test_empty_and_garbage(self) -> None:
        for body in (b"", b"   ", b"this is not a csr", b"\x30\x03\x02\x01\x00", b"{", b"[1]"):
            with self.assertRaises(BadCSR):
                check_csr(csr_bytes_from_body(body, None))

    def test_json_without_csr_field(self) -> None:
        with self.assertRaises(BadCSR) as e:
            csr_bytes_from_body(b'{"pem": "x"}', "application/json")
        self.assertIn('"csr"', e.exception.detail)


class CheckTests(SynchronousTestCase):
    def test_names_lowercased_and_deduplicated(self) -> None:
        checked = check_csr(
            make_csr(["A.Go.Example.Test", "a.go.example.test", "b.go.example.test"])
        )
        self.assertEqual(checked.names, ("a.go.example.test", "b.go.example.test"))
        self.assertEqual(checked.key_type, "ec256")

    def test_tampered_signature(self) -> None:
        with self.assertRaises(BadCSR) as e:
            check_csr(tamper(make_csr(["a.go.example.test"])))
        self.assertIn("signature", e.exception.detail)

    def test_key_types(self) -> None:
        self.assertEqual(check_csr(make_csr(["a.x.test"], EC384)).key_type, "ec384")
        self.assertEqual(check_csr(make_csr(["a.x.test"], RSA2048)).key_type, "rsa2048")
        for key in (RSA1024, EC521):
            with self.assertRaises(KeyNotAllowed):
                check_csr(make_csr(["a.x.test"], key))

    def test_bad_names(self) -> None:
        for name in (
            "a.go.example.test.",
            "ünï.go.example.test",
            "a_b.go.example.test",
            "-a.go.example.test",
            "x" * 64 + ".example.test",
            "localhost",
        ):
            with self.assertRaises(BadCSR, msg=name):
                check_csr(make_csr([name], cn=None))

    def test_ip_san_refused(self) -> None:
        san = [x509.DNSName("a.go.example.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        with self.assertRaises(BadCSR) as e:
            check_csr(make_csr(["a.go.example.test"], san=san))
        self.assertIn("IPAddress", e.exception.detail)

    def test_too_many_names(self) -> None:
        names = [f"n{i}.go.example.test" for i in range(101)]
        with self.assertRaises(BadCSR):
            check_csr(make_csr(names))
        self.assertEqual(len(check_csr(make_csr(names[:100])).names), 100)

    def test_cn_outside_sans(self) -> None:
        with self.assertRaises(BadCSR) as e:
            check_csr(make_csr(["a.go.example.test"], cn="other.go.example.test"))
        self.assertEqual(e.exception.names, ["other.go.example.test"])

    def test_no_san(self) -> None:
        with self.assertRaises(BadCSR):
            check_csr(make_csr(["a.go.example.test"], san=[]))

    def test_ca_request_refused(self) -> None:
        bc = (x509.BasicConstraints(ca=True, path_length=None), True)
        with self.assertRaises(BadCSR):
            check_csr(make_csr(["a.go.example.test"], extensions=[bc]))
        ku = x509.KeyUsage(False, False, False, False, False, True, False, False, False)
        with self.assertRaises(BadCSR):
            check_csr(make_csr(["a.go.example.test"], extensions=[(ku, True)]))


class PolicyTests(SynchronousTestCase):
    def test_label_pattern(self) -> None:
        policy = NamePolicy(["{label}.go.example.test", "go.example.test"])
        policy.check(["a.go.example.test", "go.example.test"])
        for bad in ("a.b.go.example.test", "a.go.example.com", "*.go.example.test"):
            with self.assertRaises(NameNotAllowed) as e:
                policy.check(["a.go.example.test", bad])
            self.assertEqual(e.exception.names, [bad])

    def test_literal_wildcard(self) -> None:
        policy = NamePolicy(["*.{label}.go.example.test", "{label}.go.example.test"])
        policy.check(["x.go.example.test", "*.x.go.example.test"])

    def test_key_pattern(self) -> None:
        checked = check_csr(make_csr(["a.go.example.test"], EC256))
        label = checked.key_label
        self.assertEqual(label, key_label(checked.spki_der))
        self.assertEqual(len(label), 32)
        policy = NamePolicy(["{key}.go.example.test"])
        policy.check([f"{label}.go.example.test"], label)
        with self.assertRaises(NameNotAllowed):
            policy.check(["a.go.example.test"], label)
        self.assertEqual(policy.names_for_key(label), [f"{label}.go.example.test"])

    def test_bad_patterns(self) -> None:
        for text in ("", "a.", "{lab}.x.test", "a.*.x.test", "test", "a b.x.test"):
            with self.assertRaises(ValueError, msg=text):
                NamePattern.parse(text)


class MoreCheckTests(SynchronousTestCase):
    def test_reserved_and_bad_a_labels(self) -> None:
        for name in ("ab--c.go.example.test", "xn--zz-.go.example.test", "xn--a.go.example.test"):
            with self.assertRaises(BadCSR, msg=name):
                check_csr(make_csr([name], cn=None))
        self.assertEqual(
            check_csr(make_csr(["xn--bcher-kva.go.example.test"])).names,
            ("xn--bcher-kva.go.example.test",),
        )

    def test_key_label_from_body(self) -> None:
        from cryptography.hazmat.primitives import serialization

        from csrproxy.issuance.csr import public_key_label

        label = check_csr(make_csr(["a.x.test"], EC256)).key_label
        pem = EC256.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for body in (
            make_csr(["a.x.test"], EC256),
            pem,
            json.dumps({"public_key": pem.decode()}).encode(),
        ):
            self.assertEqual(public_key_label(body, None, CSR_KEY_TYPES), label)
        with self.assertRaises(KeyNotAllowed):
            public_key_label(make_csr(["a.x.test"], RSA1024), None, CSR_KEY_TYPES)
        with self.assertRaises(BadCSR):
            public_key_label(
                b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", None, ()
            )

    def test_label_pattern_never_takes_a_key_shaped_label(self) -> None:
        label = check_csr(make_csr(["a.x.test"], EC256)).key_label
        other = check_csr(make_csr(["a.x.test"], EC384)).key_label
        policy = NamePolicy(["{label}.go.example.test", "{key}.go.example.test"])
        policy.check([f"{label}.go.example.test"], label)
        with self.assertRaises(NameNotAllowed):
            policy.check([f"{other}.go.example.test"], label)

    def test_seed_subject(self) -> None:
        from csrproxy.errors import SubjectNotAllowed

        policy = NamePolicy([], "CN=go.example.test")
        self.assertEqual([p.text for p in policy.patterns], ["go.example.test"])
        checked = check_csr(make_csr(["go.example.test"]))
        policy.check_subject(checked.subject)
        with self.assertRaises(SubjectNotAllowed):
            policy.check_subject("O=x,CN=go.example.test")


def rsa_key_with_exponent(e: int) -> rsa.RSAPrivateKey:
    """An RSA 2048 key whose public exponent is ``e`` (cryptography makes only 3 and 65537).

    Primes from keys made with e=3 are 2 mod 3, as they must be for an exponent like
    2^2047+1 (a multiple of 3); another key is tried when ``e`` shares a factor with both.
    """
    for _ in range(5):
        base = rsa.generate_private_key(3, 2048).private_numbers()
        p, q = base.p, base.q
        lam = math.lcm(p - 1, q - 1)
        if math.gcd(e, lam) != 1:
            continue
        d = pow(e, -1, lam)
        public = rsa.RSAPublicNumbers(e, p * q)
        numbers = rsa.RSAPrivateNumbers(
            p, q, d, d % (p - 1), d % (q - 1), rsa.rsa_crt_iqmp(p, q), public
        )
        return numbers.private_key()
    raise AssertionError(f"no RSA key found for e={e}")


HUGE_E = 2**2047 + 1
RSA2048_HUGE_E = rsa_key_with_exponent(HUGE_E)
RSA2048_E65539 = rsa_key_with_exponent(65539)


class ExponentTests(SynchronousTestCase):
    """The RSA public exponent must be exactly 65537 (Boulder's goodkey rule)."""

    def test_65537_accepted(self) -> None:
        self.assertEqual(check_csr(make_csr(["a.x.test"], RSA2048)).key_type, "rsa2048")

    def test_3_refused(self) -> None:
        with self.assertRaises(BadCSR) as e:
            check_csr(make_csr(["a.x.test"], RSA2048_E3))
        self.assertIn("exponent 3 refused: it must be 65537", e.exception.detail)

    def test_odd_exponent_above_65537_refused(self) -> None:
        with self.assertRaises(BadCSR) as e:
            check_csr(make_csr(["a.x.test"], RSA2048_E65539))
        self.assertIn("exponent 65539 refused", e.exception.detail)

    def test_2047_bit_exponent_refused_before_the_signature_check(self) -> None:
        csr = make_csr(["a.x.test"], RSA2048_HUGE_E)
        # The CSR itself is sound: its signature verifies with the huge exponent.
        self.assertTrue(x509.load_pem_x509_csr(csr).is_signature_valid)
        with self.assertRaises(BadCSR) as e:
            check_csr(csr)
        # The detail names the exponent's size, not its 617 digits.
        self.assertIn("exponent of 2048 bits refused", e.exception.detail)
        self.assertLess(len(e.exception.detail), 100)

    def test_refusal_costs_less_than_an_accepted_rsa_csr(self) -> None:
        huge = make_csr(["a.x.test"], RSA2048_HUGE_E)
        normal = make_csr(["a.x.test"], RSA2048)

        def cost(body: bytes, rounds: int = 20) -> float:
            start = time.process_time()
            for _ in range(rounds):
                with contextlib.suppress(BadCSR):
                    check_csr(body)
            return time.process_time() - start

        self.assertLess(cost(huge), cost(normal) * 2)

    def test_public_key_label_refuses_the_exponent_too(self) -> None:
        from csrproxy.issuance.csr import public_key_label

        with self.assertRaises(BadCSR):
            public_key_label(make_csr(["a.x.test"], RSA2048_E3), None, CSR_KEY_TYPES)
