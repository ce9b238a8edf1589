"""Preemption: SIGTERM/SIGUSR1 set a flag; the loop stops at a step boundary.

The handler only sets a flag (nothing else is safe inside a signal handler). Alone, the
trainer stops after the current step. With several ranks the flag is agreed at the next
log step, riding along the metrics' one collective (:meth:`MetricLogger.flush`), so every
rank stops after the same step even if only one of them got the signal, and no step pays
for a collective and a host read of its own.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any


log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """A preemption flag set by signal handlers; use as a context manager.

    Args:
        signals: which signals request a stop.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is not threading.main_thread():
            # Python only allows handlers in the main thread; stop requests then come via request().
            log.warning("not in the main thread: SIGTERM/SIGUSR1 will not trigger a checkpoint-and-stop")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def request(self) -> None:
        """Ask for a stop without a signal (e.g. from a launcher's checkpoint hook)."""
        self.requested = True
