"""Which names a caller may have.

Patterns come from ``[policy] names``: a literal name, or labels written as
``{label}`` (exactly one DNS label) or ``{key}`` (the label derived from the
CSR's public key, see :func:`key_label`).  A leading ``*.`` is the literal
wildcard label of a wildcard certificate name.  Pure logic: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from csrproxy.errors import NameNotAllowed

_LDH = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PLACEHOLDERS = ("{label}", "{key}")


def key_label(spki_der: bytes) -> str:
    """A stable DNS label for a public key: base32 of 160 bits of SHA-256(SPKI), lowercase."""
    digest = hashlib.sha256(spki_der).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def is_ldh_label(label: str) -> bool:
    """True for a letter-digit-hyphen label of 1..63 characters (lowercase)."""
    return bool(_LDH.match(label))


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
                    "'{label}', '{key}' nor a leading '*'"
                )
        if len(labels) < 2:
            raise ValueError(f"{text!r} needs at least two labels")
        return cls(text=norm, labels=labels)

    def matches(self, name: str, key: str | None) -> bool:
        """True when ``name`` (lowercase, no trailing dot) fits this pattern."""
        parts = name.split(".")
        if len(parts) != len(self.labels):
            return False
        for want, got in zip(self.labels, parts, strict=True):
            if want == "{label}":
                if not is_ldh_label(got):
                    return False
            elif want == "{key}":
                if key is None or got != key:
                    return False
            elif want != got:
                return False
        return True

    def example(self, key: str | None) -> str | None:
        """The name this pattern gives for ``key`` when it has no ``{label}``, else None."""
        if "{label}" in self.labels or (key is None and "{key}" in self.labels):
            return None
        return ".".join(key if (label == "{key}" and key) else label for label in self.labels)


class NamePolicy:
    """The set of name patterns a CSR's names must match."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: tuple[NamePattern, ...] = tuple(NamePattern.parse(p) for p in patterns)

    def allowed(self, name: str, key: str | None = None) -> bool:
        return any(p.matches(name, key) for p in self.patterns)

    def check(self, names: Sequence[str], key: str | None = None) -> None:
        """Raise :class:`NameNotAllowed` listing every name no pattern allows."""
        bad = [n for n in names if not self.allowed(n, key)]
        if bad:
            raise NameNotAllowed(
                f"not allowed by policy: {', '.join(bad)} "
                f"(allowed: {', '.join(p.text for p in self.patterns)})",
                bad,
            )

    def names_for_key(self, key: str) -> list[str]:
        """The concrete names a key may have without choosing a label itself."""
        return [n for p in self.patterns if (n := p.example(key)) is not None]
