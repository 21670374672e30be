"""Who uses a state directory: an exclusive ``flock`` on ``<state dir>/csrproxy.lock``.

The daemon holds it for its whole life (so a second daemon on the same directory refuses
to start instead of resuming the first one's orders), ``csrproxy-admin restore`` holds it
while it replaces the database.  The file holds the holder's pid, for messages only: the
lock is the truth, and the kernel drops it when the holder exits, however it exits.
flock locks belong to the open file description: a second open of the file conflicts
even in the same process, and a forked child shares its parent's lock.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from twisted.application.service import Service

from csrproxy.errors import ConfigError

LOCK_NAME = "csrproxy.lock"


class StateInUse(ConfigError):
    """Another process holds the lock of ``directory``; ``pid`` is its process id (0 when it
    has recorded none)."""

    def __init__(self, directory: Path, pid: int) -> None:
        who = f"another csrproxy (pid {pid})" if pid else "another csrproxy"
        super().__init__("state.dir", f"{who} uses {directory}")
        self.directory = directory
        self.pid = pid


class StateLock:
    """The lock of one state directory, taken by :meth:`acquire` (never waiting on a live
    holder) and given back by :meth:`release`."""

    def __init__(self, state_dir: str | Path) -> None:
        self.directory = Path(state_dir)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and record our pid; :class:`StateInUse` when another holds it,
        ``ConfigError`` when the file cannot be used (a link, not a regular file)."""
        import fcntl  # here, so the package still imports where there is no fcntl

        if self._fd is not None:
            return
        try:
            fd = _open(self.path, os.O_RDWR | os.O_CREAT)
        except FileNotFoundError as e:
            raise ConfigError("state.dir", f"no directory {self.directory}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Held: by a daemon (its pid), or for a few microseconds by a probe of
                # in_use() or a holder that has not written its pid yet (0). Never waited
                # on: a start that meets a probe exits and is started again.
                pid = _read_pid(fd)
                raise StateInUse(self.directory, pid if pid and _alive(pid) else 0) from None
            if os.geteuid() == 0:
                # root (an operator's restore) must not leave a file the daemon cannot open
                owner = os.stat(self.directory)
                os.fchown(fd, owner.st_uid, owner.st_gid)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.record_pid()

    def record_pid(self) -> None:
        """Write our pid into the file again (twistd forks after the lock was taken)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Give the lock back (the file stays: unlinking it would race a new holder)."""
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class StateLockService(Service):
    """Keeps a taken :class:`StateLock` for the daemon: records the pid of the process that
    runs (twistd daemonizes after ``makeService``) and releases the lock when stopped."""

    def __init__(self, lock: StateLock) -> None:
        self.lock = lock

    # Service.x(self), not super().x(): mypy takes twisted's methods as untyped only so.
    def startService(self) -> None:
        Service.startService(self)
        self.lock.record_pid()

    def stopService(self) -> None:
        Service.stopService(self)
        self.lock.release()


def in_use(state_dir: str | Path) -> int | None:
    """The pid of the process holding ``state_dir``'s lock (0 when it recorded none), or None
    when nobody holds it.  Probes without keeping the lock."""
    import fcntl

    path = Path(state_dir) / LOCK_NAME
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            # Shared: probes do not conflict with each other, only with a holder.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        return None
    finally:
        os.close(fd)


def _open(path: Path, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except FileNotFoundError:
        raise
    except OSError as e:
        # Linux says ELOOP for a link under O_NOFOLLOW, FreeBSD EMLINK.
        why = "is a symbolic link" if e.errno in (errno.ELOOP, errno.EMLINK) else e.strerror
        raise ConfigError("state.dir", f"cannot use {path}: {why}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError("state.dir", f"cannot use {path}: not a regular file")
    return fd


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        return True
    return True
