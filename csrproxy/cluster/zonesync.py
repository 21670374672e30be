"""Serving the challenge records other instances publish (issue 16).

Instances sharing one PostgreSQL state database each answer DNS from their own
in-memory :class:`~csrproxy.dns.zone.ChallengeZone`. :class:`ChallengeSync` keeps
this instance's zone serving the builtin challenge records the others wrote: a
listener thread hears ``pg_notify('csrproxy_challenges', <instance>)`` and asks for a
resync, which reads :meth:`StateDB.others_challenges` on the store thread and applies
the difference to the zone. A resync also runs every ``resync_interval`` seconds and
after every (re)connection, so a lost notification only delays a record.

Bounds: ``served`` holds at most what the database holds of the other instances'
builtin records (one entry per row); at most one resync runs and one more is pending
(requests in between coalesce); the listener thread has at most one call queued for
the reactor however many notifications arrive; callers of :meth:`ChallengeSync.resync`
wait in a list (the daemon's few: health checks and tests), and the store's failure
schedules one retry timer at most.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import psycopg
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from csrproxy.dns.zone import ChallengeZone
from csrproxy.dns.zones import Zones
from csrproxy.state.cluster_queries import CHALLENGES_CHANNEL
from csrproxy.state.engine import redacted, with_options
from csrproxy.state.store import Store

log = Logger()

#: How often the listener thread looks at its stop event while it waits.
POLL = 0.25
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
#: How long stopService waits for the listener thread to end.
STOP_WAIT = 1.0
#: After a resync fails, one more this soon (the store's connection is often replaced at
#: the next call); then the periodic resyncs retry.
RETRY_AFTER_FAILURE = 1.0

Record = tuple[str, str]


class Listening(Protocol):
    """One connection that LISTENs on the challenges channel."""

    def notifies(self, timeout: float) -> Iterable[str]:
        """The payloads of the notifications heard within ``timeout`` seconds."""

    def close(self) -> None: ...


#: Opens a :class:`Listening` connection; raises ``psycopg.Error``/``OSError`` when it cannot.
ListenFactory = Callable[[], Listening]


class PostgresListening:
    """A dedicated autocommit psycopg connection that LISTENs on :data:`CHALLENGES_CHANNEL`."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(with_options(dsn), autocommit=True)
        try:
            self._conn.execute(f"LISTEN {CHALLENGES_CHANNEL}")
        except BaseException:
            self._conn.close()
            raise

    def notifies(self, timeout: float) -> Iterable[str]:
        return (n.payload for n in self._conn.notifies(timeout=timeout))

    def close(self) -> None:
        self._conn.close()


