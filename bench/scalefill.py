"""State databases for bench/scale: N synthetic installations, or N copies of one row.

The schema is the one the daemon under test made (read from a database it created:
tables, indexes, ``user_version``, page size, auto-vacuum), so the same code fills the
database of the old tree and of the new one; a column the daemon's schema lacks is not
written, a column this module does not know must allow NULL.

A synthetic installation is what a real one leaves: its own EC P-256 key, a CSR for its
own name ``<i>.<zone>``, a chain from ``bench/scalecerts.py`` (2.8 KB of PEM), the
certificate row and its finished order row.  Generated on every core, written 10,000 rows
a transaction, and cached per N and schema so that a second run only copies the file.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import secrets
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from bench.scalecerts import BenchCA, LeafSigner, bench_ca, new_installation

#: Bump when the generated rows change: cached databases of another version are not used.
GENERATOR = 1
DAY = 86400.0
LIFETIME = 90 * DAY
#: Every POOL_EVERY-th installation is old enough to be due (its leaf is 70-85 days old);
#: it is parked (inactive, renewal time far off) until a run picks it as due.  So at most
#: 1 / POOL_EVERY of the installations can be made due.
POOL_EVERY = 100
#: The other leaves' not_before is a random point in the last NOT_BEFORE_SPAN: renewal
#: (at 2/3..3/4 of 90 days) is at least 7 days after the fill, so a cached database stays
#: not due for as long as it may be reused.
NOT_BEFORE_SPAN = 53 * DAY
#: A cached database is reused for at most this long (hours).
CACHE_MAX_AGE_H = 72.0
#: ARI rechecks are spread over this long after "now".
ARI_SPREAD = 6 * 3600.0
#: Rows per transaction, and installations per task handed to a worker.
TRANSACTION = 10_000
CHUNK = 1_000
#: Where a finished order or a certificate "was" at the CA: loopback, never fetched.
OLD_CA = "https://127.0.0.1:14000"


# -- the daemon's schema --------------------------------------------------------------


@dataclass(frozen=True)
class Schema:
    """What a fresh database needs to be the daemon's own, read from one it made."""

    user_version: int
    page_size: int
    auto_vacuum: int
    #: CREATE TABLE statements, in the order the daemon made them.
    tables: tuple[str, ...]
    #: CREATE INDEX / TRIGGER / VIEW statements (made after the bulk insert).
    others: tuple[str, ...]
    #: table -> its columns, in order.
    columns: dict[str, tuple[str, ...]]
    #: table -> the columns that are NOT NULL without a default.
    required: dict[str, frozenset[str]]

    @classmethod
    def read(cls, db_path: Path) -> Schema:
        conn = sqlite3.connect(db_path)
        try:
            rows = conn.execute(
                "SELECT type, name, sql FROM sqlite_master "
                "WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
            ).fetchall()
            tables = tuple(sql for kind, _, sql in rows if kind == "table")
            others = tuple(sql for kind, _, sql in rows if kind != "table")
            columns: dict[str, tuple[str, ...]] = {}
            required: dict[str, frozenset[str]] = {}
            for kind, name, _ in rows:
                if kind != "table":
                    continue
                info = conn.execute(f"PRAGMA table_info({name})").fetchall()
                columns[name] = tuple(r[1] for r in info)
                # (cid, name, type, notnull, dflt_value, pk)
                required[name] = frozenset(r[1] for r in info if r[3] and r[4] is None)
            return cls(
                user_version=int(conn.execute("PRAGMA user_version").fetchone()[0]),
                page_size=int(conn.execute("PRAGMA page_size").fetchone()[0]),
                auto_vacuum=int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]),
                tables=tables,
                others=others,
                columns=columns,
                required=required,
            )
        finally:
            conn.close()

    @property
    def digest(self) -> str:
        text = json.dumps(
            [self.user_version, self.page_size, self.auto_vacuum, self.tables, self.others]
        )
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def finished_status(self) -> str:
        """What a finished order's status is: 'issued' once the schema knows it (migration
        3), else 'valid' (with its certificate_id, which is what ended it then)."""
        return "issued" if any("'issued'" in sql for sql in self.others) else "valid"

    def has(self, table: str, column: str) -> bool:
        return column in self.columns.get(table, ())

    def writable(self, table: str, known: Sequence[str]) -> tuple[str, ...]:
        """The columns of ``table`` to write, of those ``known``; raise if the schema has a
        NOT NULL column without default that is not among them."""
        missing = self.required.get(table, frozenset()) - set(known)
        if missing:
            raise RuntimeError(
                f"the daemon's {table} table has NOT NULL columns bench/scale does not "
                f"fill: {sorted(missing)} (teach bench/scalefill.py about them)"
            )
        return tuple(c for c in self.columns[table] if c in known)

    def create(self, path: Path) -> sqlite3.Connection:
        """A new database at ``path`` with the tables only, set up for a bulk load."""
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(f"PRAGMA page_size = {self.page_size}")
        conn.execute(f"PRAGMA auto_vacuum = {self.auto_vacuum}")
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")  # 256 MB: index builds sort in memory
        for sql in self.tables:
            conn.execute(sql)
        conn.execute(f"PRAGMA user_version = {self.user_version}")
        return conn

    def finish(self, conn: sqlite3.Connection) -> None:
        """Build the indexes (after the load: one sort each) and close."""
        for sql in self.others:
            conn.execute(sql)
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.close()


