"""Certificate chains as the server answers them: parse, check, serialize."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from csrproxy.client.errors import EXIT_REFUSED, ClientError
from csrproxy.client.keys import PrivateKey, same_key


def dns_names(cert: x509.Certificate) -> list[str]:
    """The DNS names of ``cert``'s SAN ([] without one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def verify_chain(
    pem: bytes,
    key: PrivateKey,
    names: Sequence[str],
    root_pem: bytes | None = None,
    now: float | None = None,
) -> list[x509.Certificate]:
    """The leaf carries our key and exactly our names, each cert is signed by the next
    (and the last by ``root_pem`` when given), and the leaf is valid at ``now``."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ClientError(f"the server's answer is not a PEM chain: {e}", EXIT_REFUSED) from e
    leaf = chain[0]
    if not same_key(leaf, key):
        raise ClientError("the certificate's key is not our key", EXIT_REFUSED)
    got = sorted({n.lower() for n in dns_names(leaf)})
    if got != sorted({n.lower() for n in names}):
        raise ClientError(f"the certificate names {got}, not {sorted(names)}", EXIT_REFUSED)
    t = time.time() if now is None else now
    if not leaf.not_valid_before_utc.timestamp() - 300 <= t < leaf.not_valid_after_utc.timestamp():
        raise ClientError("the certificate is not valid now", EXIT_REFUSED)
    issuers = chain[1:] + ([x509.load_pem_x509_certificate(root_pem)] if root_pem else [])
    for child, parent in zip(chain, issuers, strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise ClientError(
                f"{child.subject.rfc4514_string()} is not issued by "
                f"{parent.subject.rfc4514_string()}: {e}",
                EXIT_REFUSED,
            ) from e
    return chain


def pem_of(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def load_chain(path: Path) -> list[x509.Certificate] | None:
    """The certificates in ``path``, or None when it is missing or not PEM."""
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return None
