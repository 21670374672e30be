"""Certificate facts the ACME client needs: chain matching and ARI certificate ids."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID
from josepy.b64 import b64encode


def load_chain(pem: str | bytes) -> list[x509.Certificate]:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificates(data)


def _cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def top_issuer_cn(pem: str | bytes) -> str | None:
    """The issuer CN of the topmost certificate of a chain (how certbot and lego pick chains)."""
    chain = load_chain(pem)
    return _cn(chain[-1].issuer) if chain else None


def chain_issuer_cns(pem: str | bytes) -> list[str]:
    return [cn for c in load_chain(pem) if (cn := _cn(c.issuer)) is not None]


def ari_cert_id(cert: x509.Certificate) -> str:
    """The RFC 9773 certificate id: base64url(AKI keyIdentifier) "." base64url(serial)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise ValueError("the certificate has no authorityKeyIdentifier") from None
    if aki.key_identifier is None:
        raise ValueError("the certificate's authorityKeyIdentifier has no keyIdentifier")
    serial = cert.serial_number
    # DER INTEGER content octets: big-endian, with a leading zero when the top bit is set.
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8, "big")
    return f"{b64encode(aki.key_identifier).decode()}.{b64encode(serial_bytes).decode()}"


@dataclass(frozen=True)
class RenewalWindow:
    """The CA's suggested renewal window (RFC 9773) and when to ask again."""

    start: datetime.datetime
    end: datetime.datetime
    retry_after: float | None = None
    explanation_url: str | None = None


def parse_window(doc: dict[str, object], retry_after: float | None) -> RenewalWindow:
    window = doc.get("suggestedWindow")
    if not isinstance(window, dict):
        raise ValueError("renewalInfo has no suggestedWindow")
    start = _rfc3339(window.get("start"))
    end = _rfc3339(window.get("end"))
    if end < start:
        raise ValueError("renewalInfo window ends before it starts")
    url = doc.get("explanationURL")
    return RenewalWindow(start, end, retry_after, url if isinstance(url, str) else None)


def _rfc3339(value: object) -> datetime.datetime:
    if not isinstance(value, str):
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when
