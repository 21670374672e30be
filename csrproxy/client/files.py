"""Atomic file replacement: each file is whole, old or new, after a failure or a crash."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

# One logger for the whole client, as before the split: the CLI's handler attaches to it.
log = logging.getLogger("csrproxy.client")


def _temp_copy(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a fsynced temp file next to ``path``, with the mode and group of the
    file it will replace (when there is one), else ``mode``."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, (st.st_mode & 0o777) if st else mode)
        if st is not None:
            with suppress(OSError):
                os.fchown(fd, -1, st.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(directory: Path, files: Sequence[tuple[str, bytes, int]]) -> None:
    """Replace several files, in the order given, so that each is the old or the new one.

    Every new file is written and fsynced to a temp file first; then the renames follow
    each other.  If anything fails, the files already renamed get their old content back
    and no temp file is left.  A power cut between two renames can still leave the
    earlier files new and the later ones old (each file whole).
    """
    temps: list[tuple[Path, Path]] = []
    done: list[tuple[Path, bytes | None]] = []
    try:
        for name, data, mode in files:
            temps.append((_temp_copy(directory / name, data, mode), directory / name))
        for tmp, target in temps:
            old = target.read_bytes() if target.exists() else None
            os.replace(tmp, target)
            done.append((target, old))
        _fsync_dir(directory)
    except BaseException:
        for target, old in reversed(done):
            try:
                if old is None:
                    target.unlink(missing_ok=True)
                else:
                    os.replace(_temp_copy(target, old, 0o600), target)
            except OSError:
                log.exception("could not put %s back", target)
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old or the new file, never a part."""
    write_files(path.parent, [(path.name, data, mode)])
