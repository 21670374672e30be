"""The throwaway PostgreSQL: comes up on loopback, serves an ordinary role, drops sessions
on demand, and goes away with its cluster."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from csrproxy.testing.postgres import Postgres, available, start_postgres

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="PostgreSQL server binaries not installed"),
]


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    with start_postgres(str(tmp_path_factory.mktemp("postgres"))) as p:
        yield p


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_ordinary_role_owns_its_database(pg: Postgres) -> None:
    assert pg.dsn.startswith(f"postgresql://csrproxy:{pg.password}@127.0.0.1:{pg.port}/")
    with psycopg.connect(pg.dsn) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), rolsuper FROM pg_roles"
            " WHERE rolname = current_user"
        ).fetchone()
        assert row == ("csrproxy", "csrproxy", False)
        conn.execute("CREATE TABLE t (k text PRIMARY KEY, v int NOT NULL)")
        conn.execute("INSERT INTO t VALUES ('a', 1)")
        assert conn.execute("SELECT v FROM t WHERE k = 'a'").fetchone() == (1,)
        conn.rollback()
    with psycopg.connect(pg.admin_dsn) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)


def test_wrong_password_is_refused(pg: Postgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn.replace(pg.password, "x" * 32), connect_timeout=5)


def test_fresh_database_is_empty_and_owned_by_csrproxy(pg: Postgres) -> None:
    dsn = pg.fresh_database("module_a")
    assert dsn == pg.dsn_for("module_a")
    with psycopg.connect(dsn) as conn:
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        assert owner == ("csrproxy",)
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE t (k int)")
    with pytest.raises(ValueError):
        pg.fresh_database('x"; DROP DATABASE csrproxy; --')


def test_terminate_connections_breaks_open_sessions_of_that_database(pg: Postgres) -> None:
    dsn = pg.fresh_database("dropped")
    with (
        psycopg.connect(dsn, autocommit=True) as victim,
        psycopg.connect(pg.dsn, autocommit=True) as bystander,
    ):
        victim.execute("SELECT 1")
        assert pg.terminate_connections("dropped") == 1
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert victim.closed
        assert bystander.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(dsn) as again:  # the database itself is still there
        assert again.execute("SELECT 1").fetchone() == (1,)
    assert pg.terminate_connections("dropped") == 0


def test_starts_quickly_and_stop_removes_everything(tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = start_postgres(str(tmp_path))
    elapsed = time.monotonic() - t0
    print(f"PostgreSQL start-up: {elapsed:.2f} s")
    assert p.proc is not None and p.proc.poll() is None
    assert os.path.isdir(os.path.join(p.cluster_dir, "data"))
    conn = psycopg.connect(p.dsn)  # left open: stop() must not wait for it
    t0 = time.monotonic()
    p.stop()
    assert time.monotonic() - t0 < 5
    assert p.proc.returncode == 0  # a clean fast shutdown, not SIGKILL
    assert not os.path.exists(p.cluster_dir)
    assert _bindable(p.port)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    p.stop()  # idempotent
    assert "database system is shut down" in Path(p.log_path).read_text()
