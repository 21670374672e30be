"""The SQLite database under ``[state] dir``: schema, migrations and queries.

Synchronous and thread-confined: the daemon runs every call on one worker
thread (see :class:`csrproxy.state.store.Store`); ``csrproxy-admin`` calls it
directly.  WAL mode with ``synchronous=FULL``: a committed write survives a
crash or a power cut.  Every write is one transaction: all of it or nothing.
Challenge records that are no longer published are forgotten lazily, inside
the next write's transaction (:meth:`StateDB.forget_challenge_later`).  The
database also keeps the server-side secrets (:meth:`StateDB.secret`), so that
certificate ids outlive restarts, backups and restores.  Every query a request or a
periodic pass makes is one index search (``tests/state/test_schema3.py``).
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from csrproxy.state.cluster_queries import (
    ORDER_LEASE,
    ClusterQueries,
    OrderRunningElsewhere,
)
from csrproxy.state.engine import (
    POSTGRESQL,
    SQLITE,
    Connection,
    Cursor,
    PostgresConnection,
    is_postgres_dsn,
    postgres_ddl,
    redacted,
)
from csrproxy.state.renewal_queries import RenewalQueries
from csrproxy.state.rows import (
    _CURRENT,
    FINISHED,
    UNFINISHED,
    CertificateRow,
    ChallengeRow,
    OrderRow,
    cert_from_row,
    names_key,
    order_from_row,
)
from csrproxy.state.schema import MIGRATIONS, postgres_migration
from csrproxy.state.sql import UNFINISHED_SQL as _UNFINISHED_SQL
from csrproxy.state.sql import upsert

DB_NAME = "csrproxy.sqlite3"
#: Bytes the write-ahead log keeps after a checkpoint at most.
WAL_LIMIT = 64 * 1024 * 1024

#: A method of the database, its positional and keyword arguments.
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


#: The advisory lock PostgreSQL instances migrate under (any constant of our own).
MIGRATION_LOCK = 0x63737270_0001




class StateDB(RenewalQueries, ClusterQueries):
    """One connection to the state database."""

    def __init__(self, location: str | Path, instance: str = "") -> None:
        """Open the database at ``location``: a file (SQLite), or a ``postgresql://`` URL.

        ``instance`` names this instance in the rows it writes for others to see
        (``[cluster] instance``)."""
        self.instance = instance
        #: Seconds an order is leased to the instance running it (shared databases).
        self.order_lease = ORDER_LEASE
        #: (name, value) of challenge records unpublished but still on record; any thread
        #: may append, the next transaction deletes them (a leftover only costs a harmless
        #: removal at the next start).
        self._removals: collections.deque[tuple[str, str]] = collections.deque()
        self._in_batch = False
        #: Transactions committed that wrote something (the store's health follows writes,
        #: not reads: a full disk still answers reads).
        self.writes = 0
        self._wrote = False
        self.conn: Connection
        if isinstance(location, str) and is_postgres_dsn(location):
            self.dialect = POSTGRESQL
            self._path: Path | None = None
            #: Where the database is, for logs (a PostgreSQL DSN without its password).
            self.where = redacted(location)
            self.conn = PostgresConnection(location)
        else:
            self.dialect = SQLITE
            self._path = Path(location)
            self.where = str(self._path)
            self.conn = self._open_sqlite(self._path)
        self.migrate()

    @staticmethod
    def _open_sqlite(path: Path) -> sqlite3.Connection:
        created = not path.exists()
        old_umask = os.umask(0o077)
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        finally:
            os.umask(old_umask)
        conn.row_factory = sqlite3.Row
        if created:
            # Pruning gives pages back to the file system (before any table exists).
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # The WAL is truncated to this after a checkpoint (a burst of writes leaves no 1 GB
        # file behind for ever).
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        conn.execute("PRAGMA foreign_keys=ON")
        if created:
            os.chmod(path, 0o600)
        return conn

    @property
    def path(self) -> Path:
        """The SQLite database's file (TypeError on PostgreSQL)."""
        if self._path is None:
            raise TypeError(f"{self.where} is not an SQLite database")
        return self._path

    @property
    def sqlite(self) -> sqlite3.Connection:
        """The SQLite connection (for what only SQLite has: backups, vacuum)."""
        if not isinstance(self.conn, sqlite3.Connection):
            raise TypeError(f"{self.where} is not an SQLite database")
        return self.conn

    def close(self) -> None:
        self.conn.close()

    @property
    def version(self) -> int:
        if self.dialect is SQLITE:
            return int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        row = self.conn.execute("SELECT version FROM csrproxy_schema").fetchone()
        return 0 if row is None else int(row[0])

    def probe_write(self) -> None:
        """One small write (the schema version, unchanged): can the database be written?"""
        with self.transaction() as c:
            if self.dialect is SQLITE:
                c.execute(f"PRAGMA user_version = {int(self.version)}")
            else:
                c.execute("UPDATE csrproxy_schema SET version = version")
            self._wrote = True

    def migrate(self) -> None:
        """Bring the schema to the newest version, one transaction per step."""
        if self.dialect is POSTGRESQL:
            self._migrate_postgres()
            return
        migrated = False
        while self.version < len(MIGRATIONS):
            step = self.version
            script = MIGRATIONS[step] + f"\nPRAGMA user_version = {step + 1};"
            self.sqlite.executescript(f"BEGIN IMMEDIATE;\n{script}\nCOMMIT;")
            migrated = True
        if migrated:  # a big migration leaves a big WAL: give the space back now
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._check_not_newer()

    def _migrate_postgres(self) -> None:
        # One transaction under an advisory lock: instances starting together migrate once.
        conn = self.conn
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS csrproxy_schema (version BIGINT NOT NULL)")
            if conn.execute("SELECT version FROM csrproxy_schema").fetchone() is None:
                conn.execute("INSERT INTO csrproxy_schema (version) VALUES (0)")
            while self.version < len(MIGRATIONS):
                step = self.version
                for statement in postgres_ddl(postgres_migration(step)):
                    conn.execute(statement)
                conn.execute("UPDATE csrproxy_schema SET version = ?", (step + 1,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._check_not_newer()

    def _check_not_newer(self) -> None:
        if self.version > len(MIGRATIONS):
            raise RuntimeError(
                f"{self.where} has schema version {self.version}, newer than this csrproxy "
                f"({len(MIGRATIONS)}): upgrade csrproxy"
            )

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error: all of it or nothing.

        Challenge records waiting to be forgotten are deleted in the same transaction.
        Inside :meth:`batch` it is a savepoint of the batch's transaction instead.
        """
        if self._in_batch:
            self.conn.execute("SAVEPOINT write")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK TO write")
                self.conn.execute("RELEASE write")
                raise
            self.conn.execute("RELEASE write")
            return
        self.conn.execute(self.dialect.begin)
        changes = self.conn.total_changes
        self._wrote = False
        removals: list[tuple[str, str]] = []
        while self._removals:
            removals.append(self._removals.popleft())
        try:
            if removals:
                self.conn.executemany(_REMOVE_CHALLENGE, removals)
                self._challenges_changed()
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            self._removals.extendleft(reversed(removals))
            raise
        self.conn.execute("COMMIT")
        if self._wrote or self.conn.total_changes != changes:
            self.writes += 1

    def batch(self, calls: Sequence[Call]) -> list[tuple[bool, Any]]:
        """Run ``calls`` in one transaction (group commit), each all-or-nothing on its own.

        Returns ``(True, result)`` or ``(False, exception)`` per call; raises when the
        transaction itself cannot commit (then none of it happened).
        """
        outcomes: list[tuple[bool, Any]] = []
        with self.transaction():
            self._in_batch = True
            try:
                for method, args, kwargs in calls:
                    try:
                        outcomes.append((True, method(*args, **kwargs)))
                    except Exception as e:
                        outcomes.append((False, e))
            finally:
                self._in_batch = False
        return outcomes

    def _write(self, sql: str, args: Sequence[Any] | dict[str, Any]) -> Cursor:
        with self.transaction() as conn:
            cursor: Cursor = conn.execute(sql, args)
            return cursor

    # -- account ------------------------------------------------------------

    def save_account(
        self, directory: str, url: str, key_file: str, key_thumbprint: str | None = None
    ) -> None:
        """Record the account at ``directory``. The first key recorded stays the
        database's: a row with another key's thumbprint is left as it is (the instance with
        the other key is refused at its next start)."""
        self._write(
            "INSERT INTO account (directory, url, key_file, created, key_thumbprint) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(directory) DO UPDATE SET url = excluded.url, "
            "key_file = excluded.key_file, "
            "key_thumbprint = coalesce(account.key_thumbprint, excluded.key_thumbprint) "
            "WHERE account.key_thumbprint IS NULL OR excluded.key_thumbprint IS NULL "
            "OR account.key_thumbprint = excluded.key_thumbprint",
            (directory, url, key_file, time.time(), key_thumbprint),
        )

    def account(self, directory: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT * FROM account WHERE directory = ?", (directory,)
        ).fetchone()
        return dict(row) if row else None

    def accounts(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM account ORDER BY created")]

    # -- orders ---------------------------------------------------------------

    def save_order(self, order: OrderRow) -> None:
        """Record ``order`` as this instance's (the one that runs it); on a shared database
        leased to it for ``order_lease`` seconds (:meth:`extend_leases` keeps it)."""
        lease = time.time() + self.order_lease if self.shared else None
        d = order.__dict__ | {
            "names": json.dumps(order.names),
            "owner": self.instance,
            "lease_until": lease,
        }
        sql = upsert(
            "orders",
            "id",
            "request_key csr names acme_url status error certificate_id replaces created "
            "updated owner lease_until profile ca",
        )
        if not self.shared:
            self._write(sql, d)
            return
        try:
            self._write(sql, d)
        except psycopg.errors.UniqueViolation:
            # orders_one_running: another instance placed the order for this CSR first.
            running = self.conn.execute(
                f"SELECT id FROM orders WHERE request_key = ? AND status IN ({_UNFINISHED_SQL})",
                (order.request_key,),
            ).fetchone()
            raise OrderRunningElsewhere(str(running[0]) if running else "") from None

    def update_order(self, order_id: str, **fields: Any) -> None:
        allowed = {"acme_url", "status", "error", "certificate_id"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update order fields {sorted(fields)}")
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        self._write(
            f"UPDATE orders SET {sets}, updated = :updated WHERE id = :id",
            fields | {"id": order_id, "updated": time.time()},
        )

    def order(self, order_id: str) -> OrderRow | None:
        row = self.conn.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
        return order_from_row(row) if row else None

    def orders(self, statuses: Iterable[str] | None = None, limit: int = 1000) -> list[OrderRow]:
        if statuses is None:
            rows = self.conn.execute("SELECT * FROM orders ORDER BY created DESC LIMIT ?", (limit,))
        else:
            wanted = list(statuses)
            marks = ",".join("?" * len(wanted))
            rows = self.conn.execute(
                f"SELECT * FROM orders WHERE status IN ({marks}) ORDER BY created LIMIT ?",
                (*wanted, limit),
            )
        return [order_from_row(r) for r in rows]

    def unfinished_orders(self, limit: int = 100_000) -> list[OrderRow]:
        """Orders that had not ended, oldest first (by the partial index of unfinished ones):
        on a shared database, only this instance's (the others run theirs)."""
        # The statuses as literals: only then can SQLite use the partial index.
        if self.dialect is SQLITE:
            rows = self.conn.execute(
                f"SELECT * FROM orders WHERE status IN ({_UNFINISHED_SQL}) AND created > -1 "
                "ORDER BY created LIMIT ?",
                (limit,),
            )
        else:
            rows = self.conn.execute(
                f"SELECT * FROM orders WHERE status IN ({_UNFINISHED_SQL}) AND created > -1 "
                "AND (owner = ? OR owner IS NULL) ORDER BY created LIMIT ?",
                (self.instance, limit),
            )
        return [order_from_row(r) for r in rows]

    def order_with_chain(self, order_id: str) -> tuple[OrderRow, CertificateRow | None] | None:
        """An order and, once it has ended with one, its certificate."""
        order = self.order(order_id)
        if order is None:
            return None
        cert = self.certificate(order.certificate_id) if order.certificate_id else None
        return order, cert

    # -- certificates -------------------------------------------------------------

    def save_certificate(self, cert: CertificateRow) -> None:
        d = cert.__dict__ | {"names": json.dumps(cert.names)}
        self._write(_SAVE_CERTIFICATE, d)

    def certificate_issued(
        self, cert: CertificateRow, order_id: str, renewal: bool = False
    ) -> CertificateRow:
        """Record ``cert`` as its request key's current certificate and end its order, in
        one transaction; returns the row as recorded.

        It keeps the installation's signer from the certificate it supersedes (the same key
        and names), and, for a renewal csrproxy made on its own, its activity clock.  The
        certificate issued last is current, even when it ends sooner than the one before
        (a shorter profile): the installation always has one.
        """
        now = time.time()
        with self.transaction() as conn:
            current = self.current_certificate(cert.request_key)
            if current is not None:
                cert.signed_by = current.signed_by
                if renewal:
                    cert.last_requested = current.last_requested
            cert.names_key = names_key(cert.names)
            cert.superseded = None
            conn.execute(_SAVE_CERTIFICATE, cert.__dict__ | {"names": json.dumps(cert.names)})
            conn.execute(
                f"UPDATE certificates SET superseded = ? WHERE request_key = ? AND id != ? "
                f"AND {_CURRENT}",
                (now, cert.request_key, cert.id),
            )
            conn.execute(
                "UPDATE orders SET status = 'issued', certificate_id = ?, updated = ? WHERE id = ?",
                (cert.id, now, order_id),
            )
        return cert

    def touch_certificate(self, cert_id: str, when: float) -> None:
        """A read that counts as its installation's activity (it is renewed again)."""
        self._write(
            "UPDATE certificates SET last_requested = ?, dormant = 0 WHERE id = ?", (when, cert_id)
        )

    def certificate_signed(self, request_key: str, when: float, signed_by: str | None) -> None:
        """A sign request for the CSR behind ``request_key``: when it came and from whom."""
        self._write(
            "UPDATE certificates SET last_requested = ?, signed_by = ?, dormant = 0 "
            f"WHERE request_key = ? AND {_CURRENT}",
            (when, signed_by, request_key),
        )

    def current_certificate(self, request_key: str) -> CertificateRow | None:
        """The certificate a sign request for ``request_key`` is served (index: request key)."""
        row = self.conn.execute(
            f"SELECT * FROM certificates WHERE request_key = ? AND {_CURRENT} "
            "ORDER BY not_after DESC LIMIT 1",
            (request_key,),
        ).fetchone()
        return cert_from_row(row) if row else None

    def current_by_key_prefix(self, prefix: str) -> CertificateRow | None:
        """The current certificate whose request key starts with ``prefix`` (lowercase hex)."""
        row = self.conn.execute(
            f"SELECT * FROM certificates WHERE request_key >= ? AND request_key < ? "
            f"AND {_CURRENT} ORDER BY not_after DESC LIMIT 1",
            (prefix, prefix + "~"),
        ).fetchone()
        return cert_from_row(row) if row else None

    def names_issued(self, names: Iterable[str]) -> bool:
        """Was a certificate for exactly this set of names ever recorded (index: names)?"""
        row = self.conn.execute(
            "SELECT 1 FROM certificates WHERE names_key = ? LIMIT 1", (names_key(names),)
        ).fetchone()
        return row is not None

    def sign_lookup(
        self, request_key: str, names: Iterable[str]
    ) -> tuple[CertificateRow | None, bool]:
        """What a sign request needs: the current certificate of its request key, and whether
        its set of names was issued before."""
        current = self.current_certificate(request_key)
        return current, current is not None or self.names_issued(names)

    def mark_revoked(self, cert_id: str, reason: int) -> None:
        self._write("UPDATE certificates SET revoked = ? WHERE id = ?", (reason, cert_id))

    def certificate(self, cert_id: str) -> CertificateRow | None:
        row = self.conn.execute("SELECT * FROM certificates WHERE id = ?", (cert_id,)).fetchone()
        return cert_from_row(row) if row else None

    def certificates(self, limit: int = 100_000) -> list[CertificateRow]:
        rows = self.conn.execute(
            "SELECT * FROM certificates ORDER BY created DESC LIMIT ?", (limit,)
        )
        return [cert_from_row(r) for r in rows]

    def newest_certificate(self, request_key: str) -> CertificateRow | None:
        row = self.conn.execute(
            "SELECT * FROM certificates WHERE request_key = ? AND revoked IS NULL "
            "ORDER BY not_after DESC LIMIT 1",
            (request_key,),
        ).fetchone()
        return cert_from_row(row) if row else None

    # -- secrets ------------------------------------------------------------------

    def secret(self, name: str, size: int = 32) -> bytes:
        """The server-side secret ``name``: ``size`` random bytes made on first use, then kept.

        Every instance sharing this database gets the same value (the first write wins).
        """
        found = self.existing_secret(name)
        if found is not None:
            return found
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO secrets (name, value, created) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (name, secrets.token_bytes(size), time.time()),
            )
            row = conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])

    def existing_secret(self, name: str) -> bytes | None:
        """The secret ``name`` if one was made, without writing anything."""
        row = self.conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    # -- challenge records ------------------------------------------------------------

    def add_challenge(self, order_id: str, name: str, value: str, backend: str) -> int:
        with self.transaction() as conn:
            # Read inside the transaction: SQLite's RETURNING holds the statement open.
            row = conn.execute(
                "INSERT INTO challenges (order_id, name, value, backend, created, instance) "
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (order_id, name, value, backend, time.time(), self.instance),
            ).fetchone()
            self._challenges_changed()
        return int(row[0])

    def remove_challenge(self, name: str, value: str) -> None:
        with self.transaction() as conn:
            conn.execute(_REMOVE_CHALLENGE, (name, value))
            self._challenges_changed()

    def forget_challenge_later(self, name: str, value: str) -> None:
        """Delete one record of ``name``/``value`` with the next write (safe from any thread)."""
        self._removals.append((name, value))

    def flush_removals(self) -> None:
        """Delete the records :meth:`forget_challenge_later` queued, now."""
        if self._removals:
            with self.transaction():
                pass

    def challenges(self) -> list[ChallengeRow]:
        """Every challenge record, of every instance."""
        return [ChallengeRow(**dict(r)) for r in self.conn.execute("SELECT * FROM challenges")]

    def clear_challenges(self, ids: Iterable[int]) -> None:
        with self.transaction() as conn:
            conn.executemany("DELETE FROM challenges WHERE id = ?", [(i,) for i in ids])


_SAVE_CERTIFICATE = upsert(
    "certificates",
    "id",
    "request_key csr names spki_sha256 chain not_before not_after order_id acme_url created "
    "last_requested revoked signed_by names_key superseded renew_at dormant ari_start ari_end "
    "ari_next profile ca",
)
_REMOVE_CHALLENGE = (
    "DELETE FROM challenges WHERE id IN "
    "(SELECT id FROM challenges WHERE name = ? AND value = ? LIMIT 1)"
)


__all__ = [
    "FINISHED",
    "UNFINISHED",
    "CertificateRow",
    "ChallengeRow",
    "OrderRow",
    "StateDB",
    "names_key",
]
