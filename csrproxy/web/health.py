"""Liveness and readiness, each part named: what ``GET /v1/health`` and the gauges report.

Liveness is the process answering at all.  Readiness is every check passing; each check
is a callable returning ``(ok, detail)`` so that the parts of the daemon (the account, the
listeners, the store, the CA) report on themselves without this module knowing them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

log = Logger()

#: A part of readiness: ``(ok, what to tell the operator)``.
Probe = Callable[[], tuple[bool, str]]

#: Below this much free space in the state directory the daemon is not ready: each order
#: writes a few KiB, and SQLite needs room for its write-ahead log.
MIN_FREE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


class Health:
    """Readiness as named checks, run when asked (they are cheap: no I/O but ``statvfs``)."""

    def __init__(
        self,
        probes: Sequence[tuple[str, Probe]],
        info: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.probes = list(probes)
        #: What the document says besides the checks (the instance, the database).
        self.info = info
        self._failing: set[str] = set()

    def checks(self) -> list[Check]:
        out = []
        for name, probe in self.probes:
            try:
                ok, detail = probe()
            except Exception as e:  # a broken probe is a failing check, not a 500
                ok, detail = False, f"check failed: {e}"
            out.append(Check(name, ok, detail))
            self._note(name, ok, detail)
        return out

    def _note(self, name: str, ok: bool, detail: str) -> None:
        # One line per change of a check's state, not one per health request.
        if ok and name in self._failing:
            self._failing.discard(name)
            log.info("ready again: {check}", check=name)
        elif not ok and name not in self._failing:
            self._failing.add(name)
            log.warn("not ready: {check}: {detail}", check=name, detail=detail)

    def ready(self) -> bool:
        return all(c.ok for c in self.checks())

    def document(self) -> dict[str, Any]:
        checks = self.checks()
        return {
            **(self.info() if self.info is not None else {}),
            "live": True,
            "ready": all(c.ok for c in checks),
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
        }


#: While the store is not healthy and has room again, a test write is tried this often
#: (health checks come from load balancers; a drained daemon makes no writes of its own).
RETRY_WRITE_EVERY = 10.0


def free_space_probe(
    path: str,
    healthy: Callable[[], bool],
    minimum: int = MIN_FREE_BYTES,
    retry_write: Callable[[], object] | None = None,
    now: Callable[[], float] = time.monotonic,
) -> Probe:
    """The store is ready while its last write succeeded and its directory has room.

    ``retry_write`` starts a test write in the background (it makes the store healthy
    again when it succeeds); it is asked for at most every ``RETRY_WRITE_EVERY`` seconds.
    """
    last_try = [-RETRY_WRITE_EVERY]

    def probe() -> tuple[bool, str]:
        try:
            st = os.statvfs(path)
        except OSError as e:
            return False, f"{path}: {e.strerror}"
        free = st.f_bavail * st.f_frsize
        if not healthy():
            due = now() - last_try[0] >= RETRY_WRITE_EVERY
            if retry_write is not None and free >= minimum and due:
                last_try[0] = now()
                retry_write()
            return False, f"the last write to the state database failed ({free >> 20} MiB free)"
        if free < minimum:
            return False, f"{path} has {free >> 10} KiB free (needs {minimum >> 20} MiB)"
        return True, f"{free >> 20} MiB free"

    return probe