# -- synthetic installations ------------------------------------------------------------

#: The columns this module writes.
CERT_COLUMNS = (
    "id",
    "request_key",
    "csr",
    "names",
    "spki_sha256",
    "chain",
    "not_before",
    "not_after",
    "order_id",
    "acme_url",
    "created",
    "last_requested",
    "revoked",
    "signed_by",
    "names_key",
    "superseded",
    "renew_at",
    "dormant",
    "ari_start",
    "ari_end",
    "ari_next",
)
ORDER_COLUMNS = (
    "id",
    "request_key",
    "csr",
    "names",
    "acme_url",
    "status",
    "error",
    "certificate_id",
    "replaces",
    "created",
    "updated",
)


@dataclass(frozen=True)
class Issuing:
    """What every worker needs to make rows."""

    ca: BenchCA
    zone: str
    now: float
    status: str
    cert_columns: tuple[str, ...]
    order_columns: tuple[str, ...]


_issuing: Issuing | None = None
_signer: LeafSigner | None = None


def _init(issuing: Issuing) -> None:
    global _issuing, _signer
    _issuing, _signer = issuing, LeafSigner(issuing.ca)


def _installation_rows(i: int, rng: random.Random) -> tuple[list[Any], list[Any]]:
    """The certificate row and the order row of installation ``i`` (rowid ``i + 1``)."""
    assert _issuing is not None and _signer is not None
    g = _issuing
    inst = new_installation(f"{i}.{g.zone}")
    parked = i % POOL_EVERY == POOL_EVERY - 1
    if parked:  # old enough to be due; inactive and not due until a run picks it
        not_before = g.now - rng.uniform(70 * DAY, 85 * DAY)
        last_requested = g.now - rng.uniform(60 * DAY, 80 * DAY)
    else:
        not_before = g.now - rng.uniform(0, NOT_BEFORE_SPAN)
        last_requested = max(not_before, g.now - rng.uniform(0, 7 * DAY))
    not_before = float(int(not_before))  # X.509 times have whole seconds
    not_after = not_before + LIFETIME - 1
    if parked:
        renew_at = g.now + rng.uniform(20 * DAY, 30 * DAY)
    else:
        renew_at = not_before + LIFETIME * (2 / 3 + rng.random() / 12)
    leaf = _signer.leaf(inst, not_before, not_after, i)
    cert_id = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()[:32]
    order_id = secrets.token_hex(16)
    names = json.dumps([inst.name])
    cert = {
        "id": cert_id,  # csrproxy.issuance.ledger.leaf_id
        "request_key": inst.request_key,
        "csr": inst.csr_der,
        "names": names,
        "spki_sha256": inst.spki_sha256,
        "chain": leaf.public_bytes(serialization.Encoding.PEM).decode() + g.ca.cert_pem.decode(),
        "not_before": not_before,
        "not_after": not_after,
        "order_id": order_id,
        "acme_url": f"{OLD_CA}/certZ/{leaf.serial_number:x}",
        "created": not_before,
        "last_requested": last_requested,
        "revoked": None,
        "signed_by": None,
        "names_key": inst.name,
        "superseded": None,
        "renew_at": renew_at,
        "dormant": 0,
        "ari_start": None,
        "ari_end": None,
        "ari_next": g.now + rng.random() * ARI_SPREAD,
    }
    order = {
        "id": order_id,
        "request_key": inst.request_key,
        "csr": inst.csr_der,
        "names": names,
        "acme_url": f"{OLD_CA}/my-order/{order_id}",
        "status": g.status,
        "error": None,
        "certificate_id": cert_id,
        "replaces": None,
        "created": not_before - 20,
        "updated": not_before,
    }
    return (
        [i + 1, *(cert[c] for c in g.cert_columns)],
        [i + 1, *(order[c] for c in g.order_columns)],
    )


