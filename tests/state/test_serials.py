"""The built-in zone's serial survives restarts (csrproxy.state.serials)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.dns.zone import ChallengeZone, next_serial
from csrproxy.state.database import StateDB
from csrproxy.state.serials import SerialRecorder, load_serial, save_serial
from tests.support.renewals import InlineStore

ORIGIN = "go.example.test"


class HeldStore(InlineStore):
    """Runs each call when ``release`` is called, in order: writes stay in flight."""

    def __init__(self, db: Any) -> None:
        super().__init__(db)
        self.held: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def run(self, method: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append((d, method, args))
        return d

    def release(self) -> None:
        d, method, args = self.held.pop(0)
        try:
            d.callback(method(*args))
        except Exception as e:
            d.errback(e)


class SerialTests(SynchronousTestCase):
    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, root)
        self.db = StateDB(root / "state.db")
        self.db.migrate()
        self.addCleanup(self.db.close)

    def test_none_until_saved_then_the_latest(self) -> None:
        self.assertIsNone(load_serial(self.db, ORIGIN))
        save_serial(self.db, ORIGIN, 5)
        save_serial(self.db, ORIGIN, 7)
        self.assertEqual(load_serial(self.db, ORIGIN), 7)
        self.assertIsNone(load_serial(self.db, "other.test"))

    def test_a_burst_costs_two_writes_and_records_the_newest(self) -> None:
        store = HeldStore(self.db)
        record = SerialRecorder(store, ORIGIN)  # type: ignore[arg-type]
        for serial in range(100, 110):
            record(serial)
        self.assertEqual(len(store.held), 1)
        store.release()
        self.assertEqual(load_serial(self.db, ORIGIN), 100)
        self.assertEqual(len(store.held), 1)
        store.release()
        self.assertEqual(load_serial(self.db, ORIGIN), 109)
        self.assertEqual(store.held, [])

    def test_a_failed_write_fails_nothing_and_the_next_one_is_made(self) -> None:
        calls = []

        class Failing(InlineStore):
            def run(self, method: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
                calls.append(args)
                if len(calls) == 1:
                    raise_later: Deferred[Any] = Deferred()
                    raise_later.errback(OSError("disk full"))
                    return raise_later
                return succeed(method(*args))

        record = SerialRecorder(Failing(self.db), ORIGIN)  # type: ignore[arg-type]
        record(1)
        record(2)
        self.assertEqual(load_serial(self.db, ORIGIN), 2)
        self.flushLoggedErrors()

    def test_after_a_burst_ahead_of_the_clock_a_restart_still_rises(self) -> None:
        now = 1_700_000_000.0
        zone = ChallengeZone(ORIGIN, ["ns1." + ORIGIN], [], clock=lambda: now)
        record = SerialRecorder(InlineStore(self.db), ORIGIN)  # type: ignore[arg-type]
        zone.on_serial(record)
        for i in range(50):  # fifty changes in one second run 50 ahead of the clock
            zone.add_txt("_acme-challenge." + ORIGIN, str(i))
        last = zone.serial
        self.assertEqual(last, int(now) + 50)
        recorded = load_serial(self.db, ORIGIN)
        assert recorded is not None
        again = ChallengeZone(
            ORIGIN, ["ns1." + ORIGIN], [], serial=next_serial(recorded, int(now) + 1)
        )
        self.assertEqual(again.serial, last + 1)
