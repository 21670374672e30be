"""Test knob: die like ``kill -9`` at a named point of an order.

``CSRPROXY_CRASH_AT=after-new-order`` (or ``after-challenge``, ``after-finalize``,
``after-download``) makes the process SIGKILL itself the first time it reaches
that point, so crash-recovery tests hit exact moments.  Unset in production.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after-new-order", "after-challenge", "after-finalize", "after-download")


def reached(point: str) -> None:
    if os.environ.get("CSRPROXY_CRASH_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