def _chunk(bounds: tuple[int, int]) -> tuple[list[list[Any]], list[list[Any]]]:
    rng = random.Random()
    certs, orders = [], []
    for i in range(*bounds):
        c, o = _installation_rows(i, rng)
        certs.append(c)
        orders.append(o)
    return certs, orders


def _parallel(
    work: Callable[[tuple[int, int]], Any],
    n: int,
    init: Callable[..., None] | None,
    initargs: tuple[Any, ...],
) -> Iterator[Any]:
    """``work((start, stop))`` for chunks of ``range(n)`` on every core, results in order;
    at most 2 chunks per worker in flight (so the results wait in a bounded queue)."""
    procs = max(1, os.cpu_count() or 1)
    bounds = [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs, initializer=init, initargs=initargs) as pool:
        pending: deque[Any] = deque()
        todo = iter(bounds)
        for b in todo:
            pending.append(pool.apply_async(work, (b,)))
            if len(pending) >= 2 * procs:
                break
        while pending:
            result = pending.popleft().get(timeout=600)
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.apply_async(work, (nxt,)))
            yield result


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    return (
        f"INSERT INTO {table} (rowid, {', '.join(columns)}) "
        f"VALUES ({', '.join('?' * (len(columns) + 1))})"
    )


def generate(path: Path, schema: Schema, n: int, zone: str, progress: bool = True) -> None:
    """Write ``n`` synthetic installations into a new database at ``path``."""
    now = time.time()
    issuing = Issuing(
        ca=bench_ca(zone, now),
        zone=zone,
        now=now,
        status=schema.finished_status,
        cert_columns=schema.writable("certificates", CERT_COLUMNS),
        order_columns=schema.writable("orders", ORDER_COLUMNS),
    )
    conn = schema.create(path)
    c_sql = _insert_sql("certificates", issuing.cert_columns)
    o_sql = _insert_sql("orders", issuing.order_columns)
    done, t0, last = 0, time.monotonic(), time.monotonic()
    in_tx = 0
    for certs, orders in _parallel(_chunk, n, _init, (issuing,)):
        if in_tx == 0:
            conn.execute("BEGIN")
        conn.executemany(c_sql, certs)
        conn.executemany(o_sql, orders)
        in_tx += len(certs)
        done += len(certs)
        if in_tx >= TRANSACTION:
            conn.execute("COMMIT")
            in_tx = 0
        if progress and time.monotonic() - last > 30:
            last = time.monotonic()
            rate = done / (last - t0)
            print(f"  fill: {done:,}/{n:,} ({rate:,.0f}/s)", flush=True)
    if in_tx:
        conn.execute("COMMIT")
    schema.finish(conn)


