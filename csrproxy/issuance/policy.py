"""Which names a caller may have: the ``[policy] names`` patterns (their syntax is
:mod:`csrproxy.names`') applied to a CSR's names.  Pure logic: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from csrproxy.errors import NameNotAllowed, SubjectNotAllowed
from csrproxy.names import NamePattern, subject_common_name


class NamePolicy:
    """The set of name patterns a CSR's names must match; in seed mode also the exact
    subject (``[policy] subject``), whose CN is then the default name."""

    def __init__(self, patterns: Iterable[str], subject: str | None = None) -> None:
        patterns = list(patterns)
        if subject is not None and not patterns:
            patterns = [subject_common_name(subject)]
        self.patterns: tuple[NamePattern, ...] = tuple(NamePattern.parse(p) for p in patterns)
        self.subject = subject

    def check_subject(self, subject: str) -> None:
        """Seed mode: raise :class:`SubjectNotAllowed` unless ``subject`` is exactly it."""
        if self.subject is not None and subject != self.subject:
            raise SubjectNotAllowed(
                f"the CSR's subject {subject!r} is not the configured {self.subject!r}",
                subject,
            )

    def offer(self, key: str) -> list[str]:
        """What ``GET /v1/name`` shows a key: names with ``{key}`` filled in, and
        ``{label}`` patterns as patterns."""
        return list(dict.fromkeys(p.offer(key) for p in self.patterns))

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
