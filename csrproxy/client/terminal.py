"""The terminal while the client waits: a progress line redrawn every second, and log
lines on stderr that step around it."""

from __future__ import annotations

import logging
import threading
import time
from typing import TextIO


class TerminalProgress:
    """``\\r waiting for the CA… 3s`` on a terminal, redrawn every second while waiting."""

    def __init__(self, stream: TextIO, interval: float = 1.0) -> None:
        self.stream, self.interval = stream, interval
        self.message, self.started = "", 0.0
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, message: str) -> None:
        with self.lock:
            if message and not self.message:
                self.started = time.monotonic()
            self.message = message
            self.draw() if message else self.clear()
        if message and self._thread is None:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        elif not message and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._stop.clear()

    def draw(self) -> None:
        elapsed = int(time.monotonic() - self.started)
        self.stream.write(f"\r\x1b[K {self.message}… {elapsed}s")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self.lock:
                if self.message:
                    self.draw()


class TerminalLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on stderr that step around the progress line."""

    def __init__(self, stream: TextIO, progress: TerminalProgress | None) -> None:
        super().__init__(stream)
        self.progress = progress
        self.setFormatter(logging.Formatter("csrproxy-client: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        p = self.progress
        if p is None or not p.message:
            return super().emit(record)
        with p.lock:
            p.clear()
            super().emit(record)
            p.draw()
