"""Driving in-memory ACME exchanges on a Clock until a Deferred fires (no sleeps)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock


def run_until_fired(
    d: Deferred[Any],
    flush: Callable[[], object],
    clock: Clock,
    step: float = 0.01,
    limit: float = 100.0,
) -> list[Any]:
    """Flush the in-memory agent and advance ``clock`` by ``step`` until ``d`` fires or
    ``limit`` seconds of clock time pass; ``[result]`` (a Failure too), or ``[]``."""
    out: list[Any] = []
    d.addBoth(out.append)
    elapsed = 0.0
    while not out and elapsed < limit:
        flush()
        clock.advance(step)
        elapsed += step
    return out
