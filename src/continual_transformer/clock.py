"""Wall time of a call's phases, for the reports of learning calls."""

from __future__ import annotations

import time


class PhaseClock:
    """Wall seconds of the phases of one call, in order (``lap(name)`` ends a phase). No device
    synchronisation of its own: a phase that ends with a read of its results on the host counts its device
    work; one that does not counts the host's time, and its queued work falls in a later phase."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 4)
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self._start
