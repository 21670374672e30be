"""Test keys and CSR builders, made once per test run (key generation is slow)."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

EC256 = ec.generate_private_key(ec.SECP256R1())
EC256_B = ec.generate_private_key(ec.SECP256R1())
EC384 = ec.generate_private_key(ec.SECP384R1())
EC521 = ec.generate_private_key(ec.SECP521R1())
RSA1024 = rsa.generate_private_key(65537, 1024)
RSA2048 = rsa.generate_private_key(65537, 2048)
RSA2048_E3 = rsa.generate_private_key(3, 2048)

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def make_csr(
    names: Sequence[str],
    key: Key = EC256,
    *,
    cn: str | None = "",
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    san: Sequence[x509.GeneralName] | None = None,
    pem: bool = True,
) -> bytes:
    """A CSR for ``names``; ``cn=""`` means the first name, ``None`` no CN."""
    attrs = []
    common = names[0] if cn == "" and names else cn
    if common:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    # Unchecked, so tests can build CSRs with the U-labels clients may send.
    general = (
        list(san) if san is not None else [x509.DNSName._init_without_validation(n) for n in names]
    )
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)


def tamper(pem: bytes) -> bytes:
    """The same CSR with one bit of its signature flipped."""
    csr = x509.load_pem_x509_csr(pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    return bytes(der)
