"""Progress edits no more often than a platform allows (Discord ~1.5 s, Telegram groups ~3 s)."""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    """``ready()`` is True at most once per ``interval_s``; ``force`` for the last update."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: float | None = None

    def ready(self, force: bool = False) -> bool:
        now = self.clock()
        if force or self._last is None or now - self._last >= self.interval_s:
            self._last = now
            return True
        return False
