"""The state lock, and ``csrproxy-admin backup`` / ``restore`` of the state database."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.admin import copy_database, inspect_database, main
from csrproxy.errors import ConfigError
from csrproxy.state.database import DB_NAME, CertificateRow, StateDB
from csrproxy.state.lock import LOCK_NAME, StateInUse, StateLock, StateLockService, in_use
from csrproxy.state.schema import MIGRATIONS
from csrproxy.state.store import StateDir

CONFIG = """
[acme]
directory = "https://127.0.0.1:14000/dir"

[dns]
zone = "go.example.test"
nameservers = ["ns1.go.example.test"]

[policy]
names = ["{{label}}.go.example.test"]

[state]
dir = "{state}"
"""

#: A child that takes the lock of argv[1], says so, and keeps it until its stdin closes.
HOLDER = """
import sys
from csrproxy.state.lock import StateLock
lock = StateLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def cert(cid: str) -> CertificateRow:
    # A chain of a realistic size, so the database spans many pages.
    return CertificateRow(
        id=cid,
        request_key=f"rk-{cid}",
        csr=b"csr",
        names=[f"{cid}.go.example.test"],
        spki_sha256="ab",
        chain="PEM" * 700,
        not_before=1e9,
        not_after=2e9,
    )


def ids(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM certificates ORDER BY id")]
    finally:
        conn.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class Work(SynchronousTestCase):
    def setUp(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="csrproxy-test-backup-"))
        self.addCleanup(shutil.rmtree, self.work, True)
        self.state = StateDir(self.work / "state")
        self.state.prepare()

    def hold_in_child(self) -> subprocess.Popen[str]:
        """A process holding the state lock, until the test ends."""
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(self.state.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

        def end() -> None:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.close()
            child.wait(30)
            child.stdout.close()

        self.addCleanup(end)
        assert child.stdout is not None
        self.assertEqual(child.stdout.readline(), "held\n")
        return child


class StateLockTests(Work):
    def test_a_second_open_file_description_is_refused_until_release(self) -> None:
        first = StateLock(self.state.path)
        first.acquire()
        second = StateLock(self.state.path)
        refused = self.assertRaises(StateInUse, second.acquire)
        self.assertIsInstance(refused, ConfigError)
        self.assertEqual((refused.key, refused.pid), ("state.dir", os.getpid()))
        self.assertIn(f"another csrproxy (pid {os.getpid()}) uses {self.state.path}", str(refused))
        self.assertEqual(in_use(self.state.path), os.getpid())
        self.assertFalse(second.held)

        first.release()
        self.assertIsNone(in_use(self.state.path))
        second.acquire()
        self.assertEqual(in_use(self.state.path), os.getpid())
        second.release()

    def test_the_file_is_0600_and_holds_the_pid_while_held(self) -> None:
        self.addCleanup(os.umask, os.umask(0))
        lock = StateLock(self.state.path)
        lock.acquire()
        path = self.state.path / LOCK_NAME
        self.assertEqual(mode(path), 0o600)
        self.assertEqual(path.read_text(), f"{os.getpid()}\n")
        lock.release()
        self.assertEqual(path.read_text(), "")
        self.assertTrue(path.exists(), "removing the file would race a new holder")

    def test_probing_a_directory_never_locked_creates_nothing(self) -> None:
        self.assertIsNone(in_use(self.state.path))
        self.assertIsNone(in_use(self.work / "missing"))
        self.assertFalse((self.state.path / LOCK_NAME).exists())

    def test_a_symbolic_link_is_not_followed(self) -> None:
        elsewhere = self.work / "elsewhere"
        elsewhere.write_text("keep")
        (self.state.path / LOCK_NAME).symlink_to(elsewhere)
        refused = self.assertRaises(ConfigError, StateLock(self.state.path).acquire)
        self.assertIn("symbolic link", str(refused))
        self.assertRaises(ConfigError, in_use, self.state.path)
        self.assertEqual(elsewhere.read_text(), "keep")

    def test_another_process_holds_it_and_its_exit_frees_it(self) -> None:
        child = self.hold_in_child()
        self.assertEqual(in_use(self.state.path), child.pid)
        refused = self.assertRaises(StateInUse, StateLock(self.state.path).acquire)
        self.assertEqual(refused.pid, child.pid)
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)
        self.assertIsNone(in_use(self.state.path))

    def test_the_service_records_the_running_pid_and_releases_when_stopped(self) -> None:
        lock = StateLock(self.state.path)
        lock.acquire()
        (self.state.path / LOCK_NAME).write_text("1\n")  # the pid of a parent that forked
        service = StateLockService(lock)
        service.startService()
        self.assertEqual(in_use(self.state.path), os.getpid())
        service.stopService()
        self.assertIsNone(in_use(self.state.path))

    def test_the_lock_outlives_the_parent_that_forked(self) -> None:
        # What twistd does after makeService: fork, the parent exits, the child runs on.
        script = HOLDER.replace(
            'print("held", flush=True)',
            "import os\nif os.fork():\n    os._exit(0)\nlock.record_pid()\n"
            "print(os.getpid(), flush=True)",
        )
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(self.state.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        self.addCleanup(child.stdout.close)
        self.assertEqual(child.wait(30), 0)
        grandchild = int(child.stdout.readline())
        self.assertEqual(in_use(self.state.path), grandchild)
        child.stdin.close()
        self.assertEqual(child.stdout.read(), "")  # EOF: the grandchild has exited
        self.assertIsNone(in_use(self.state.path))


class BackupRestoreTests(Work):
    def setUp(self) -> None:
        super().setUp()
        self.config = self.work / "csrproxy.toml"
        self.config.write_text(CONFIG.format(state=self.state.path))
        self.path = self.state.path / DB_NAME
        # The daemon's connection (it holds no lock here: restore tests close it first).
        self.db = StateDB(self.path)
        self.addCleanup(self.db.close)
        self.db.save_certificate(cert("c1"))
        self.db.save_certificate(cert("c2"))
        self.out = self.work / "backup.sqlite3"
        self.addCleanup(os.umask, os.umask(0))  # modes are set, not left to the umask

    def admin(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--config", str(self.config), *argv])
        return code, out.getvalue(), err.getvalue()

    def assert_refused(self, file: Path, why: str) -> None:
        before = set(os.listdir(self.state.path))
        code, _, err = self.admin("restore", str(file))
        self.assertEqual(code, 1, err)
        self.assertIn(why, err)
        self.assertEqual(ids(self.path), ["c1", "c2", "c3"])
        left = set(os.listdir(self.state.path)) - before - {LOCK_NAME}
        self.assertEqual(left, set(), "a temporary file was left")

    def test_round_trip_restores_the_backups_rows_only(self) -> None:
        code, out, err = self.admin("backup", str(self.out))
        self.assertEqual(code, 0, err)
        self.assertIn(f"schema version {len(MIGRATIONS)}", out)
        self.assertIn("account.key", out)
        self.assertEqual(mode(self.out), 0o600)
        self.assertEqual([p.name for p in self.work.iterdir() if p.name.startswith(".")], [])
        self.db.save_certificate(cert("c3"))
        self.db.close()

        code, out, err = self.admin("restore", str(self.out))
        self.assertEqual(code, 0, err)
        self.assertIn(f"schema version {len(MIGRATIONS)}", out)
        self.assertIn("put the original account.key back", out)
        self.assertEqual(ids(self.path), ["c1", "c2"])
        self.assertEqual(mode(self.path), 0o600)
        self.assertIsNone(in_use(self.state.path), "restore keeps no lock")
        again = StateDB(self.path)  # what the daemon opens next
        self.addCleanup(again.close)
        self.assertEqual(again.version, len(MIGRATIONS))

    def test_backup_does_not_wait_for_a_write_and_copies_what_is_committed(self) -> None:
        self.db.conn.execute("PRAGMA wal_autocheckpoint=0")
        self.db.save_certificate(cert("c3"))  # committed, only in the WAL
        self.db.conn.execute("BEGIN IMMEDIATE")
        self.db.conn.execute("UPDATE certificates SET chain = 'x'")
        self.db.conn.execute("DELETE FROM certificates WHERE id = 'c1'")
        code, _, err = self.admin("backup", str(self.out))
        self.db.conn.execute("COMMIT")
        self.assertEqual(code, 0, err)
        self.assertEqual(ids(self.out), ["c1", "c2", "c3"])
        conn = sqlite3.connect(self.out)
        self.addCleanup(conn.close)
        self.assertEqual(
            {r[0] for r in conn.execute("SELECT chain FROM certificates")}, {"PEM" * 700}
        )
        with open(self.out, "rb") as f:  # file format 1: no -wal beside it needed to read it
            self.assertEqual(f.read(20)[18:20], b"\x01\x01")

    def test_a_stepwise_copy_is_one_snapshot_while_another_connection_writes(self) -> None:
        writer = StateDB(self.path)
        self.addCleanup(writer.close)
        for n in range(40):
            writer.save_certificate(cert(f"b{n:02}"))
        at_start = ids(self.path)
        steps: list[int] = []
        written: list[str] = []

        def write_between_steps(status: int, remaining: int, total: int) -> None:
            steps.append(remaining)
            # Bounded: a copy that restarts on every commit ends (and fails), not spins.
            if len(written) < 20:
                written.append(f"w{len(written):02}")
                writer.save_certificate(cert(written[-1]))

        copy = self.work / "copy.sqlite3"
        copy_database(self.path, copy, step=1, progress=write_between_steps)
        self.assertEqual((len(written), steps[-1]), (20, 0))
        self.assertGreater(len(steps), 20)
        self.assertEqual(ids(copy), at_start)
        self.assertEqual(ids(self.path), sorted(at_start + written))
        self.assertEqual(inspect_database(copy, thorough=True), len(MIGRATIONS))
        self.assertEqual(mode(copy), 0o600)

    def test_restore_is_refused_while_another_process_holds_the_lock(self) -> None:
        self.assertEqual(self.admin("backup", str(self.out))[0], 0)
        self.db.save_certificate(cert("c3"))
        child = self.hold_in_child()
        self.assert_refused(self.out, f"another csrproxy (pid {child.pid}) uses")

    def test_restore_is_refused_while_another_open_file_description_holds_it(self) -> None:
        self.assertEqual(self.admin("backup", str(self.out))[0], 0)
        self.db.save_certificate(cert("c3"))
        lock = StateLock(self.state.path)
        lock.acquire()
        self.addCleanup(lock.release)
        self.assert_refused(self.out, f"(pid {os.getpid()})")

    def test_restore_refuses_what_is_not_a_state_database(self) -> None:
        self.db.save_certificate(cert("c3"))
        junk = self.work / "junk"
        junk.write_bytes(b"not a database\n" * 1000)
        self.assert_refused(junk, "file is not a database")

        other = self.work / "other.sqlite3"
        conn = sqlite3.connect(other)
        conn.execute("CREATE TABLE orders (id TEXT)")
        conn.commit()
        conn.close()
        self.assert_refused(other, "no certificates table")
        self.assert_refused(self.work / "missing", "no file")

    def test_restore_refuses_a_newer_schema(self) -> None:
        self.assertEqual(self.admin("backup", str(self.out))[0], 0)
        conn = sqlite3.connect(self.out)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
        conn.close()
        self.db.save_certificate(cert("c3"))
        self.assert_refused(self.out, f"newer than this csrproxy's ({len(MIGRATIONS)})")

    def test_restore_refuses_a_damaged_backup(self) -> None:
        self.assertEqual(self.admin("backup", str(self.out))[0], 0)
        size = self.out.stat().st_size
        with open(self.out, "r+b") as f:  # garble the middle pages, keep the header
            f.seek(size // 2)
            f.write(b"\xff" * 8192)
        self.db.save_certificate(cert("c3"))
        self.assert_refused(self.out, "not a usable csrproxy state database")

    def test_restore_drops_the_write_ahead_log_a_killed_daemon_left(self) -> None:
        self.assertEqual(self.admin("backup", str(self.out))[0], 0)
        self.db.close()
        killed = textwrap.dedent(
            """
            import os, sys
            from csrproxy.state.database import StateDB
            from tests.state.test_backup import cert
            db = StateDB(sys.argv[1])
            db.conn.execute("PRAGMA wal_autocheckpoint=0")
            for n in range(5):
                db.save_certificate(cert(f"k{n}"))
            os._exit(0)  # as kill -9: no checkpoint, the rows live in the WAL only
            """
        )
        subprocess.run(
            [sys.executable, "-c", killed, str(self.path)],
            check=True,
            timeout=60,
            cwd=Path(__file__).parents[2],
        )
        self.assertGreater(Path(f"{self.path}-wal").stat().st_size, 0)

        code, _, err = self.admin("restore", str(self.out))
        self.assertEqual(code, 0, err)
        self.assertFalse(Path(f"{self.path}-wal").exists())
        self.assertEqual(ids(self.path), ["c1", "c2"])
        self.assertEqual(inspect_database(self.path, thorough=True), len(MIGRATIONS))

    def test_backup_refusals_and_usage(self) -> None:
        code, _, err = self.admin("backup", str(self.path))
        self.assertEqual(code, 1)
        self.assertIn("is the state database itself", err)
        code, _, err = self.admin("backup", str(self.work / "missing" / "backup.sqlite3"))
        self.assertEqual(code, 1)
        self.assertIn("backup:", err)
        self.assertEqual(self.admin("backup")[0], 2)
        self.assertEqual(self.admin("restore")[0], 2)
        shutil.rmtree(self.state.path)
        code, _, err = self.admin("backup", str(self.out))
        self.assertEqual((code, "no state database" in err), (1, True))
        self.assertFalse(self.out.exists())
