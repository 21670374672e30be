"""``csrproxy-admin``: read the state for operators, revoke, export the account.

    csrproxy-admin --config FILE certificates            list issued certificates
    csrproxy-admin --config FILE orders [--unfinished]    list orders
    csrproxy-admin --config FILE show ID                  one certificate or order, as JSON
    csrproxy-admin --config FILE revoke ID [--reason R]   revoke a certificate at the CA
    csrproxy-admin --config FILE account                  account URL and public key (for CAA)
    csrproxy-admin --config FILE backup FILE              copy the state database, live
    csrproxy-admin --config FILE restore FILE             put a backup in place (daemon stopped)
    csrproxy-admin --config FILE unpause NAME             forget NAME's failures in a row

``ID`` is a certificate's row id (as listed), an order id, or the certificate id an
installation was given (``CSRProxy-Certificate-Id``: its newest certificate).  The
private key is never printed.  ``backup`` copies the database only: keep ``account.key``
(written once, never changed) once, apart from it.  Exit codes: 0 ok, 1 failed, 2 usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from csrproxy.acme.client import REVOCATION_REASONS
from csrproxy.acme.jws import AccountKey
from csrproxy.config import Config, load_config
from csrproxy.errors import ConfigError, CsrproxyError
from csrproxy.issuance.admission import CONSECUTIVE
from csrproxy.issuance.domains import identifier_of
from csrproxy.issuance.ledger import CERTIFICATE_ID_SECRET, CertificateIds
from csrproxy.state.database import DB_NAME, UNFINISHED, CertificateRow, OrderRow, StateDB
from csrproxy.state.lock import StateInUse, StateLock, in_use
from csrproxy.state.schema import MIGRATIONS
from csrproxy.state.store import ACCOUNT_KEY, StateDir

#: Pages SQLite's online backup copies per step (16 MiB of 4 KiB pages).
BACKUP_STEP = 4096


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ids(db: StateDB) -> CertificateIds | None:
    """The daemon's certificate ids (None before its first start made the secret)."""
    secret = db.existing_secret(CERTIFICATE_ID_SECRET)
    return CertificateIds(secret) if secret is not None else None


def _cert_doc(c: CertificateRow, ids: CertificateIds | None = None) -> dict[str, Any]:
    return {
        "id": c.id,
        "certificate_id": ids.of(c.request_key) if ids is not None else None,
        "names": c.names,
        "not_before": _when(c.not_before),
        "not_after": _when(c.not_after),
        "order_id": c.order_id,
        "acme_url": c.acme_url,
        "spki_sha256": c.spki_sha256,
        "last_requested": _when(c.last_requested),
        "revoked": c.revoked,
        "signed_by": c.signed_by,
        "chain": c.chain,
    }


def _order_doc(o: OrderRow) -> dict[str, Any]:
    return {
        "id": o.id,
        "names": o.names,
        "status": o.status,
        "acme_url": o.acme_url,
        "error": o.error,
        "certificate_id": o.certificate_id,
        "created": _when(o.created),
        "updated": _when(o.updated),
    }


def list_certificates(db: StateDB) -> str:
    rows = [f"{'id':<24} {'not after':<21} {'revoked':<8} names"]
    for c in db.certificates():
        rev = "" if c.revoked is None else str(c.revoked)
        rows.append(f"{c.id:<24} {_when(c.not_after):<21} {rev:<8} {','.join(c.names)}")
    return "\n".join(rows)


def list_orders(db: StateDB, unfinished: bool) -> str:
    rows = [f"{'id':<24} {'status':<11} {'updated':<21} names"]
    for o in db.orders(UNFINISHED if unfinished else None):
        rows.append(f"{o.id:<24} {o.status:<11} {_when(o.updated):<21} {','.join(o.names)}")
    return "\n".join(rows)


def show(db: StateDB, item: str) -> dict[str, Any] | None:
    ids = _ids(db)
    cert = db.certificate(item)
    if cert is not None:
        return {"certificate": _cert_doc(cert, ids)}
    order = db.order(item)
    if order is not None:
        return {"order": _order_doc(order)}
    prefix = ids.key_prefix(item) if ids is not None else None
    if prefix is not None and (cert := db.current_by_key_prefix(prefix)) is not None:
        return {"certificate": _cert_doc(cert, ids)}
    return None


def account_info(config: Config, state: StateDir, db: StateDB) -> dict[str, Any]:
    """The account URL and public key; the private key stays where it is."""
    pem = state.read_account_key()
    if pem is None:
        raise ConfigError("state.dir", f"no account key in {state.path}")
    key = AccountKey.from_pem(pem)
    public = key.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    row = db.account(config.acme.directory)
    url = row["url"] if row else None
    doc: dict[str, Any] = {
        "directory": config.acme.directory,
        "account_url": url,
        "public_key": public.decode(),
        "jwk_thumbprint": key.thumbprint,
    }
    if url:
        doc["caa_example"] = f'0 issue "<your CA>; accounturi={url}; validationmethods=dns-01"'
    return doc


