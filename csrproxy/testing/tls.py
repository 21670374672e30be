"""A throwaway CA and server certificates for loopback HTTPS (pebble, proxies, tests)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def make_cert(
    subject: str,
    issuer: str,
    pub: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    exts: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    for ext, critical in exts:
        b = b.add_extension(ext, critical)
    return b.sign(signer, hashes.SHA256())


def make_tls_files(
    directory: str,
    hosts: Sequence[str] = ("127.0.0.1", "::1", "localhost"),
) -> tuple[str, str, str, str]:
    """Write a throwaway CA and a server cert for ``hosts`` (EC P-256, 30 days) into
    ``directory``; returns the paths ``(ca_cert, ca_key, cert, key)`` (``cert``: leaf only)."""
    os.makedirs(directory, exist_ok=True)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cn = "csrproxy test kit throwaway CA"
    ca = make_cert(
        ca_cn,
        ca_cn,
        ca_key.public_key(),
        ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True),
            (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
        ],
    )
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    leaf = make_cert(
        "localhost",
        ca_cn,
        key.public_key(),
        ca_key,
        [
            (x509.SubjectAlternativeName(sans), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
        ],
    )
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    nokey = serialization.NoEncryption()
    paths = [os.path.join(directory, n) for n in ("ca.pem", "ca.key", "cert.pem", "key.pem")]
    for path, data in zip(
        paths,
        (
            ca.public_bytes(pem),
            ca_key.private_bytes(pem, pkcs8, nokey),
            leaf.public_bytes(pem),
            key.private_bytes(pem, pkcs8, nokey),
        ),
        strict=True,
    ):
        with open(path, "wb") as f:
            f.write(data)
    return paths[0], paths[1], paths[2], paths[3]


# ---- processes
