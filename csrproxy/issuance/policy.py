"""Which names a caller may have: the ``[policy] names`` patterns (their syntax is
:mod:`csrproxy.names`') applied to a CSR's names.  Pure logic: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from csrproxy.addresses import DEFAULT_RANGES, Address, Network, within
from csrproxy.errors import NameNotAllowed, SubjectNotAllowed
from csrproxy.names import NamePattern, is_key_label, subject_common_name

#: Whether a zone (its origin) has room for one more new certificate this week: the
#: budget of its registered domain (``[dns] zones``, ``GET /v1/name``).
ZoneRoom = Callable[[str], bool]


def always_room(zone: str) -> bool:
    """A :data:`ZoneRoom` that never says no (no budget known)."""
    return True


class NamePolicy:
    """The set of name patterns a CSR's names must match; in seed mode also the exact
    subject (``[policy] subject``), whose CN is then the default name.

    ``zones`` are the zones the names are in (``[dns] zones``, in configuration order):
    patterns alike below their zones (``{key}.a.example`` and ``{key}.b.example``) are
    alternatives, of which :meth:`offer` gives one.
    """

    def __init__(
        self,
        patterns: Iterable[str],
        subject: str | None = None,
        zones: Sequence[str] = (),
        ip_ranges: Sequence[Network] = DEFAULT_RANGES,
    ) -> None:
        patterns = list(patterns)
        if subject is not None and not patterns:
            patterns = [subject_common_name(subject)]
        self.patterns: tuple[NamePattern, ...] = tuple(NamePattern.parse(p) for p in patterns)
        self.subject = subject
        self.zones = tuple(zones)
        #: The addresses an ``{ip}`` label may carry (``[policy] ip_ranges``).
        self.ip_ranges = tuple(ip_ranges)

    def check_subject(self, subject: str) -> None:
        """Seed mode: raise :class:`SubjectNotAllowed` unless ``subject`` is exactly it."""
        if self.subject is not None and subject != self.subject:
            raise SubjectNotAllowed(
                f"the CSR's subject {subject!r} is not the configured {self.subject!r}",
                subject,
            )

    def offer(
        self,
        key: str,
        room: ZoneRoom = always_room,
        usable: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """What ``GET /v1/name`` shows a key: names with ``{key}`` filled in, and
        ``{label}`` patterns as patterns, each only when ``usable`` (all, without it).

        Of patterns alike in several zones, one name: the one in the first zone (in
        ``zones`` order) that has ``room`` among the zones where any has a choice, so that
        the names of one certificate share a zone; else that pattern's first zone with
        room; else its first zone (the order then meets the budget's refusal).
        """
        groups: dict[tuple[str, ...], list[tuple[int, str]]] = {}
        for pattern in self.patterns:
            name = pattern.offer(key)
            if usable is not None and not usable(name):
                continue
            zone = pattern.zone_in(self.zones)
            if zone is None:
                groups.setdefault(("", name), []).append((0, name))  # an alternative of none
            else:
                place = (self.zones.index(zone), name)
                same = groups.setdefault(pattern.relative_to(zone), [])
                if place not in same:
                    same.append(place)
        asked: dict[int, bool] = {}

        def has_room(index: int) -> bool:
            if index not in asked:
                asked[index] = room(self.zones[index])
            return asked[index]

        choices = sorted({i for same in groups.values() if len(same) > 1 for i, _ in same})
        chosen = next((i for i in choices if has_room(i)), None)
        offered: list[str] = []
        for same in groups.values():
            same.sort()
            pick = next((n for i, n in same if i == chosen), None)
            if pick is None:
                pick = next((n for i, n in same if len(same) > 1 and has_room(i)), same[0][1])
            offered.append(pick)
        return list(dict.fromkeys(offered))

    def allowed(self, name: str, key: str | None = None) -> bool:
        return any(
            p.matches(name, key) and all(within(a, self.ip_ranges) for a in p.addresses(name))
            for p in self.patterns
        )

    def address_of(self, name: str) -> Address | None:
        """The address a name of an ``{ip}`` pattern stands for (the DNS answers it), when
        it is within ``ip_ranges``; any ``{key}`` label of the right shape counts (the DNS
        server cannot know whose key it is)."""
        for pattern in self.patterns:
            if "{ip}" not in pattern.labels or not pattern.matches(name, _key_of(pattern, name)):
                continue
            found = pattern.addresses(name)
            if len(found) == 1 and within(found[0], self.ip_ranges):
                return found[0]
        return None

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


def _key_of(pattern: NamePattern, name: str) -> str | None:
    """The label in ``name`` where ``pattern`` has ``{key}`` (None when it has none)."""
    for want, got in zip(pattern.labels, name.split("."), strict=False):
        if want == "{key}":
            return got if is_key_label(got) else None
    return None