def revoke(config: Config, state: StateDir, db: StateDB, cert_id: str, reason: str) -> str:
    """Revoke through the ACME client, on a reactor of its own."""
    row = db.certificate(cert_id)
    if row is None:
        raise LookupError(f"no certificate {cert_id}")
    pem = state.read_account_key()
    if pem is None:
        raise ConfigError("state.dir", f"no account key in {state.path}")
    leaf = x509.load_pem_x509_certificates(row.chain.encode())[0]
    der = leaf.public_bytes(serialization.Encoding.DER)

    from twisted.internet import defer, task

    from csrproxy.acme.client import ACMEClient
    from csrproxy.http import make_http_client

    async def run(reactor: Any) -> None:
        client = ACMEClient(
            reactor,
            make_http_client(reactor, config.acme.ca_certs),
            config.acme.directory,
            AccountKey.from_pem(pem),
        )
        await client.account()
        await client.revoke(der, reason)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return "unreachable"


class NotAStateDatabase(CsrproxyError):
    """``path`` is not a state database this csrproxy can use; ``reason`` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} is not a usable csrproxy state database: {reason}")
        self.path = path
        self.reason = reason


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that never writes ``path`` (no migration, no checkpoint)."""
    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None)


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_database(
    source: Path,
    target: Path,
    step: int = BACKUP_STEP,
    progress: Callable[[int, int, int], object] | None = None,
) -> None:
    """Copy the SQLite database ``source`` into the new file ``target`` (0600, fsynced) with
    the online backup API: one snapshot of ``source``, even while others write it."""
    src = _read_only(source)
    try:
        # One read transaction across all steps: the copy is one snapshot, writers go on
        # (WAL), and another connection's commit does not restart the copy.
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(target, flags, 0o600))
        dst = sqlite3.connect(target, isolation_level=None)
        try:
            src.backup(dst, pages=step, progress=progress)
            # One self-contained file: reading it needs no -wal or -shm beside it.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
        src.execute("COMMIT")
    finally:
        src.close()
    _fsync(target)


def inspect_database(path: Path, thorough: bool = False) -> int:
    """The schema version of the state database ``path``, once it passed SQLite's
    ``quick_check`` (``integrity_check`` when ``thorough``) and has csrproxy's tables."""
    conn = _read_only(path)
    try:
        check = "integrity_check" if thorough else "quick_check"
        problems = [r[0] for r in conn.execute(f"PRAGMA {check}")]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as e:
        raise NotAStateDatabase(path, str(e)) from e
    finally:
        conn.close()
    if problems != ["ok"]:
        raise NotAStateDatabase(path, f"{check} failed: {'; '.join(problems[:3])}")
    if missing := {"certificates", "orders"} - tables:
        raise NotAStateDatabase(path, f"no {' or '.join(sorted(missing))} table")
    return version