class ChallengeSync(Service):
    """Keeps ``zone`` (one, or :class:`Zones`: each record into its own zone) serving the
    ``backend`` challenge records of the other instances.

    ``served`` is what this service added to the zone (a multiset of (name, value));
    ``connected`` says whether the listener is connected, ``resyncs`` counts the
    resyncs applied and ``last_resync`` is the time of the latest (``reactor.seconds()``).
    Stopping removes everything in ``served`` from the zone.
    """

    def __init__(
        self,
        reactor: Any,
        store: Store,
        zone: ChallengeZone | Zones,
        dsn: str,
        instance: str,
        *,
        resync_interval: float = 5.0,
        backend: str = "builtin",
        listen: ListenFactory | None = None,
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.zone = zone
        self.instance = instance
        self.resync_interval = resync_interval
        self.backend = backend
        self._where = redacted(dsn)
        self._listen: ListenFactory = (
            listen if listen is not None else lambda: PostgresListening(dsn)
        )
        self.served: Counter[Record] = Counter()
        self.connected = False
        self.resyncs = 0
        self.last_resync: float | None = None
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        # The listener's backoff: returns True when stopped (interrupted) during the wait.
        self._wait: Callable[[float], bool] = self._stop.wait
        self._call_queued = threading.Event()
        self._running = False
        self._dirty = False
        self._waiting: list[Deferred[None]] = []  # for the resync after the running one
        self._current: list[Deferred[None]] = []  # for the running one
        self._read_failing = False
        self._retry: Any = None  # the IDelayedCall of the retry after a failure, if any
        self._skipped: frozenset[str] = frozenset()
        self._exited: Deferred[None] = Deferred()
        self._logged_down = False

    # -- the service ----------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._stop.clear()
        self._exited = Deferred()
        self.thread = threading.Thread(
            target=self._listen_loop, name="csrproxy-zonesync", daemon=True
        )
        self.thread.start()
        self.request_resync()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._stop.set()
        for name, value in self.served.elements():
            self.zone.remove_txt(name, value)
        self.served = Counter()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        waiters, self._current, self._waiting = self._current + self._waiting, [], []
        for d in waiters:
            d.callback(None)
        if self.thread is None or not self.thread.is_alive():
            return succeed(None)
        # The thread sees the stop event within POLL; do not hold the shutdown longer.
        exited: Deferred[None] = Deferred()
        self._exited.chainDeferred(exited)
        exited.addTimeout(STOP_WAIT, self.reactor, onTimeoutCancel=lambda *_: None)
        return exited

    # -- resyncs (reactor thread) --------------------------------------------------

    def request_resync(self) -> None:
        """Resync soon: now, or once more after the running one (requests coalesce)."""
        if not self.running:
            return
        if self._running:
            self._dirty = True
        else:
            self._start_resync()

    def resync(self) -> Deferred[None]:
        """Resync; fires once a resync that read the database after this call is applied
        (with the store's failure if that read failed)."""
        d: Deferred[None] = Deferred()
        if self._running:
            self._dirty = True
            self._waiting.append(d)
        else:
            self._current.append(d)
            self._start_resync()
        return d

    def _start_resync(self) -> None:
        self._running = True
        self._dirty = False
        self._current, self._waiting = self._current + self._waiting, []
        read = self.store.run(self.store.db.others_challenges, self.backend)
        read.addCallback(self._apply)
        read.addErrback(self._read_failed)
        read.addBoth(self._finished)

    def _apply(self, rows: list[Record]) -> None:
        if self._read_failing:
            self._read_failing = False
            log.info("zone sync reads the state database again")
        if not self.running:
            return  # stopped meanwhile: the zone no longer carries what we served
        wanted = Counter(rows)
        for record, count in (self.served - wanted).items():
            for _ in range(count):
                self.zone.remove_txt(*record)
        served = self.served & wanted
        skipped: set[str] = set()
        for record, count in (wanted - self.served).items():
            try:
                for _ in range(count):
                    self.zone.add_txt(*record)
                    served[record] += 1
            except ValueError:
                skipped.add(record[0])
        self.served = served
        if skipped and frozenset(skipped) != self._skipped:
            names = sorted(skipped)
            log.warn(
                "zone sync skips {count} name(s) of other instances outside zone {zone}: {names}",
                count=len(names),
                zone=", ".join(Zones.of(self.zone).origins),
                names=", ".join(names[:5]) + (" ..." if len(names) > 5 else ""),
            )
        self._skipped = frozenset(skipped)
        self.resyncs += 1
        self.last_resync = self.reactor.seconds()

    def _read_failed(self, failure: Failure) -> Failure:
        if not self._read_failing:
            self._read_failing = True
            if self.running:
                self._retry = self.reactor.callLater(RETRY_AFTER_FAILURE, self._retried)
            log.error(
                "zone sync cannot resync the other instances' records: {err}",
                err=failure.getErrorMessage(),
            )
        return failure

    def _retried(self) -> None:
        self._retry = None
        self.request_resync()

    def _finished(self, outcome: Failure | None) -> None:
        done, self._current = self._current, []
        self._running = False
        for d in done:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(None)
        if self._dirty and self.running:
            self._start_resync()
        elif self._waiting:  # stopped with callers waiting: nothing more will run
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    # -- the listener thread -------------------------------------------------------

    def _from_thread(self, call: Callable[..., None], *args: Any) -> None:
        self.reactor.callFromThread(call, *args)

    def _ask_resync(self) -> None:
        # At most one call queued for the reactor, however fast notifications come.
        if not self._call_queued.is_set():
            self._call_queued.set()
            self._from_thread(self._resync_from_thread)

    def _resync_from_thread(self) -> None:
        self._call_queued.clear()
        self.request_resync()

    def _listen_loop(self) -> None:
        delay = BACKOFF_FIRST
        try:
            while not self._stop.is_set():
                try:
                    conn = self._listen()
                except (psycopg.Error, OSError) as e:
                    self._from_thread(self._set_connected, False, str(e))
                    if self._wait(delay):
                        break
                    delay = min(delay * 2, BACKOFF_MAX)
                    self._ask_resync()  # the store's own connection may still work
                    continue
                delay = BACKOFF_FIRST
                try:
                    self._from_thread(self._set_connected, True, "")
                    self._ask_resync()  # what was sent before LISTEN (or while down) is lost
                    self._hear(conn)
                except (psycopg.Error, OSError) as e:
                    self._from_thread(self._set_connected, False, str(e))
                finally:
                    with contextlib.suppress(psycopg.Error, OSError):
                        conn.close()
                if self._wait(delay):
                    break
                delay = min(delay * 2, BACKOFF_MAX)
        except Exception:
            self._from_thread(self._crashed, Failure())
        finally:
            self._from_thread(self._listener_exited)

    def _hear(self, conn: Listening) -> None:
        next_resync = time.monotonic() + self.resync_interval
        while not self._stop.is_set():
            remaining = next_resync - time.monotonic()
            if remaining <= 0:
                self._ask_resync()  # the periodic resync: a missed notification only delays
                next_resync = time.monotonic() + self.resync_interval
                remaining = self.resync_interval
            for payload in conn.notifies(timeout=min(POLL, remaining)):
                if payload != self.instance:
                    self._ask_resync()
                if self._stop.is_set():
                    return

    # -- listener state (reactor thread) -------------------------------------------

    def _set_connected(self, connected: bool, err: str) -> None:
        # One line when the listener breaks, one when it is back; none per retry.
        if connected:
            if not self.connected:
                log.info("zone sync listening for challenge changes on {where}", where=self._where)
            self.connected = True
            self._logged_down = False
            return
        self.connected = False
        if not self._logged_down:
            self._logged_down = True
            log.warn(
                "zone sync cannot listen on {where}: {err}; reconnecting (other instances'"
                " records may be late meanwhile)",
                where=self._where,
                err=err.strip() or "connection closed",
            )

    def _crashed(self, failure: Failure) -> None:
        log.failure(
            "zone sync listener stopped; other instances' records are no longer served",
            failure,
        )

    def _listener_exited(self) -> None:
        self.connected = False
        if not self._exited.called:
            self._exited.callback(None)
