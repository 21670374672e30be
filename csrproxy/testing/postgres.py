"""A throwaway PostgreSQL (Debian ``postgresql``) on a free loopback port.

``start_postgres`` makes a new cluster with ``initdb`` (password authentication,
scram-sha-256, for a superuser ``csrproxy_admin``), runs ``postgres`` in the foreground
listening on 127.0.0.1 only, without durability (fsync off: a crash loses the cluster,
which is thrown away anyway), and creates a role ``csrproxy`` owning a database
``csrproxy``, so tests connect as an ordinary role as production does.

PostgreSQL refuses to run as root: when the test process is root, ``initdb`` and the
server run as the ``postgres`` system user (made by the Debian package) through
``setpriv``, in a directory under the system temporary directory that it owns (the
pytest directory, mode 0700 under root's, is not traversable by it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from csrproxy.testing.ports import free_port
from csrproxy.testing.processes import Daemon, retrying, spawn

ADMIN = "csrproxy_admin"
ROLE = "csrproxy"
DATABASE = "csrproxy"
SYSTEM_USER = "postgres"  # who runs the server when the test process is root
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


def bindir() -> str | None:
    """The server binaries of the highest PostgreSQL version installed the Debian way
    (``/usr/lib/postgresql/<version>/bin``), or None."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        version = initdb.split("/")[4]
        if os.access(initdb, os.X_OK) and version.isdigit():
            found.append((int(version), os.path.dirname(initdb)))
    return max(found)[1] if found else None


def available() -> bool:
    """True when the server binaries are installed (and, as root, the ``postgres`` user)."""
    if bindir() is None:
        return False
    if os.geteuid() != 0:
        return True
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        return False
    return True


@dataclass(eq=False)
class Postgres(Daemon):
    port: int = 0
    cluster_dir: str = ""  # removed by stop()
    admin_password: str = ""
    password: str = ""  # the ``csrproxy`` role's

    @property
    def admin_dsn(self) -> str:
        """The superuser's DSN, to the ``postgres`` maintenance database."""
        return f"postgresql://{ADMIN}:{self.admin_password}@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        """The ``csrproxy`` role's DSN to the ``csrproxy`` database (no superuser)."""
        return self.dsn_for(DATABASE)

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def admin(
        self, query: sql.SQL | sql.Composed, params: Sequence[object] = ()
    ) -> list[tuple[object, ...]]:
        """Run one statement as the superuser, outside a transaction; its rows, if any."""
        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(query, params)
            return list(cur.fetchall()) if cur.description is not None else []

    def fresh_database(self, name: str) -> str:
        """Create an empty database ``name`` owned by ``csrproxy``; its DSN."""
        if not _NAME.match(name):
            raise ValueError(f"database name {name!r}: want lower-case letters, digits, _")
        self.admin(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(ROLE)
            )
        )
        return self.dsn_for(name)

    def terminate_connections(self, dbname: str) -> int:
        """End every session on ``dbname`` (as a dropped connection would) and wait until
        they are gone (up to 5 s each); how many there were."""
        rows = self.admin(
            sql.SQL(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()"
            ),
            (dbname,),
        )
        return len(rows)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are ended, unlike SIGTERM's wait for them), then
        the Daemon's SIGTERM/SIGKILL; remove the cluster.  Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        super().stop()
        if self.cluster_dir:
            shutil.rmtree(self.cluster_dir, ignore_errors=True)


def start_postgres(workdir: str, *, timeout: float = 30) -> Postgres:
    """Start a new PostgreSQL cluster on a free port of 127.0.0.1, log in ``workdir``;
    ready once ``csrproxy`` can connect to its database."""
    return retrying(lambda: _start(workdir, timeout))


def _as_server_user() -> tuple[list[str], int, int]:
    """The command prefix that runs a program as the server's user, and that user's ids."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    try:
        pw = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise RuntimeError(
            f"PostgreSQL will not run as root and there is no {SYSTEM_USER!r} user"
        ) from None
    # setpriv keeps the parent-death signal that a change of user would clear.
    prefix = [
        "setpriv",
        f"--reuid={pw.pw_uid}",
        f"--regid={pw.pw_gid}",
        "--init-groups",
        "--pdeathsig=keep",
    ]
    return prefix, pw.pw_uid, pw.pw_gid


def _start(workdir: str, timeout: float) -> Postgres:
    bin_dir = bindir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql/*/bin")
    prefix, uid, gid = _as_server_user()
    log_path = os.path.join(os.path.abspath(workdir), "postgres.log")
    # Under /tmp: short enough for the socket path (107 bytes) and reachable by the server user.
    cluster = tempfile.mkdtemp(prefix="csrproxy-pg-", dir=tempfile.gettempdir())
    pg = Postgres(
        log_path,
        port=free_port(),
        cluster_dir=cluster,
        admin_password=secrets.token_hex(16),
        password=secrets.token_hex(16),
    )
    env = {"PATH": "/usr/bin:/bin", "LANG": "C", "LC_ALL": "C", "TZ": "UTC"}
    data, sockets = os.path.join(cluster, "data"), os.path.join(cluster, "run")
    pwfile = os.path.join(cluster, "pwfile")
    try:
        os.mkdir(sockets, 0o700)
        with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(pg.admin_password + "\n")
        for path in (cluster, sockets, pwfile):
            os.chown(path, uid, gid)
        initdb = [
            *prefix,
            os.path.join(bin_dir, "initdb"),
            "-D",
            data,
            "-U",
            ADMIN,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        r = subprocess.run(
            initdb, capture_output=True, text=True, timeout=timeout, cwd=cluster, env=env
        )
        os.unlink(pwfile)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr}{r.stdout}")
    except BaseException:
        pg.stop()
        raise
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(pg.port),
        "unix_socket_directories": sockets,
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "100",
    }
    argv = [*prefix, os.path.join(bin_dir, "postgres"), "-D", data]
    for k, v in settings.items():
        argv += ["-c", f"{k}={v}"]

    def ready() -> bool:
        with psycopg.connect(pg.admin_dsn, connect_timeout=1) as conn:
            conn.execute("SELECT 1")
        return True

    pg.adopt(spawn(argv, log_path, env), ready, "postgres", timeout)
    try:
        pg.admin(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(pg.password)
            )
        )
        pg.fresh_database(DATABASE)
    except BaseException:
        pg.stop()
        raise
    return pg
