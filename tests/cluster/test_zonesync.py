"""ChallengeSync on a Clock, with a fake store and a fake LISTEN connection."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.cluster import zonesync
from csrproxy.cluster.zonesync import ChallengeSync, Listening
from csrproxy.dns.zone import ChallengeZone
from csrproxy.dns.zones import Zones
from csrproxy.errors import CsrproxyError

ORIGIN = "go.example.test"
A = "_acme-challenge.a." + ORIGIN
B = "_acme-challenge.b." + ORIGIN


class ThreadReactor(Clock):
    """A Clock with ``callFromThread``: calls are kept until :meth:`drain` (or run at once
    when ``immediate``, for a listener loop run on the test's own thread)."""

    def __init__(self, immediate: bool = False) -> None:
        super().__init__()
        self.immediate = immediate
        self.from_thread: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self._lock = threading.Lock()

    def callFromThread(self, f: Callable[..., object], *args: Any) -> None:
        if self.immediate:
            f(*args)
            return
        with self._lock:
            self.from_thread.append((f, args))

    def drain(self) -> int:
        with self._lock:
            calls, self.from_thread = self.from_thread, []
        for f, args in calls:
            f(*args)
        return len(calls)


class FakeDB:
    """``others_challenges`` from a list the test sets; counts the reads."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.reads = 0
        self.broken = False

    def others_challenges(self, backend: str = "builtin") -> list[tuple[str, str]]:
        assert backend == "builtin"
        self.reads += 1
        if self.broken:
            raise CsrproxyError("database gone")
        return list(self.rows)


class InlineStore:
    """Runs each call at once (as tests/support/renewals.py's), or, when ``held``, keeps
    its Deferred for the test to fire with :meth:`release`."""

    def __init__(self, db: FakeDB) -> None:
        self.db = db
        self.held = False
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run(self, method: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.held:
            d: Deferred[Any] = Deferred()
            self.pending.append((method, args, d))
            return d
        try:
            return succeed(method(*args))
        except Exception:
            return fail()

    def release(self) -> None:
        method, args, d = self.pending.pop(0)
        d.callback(method(*args))


class IdleListening:
    """A LISTEN connection that never hears anything: each ``notifies`` waits for its
    ``timeout``, or until ``wake`` is set (the test's cleanup, to end the thread at once)."""

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def notifies(self, timeout: float) -> Iterable[str]:
        self.wake.wait(timeout)
        return []

    def close(self) -> None:
        pass


class ScriptedListening:
    """Hears the scripted batches, one per ``notifies`` call (an exception is raised);
    when they run out it stops ``sync`` (the test runs the loop on its own thread)."""

    def __init__(self, sync: Callable[[], ChallengeSync], batches: list[Any]) -> None:
        self.sync = sync
        self.batches = list(batches)
        self.timeouts: list[float] = []
        self.closed = False

    def notifies(self, timeout: float) -> Iterator[str]:
        self.timeouts.append(timeout)
        if not self.batches:
            self.sync()._stop.set()
            return
        batch = self.batches.pop(0)
        if isinstance(batch, Exception):
            raise batch
        yield from batch

    def close(self) -> None:
        self.closed = True


def zone() -> ChallengeZone:
    return ChallengeZone(ORIGIN, ["ns1." + ORIGIN], ["@ A 127.0.0.1"], serial=1)


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadReactor()
        self.db = FakeDB()
        self.store = InlineStore(self.db)
        self.zone = zone()
        self.wake = threading.Event()
        self.sync = self.make()

    def make(self, listen: Callable[[], Listening] | None = None, **kw: Any) -> ChallengeSync:
        return ChallengeSync(
            self.reactor,
            self.store,  # type: ignore[arg-type]
            self.zone,
            "postgresql://u@127.0.0.1:1/db",
            "ns2",
            listen=listen or (lambda: IdleListening(self.wake)),
            **kw,
        )

    def start(self) -> None:
        self.sync.startService()

        def stop() -> None:
            if self.sync.running:
                self.sync.stopService()
            self.wake.set()
            if self.sync.thread is not None:
                self.sync.thread.join(2)  # gone within POLL once stopped
                assert not self.sync.thread.is_alive()

        self.addCleanup(stop)


class ResyncTests(Base):
    def test_multiset_diff(self) -> None:
        self.start()
        self.assertEqual(self.db.reads, 1)  # the first resync, at the start
        self.db.rows = [(A, "v"), (A, "v"), (B, "w")]
        self.successResultOf(self.sync.resync())
        self.assertEqual(self.zone.txt_values(A), ("v", "v"))
        self.assertEqual(self.zone.txt_values(B), ("w",))
        self.assertEqual(self.sync.served, Counter({(A, "v"): 2, (B, "w"): 1}))
        self.db.rows = [(A, "v")]
        self.successResultOf(self.sync.resync())
        self.assertEqual(self.zone.txt_values(A), ("v",))
        self.assertEqual(self.zone.txt_values(B), ())
        self.assertEqual(self.sync.served, Counter({(A, "v"): 1}))
        self.assertEqual(self.sync.resyncs, 3)
        self.assertEqual(self.sync.last_resync, 0.0)

    def test_own_records_in_the_zone_are_left_alone(self) -> None:
        self.zone.add_txt(A, "v")  # this instance's own record, the same value
        self.start()
        self.db.rows = [(A, "v")]
        self.successResultOf(self.sync.resync())
        self.assertEqual(self.zone.txt_values(A), ("v", "v"))
        self.db.rows = []
        self.successResultOf(self.sync.resync())
        self.assertEqual(self.zone.txt_values(A), ("v",))

    def test_requests_while_running_coalesce_into_one_more(self) -> None:
        self.store.held = True
        self.start()
        self.assertEqual(len(self.store.pending), 1)
        first = self.sync.resync()
        for _ in range(100):
            self.sync.request_resync()
        self.assertEqual(len(self.store.pending), 1)  # never two at once
        self.db.rows = [(A, "v")]
        self.store.release()
        self.assertNoResult(first)  # it waits for a read made after it was asked
        self.assertEqual(len(self.store.pending), 1)  # exactly one more
        self.store.release()
        self.successResultOf(first)
        self.assertEqual(self.store.pending, [])
        self.assertEqual(self.db.reads, 2)
        self.assertEqual(self.zone.txt_values(A), ("v",))

    def test_a_failed_read_is_logged_once_and_retried_by_the_next(self) -> None:
        self.start()
        self.db.broken = True
        with capturedLogs() as logs:
            self.failureResultOf(self.sync.resync(), CsrproxyError)
            self.sync.request_resync()
            self.sync.request_resync()
            self.db.broken = False
            self.db.rows = [(A, "v")]
            self.successResultOf(self.sync.resync())
        texts = [e["log_format"] for e in logs]
        self.assertEqual(len(texts), 2, texts)  # broken, and back
        self.assertEqual(self.zone.txt_values(A), ("v",))

    def test_a_failed_read_is_retried_once_soon(self) -> None:
        self.start()
        self.db.broken = True
        self.failureResultOf(self.sync.resync(), CsrproxyError)
        self.assertEqual(self.db.reads, 2)
        self.reactor.advance(zonesync.RETRY_AFTER_FAILURE)
        self.assertEqual(self.db.reads, 3)  # the retry, failing again
        self.reactor.advance(60)
        self.assertEqual(self.db.reads, 3)  # then only the listener's periodic requests
        self.db.broken = False
        self.db.rows = [(A, "v")]
        self.sync.request_resync()
        self.assertEqual(self.zone.txt_values(A), ("v",))
        self.db.broken = True
        self.failureResultOf(self.sync.resync(), CsrproxyError)
        self.sync.stopService()
        retries = [
            c
            for c in self.reactor.getDelayedCalls()
            if getattr(c, "func", None) == self.sync._retried
        ]
        self.assertEqual(retries, [])  # cancelled

    def test_names_outside_the_zone_are_skipped_and_logged_once(self) -> None:
        self.start()
        self.db.rows = [("_acme-challenge.x.elsewhere.test", "v")] * 3 + [
            ("_acme-challenge.y.elsewhere.test", "w"),
            (A, "v"),
        ]
        with capturedLogs() as logs:
            self.successResultOf(self.sync.resync())
            self.successResultOf(self.sync.resync())
        self.assertEqual(len(logs), 1)
        self.assertEqual(logs[0]["count"], 2)
        self.assertEqual(self.sync.served, Counter({(A, "v"): 1}))
        self.assertEqual(self.zone.txt_values(A), ("v",))

    def test_stop_removes_what_was_served(self) -> None:
        self.zone.add_txt(A, "own")
        self.start()
        self.db.rows = [(A, "v"), (A, "v"), (B, "w")]
        self.successResultOf(self.sync.resync())
        self.store.held = True
        late = self.sync.resync()
        self.sync.stopService()
        self.assertEqual(self.zone.txt_values(A), ("own",))
        self.assertEqual(self.zone.txt_values(B), ())
        self.assertEqual(self.sync.served, Counter())
        self.successResultOf(late)
        self.store.release()  # a read that ends after the stop adds nothing
        self.assertEqual(self.zone.txt_values(B), ())
        self.sync.request_resync()  # nor does a notification heard late
        self.assertEqual(self.store.pending, [])

    def test_stop_waits_for_the_listener_at_most_a_second(self) -> None:
        self.start()
        stopped = self.sync.stopService()
        self.reactor.advance(zonesync.STOP_WAIT)
        self.successResultOf(stopped)


class ListenerTests(Base):
    """The listener loop, run on the test's thread, its calls to the reactor made at once."""

    def setUp(self) -> None:
        super().setUp()
        self.reactor.immediate = True
        self.sync.running = True
        self.waits: list[float] = []

        def wait(delay: float) -> bool:
            self.waits.append(delay)
            return self.sync._stop.is_set()

        self.sync._wait = wait

    def script(self, *connections: list[Any] | Exception) -> list[ScriptedListening]:
        made: list[ScriptedListening] = []
        plan = list(connections)

        def listen() -> Listening:
            step = plan.pop(0)
            if isinstance(step, Exception):
                if not plan:
                    self.sync._stop.set()
                raise step
            made.append(ScriptedListening(lambda: self.sync, step))
            return made[-1]

        self.sync._listen = listen
        return made

    def test_own_notifications_are_ignored(self) -> None:
        self.sync.resync_interval = 1000.0
        self.script([["ns2", "ns2"], ["ns2"], ["ns1"], ["ns2", "ns3"]])
        self.sync._listen_loop()
        # One at the connection, one for ns1's, one for ns3's.
        self.assertEqual(self.db.reads, 3)
        self.assertFalse(self.sync.connected)  # the loop ended

    def test_each_timeout_resyncs(self) -> None:
        self.sync.resync_interval = 0.0
        made = self.script([[], [], []])
        self.sync._listen_loop()
        [conn] = made
        self.assertEqual(conn.timeouts, [0.0] * 4)
        self.assertEqual(self.db.reads, 1 + 4)  # the connection's, and each timeout's

    def test_the_thread_queues_at_most_one_call(self) -> None:
        self.reactor.immediate = False
        self.sync.resync_interval = 1000.0
        self.script([["ns1"] * 1000, ["ns3"] * 1000])
        self.sync._listen_loop()
        resyncs = [c for c in self.reactor.from_thread if c[0] == self.sync._resync_from_thread]
        self.assertEqual(len(resyncs), 1)
        self.reactor.drain()
        self.assertEqual(self.db.reads, 1)

    def test_reconnects_with_backoff_logging_once(self) -> None:
        self.sync.resync_interval = 1000.0
        down = psycopg.OperationalError("server closed the connection unexpectedly")
        refused = psycopg.OperationalError("connection refused")
        seen: list[bool] = []
        set_connected = self.sync._set_connected

        def record(connected: bool, err: str) -> None:
            set_connected(connected, err)
            seen.append(connected)

        self.sync._set_connected = record  # type: ignore[method-assign]
        made = self.script([[], down], *[refused] * 7, [["ns1"]])
        with capturedLogs() as logs:
            self.sync._listen_loop()
        self.assertEqual(self.waits, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 1.0])
        self.assertEqual(seen, [True] + [False] * 8 + [True])
        self.assertEqual(len(logs), 3, [e["log_format"] for e in logs])  # up, down, back
        self.assertTrue(all(c.closed for c in made))
        # Resyncs: at each connection (2), at each failed wait (7) and for ns1's change.
        self.assertEqual(self.db.reads, 2 + 7 + 1)

    def test_a_bug_in_the_listener_is_logged(self) -> None:
        def listen() -> Listening:
            raise RuntimeError("bug")

        self.sync._listen = listen
        with capturedLogs() as logs:
            self.sync._listen_loop()
        [event] = logs
        self.assertIn("no longer served", event["log_format"])
        self.assertFalse(self.sync.connected)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_interrupts_the_backoff(self) -> None:
        self.sync._wait = self.sync._stop.wait  # the real wait, stopped during it
        refused = psycopg.OperationalError("connection refused")

        def listen() -> Listening:
            self.sync._stop.set()
            raise refused

        self.sync._listen = listen
        self.sync._listen_loop()  # returns at once: the wait is interrupted
        self.assertFalse(self.sync.connected)


class SeveralZonesTests(Base):
    """With ``[dns] zones`` each record of the other instances goes into its own zone."""

    OTHER = "go-other.example.net"

    def setUp(self) -> None:
        super().setUp()
        self.second = ChallengeZone(self.OTHER, ["ns1." + ORIGIN], ["@ A 127.0.0.1"], serial=1)
        self.zones = Zones([zone(), self.second])
        self.zone = self.zones  # type: ignore[assignment]
        self.sync = self.make()

    def test_each_record_in_its_zone_and_outsiders_skipped(self) -> None:
        self.start()
        c = "_acme-challenge.c." + self.OTHER
        self.db.rows = [(A, "v"), (c, "w"), ("_acme-challenge.x.example.org", "z")]
        with capturedLogs() as logs:
            self.successResultOf(self.sync.resync())
        first, second = self.zones
        self.assertEqual(first.txt_values(A), ("v",))
        self.assertEqual(second.txt_values(c), ("w",))
        self.assertEqual(first.challenge_names(), (A,))
        [warned] = [e for e in logs if "skips" in e["log_format"]]
        self.assertEqual(warned["zone"], f"{ORIGIN}, {self.OTHER}")
        self.db.rows = []
        self.successResultOf(self.sync.resync())
        self.assertEqual(second.txt_values(c), ())
