"""Decoding request bodies: JSON nesting is bounded before decoding, and odd CSR
structures are the CSR's fault (BadCSR), never an unexpected exception."""

from __future__ import annotations

import json
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.errors import BadCSR
from csrproxy.issuance.csr import (
    MAX_JSON_DEPTH,
    check_csr,
    csr_bytes_from_body,
    json_body,
    public_key_label,
)
from csrproxy.names import CSR_KEY_TYPES
from tests.support.keys import EC256, make_csr


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(body)) + body


def signed_request(info: bytes) -> bytes:
    """A DER CSR around ``info`` (a CertificationRequestInfo), validly signed by EC256."""
    ecdsa_with_sha256 = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
    signature = EC256.sign(info, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, info + ecdsa_with_sha256 + _tlv(0x03, b"\x00" + signature))


class JSONBodyTests(SynchronousTestCase):
    def test_sixty_thousand_brackets_refused_before_decoding(self) -> None:
        for body in (b"[" * 60_000, b"{" * 60_000, b'{"csr": ' + b"[" * 60_000):
            start = time.perf_counter()
            with self.assertRaises(BadCSR) as caught:
                json_body(body)
            self.assertIn("nested deeper than 32", caught.exception.detail)
            self.assertLess(time.perf_counter() - start, 0.5)
            with self.assertRaises(BadCSR):
                csr_bytes_from_body(body, "application/json")
        with self.assertRaises(BadCSR):
            public_key_label(b"{" + b"[" * 60_000, None, CSR_KEY_TYPES)

    def test_depth_bound_is_exact(self) -> None:
        ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
        self.assertEqual(json.dumps(json_body(ok)).count("["), MAX_JSON_DEPTH)
        with self.assertRaises(BadCSR):
            json_body(b"[" + ok + b"]")
        # Depth, not the number of brackets.
        self.assertEqual(len(json_body(b"[" + b"[]," * 5000 + b"[]]")), 5001)

    def test_brackets_in_strings_do_not_count(self) -> None:
        doc = {"csr": "x", "a": "[" * 100, "b": '\\"[[[[' * 50, "c": "{" * 100}
        self.assertEqual(json_body(json.dumps(doc).encode()), doc)

    def test_bad_json_is_bad_csr(self) -> None:
        for body in (
            b"{",
            b'{"csr": 1' + b"1" * 5000 + b"}",
            b'{"csr": "\xff"}',
            b"{\x00}",
            b"]]]]",
        ):
            with self.assertRaises(BadCSR, msg=body[:40]):
                json_body(body)


class OddStructureTests(SynchronousTestCase):
    def test_duplicate_extension_is_bad_csr(self) -> None:
        pem = make_csr(
            ["a.x.test"], extensions=[(x509.BasicConstraints(ca=False, path_length=None), False)]
        )
        info = x509.load_pem_x509_csr(pem).tbs_certrequest_bytes
        basic_constraints, subject_alt_name = (
            bytes.fromhex("0603551d13"),
            bytes.fromhex("0603551d11"),
        )
        self.assertEqual(info.count(basic_constraints), 1)
        twice = signed_request(info.replace(basic_constraints, subject_alt_name))
        with self.assertRaises(BadCSR) as caught:
            check_csr(twice)
        self.assertIn("Duplicate", caught.exception.detail)


def test_json_depth_is_counted_outside_strings_only() -> None:
    from csrproxy.issuance.csr import json_depth_exceeds

    assert not json_depth_exceeds(b"[" * 32 + b"]" * 32, 32)
    assert json_depth_exceeds(b"[" * 33 + b"]" * 33, 32)
    assert not json_depth_exceeds(b'{"csr": "' + b"[" * 60_000 + b'"}', 32)
    assert not json_depth_exceeds(b'{"a": "' + b"[" * 50 + b'\\"' + b"[" * 50 + b'"}', 32)
    assert json_depth_exceeds(b'{"a": "\\\\"' + b", [" * 40, 32)  # the escape ends there
    # Unterminated strings full of escaped quotes: one pass (this took 19 s with a
    # backtracking pattern, at 64 KiB), and the answer is still right.
    assert not json_depth_exceeds(b'{"' + b'\\"' * 32_768, 32)
    assert not json_depth_exceeds(b'{"' + b'\\"' * 32_767 + b"\\", 32)
    assert json_depth_exceeds(b'"a",' * 16_000 + b"[" * 40, 32)
