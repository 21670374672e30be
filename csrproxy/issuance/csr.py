"""Parse and check a certificate signing request.

This decides whether a CSR is well-formed and usable at a public CA (its
self-signature, key type and size, and its names).  Whether the names are
*allowed* is :mod:`csrproxy.issuance.policy`'s job.  Pure logic: no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from csrproxy.errors import BadCSR, BadRequest, KeyNotAllowed
from csrproxy.names import CSR_KEY_TYPES, is_ldh_label, key_label

DEFAULT_MAX_NAMES = 100

_PEM_HEADERS = (b"-----BEGIN CERTIFICATE REQUEST-----", b"-----BEGIN NEW CERTIFICATE REQUEST-----")


@dataclass(frozen=True, eq=False)
class CheckedCSR:
    """A CSR that passed every check, with what the rest of csrproxy needs from it."""

    der: bytes
    names: tuple[str, ...]
    spki_der: bytes
    key_type: str
    #: The subject as an RFC 4514 string (for seed mode's exact comparison).
    subject: str = ""
    #: The certificate profile the request asked for (None: the configured one).
    profile: str | None = None

    @functools.cached_property
    def key_label(self) -> str:
        return key_label(self.spki_der)

    @property
    def spki_sha256(self) -> str:
        return hashlib.sha256(self.spki_der).hexdigest()

    @functools.cached_property
    def request_key(self) -> str:
        """Identifies identical requests: same public key, same set of names, and the same
        profile when one is asked for (without one, the key is what it always was)."""
        asked = b"" if self.profile is None else b"\0profile=" + self.profile.encode()
        return hashlib.sha256(
            self.spki_der + b"\0" + ",".join(sorted(self.names)).encode() + asked
        ).hexdigest()

    def with_profile(self, profile: str | None) -> CheckedCSR:
        """This CSR asked with ``profile`` (itself when that changes nothing)."""
        return self if profile == self.profile else dataclasses.replace(self, profile=profile)


#: Deepest nesting of JSON arrays and objects accepted in a body (``{"csr": ...}`` is 1).
MAX_JSON_DEPTH = 32

#: A JSON string, or an unterminated one up to the end (so that no quote inside it starts
#: another match: one pass, linear; possessive, so nothing is tried twice).
_STRING = re.compile(rb'"(?:[^"\\]|\\.|\\\Z)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True when ``body``'s arrays and objects nest deeper than ``limit`` (strings skipped).

    Linear in the body: strings are dropped in one regex pass, then the brackets are
    counted; a body with no more than ``limit`` brackets in all is not scanned.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for b in _STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        depth += 1 if b in b"[{" else -1
        if depth > limit:
            return True
    return False


def json_body(body: bytes) -> Any:
    """The JSON document in ``body``, or :class:`BadCSR`; nesting deeper than
    :data:`MAX_JSON_DEPTH` is refused before decoding (``json.loads`` recurses once per
    level, and ``[`` * 60,000 ends in ``RecursionError``)."""
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise BadCSR(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadCSR(f"the body is not valid JSON: {e}") from e


def csr_bytes_from_body(body: bytes, content_type: str | None) -> bytes:
    """The PEM or DER CSR carried by an HTTP body (raw PEM, DER, or JSON ``{"csr": PEM}``)."""
    return sign_body(body, content_type)[0]


def sign_body(body: bytes, content_type: str | None) -> tuple[bytes, str | None]:
    """The CSR carried by a ``POST /v1/sign`` body (raw PEM, DER, or JSON ``{"csr": PEM}``)
    and the JSON body's ``"profile"``, if any."""
    stripped = body.strip()
    if not stripped:
        raise BadCSR('the request body is empty; send a PEM or DER CSR or JSON {"csr": "<PEM>"}')
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == "application/json" or stripped[:1] == b"{":
        doc = json_body(stripped)
        if not isinstance(doc, dict) or not isinstance(doc.get("csr"), str):
            raise BadCSR('the JSON body must be an object with a string field "csr"')
        profile = doc.get("profile")
        if profile is not None and not isinstance(profile, str):
            raise BadRequest('"profile" must be a string')
        return str(doc["csr"]).encode("utf-8", "replace"), profile
    return stripped, None


def public_key_label(body: bytes, content_type: str | None, key_types: Collection[str]) -> str:
    """The ``{key}`` label for the public key in a body: a CSR (as ``POST /v1/sign`` takes
    it), a PEM public key, or JSON ``{"public_key": "<PEM>"}``."""
    stripped = body.strip()
    if stripped[:1] == b"{":
        doc = json_body(stripped)
        if isinstance(doc, dict) and isinstance(doc.get("public_key"), str):
            stripped = str(doc["public_key"]).encode("utf-8", "replace").strip()
    if b"-----BEGIN PUBLIC KEY-----" in stripped:
        try:
            key = serialization.load_pem_public_key(stripped[stripped.index(b"-----BEGIN") :])
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise BadCSR(f"the public key does not parse: {e}") from e
    else:
        key = _csr_key(load_csr(csr_bytes_from_body(stripped, content_type)))
    _allowed_type(key, key_types)
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key_label(spki)


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Load a PEM or DER CSR, or raise :class:`BadCSR`."""
    try:
        if any(h in data for h in _PEM_HEADERS):
            start = data.index(b"-----BEGIN")
            return x509.load_pem_x509_csr(data[start:].replace(b"NEW CERTIFICATE", b"CERTIFICATE"))
        if data[:1] == b"\x30":
            return x509.load_der_x509_csr(data)
    except ValueError as e:
        raise BadCSR(f"the CSR does not parse: {e}") from e
    raise BadCSR("the body is not a CSR: expected PEM (-----BEGIN CERTIFICATE REQUEST-----) or DER")


def key_type_of(csr: x509.CertificateSigningRequest) -> str:
    """``rsa2048``, ``ec256``, … for the CSR's public key; raises for unusable keys."""
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyNotAllowed(f"the CSR's public key cannot be read: {e}") from e
    return _key_type(key)


#: The one RSA public exponent accepted, as Let's Encrypt's Boulder does (goodkey:
#: "key exponent must be 65537").  The Baseline Requirements (6.1.6) only ask for an odd
#: e >= 3 and recommend 2^16+1 .. 2^256-1; one fixed value keeps the check cheap, since
#: verifying a CSR's signature costs in proportion to the exponent's length.
RSA_EXPONENT = 65537


def check_rsa_exponent(e: int) -> None:
    """Raise :class:`BadCSR` unless ``e`` is :data:`RSA_EXPONENT`."""
    if e != RSA_EXPONENT:
        shown = str(e) if e.bit_length() <= 64 else f"of {e.bit_length()} bits"
        raise BadCSR(f"RSA public exponent {shown} refused: it must be {RSA_EXPONENT}")


def _key_type(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        # Before anything computes with the key (the signature check does).
        check_rsa_exponent(key.public_numbers().e)
        return f"rsa{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec256", "secp384r1": "ec384", "secp521r1": "ec521"}.get(
            key.curve.name, f"ec-{key.curve.name}"
        )
    return type(key).__name__.lower().replace("publickey", "").strip("_") or "unknown"


def check_name(name: str) -> str | None:
    """Why ``name`` is not a usable certificate DNS name, or None when it is."""
    if not name:
        return "empty name"
    if not name.isascii():
        return "not ASCII: send IDNs as A-labels (xn--)"
    if name.endswith("."):
        return "trailing dot"
    if len(name) > 253:
        return "longer than 253 characters"
    labels = name.split(".")
    if len(labels) < 2:
        return "not a fully qualified name"
    for i, label in enumerate(labels):
        if label == "*" and i == 0:
            continue
        if len(label) > 63:
            return "a label is longer than 63 characters"
        if not is_ldh_label(label):
            return f"label {label!r} is not letters, digits and inner hyphens"
        if label[2:4] == "--":
            if not label.startswith("xn--"):
                return f"label {label!r} has '--' in positions 3-4 (reserved for A-labels)"
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                return f"label {label!r} is not a valid A-label (bad punycode)"
    return None


def check_csr(
    data: bytes,
    *,
    key_types: Collection[str] = CSR_KEY_TYPES,
    max_names: int = DEFAULT_MAX_NAMES,
) -> CheckedCSR:
    """Parse ``data`` (PEM or DER) and check it; raise a typed error for the first failure."""
    csr = load_csr(data)
    try:
        return _check(csr, key_types, max_names)
    except (
        ValueError,
        TypeError,
        UnsupportedAlgorithm,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ) as e:
        # Whatever odd structure got past the parser, it is the CSR's fault, not ours.
        raise BadCSR(f"the CSR cannot be used: {e}") from e


_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


def _csr_key(csr: x509.CertificateSigningRequest) -> Any:
    try:
        return csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyNotAllowed(f"the CSR's public key cannot be read: {e}") from e


def _allowed_type(key: Any, key_types: Collection[str]) -> str:
    key_type = _key_type(key)
    if key_type not in key_types:
        raise KeyNotAllowed(f"key type {key_type} is not allowed (allowed: {', '.join(key_types)})")
    return key_type


def _check(
    csr: x509.CertificateSigningRequest, key_types: Collection[str], max_names: int
) -> CheckedCSR:
    key = _csr_key(csr)
    key_type = _allowed_type(key, key_types)
    if not isinstance(csr.signature_hash_algorithm, _HASHES):
        algo = getattr(csr.signature_hash_algorithm, "name", "none")
        raise BadCSR(f"the CSR is signed with {algo}; use SHA-256, SHA-384 or SHA-512")
    if not csr.is_signature_valid:
        raise BadCSR("the CSR's signature does not verify (proof of possession failed)")

    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise BadCSR("the CSR has no subjectAltName extension with DNS names") from None
    except ValueError as e:
        raise BadCSR(f"the CSR's extensions do not parse: {e}") from e
    others = [g for g in sans if not isinstance(g, x509.DNSName)]
    if others:
        raise BadCSR(
            "only DNS names are allowed in subjectAltName, found: "
            + ", ".join(f"{type(g).__name__} {g.value}" for g in others)
        )
    raw_names = [str(g.value) for g in sans]
    bad = [(n, why) for n in raw_names if (why := check_name(n.lower())) is not None]
    if bad:
        raise BadCSR(
            "invalid DNS names: " + "; ".join(f"{n!r}: {why}" for n, why in bad),
            names=[n for n, _ in bad],
        )
    names = tuple(dict.fromkeys(n.lower() for n in raw_names))
    if not names:
        raise BadCSR("the CSR's subjectAltName holds no DNS names")
    if len(names) > max_names:
        raise BadCSR(f"the CSR has {len(names)} names; at most {max_names} are allowed")

    try:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as e:
        raise BadCSR(f"the CSR's subject does not parse: {e}") from e
    for cn in cns:
        value = str(cn.value).lower()
        if value not in names:
            raise BadCSR(f"the subject CN {cn.value!r} is not among the subjectAltNames", [value])

    _refuse_ca_request(csr)
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return CheckedCSR(
        der=csr.public_bytes(serialization.Encoding.DER),
        names=names,
        spki_der=spki,
        key_type=key_type,
        subject=csr.subject.rfc4514_string(),
    )


def _refuse_ca_request(csr: x509.CertificateSigningRequest) -> None:
    try:
        bc = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise BadCSR("the CSR asks for a CA certificate (basicConstraints CA:TRUE)")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = csr.extensions.get_extension_for_class(x509.KeyUsage).value
        if ku.key_cert_sign or ku.crl_sign:
            raise BadCSR("the CSR asks for keyCertSign/cRLSign key usage")
    except x509.ExtensionNotFound:
        pass
