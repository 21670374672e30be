"""The built-in zone's SOA serial in the state database: one ``zones`` row per origin.

The serial is the Unix time of the latest change, or one more than the serial before
when changes come faster than one a second (``csrproxy.dns.zone.next_serial``); after a
restart it must still rise, or secondaries keep the copy they have (RFC 1982). The daemon
reads the row once at start and records every change through the store's one thread;
:class:`SerialRecorder` keeps at most one write in flight and one waiting (the newest
serial), so a burst of changes costs two writes.
"""

from __future__ import annotations

import time

from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.state.database import StateDB
from csrproxy.state.store import Store

log = Logger()


def load_serial(db: StateDB, origin: str) -> int | None:
    """The serial recorded for ``origin``, or None."""
    row = db.conn.execute("SELECT serial FROM zones WHERE origin = ?", (origin,)).fetchone()
    return None if row is None else int(row[0])


def save_serial(db: StateDB, origin: str, serial: int) -> None:
    """Record ``serial`` as ``origin``'s."""
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO zones (origin, serial, updated) VALUES (?, ?, ?) ON CONFLICT (origin) "
            "DO UPDATE SET serial = excluded.serial, updated = excluded.updated",
            (origin, serial, time.time()),
        )


class SerialRecorder:
    """A ``ChallengeZone.on_serial`` listener recording each serial of ``origin`` through
    ``store``: call it with the serial.

    A failed write logs one line until a write works again, and fails nothing else.
    """

    def __init__(self, store: Store, origin: str) -> None:
        self.store = store
        self.origin = origin
        self._busy = False
        self._waiting: int | None = None
        self._failing = False

    def __call__(self, serial: int) -> None:
        if self._busy:
            self._waiting = serial
            return
        self._busy = True
        self.store.run(save_serial, self.store.db, self.origin, serial).addBoth(self._done)

    def _done(self, result: object) -> None:
        self._busy = False
        if isinstance(result, Failure):
            if not self._failing:
                self._failing = True
                log.warn("zone serial not recorded: {err}", err=result.getErrorMessage())
        elif self._failing:
            self._failing = False
            log.info("zone serial recorded again")
        if self._waiting is not None:
            serial, self._waiting = self._waiting, None
            self(serial)
