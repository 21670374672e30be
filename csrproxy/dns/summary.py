"""One log line per window for events that come in floods (refused TCP connections, rate
limited replies): counts by what happened and by source, never a line per event."""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

log = Logger()

K = TypeVar("K", bound=Hashable)


class WindowSummary(Generic[K]):
    """Counts events; the first opens a window of ``interval`` seconds, at its end one
    warning (``message``, fields ``total``, ``field`` — the counts by what — and ``top``)
    names the ``named`` sources seen most.  Sources beyond ``named * 4`` in one window are
    counted, not named: a flood from many addresses costs no memory."""

    def __init__(
        self,
        clock: Any,
        message: str,
        field: str,
        *,
        interval: float,
        named: int = 5,
        describe: Callable[[K], str] = str,
    ) -> None:
        self.clock = clock
        self.message = message
        self.field = field
        self.interval = interval
        self.named = named
        self.describe = describe
        self._what: collections.Counter[str] = collections.Counter()
        self._sources: collections.Counter[K] = collections.Counter()
        self._window: IDelayedCall | None = None

    def count(self, what: str, source: K) -> None:
        self._what[what] += 1
        if source in self._sources or len(self._sources) < self.named * 4:
            self._sources[source] += 1
        if self._window is None:
            self._window = self.clock.callLater(self.interval, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line (if anything) and start afresh."""
        if self._window is not None and self._window.active():
            self._window.cancel()
        self._window = None
        if not self._what:
            return
        total = sum(self._what.values())
        counts = ", ".join(f"{what} {n}" for what, n in sorted(self._what.items()))
        top = ", ".join(
            f"{self.describe(s)} {n}" for s, n in self._sources.most_common(self.named)
        )
        self._what.clear()
        self._sources.clear()
        log.warn(self.message, total=total, top=top, **{self.field: counts})
