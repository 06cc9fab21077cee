"""--watchdog-timeout: a scheduler stuck in one step is reported and its process exits
non-zero (the API server then fails pending requests and exits too), instead of every
client waiting forever."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _exit_stuck(elapsed_s: float) -> None:
    logger.error("a scheduler step has run for %.0f s, past --watchdog-timeout; the "
                 "threads' stacks follow, then the process exits", elapsed_s)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(1)  # the stuck step holds the main thread: nothing else can end it


class StepWatchdog:
    """`begin()` / `end()` around each step; a thread calls `on_stuck(elapsed)` once when
    a step has been running longer than `timeout_s` (None: never)."""

    def __init__(self, timeout_s: float | None,
                 on_stuck: Callable[[float], None] = _exit_stuck) -> None:
        self.timeout_s = timeout_s
        self.on_stuck = on_stuck
        self._started: float | None = None  # monotonic start of the running step
        if timeout_s is not None:
            threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def begin(self) -> None:
        self._started = time.monotonic()

    def end(self) -> None:
        self._started = None

    def _watch(self) -> None:
        assert self.timeout_s is not None
        interval = min(1.0, self.timeout_s / 4)
        while True:
            time.sleep(interval)
            started = self._started
            if started is not None and time.monotonic() - started > self.timeout_s:
                self.on_stuck(time.monotonic() - started)
                return
