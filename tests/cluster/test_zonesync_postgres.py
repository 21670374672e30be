"""ChallengeSync on a real PostgreSQL and the real reactor: one instance's challenge
record served by another's zone, through LISTEN/NOTIFY, and after a dropped connection."""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from typing import Any, ClassVar

import psycopg
import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from csrproxy.cluster.zonesync import ChallengeSync
from csrproxy.dns.zone import ChallengeZone
from csrproxy.state.database import StateDB
from csrproxy.state.store import Store
from csrproxy.testing.postgres import Postgres, available, start_postgres
from tests.support.polling import until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="PostgreSQL server binaries not installed"),
]

ORIGIN = "go.example.test"
A = "_acme-challenge.a." + ORIGIN
_names = itertools.count()


class ZoneSyncPostgresTests(TestCase):
    server: ClassVar[Postgres]

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = start_postgres(tempfile.mkdtemp(prefix="csrproxy-pgsync-"))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def setUp(self) -> Deferred[float]:  # type: ignore[override]
        self.dbname = f"zonesync_{next(_names)}"
        dsn = self.server.fresh_database(self.dbname)
        self.ns1 = StateDB(dsn, "ns1")
        self.addCleanup(self.ns1.close)
        store = Store(global_reactor, StateDB(dsn, "ns2"))
        store.start()
        self.addCleanup(store.stop)
        self.zone = ChallengeZone(ORIGIN, ["ns1." + ORIGIN], ["@ A 127.0.0.1"])
        # Longer than the tests: what they see comes from notifications and reconnections.
        self.sync = ChallengeSync(global_reactor, store, self.zone, dsn, "ns2", resync_interval=60)
        self.sync.startService()
        self.addCleanup(self.stop)
        return until(global_reactor, lambda: self.sync.connected and self.sync.resyncs > 0)

    def stop(self) -> Deferred[None] | None:
        if not self.sync.running:
            return None
        stopped: Deferred[None] = self.sync.stopService()
        return stopped

    def served(self, value: str) -> Callable[[], bool]:
        return lambda: value in self.zone.txt_values(A)

    def write(self, call: Callable[..., Any], *args: Any) -> None:
        # ns1's own connection, dropped too, fails one call and is then replaced.
        try:
            call(*args)
        except psycopg.OperationalError:
            call(*args)

    @inlineCallbacks
    def test_a_record_of_ns1_is_served_by_ns2_and_removed(self) -> Any:
        latencies = []
        for i in range(5):
            start = time.monotonic()
            self.ns1.add_challenge(f"o{i}", A, f"v{i}", "builtin")
            yield until(global_reactor, self.served(f"v{i}"), timeout=1.0, step=0.001)
            latencies.append(time.monotonic() - start)
        self.ns1.add_challenge("o9", A, "v0", "builtin")  # the same value twice: two records
        yield until(global_reactor, lambda: self.zone.txt_values(A).count("v0") == 2, 1.0)
        for i in range(5):
            self.ns1.remove_challenge(A, f"v{i}")
        yield until(global_reactor, lambda: self.zone.txt_values(A) == ("v0",), timeout=1.0)
        print(
            f"ns1 add -> ns2 serves: max {max(latencies) * 1000:.1f} ms, "
            f"all {[round(x * 1000, 1) for x in latencies]} ms"
        )
        yield self.sync.stopService()
        self.assertEqual(self.zone.txt_values(A), ())

    @inlineCallbacks
    def test_own_records_are_not_served_twice(self) -> Any:
        store = self.sync.store
        yield store.run(store.db.add_challenge, "o1", A, "mine", "builtin")
        self.ns1.add_challenge("o2", A, "theirs", "builtin")
        yield until(global_reactor, self.served("theirs"), timeout=1.0)
        self.assertEqual(self.zone.txt_values(A), ("theirs",))

    @inlineCallbacks
    def test_the_listener_reconnects_and_resyncs(self) -> Any:
        self.server.terminate_connections(self.dbname)
        yield until(global_reactor, lambda: not self.sync.connected, what="disconnected")
        self.write(self.ns1.add_challenge, "o1", A, "while-down", "builtin")
        down_at_commit = not self.sync.connected
        start = time.monotonic()
        yield until(global_reactor, lambda: self.sync.connected, what="reconnected")
        yield until(global_reactor, self.served("while-down"), timeout=5.0)
        print(f"record added while down served {time.monotonic() - start:.2f} s later")
        self.assertTrue(down_at_commit)
        # And notifications work again on the new connection.
        self.ns1.add_challenge("o2", A, "after", "builtin")
        yield until(global_reactor, self.served("after"), timeout=1.0)
