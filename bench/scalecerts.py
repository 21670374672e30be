"""Certificates for bench/scale's synthetic installations, shaped like Let's Encrypt's.

A bench root (RSA-4096, as ISRG Root X1) signs a P-256 intermediate (as the E-series; P-256
rather than P-384 because it signs a million leaves); the intermediate signs 90-day leaves
carrying what a Let's Encrypt leaf carries: key usage, serverAuth, SKI, AKI (with the serial,
the ARI certificate id), AIA, the SAN, the DV policy, a CRL distribution point and two
embedded SCTs.  Leaf about 1.3 KB of PEM, intermediate about 1.5 KB.  Nothing here is trusted
by anyone: the daemon only stores and parses these chains.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

#: The CA/Browser Forum's domain-validated policy, as in Let's Encrypt's certificates.
_DV_POLICY = x509.CertificatePolicies(
    [x509.PolicyInformation(x509.ObjectIdentifier("2.23.140.1.2.1"), None)]
)
_SCT_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")


@dataclass(frozen=True)
class BenchCA:
    """The intermediate that signs the leaves (picklable: handed to every worker)."""

    key_pem: bytes
    cert_pem: bytes
    ski: bytes
    zone: str
    #: Two fixed CT log ids (the SCTs' signatures are random bytes of the right shape).
    log_ids: tuple[bytes, bytes]


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "csrproxy bench"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _aia(url: str) -> x509.AuthorityInformationAccess:
    return x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(url)
            )
        ]
    )


def _crl(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)]
    )


def bench_ca(zone: str, now: float) -> BenchCA:
    """A new root and intermediate (the root's key is thrown away)."""
    t = datetime.datetime.fromtimestamp(now, datetime.UTC)
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("E9"))
        .issuer_name(_name("csrproxy bench root X9"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - datetime.timedelta(days=365))
        .not_valid_after(t + datetime.timedelta(days=730))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(ski, False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .add_extension(_aia(f"http://x9.i.{zone}/"), False)
        .add_extension(_DV_POLICY, False)
        .add_extension(_crl(f"http://x9.c.{zone}/"), False)
        .sign(root_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return BenchCA(
        key_pem=key_pem,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        ski=ski.digest,
        zone=zone,
        log_ids=(secrets.token_bytes(32), secrets.token_bytes(32)),
    )


def sct_list(log_ids: tuple[bytes, bytes], when_ms: int) -> bytes:
    """An RFC 6962 SignedCertificateTimestampList of two SCTs, wrapped in a DER OCTET STRING
    (the extension's value); the signatures are random DER ECDSA signatures."""
    scts = b""
    for log_id in log_ids:
        r = bytes([secrets.randbelow(0x7F) + 1]) + secrets.token_bytes(31)
        s = bytes([secrets.randbelow(0x7F) + 1]) + secrets.token_bytes(31)
        sig = b"\x30\x44\x02\x20" + r + b"\x02\x20" + s
        body = (
            b"\x00"  # v1
            + log_id
            + when_ms.to_bytes(8, "big")
            + b"\x00\x00"  # no extensions
            + b"\x04\x03"  # SHA-256, ECDSA
            + len(sig).to_bytes(2, "big")
            + sig
        )
        scts += len(body).to_bytes(2, "big") + body
    tls = len(scts).to_bytes(2, "big") + scts
    return b"\x04" + _der_length(len(tls)) + tls


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


@dataclass(frozen=True)
class Installation:
    """One key's CSR for one name (a new installation's request)."""

    name: str
    csr_der: bytes
    spki_der: bytes
    key: ec.EllipticCurvePrivateKey

    @property
    def request_key(self) -> str:
        # csrproxy.issuance.csr.CheckedCSR.request_key
        return hashlib.sha256(self.spki_der + b"\0" + self.name.encode()).hexdigest()

    @property
    def spki_sha256(self) -> str:
        return hashlib.sha256(self.spki_der).hexdigest()


def new_installation(name: str) -> Installation:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .sign(key, hashes.SHA256())
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Installation(name, csr.public_bytes(serialization.Encoding.DER), spki, key)


class LeafSigner:
    """Signs leaves with a :class:`BenchCA` (its key loaded once per process)."""

    def __init__(self, ca: BenchCA) -> None:
        self.ca = ca
        key = serialization.load_pem_private_key(ca.key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._key = key
        self._issuer = x509.load_pem_x509_certificate(ca.cert_pem).subject
        self._aki = x509.AuthorityKeyIdentifier(ca.ski, None, None)
        self._aia = _aia(f"http://e9.i.{ca.zone}/")

    def leaf(
        self, inst: Installation, not_before: float, not_after: float, shard: int
    ) -> x509.Certificate:
        """The leaf for ``inst``; ``shard`` picks one of its CA's CRLs (as Let's Encrypt's
        128 shards)."""
        public = inst.key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, inst.name)]))
            .issuer_name(self._issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(not_before, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(not_after, datetime.UTC))
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
            .add_extension(self._aki, False)
            .add_extension(self._aia, False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(inst.name)]), False)
            .add_extension(_DV_POLICY, False)
            .add_extension(_crl(f"http://e9.c.{self.ca.zone}/{shard % 128}.crl"), False)
            .add_extension(
                x509.UnrecognizedExtension(
                    _SCT_OID, sct_list(self.ca.log_ids, int(not_before * 1000))
                ),
                False,
            )
            .sign(self._key, hashes.SHA256())
        )