def copy_rows(path: Path, schema: Schema, source: Path, name: str, n: int) -> None:
    """A new database at ``path`` with ``n`` copies of ``source``'s certificate row for
    ``name`` and its order row (each copy its own certificate id, request key and order id,
    the two rows pointing at each other, everything else kept)."""
    src = sqlite3.connect(source)
    src.row_factory = sqlite3.Row
    try:
        found = src.execute(
            "SELECT * FROM certificates WHERE names = ?", (json.dumps([name]),)
        ).fetchone()
        if found is None:
            raise RuntimeError(f"no certificate row for {name} in {source}")
        cert = dict(found)
        row = src.execute("SELECT * FROM orders WHERE id = ?", (cert["order_id"],)).fetchone()
        if row is None:
            raise RuntimeError(f"the certificate's order {cert['order_id']!r} is not in orders")
        order = dict(row)
    finally:
        src.close()
    c_cols, o_cols = schema.columns["certificates"], schema.columns["orders"]
    conn = schema.create(path)
    c_sql, o_sql = _insert_sql("certificates", c_cols), _insert_sql("orders", o_cols)
    for start in range(0, n, TRANSACTION):
        cs, os_ = [], []
        for i in range(start, min(n, start + TRANSACTION)):
            cid, oid, key = secrets.token_hex(16), secrets.token_hex(16), secrets.token_hex(32)
            c = cert | {"id": cid, "request_key": key, "order_id": oid}
            o = order | {"id": oid, "request_key": key, "certificate_id": cid}
            cs.append([i + 1, *(c[k] for k in c_cols)])
            os_.append([i + 1, *(o[k] for k in o_cols)])
        conn.execute("BEGIN")
        conn.executemany(c_sql, cs)
        conn.executemany(o_sql, os_)
        conn.execute("COMMIT")
    schema.finish(conn)


# -- the cache ---------------------------------------------------------------------------


@dataclass
class Filled:
    """A database ready to copy, and how it was made."""

    path: Path
    fill_s: float
    cached: bool
    age_s: float
    made: float


def cached_or_generate(
    cache: Path, schema: Schema, n: int, zone: str, max_age_h: float, regenerate: bool
) -> Filled:
    """The cached synthetic database for ``n`` and ``schema`` (made now if there is none
    younger than ``max_age_h`` hours, or ``regenerate``)."""
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"scale-{n}-g{GENERATOR}-{schema.digest[:12]}"
    path, meta_path = cache / f"{stem}.sqlite3", cache / f"{stem}.json"
    if not regenerate and path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            age = time.time() - float(meta["made"])
            if 0 <= age <= max_age_h * 3600 and int(meta["n"]) == n:
                return Filled(path, float(meta["fill_s"]), True, age, float(meta["made"]))
        except (ValueError, KeyError, TypeError):
            pass
    # One database per N: those of another generator or schema go (1,000,000 is ~5 GB).
    for stale in cache.glob(f"scale-{n}-*"):
        stale.unlink(missing_ok=True)
    print(f"  filling {n:,} synthetic installations into {path} ...", flush=True)
    partial = cache / f"{stem}.partial"
    made = time.time()
    t0 = time.perf_counter()
    try:
        generate(partial, schema, n, zone)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fill_s = time.perf_counter() - t0
    partial.rename(path)
    meta_path.write_text(json.dumps({"n": n, "made": made, "fill_s": fill_s, "zone": zone}))
    return Filled(path, fill_s, False, 0.0, made)


# -- getting a copy ready for one run -------------------------------------------------------


