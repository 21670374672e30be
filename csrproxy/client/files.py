"""The certificate directory's files, reached only through the directory's descriptor
(:class:`CheckedDirectory`): nobody but this user and root may write the directory or its
secrets, no symbolic link in it is followed, and every file is replaced atomically (each
file whole, old or new, after a failure or a crash)."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType

from csrproxy.client.errors import EXIT_USAGE, ClientError

# One logger for the whole client, as before the split: the CLI's handler attaches to it.
log = logging.getLogger("csrproxy.client")

MAX_FILE = 1 << 20
"""The most :meth:`CheckedDirectory.read` reads: a key, a chain or the state is far less."""

SECRET_MODE = 0o600


def others_can_write(st: os.stat_result) -> str | None:
    """Who, besides this user and root, can change the file or directory ``st`` describes
    (its owner, its group, everyone), or None when nobody can."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        return f"it is owned by uid {st.st_uid} (neither root nor this user)"
    if mode & stat.S_IWOTH:
        return f"everyone can write it (mode {mode:04o})"
    if mode & stat.S_IWGRP:
        return f"its group (gid {st.st_gid}) can write it (mode {mode:04o})"
    return None


def refuse_writable(path: Path, st: os.stat_result, what: str) -> None:
    """Raise :class:`ClientError` (exit 2) when others can write ``path``."""
    why = others_can_write(st)
    if why is not None:
        raise ClientError(
            f"refusing {what} {path}: {why}; whoever can write it can plant a key or send "
            f"the token elsewhere.  Make it owned by root or this user and not writable "
            f"by group or others (chown, chmod go-w)",
            EXIT_USAGE,
        )


def refuse_writable_parents(path: Path) -> None:
    """Raise :class:`ClientError` (exit 2) when someone else can replace ``path`` itself: a
    directory above it (its real path's parents) that others can write, unless it is sticky
    (as ``/tmp``: there others cannot rename or remove what is not theirs)."""
    real = Path(os.path.realpath(path))
    for parent in real.parents:
        st = os.stat(parent)
        why = others_can_write(st)
        if why is not None and not st.st_mode & stat.S_ISVTX:
            raise ClientError(
                f"refusing the directory {path}: {parent} above it is not safe ({why}); "
                f"whoever can write {parent} can replace everything below it.  Make it "
                f"owned by root or this user and not writable by group or others, or "
                f"sticky (chmod +t)",
                EXIT_USAGE,
            )


class CheckedDirectory:
    """A directory that only this user and root can write, opened once and then used only
    through its descriptor: renaming or replacing the path afterwards changes nothing, and
    no name in it is followed when it is a symbolic link.

    Raises :class:`ClientError` (exit 2) when others can write the directory or a
    directory above it (unless that one is sticky), and
    ``OSError`` when it cannot be opened (``FileNotFoundError``, ``NotADirectoryError``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            refuse_writable(path, os.fstat(self.fd), "the directory")
            refuse_writable_parents(path)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> CheckedDirectory:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self, name: str, flags: int, mode: int = SECRET_MODE) -> int:
        """``os.open`` of ``name`` in the directory, never following a symbolic link (that
        is a :class:`ClientError`, exit 2)."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(name, flags, mode, dir_fd=self.fd)
        except OSError as e:
            # Linux says ELOOP for a link under O_NOFOLLOW, FreeBSD EMLINK.
            if e.errno in (errno.ELOOP, errno.EMLINK):
                raise ClientError(
                    f"{self.path / name} is a symbolic link: csrproxy-client follows no link "
                    f"in its directory; remove it",
                    EXIT_USAGE,
                ) from e
            raise

    def exists(self, name: str) -> bool:
        """Whether ``name`` is there (a symbolic link counts; it is not followed)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def read(self, name: str, *, secret: bool = False) -> bytes | None:
        """The content of the regular file ``name`` (at most :data:`MAX_FILE`), or None
        when it is missing.  A ``secret`` (the key, the state) that others can write is
        refused (exit 2); one that everyone can read is logged as a warning."""
        try:
            fd = self.open(name, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            path = self.path / name
            if not stat.S_ISREG(st.st_mode):
                raise ClientError(f"{path} is not a regular file", EXIT_USAGE)
            if secret:
                refuse_writable(path, st, "the file")
                if st.st_mode & stat.S_IROTH:
                    log.warning("%s is readable by everyone (mode %04o)", path, st.st_mode & 0o7777)
            data = f.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise ClientError(f"{path} is larger than {MAX_FILE} bytes", EXIT_USAGE)
        return data

    def write(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Replace ``name`` with ``data``: a crash leaves the old or the new file."""
        self.write_files([(name, data, mode)])

    def write_files(self, files: Sequence[tuple[str, bytes, int]]) -> None:
        """Replace several files, in the order given, so that each is the old or the new one.

        A secret (a ``mode`` that gives group and others nothing, like key.pem's 0600) gets
        exactly that mode, whatever the file it replaces had; any other file keeps the mode
        and group of the file it replaces.  Every new file is written to a new temporary
        file (``O_CREAT|O_EXCL|O_NOFOLLOW``, 0600, then its mode) and fsynced first; then
        the renames follow each other.  If anything fails, the files already renamed get
        their old content and mode back and no temporary file is left.  A power cut
        between two renames can still leave the earlier files new and the later ones old
        (each file whole).
        """
        temps: list[tuple[str, str]] = []
        done: list[tuple[str, tuple[bytes, int] | None]] = []
        try:
            for name, data, mode in files:
                temps.append((self._temp_copy(name, data, mode, keep=mode & 0o077 != 0), name))
            for tmp, name in temps:
                old = self._old(name)
                os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                done.append((name, old))
            os.fsync(self.fd)
        except BaseException:
            for name, old in reversed(done):
                try:
                    if old is None:
                        os.unlink(name, dir_fd=self.fd)
                    else:
                        back = self._temp_copy(name, old[0], old[1], keep=False)
                        os.replace(back, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                except OSError:
                    log.exception("could not put %s back", self.path / name)
            for tmp, _ in temps:
                with suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=self.fd)
            raise

    def _lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _old(self, name: str) -> tuple[bytes, int] | None:
        """What to put back if a later rename fails: the regular file's content and mode."""
        try:
            fd = self.open(name, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, ClientError):
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            return f.read(), stat.S_IMODE(st.st_mode)

    def _temp_copy(self, name: str, data: bytes, mode: int, *, keep: bool) -> str:
        """``data`` in a new fsynced temporary file beside ``name``: with ``keep``, in the
        mode and group of the regular file it will replace (when there is one), else in
        ``mode``."""
        st = self._lstat(name) if keep else None
        if st is not None and not stat.S_ISREG(st.st_mode):
            st = None
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = self.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
        try:
            with os.fdopen(fd, "wb") as f:
                # The umask may have taken bits: fchmod, as the file was opened 0600.
                os.fchmod(fd, stat.S_IMODE(st.st_mode) if st else mode)
                if st is not None:
                    with suppress(OSError):
                        os.fchown(fd, -1, st.st_gid)
                f.write(data)
                f.flush()
                os.fsync(fd)
        except BaseException:
            os.unlink(tmp, dir_fd=self.fd)
            raise
        return tmp
