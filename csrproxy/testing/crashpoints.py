"""Test knob: die like ``kill -9`` at a named point of an order.

``CSRPROXY_CRASH_AT=after-new-order`` (or ``after-challenge``, ``after-finalize``,
``after-download``) asks for a checkpoint that makes the process SIGKILL itself the first
time an order reaches that point, so crash-recovery tests hit exact moments.  The order
code knows nothing of this: it calls the checkpoint it is given
(:class:`csrproxy.acme.order.OrderRun`), and only the wiring installs this one, when the
variable is set.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

from csrproxy.acme.order import CHECKPOINTS, Checkpoint

#: The points a crash can be asked for.
POINTS = CHECKPOINTS

#: The environment variable that names the point.
CRASH_AT = "CSRPROXY_CRASH_AT"


def crash_checkpoint(point: str) -> Checkpoint:
    """A checkpoint that SIGKILLs this process when an order reaches ``point``."""
    if point not in POINTS:
        raise ValueError(f"{CRASH_AT}={point!r} is not one of {', '.join(POINTS)}")

    def checkpoint(reached: str) -> None:
        if reached == point:
            os.kill(os.getpid(), signal.SIGKILL)

    return checkpoint


def crash_checkpoint_from_env(environ: Mapping[str, str]) -> Checkpoint | None:
    """The crash checkpoint ``environ`` asks for with CSRPROXY_CRASH_AT, else None."""
    point = environ.get(CRASH_AT)
    return crash_checkpoint(point) if point else None
