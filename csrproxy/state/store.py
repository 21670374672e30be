"""Durable state under ``[state] dir``: the account key file and the state database.

Files are written atomically (write to a temporary file, fsync, rename) and
with mode 0600 inside a 0700 directory.  The database (:mod:`csrproxy.state.database`)
is reached from the reactor through :class:`Store`.  No business rules live here.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from csrproxy.errors import ConfigError, CsrproxyError
from csrproxy.state.database import DB_NAME, Call, StateDB
from csrproxy.state.engine import DATABASE_ERRORS, redacted

log = Logger()
T = TypeVar("T")

ACCOUNT_KEY = "account.key"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def ca_digest(directory: str) -> str:
    """12 hex digits of the SHA-256 of a CA's directory URL: what names a fallback CA's
    account key file and budget rows."""
    return hashlib.sha256(directory.encode()).hexdigest()[:12]


def account_key_file(directory: str, primary: bool = True) -> str:
    """The file name of the account key for the CA at ``directory``: ``account.key`` for
    ``[acme]``'s, ``account-<ca_digest>.key`` for a fallback's."""
    return ACCOUNT_KEY if primary else f"account-{ca_digest(directory)}.key"


class StateDir:
    """The state directory and the files in it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def prepare(self) -> None:
        """Create the directory (0700) if needed; raise ConfigError when it cannot be used."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
        except OSError as e:
            raise ConfigError("state.dir", f"cannot use {self.path}: {e.strerror}") from e
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError("state.dir", f"{self.path} is not writable")

    def read_account_key(self, name: str = ACCOUNT_KEY) -> bytes | None:
        """The account key PEM (the file ``name``: :func:`account_key_file`), or None when
        there is none yet; refuses a key others can read."""
        path = self.path / name
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                "state.dir",
                f"{path} is readable by group or others (mode {stat.filemode(st.st_mode)}); "
                "chmod 600 it",
            )
        return path.read_bytes()

    def write_account_key(self, pem: bytes, name: str = ACCOUNT_KEY) -> None:
        path = self.path / name
        if path.exists():
            raise FileExistsError(f"{path} exists; the account key is written once")
        atomic_write(path, pem)

    def open_db(self, dsn: str | None = None, instance: str = "") -> StateDB:
        """Open (creating and migrating) the state database: the SQLite file here, or the
        PostgreSQL database ``dsn``, as ``instance``; ConfigError when impossible."""
        if dsn is not None:
            try:
                return StateDB(dsn, instance)
            except DATABASE_ERRORS as e:
                where = redacted(dsn)
                raise ConfigError("state.dsn", f"cannot open {where}: {e}".strip()) from e
        try:
            return StateDB(self.path / DB_NAME, instance)
        except (sqlite3.Error, OSError) as e:
            raise ConfigError("state.dir", f"cannot open {self.path / DB_NAME}: {e}") from e


class StoreUnavailable(CsrproxyError):
    """The state database cannot be written (full disk, read-only directory, I/O error)."""

    problem = "state-unavailable"
    status = 503


class Store:
    """The state database for the reactor: every call runs on one worker thread.

    Database work never blocks the reactor (the DNS server shares it), and one
    thread keeps SQLite's connection confined and the writes in order.  Calls made
    while the thread is busy run next, together in one transaction (group commit:
    one sync to disk for all of them); each caller hears back once it is committed.
    """

    def __init__(self, reactor: Any, db: StateDB) -> None:
        self.reactor = reactor
        self.db = db
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="csrproxy-store")
        self._healthy = True
        self._writes_at_failure = 0
        self._waiting: list[tuple[Call, Deferred[Any]]] = []
        #: ids of the waiting calls' Deferreds that run alone (:meth:`run_alone`).
        self._alone: set[int] = set()
        self._busy = False

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()
        try:
            self.db.flush_removals()
        except DATABASE_ERRORS as e:  # a leftover row only costs a removal at the next start
            log.warn("challenge records not forgotten: {err}", err=str(e))
        self.db.close()

    @property
    def healthy(self) -> bool:
        """False after a write failed, until one succeeds again."""
        return self._healthy

    def run(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Call ``method(*args, **kwargs)`` on the store thread."""
        return self._enqueue(False, method, args, kwargs)

    def run_alone(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """As :meth:`run`, in a transaction of its own, never grouped with other calls: for
        a call that locks rows in an order of its own (several instances lock the same
        rows; grouped calls would lock them in the order they came, and two instances could
        wait on each other)."""
        return self._enqueue(True, method, args, kwargs)

    def _enqueue(
        self, alone: bool, method: Callable[..., T], args: Any, kwargs: Any
    ) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self._waiting.append(((method, args, kwargs), d))
        if alone:
            self._alone.add(id(d))
        if not self._busy:
            self._next()

        def ok(result: T) -> T:
            # Only a write that committed since the failure says it is writable again.
            if not self._healthy and self.db.writes > self._writes_at_failure:
                self._healthy = True
                log.info("state database writable again")
            return result

        def failed(failure: Failure) -> Failure:
            if failure.check(*DATABASE_ERRORS, OSError):
                self._writes_at_failure = self.db.writes
                if self._healthy:
                    log.error(
                        "state database {path} unusable: {err}",
                        path=self.db.where,
                        err=failure.getErrorMessage(),
                    )
                self._healthy = False
                return Failure(
                    StoreUnavailable(f"csrproxy cannot record state: {failure.getErrorMessage()}")
                )
            return failure

        return d.addCallbacks(ok, failed)

    def _next(self) -> None:
        # The calls waiting, in order, up to the first that runs alone (or that one alone).
        count = 1
        if id(self._waiting[0][1]) not in self._alone:
            while count < len(self._waiting) and id(self._waiting[count][1]) not in self._alone:
                count += 1
        batch, self._waiting = self._waiting[:count], self._waiting[count:]
        for _, waiting in batch:
            self._alone.discard(id(waiting))
        self._busy = True
        if len(batch) == 1:
            (method, args, kwargs), _ = batch[0]
            done: Deferred[Any] = deferToThreadPool(
                self.reactor, self.pool, method, *args, **kwargs
            )
            done.addCallback(lambda result: [(True, result)])
        else:
            done = deferToThreadPool(self.reactor, self.pool, self.db.batch, [c for c, _ in batch])

        def fired(outcomes: list[tuple[bool, Any]] | Failure) -> None:
            # Calls the callers make now wait for the next batch, all of them together.
            for i, (_, d) in enumerate(batch):
                if isinstance(outcomes, Failure):
                    d.errback(outcomes)
                elif outcomes[i][0]:
                    d.callback(outcomes[i][1])
                else:
                    d.errback(Failure(outcomes[i][1]))
            self._busy = False
            if self._waiting:
                self._next()

        done.addBoth(fired)