def _drop(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def backup(state: StateDir, target: Path) -> str:
    """Copy the state database to ``target`` (written beside it, checked, then renamed)."""
    source = state.path / DB_NAME
    if not source.is_file():
        raise LookupError(f"no state database {source}")
    if target.exists() and os.path.samefile(target, source):
        raise ValueError(f"{target} is the state database itself")
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        copy_database(source, tmp)
        version = inspect_database(tmp)
        os.replace(tmp, target)
    except BaseException:
        _drop(tmp, Path(f"{tmp}-journal"))
        raise
    _fsync(target.parent)
    return (
        f"{source} backed up to {target} ({target.stat().st_size} bytes, schema version "
        f"{version}); keep {state.path / ACCOUNT_KEY} too: it is not in the backup"
    )


def restore(state: StateDir, source: Path) -> str:
    """Replace the state database with the backup ``source``, holding the state lock."""
    state.prepare()
    db = state.path / DB_NAME
    if not source.is_file():
        raise LookupError(f"no file {source}")
    if db.exists() and os.path.samefile(source, db):
        raise ValueError(f"{source} is the state database itself")
    pid = in_use(state.path)
    if pid is not None:
        raise StateInUse(state.path, pid)
    lock = StateLock(state.path)
    lock.acquire()  # a daemon starting now waits for nothing: it is refused
    try:
        tmp = state.path / f".{DB_NAME}.restore{os.getpid()}"
        try:
            copy_database(source, tmp)
            version = inspect_database(tmp, thorough=True)
            if version > len(MIGRATIONS):
                raise NotAStateDatabase(
                    source,
                    f"schema version {version} is newer than this csrproxy's "
                    f"({len(MIGRATIONS)}): upgrade csrproxy",
                )
            if os.geteuid() == 0:  # the daemon's user must own it, not root
                owner = os.stat(state.path)
                os.chown(tmp, owner.st_uid, owner.st_gid)
            # The old database's WAL would be replayed onto the new file: away first.
            _drop(*(Path(f"{db}{suffix}") for suffix in ("-wal", "-shm", "-journal")))
            os.replace(tmp, db)
        except BaseException:
            _drop(tmp, Path(f"{tmp}-journal"))
            raise
        _fsync(state.path)
    finally:
        lock.release()
    done = f"{source} restored to {db} (schema version {version})"
    if not (state.path / ACCOUNT_KEY).exists():
        done += f"; put the original {ACCOUNT_KEY} back before starting csrproxy"
    return done


def unpause(db: StateDB, name: str) -> str:
    """Forget the failed authorizations in a row of ``name`` (its pause): what csrproxy
    counts, not the CA's pause, which its own unpause link lifts (in the CA's refusal)."""
    ident = identifier_of(name)
    with db.transaction() as conn:
        gone = conn.execute("DELETE FROM budgets WHERE name = ?", (f"{CONSECUTIVE}:{ident}",))
        found = gone.rowcount > 0
    if not found:
        return f"{ident} has no failed authorizations in a row: nothing to unpause"
    done = f"{ident}: its failed authorizations in a row are forgotten"
    if not db.shared:
        # One instance keeps its budgets in memory and writes them; it reads them at start.
        done += "; restart csrproxy for it to take effect"
    return done


def _backup_or_restore(state: StateDir, command: str, file: str) -> int:
    try:
        if command == "backup":
            print(backup(state, Path(file)))
        else:
            print(restore(state, Path(file)))
        return 0
    except (CsrproxyError, LookupError, ValueError, sqlite3.Error, OSError) as e:
        print(f"csrproxy-admin: {command}: {e}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csrproxy-admin", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="/etc/csrproxy/csrproxy.toml")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("certificates", help="list issued certificates")
    orders = sub.add_parser("orders", help="list orders")
    orders.add_argument("--unfinished", action="store_true")
    show_p = sub.add_parser("show", help="one certificate or order as JSON")
    show_p.add_argument("id")
    rev = sub.add_parser("revoke", help="revoke a certificate at the CA")
    rev.add_argument("id")
    rev.add_argument("--reason", default="unspecified", choices=sorted(REVOCATION_REASONS))
    sub.add_parser("account", help="the ACME account URL and public key (never the private key)")
    back = sub.add_parser(
        "backup",
        help="copy the state database to FILE, consistent while csrproxy runs "
        f"(not {ACCOUNT_KEY}: keep that file once, it never changes)",
    )
    back.add_argument("file", metavar="FILE")
    res = sub.add_parser(
        "restore", help="replace the state database with the backup FILE (csrproxy stopped)"
    )
    res.add_argument("file", metavar="FILE")
    unp = sub.add_parser(
        "unpause",
        help="forget NAME's failed authorizations in a row (csrproxy refuses a paused name; "
        "unpause it at the CA too)",
    )
    unp.add_argument("name", metavar="NAME")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    try:
        config = load_config(args.config)
        state = StateDir(config.state.dir)
        if args.command in ("backup", "restore"):
            if config.state.backend == "postgresql":
                raise ConfigError(
                    "state.backend",
                    f"{args.command} copies the SQLite file; back up PostgreSQL with pg_dump "
                    "and restore with pg_restore (see README)",
                )
            # Neither opens the database as StateDB does: no migration, no lock waits.
            return _backup_or_restore(state, args.command, args.file)
        db = state.open_db(config.state.dsn, config.cluster.instance)
    except ConfigError as e:
        print(f"csrproxy-admin: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "certificates":
            print(list_certificates(db))
        elif args.command == "orders":
            print(list_orders(db, args.unfinished))
        elif args.command == "show":
            doc = show(db, args.id)
            if doc is None:
                print(f"csrproxy-admin: no certificate or order {args.id}", file=sys.stderr)
                return 1
            print(json.dumps(doc, indent=2))
        elif args.command == "account":
            print(json.dumps(account_info(config, state, db), indent=2))
        elif args.command == "unpause":
            print(unpause(db, args.name))
        elif args.command == "revoke":
            revoke(config, state, db, args.id, args.reason)
        return 0
    except SystemExit as e:  # task.react ends with SystemExit
        if e.code == 0 and args.command == "revoke":
            db.mark_revoked(args.id, REVOCATION_REASONS[args.reason])
            print(f"revoked {args.id} ({args.reason})")
        return int(e.code or 0)
    except (LookupError, ConfigError, ValueError) as e:
        print(f"csrproxy-admin: {e}", file=sys.stderr)
        return 1
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
