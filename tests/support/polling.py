"""Waiting on the real reactor for a condition that other threads or processes bring
about (a database notification, a listener reconnecting), without blocking it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred


def until(
    reactor: Any,
    predicate: Callable[[], bool],
    timeout: float = 5.0,
    step: float = 0.005,
    what: str = "the condition",
) -> Deferred[float]:
    """Check ``predicate`` every ``step`` seconds on the reactor; fires with the seconds it
    took once it holds, or fails with ``AssertionError`` after ``timeout`` seconds."""
    start = time.monotonic()
    d: Deferred[float] = Deferred()

    def check() -> None:
        elapsed = time.monotonic() - start
        if predicate():
            d.callback(elapsed)
        elif elapsed > timeout:
            d.errback(AssertionError(f"{what} did not hold within {timeout} s"))
        else:
            reactor.callLater(step, check)

    check()
    return d
