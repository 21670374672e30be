"""The installation's private key and its CSR: make, load, serialize, label, match."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from csrproxy.client.errors import EXIT_USAGE, ClientError

KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def generate_key(key_type: str = "ec256") -> PrivateKey:
    """A new key of one of :data:`KEY_TYPES`."""
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa2048", "rsa3072", "rsa4096"):
        return rsa.generate_private_key(65537, int(key_type[3:]))
    raise ClientError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})", EXIT_USAGE)


def key_type_of(key: PrivateKey) -> str:
    """The :data:`KEY_TYPES` name of ``key``."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ec{key.curve.key_size}"
    return f"rsa{key.key_size}"


def key_pem(key: PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(path: Path) -> PrivateKey:
    """The EC or RSA key in ``path``; anything else is a usage error."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read the key {path}: {e}", EXIT_USAGE) from e
    return parse_key(data, path)


def parse_key(data: bytes, where: Path) -> PrivateKey:
    """The EC or RSA key in the PEM ``data`` (read from ``where``); anything else is a
    usage error."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ClientError(f"cannot read the key {where}: {e}", EXIT_USAGE) from e
    if not isinstance(key, PrivateKey):
        raise ClientError(f"{where} holds an unsupported key type", EXIT_USAGE)
    return key


def public_key_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def same_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    """Whether ``cert`` certifies the public half of ``key``."""
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def key_label(key: PrivateKey) -> str:
    """The server's ``{key}`` label: base32 of 160 bits of SHA-256 over the SPKI."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return base64.b32encode(digest.finalize()[:20]).decode().lower()


def make_csr(key: PrivateKey, names: Sequence[str]) -> bytes:
    """A PEM CSR signed by ``key``: CN the first name, every name in the SAN."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
