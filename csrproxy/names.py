"""DNS names and the ``[policy] names`` patterns: pure rules the configuration checks
with and the issuance policy matches with.

A pattern is a literal name, or labels written as ``{label}`` (exactly one DNS label),
``{key}`` (the label derived from the CSR's public key, see :func:`key_label`) or ``{ip}``
(an address written as a label, :mod:`csrproxy.addresses`).  A
leading ``*.`` is the literal wildcard label of a wildcard certificate name.  Pure
logic: no I/O, nothing of csrproxy's rooms.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from csrproxy.addresses import Address, address_of_label

#: The key types a CSR may carry, by their ``[policy] key_types`` names: what Let's
#: Encrypt accepts.
CSR_KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "ec256", "ec384")

_LDH = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PLACEHOLDERS = ("{label}", "{key}", "{ip}")
#: What key_label() makes: 32 base32 characters.
_KEY_SHAPED = re.compile(r"^[a-z2-7]{32}$")


def key_label(spki_der: bytes) -> str:
    """A stable DNS label for a public key: base32 of 160 bits of SHA-256(SPKI), lowercase."""
    digest = hashlib.sha256(spki_der).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def is_key_label(label: str) -> bool:
    """True for a label shaped like :func:`key_label`'s (32 base32 characters)."""
    return bool(_KEY_SHAPED.match(label))


def is_ldh_label(label: str) -> bool:
    """True for a letter-digit-hyphen label of 1..63 characters (lowercase)."""
    return bool(_LDH.match(label))


def is_issuer_domain(text: str) -> bool:
    """True for a CA's issuer domain name (RFC 8659 4.2: LDH labels, dot-separated)."""
    # isprintable: _LDH's "$" would let a label end in a newline.
    return (
        len(text) <= 253
        and text.isprintable()
        and all(is_ldh_label(label) for label in text.lower().split("."))
    )


@dataclass(frozen=True)
class NamePattern:
    """One ``[policy] names`` entry, split into labels."""

    text: str
    labels: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> NamePattern:
        """Parse a pattern; raises ValueError with a clear message for a bad one."""
        norm = text.strip().lower()
        if not norm or norm.endswith("."):
            raise ValueError(f"{text!r} is not a name pattern (empty or trailing dot)")
        labels = tuple(norm.split("."))
        for i, label in enumerate(labels):
            if label in _PLACEHOLDERS:
                continue
            if label == "*" and i == 0:
                continue
            if not is_ldh_label(label):
                raise ValueError(
                    f"{text!r}: label {label!r} is neither a DNS label, "
                    "'{label}', '{key}', '{ip}' nor a leading '*'"
                )
        if len(labels) < 2:
            raise ValueError(f"{text!r} needs at least two labels")
        return cls(text=norm, labels=labels)

    def zone_in(self, zones: Sequence[str]) -> str | None:
        """The zone of ``zones`` (lowercase, no trailing dot) this pattern's names are in:
        the longest whose labels end the pattern literally; None when outside them all."""
        found = None
        for zone in zones:
            tail = tuple(zone.split("."))
            if self.labels[-len(tail) :] == tail and (found is None or len(zone) > len(found)):
                found = zone
        return found

    def relative_to(self, zone: str) -> tuple[str, ...]:
        """The labels below ``zone`` (which :meth:`zone_in` gave): ``("{key}",)`` for
        ``{key}.go.example.com`` in ``go.example.com``; the same in every zone means the
        same kind of name."""
        return self.labels[: len(self.labels) - len(zone.split("."))]

    def matches(self, name: str, key: str | None) -> bool:
        """True when ``name`` (lowercase, no trailing dot) fits this pattern."""
        parts = name.split(".")
        if len(parts) != len(self.labels):
            return False
        for want, got in zip(self.labels, parts, strict=True):
            if want == "{ip}":
                if address_of_label(got) is None:
                    return False
            elif want == "{label}":
                # A label shaped like a key label is only ever that key's own.
                if not is_ldh_label(got) or (_KEY_SHAPED.match(got) and got != key):
                    return False
            elif want == "{key}":
                if key is None or got != key:
                    return False
            elif want != got:
                return False
        return True

    def addresses(self, name: str) -> list[Address]:
        """The addresses ``name``'s ``{ip}`` labels carry (it must match this pattern)."""
        found = []
        for want, got in zip(self.labels, name.split("."), strict=False):
            if want == "{ip}" and (address := address_of_label(got)) is not None:
                found.append(address)
        return found

    def offer(self, key: str) -> str:
        """This pattern with ``{key}`` filled in (``{label}`` stays, for the client to choose)."""
        return ".".join(key if label == "{key}" else label for label in self.labels)

    def example(self, key: str | None) -> str | None:
        """The name this pattern gives for ``key`` when it has no ``{label}`` (or ``{ip}``),
        else None."""
        if (
            "{label}" in self.labels
            or "{ip}" in self.labels
            or (key is None and "{key}" in self.labels)
        ):
            return None
        return ".".join(key if (label == "{key}" and key) else label for label in self.labels)


def subject_common_name(subject: str) -> str:
    """The CN of an RFC 4514 subject (seed mode); ValueError when it has none or is bad."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError as e:
        raise ValueError(f"{subject!r} is not an RFC 4514 subject: {e}") from None
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise ValueError(f"{subject!r} must have exactly one CN")
    return str(cns[0].value).lower()


__all__ = [
    "CSR_KEY_TYPES",
    "NamePattern",
    "is_ldh_label",
    "key_label",
    "subject_common_name",
]
