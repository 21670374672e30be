"""Child processes of the test kit: started on loopback, stopped at exit and with their parent.

Each daemon is stopped by ``stop()``/the context manager, at interpreter exit, and (Linux) when
the thread that started it dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")

_live: set[Daemon] = set()  # stopped at exit


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@atexit.register
def _stop_all() -> None:
    for d in list(_live):
        d.stop()


def log_tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def spawn(
    argv: Sequence[str],
    log_path: str,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            env=dict(env) if env is not None else None,
        )


def terminate(proc: subprocess.Popen[bytes], grace: float = 5) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(eq=False)
class Daemon:
    """A child process started by the test kit, stopped by ``stop()`` or the context manager."""


    log_path: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def adopt(
        self, proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, timeout: float
    ) -> None:
        """Adopt ``proc``, poll ``ready()`` every 50 ms; if ``proc`` exits or ``timeout`` runs
        out, stop it and raise RuntimeError with the log's tail."""
        self.proc, deadline, last, log = proc, time.monotonic() + timeout, "", self.log_path
        _live.add(self)
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if ready():
                    return
            except Exception as e:
                last = f" (last error: {e!r})"
            threading.Event().wait(0.05)
        exited = proc.poll() is not None
        self.stop()
        why = (
            f"exited ({proc.returncode}) before it was ready"
            if exited
            else (f"was not ready within {timeout} s")
        )
        raise RuntimeError(f"{what} {why}{last}; log {log}:\n{log_tail(log)}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s.  Idempotent."""
        if self.proc is not None:
            terminate(self.proc)
        _live.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def retrying(start: Callable[[], T], attempts: int = 3) -> T:
    """Ports are picked free, then bound by the child: retry if another process won a port."""
    for _ in range(attempts - 1):
        try:
            return start()
        except RuntimeError as e:
            if "address already in use" not in str(e).lower():
                raise
    return start()


def https_get(url: str, cafile: str, timeout: float = 5) -> bytes:
    ctx = ssl.create_default_context(cafile=cafile)
    with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
        return bytes(r.read())
