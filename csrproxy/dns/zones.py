"""Several zones served by one server: the :class:`ChallengeZone` of a name.

:class:`Zones` holds one :class:`ChallengeZone` per configured zone (``[dns] zones``,
in configuration order) and routes each name to the zone it lies in: the zone whose
origin is the longest suffix of the name (zones do not nest, so there is at most one).
It offers what the server factory and the publishers ask of one zone (``query``,
``contains``, ``version``, ``add_txt``...), so they serve and publish into every zone
alike. Pure logic: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.names import dns, error

from csrproxy.dns import records as rr
from csrproxy.dns.zone import ChallengeZone, Result


class Zones:
    """The zones of ``zones`` (at least one, none below another), first one first.

    ``version`` rises whenever any zone's does: caches of answers are dropped on it.
    A name outside every zone fails ``query`` with ``DomainError`` (REFUSED) and
    ``add_txt`` with ``ValueError``, as one zone does.
    """

    def __init__(self, zones: Sequence[ChallengeZone]) -> None:
        if not zones:
            raise ValueError("at least one zone is needed")
        self._zones = tuple(zones)
        self._by_origin: dict[bytes, ChallengeZone] = {}
        for zone in self._zones:
            key = rr.normalize_name(zone.origin)
            for other in self._by_origin:
                if rr.is_within(key, other) or rr.is_within(other, key):
                    raise ValueError(f"zones must not nest: {zone.origin}, {rr.name_text(other)}")
            self._by_origin[key] = zone
        self._depths = sorted({len(k.split(b".")) for k in self._by_origin}, reverse=True)

    @classmethod
    def of(cls, zone: ChallengeZone | Zones) -> Zones:
        """``zone`` itself when it is a :class:`Zones`, else the one zone as one."""
        return zone if isinstance(zone, Zones) else cls([zone])

    # -- the zones ---------------------------------------------------------

    def __iter__(self) -> Iterator[ChallengeZone]:
        return iter(self._zones)

    def __len__(self) -> int:
        return len(self._zones)

    @property
    def first(self) -> ChallengeZone:
        """The first zone (``[dns] zone``)."""
        return self._zones[0]

    @property
    def origin(self) -> str:
        """The first zone's origin (code that knows one zone keeps working)."""
        return self._zones[0].origin

    @property
    def origins(self) -> tuple[str, ...]:
        return tuple(zone.origin for zone in self._zones)

    @property
    def challenge_ttl(self) -> int:
        """The longest challenge TTL of the zones (how long a cache may keep an answer)."""
        return max(zone.challenge_ttl for zone in self._zones)

    @property
    def version(self) -> int:
        """Rises with every change of any zone (each zone's version only rises)."""
        return sum(zone.version for zone in self._zones)

    def at(self, origin: bytes | str) -> ChallengeZone | None:
        """The zone whose origin is exactly ``origin`` (any case, trailing dot or not)."""
        if isinstance(origin, str):
            origin = origin.encode("ascii", "replace")
        return self._by_origin.get(origin.lower().rstrip(b"."))

    def find(self, name: bytes | str) -> ChallengeZone | None:
        """The zone ``name`` is in (its apex or below it), or None."""
        if isinstance(name, str):
            name = name.encode("ascii", "replace")
        labels = name.lower().rstrip(b".").split(b".")
        for depth in self._depths:  # deepest first: the longest suffix wins
            if depth <= len(labels):
                found = self._by_origin.get(b".".join(labels[-depth:]))
                if found is not None:
                    return found
        return None

    def on_serial(self, listener: Callable[[str, int], None]) -> Callable[[], None]:
        """Call ``listener(origin, serial)`` after each change of any zone's serial;
        returns the call that stops it."""

        def of(origin: str) -> Callable[[int], None]:
            return lambda serial: listener(origin, serial)

        stops = [zone.on_serial(of(zone.origin)) for zone in self._zones]

        def stop() -> None:
            for each in stops:
                each()

        return stop

    def status(self) -> list[dict[str, Any]]:
        """Per zone, in order: its origin, SOA serial, records served (the SOA once, as a
        transfer holds them) and challenge names (for health and metrics)."""
        return [
            {
                "origin": zone.origin,
                "serial": zone.serial,
                "records": len(zone.transfer_records()),
                "challenges": len(zone.challenge_names()),
            }
            for zone in self._zones
        ]

    # -- answering, as one zone does ----------------------------------------

    def contains(self, name: bytes) -> bool:
        return self.find(name) is not None

    def query(self, query: dns.Query, timeout: object = None) -> Deferred[Result]:
        zone = self.find(query.name.name)
        if zone is None:
            return fail(error.DomainError(query.name.name))
        return zone.query(query, timeout)

    def wildcard_owner(self, name: bytes) -> bytes | None:
        zone = self.find(name)
        return None if zone is None else zone.wildcard_owner(name)

    # -- challenge records, each in its zone -----------------------------------

    def _zone_of(self, name: str) -> ChallengeZone:
        zone = self.find(name)
        if zone is None:
            raise ValueError(f"{name} is outside the zones {', '.join(self.origins)}")
        return zone

    def add_txt(self, name: str, value: str) -> None:
        """:meth:`ChallengeZone.add_txt` in the zone of ``name``."""
        self._zone_of(name).add_txt(name, value)

    def remove_txt(self, name: str, value: str) -> None:
        """:meth:`ChallengeZone.remove_txt` in the zone of ``name`` (outside: a no-op)."""
        zone = self.find(name)
        if zone is not None:
            zone.remove_txt(name, value)

    def txt_values(self, name: str) -> tuple[str, ...]:
        zone = self.find(name)
        return () if zone is None else zone.txt_values(name)

    def challenge_names(self) -> tuple[str, ...]:
        return tuple(name for zone in self._zones for name in zone.challenge_names())

    def watch(self, identifier: str) -> Deferred[None]:
        """The ``watch`` of the zone of ``identifier`` (a ``WatchedZone``'s): fires at the
        next look-up of its challenge record; never, outside the zones."""
        base = identifier[2:] if identifier.startswith("*.") else identifier
        zone: Any = self.find(base)
        watch = getattr(zone, "watch", None)
        if watch is None:
            return Deferred()
        seen: Deferred[None] = watch(identifier)
        return seen