@dataclass
class Prepared:
    due: int = 0
    unfinished: int = 0
    seconds: float = 0.0


def place(filled: Path, db_path: Path) -> None:
    """Copy a filled database to where the daemon will open it (0600, as it makes them)."""
    db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(filled, db_path)
    os.chmod(db_path, 0o600)


def _unfinished_chunk(bounds: tuple[int, int]) -> list[tuple[str, bytes, str]]:
    out = []
    for i in range(*bounds):
        inst = new_installation(f"u{i}.{_zone_for_unfinished}")
        out.append((inst.name, inst.csr_der, inst.request_key))
    return out


_zone_for_unfinished = ""


def _init_unfinished(zone: str) -> None:
    global _zone_for_unfinished
    _zone_for_unfinished = zone


def prepare(
    db_path: Path,
    schema: Schema,
    *,
    n: int,
    due: float,
    unfinished: int,
    ca_base: str,
    zone: str,
    made: float | None,
) -> Prepared:
    """Make a run's copy current: the chosen parked installations due now and active,
    ARI rechecks moved to the next 6 h (when the database was made earlier: ``made``),
    and ``unfinished`` orders in status 'pending' at order URLs ``ca_base`` does not know
    (each its own new installation ``u<i>.<zone>``).  ``made`` None: a copy-mode
    database (nothing parked, nothing to move)."""
    t0 = time.perf_counter()
    out = Prepared()
    now = time.time()
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    try:
        conn.execute("BEGIN")
        if made is not None and due > 0:
            pool = n // POOL_EVERY
            count = min(pool, round(due * n))
            rowids = [(p * pool // count + 1) * POOL_EVERY for p in range(count)] if count else []
            sets = ["last_requested = ?"]
            if schema.has("certificates", "renew_at"):
                sets.append("renew_at = ?")
            rng = random.Random()
            args = []
            for rowid in rowids:
                vals: list[float] = [now]
                if len(sets) > 1:
                    vals.append(now - rng.uniform(0, 3600))
                args.append((*vals, rowid))
            conn.executemany(f"UPDATE certificates SET {', '.join(sets)} WHERE rowid = ?", args)
            out.due = len(rowids)
        if made is not None and schema.has("certificates", "ari_next") and now - made > 60:
            # Keep "the next 6 h" true of a database made earlier: one pass over the table.
            conn.execute(
                "UPDATE certificates SET ari_next = ari_next + ? WHERE ari_next IS NOT NULL",
                (now - made,),
            )
        if unfinished:
            cols = schema.writable("orders", ORDER_COLUMNS)
            base = conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM orders").fetchone()[0]
            rows = []
            k = 0
            for chunk in _parallel(_unfinished_chunk, unfinished, _init_unfinished, (zone,)):
                for name, csr, request_key in chunk:
                    oid = secrets.token_hex(16)
                    created = now - random.uniform(0, 600)
                    o = {
                        "id": oid,
                        "request_key": request_key,
                        "csr": csr,
                        "names": json.dumps([name]),
                        "acme_url": f"{ca_base}/my-order/bench-unknown-{oid}",
                        "status": "pending",
                        "error": None,
                        "certificate_id": None,
                        "replaces": None,
                        "created": created,
                        "updated": created,
                    }
                    k += 1
                    rows.append([base + k, *(o[c] for c in cols)])
            conn.executemany(_insert_sql("orders", cols), rows)
            out.unfinished = len(rows)
        conn.execute("COMMIT")
        # As the daemon leaves its database (WAL), and on disk: otherwise the daemon's
        # first open pays for switching it and for flushing this copy (1.4 s at 1,000,000).
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        fd = os.open(db_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        conn.close()
    out.seconds = time.perf_counter() - t0
    return out


def db_size(state: Path, name: str) -> int:
    """Bytes of the database file and its WAL/SHM files."""
    return sum(p.stat().st_size for p in state.glob(name + "*") if p.is_file())
