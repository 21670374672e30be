"""The zone's recent changes, one per serial change, for IXFR (RFC 1995).

A :class:`Change` is what a secondary must do to go from ``old_serial`` to
``new_serial``: delete ``deleted``, add ``added``. Secondaries hold RRsets (sets),
so a change is the change of the distinct records: it can be empty while the serial
still moves (a challenge value served twice, one copy removed).

Bound: a :class:`ZoneHistory` holds at most ``max_changes`` changes (default
``HISTORY_CHANGES``) and at most ``max_records`` deleted and added records in all
(default ``HISTORY_RECORDS``); the oldest changes are dropped first, and a change
alone over ``max_records`` empties the history. A change costs under 1 KiB with
the longest names and a dns-01 value (measured), so the defaults hold a few MiB at
most. A secondary whose serial is older than the oldest change kept gets the whole
zone (AXFR). The history lives in memory only: after a restart it is empty.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twisted.names import dns

HISTORY_CHANGES = 1000
HISTORY_RECORDS = 4000


@dataclass(frozen=True)
class Change:
    """One serial change: the records deleted, then the records added."""

    old_serial: int
    new_serial: int
    deleted: tuple[dns.RRHeader, ...]
    added: tuple[dns.RRHeader, ...]

    @property
    def size(self) -> int:
        """The records this change holds."""
        return len(self.deleted) + len(self.added)


class ZoneHistory:
    """The latest changes of a zone, oldest first, within ``max_changes`` changes and
    ``max_records`` records (see the module docstring)."""

    def __init__(
        self, max_changes: int = HISTORY_CHANGES, max_records: int = HISTORY_RECORDS
    ) -> None:
        self.max_changes = max_changes
        self.max_records = max_records
        self._changes: deque[Change] = deque()
        self._records = 0

    def __len__(self) -> int:
        return len(self._changes)

    @property
    def records(self) -> int:
        """The deleted and added records held, in all."""
        return self._records

    def record(self, change: Change) -> None:
        """Keep ``change`` (the newest), dropping the oldest beyond the bounds."""
        if self._changes and self._changes[-1].new_serial != change.old_serial:
            self.clear()  # not contiguous: the older changes lead nowhere
        self._changes.append(change)
        self._records += change.size
        while self._changes and (
            len(self._changes) > self.max_changes or self._records > self.max_records
        ):
            self._records -= self._changes.popleft().size

    def clear(self) -> None:
        self._changes.clear()
        self._records = 0

    def since(self, serial: int) -> list[Change] | None:
        """The changes from ``serial`` to the newest, in order; None when ``serial`` is
        not the old serial of a change kept (unknown, or already dropped)."""
        for index, change in enumerate(self._changes):
            if change.old_serial == serial:
                return list(self._changes)[index:]
        return None
