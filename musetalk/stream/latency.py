"""Per-frame latency statistics of live sessions, bounded in memory (used by ``stream.live`` and the profiler)."""

from __future__ import annotations

import random
import threading

import numpy as np

RESERVOIR_SIZE = 1024  # latencies kept for p50 / p95: +-3 % on p95 is plenty for a report


class LatencyMeter:
    """Per-frame latency of a live session (thread-safe, bounded): the time from the arrival of the audio that
    completes a frame to the frame leaving the pipeline. Call ``add(seconds, late)`` once per frame.

    Keeps the first frame's latency, count, late count, max and mean exactly, and p50/p95 over a reservoir
    (Vitter's algorithm R, ``RESERVOIR_SIZE`` values), so a 10-minute session costs the same memory as a second.
    """

    def __init__(self, reservoir_size: int = RESERVOIR_SIZE) -> None:
        self.frames = 0
        self.late = 0
        self.first: float | None = None
        self.max = 0.0
        self.total = 0.0
        self._size = reservoir_size
        self._reservoir: list[float] = []
        self._rng = random.Random(0)
        self._lock = threading.Lock()

    def add(self, seconds: float, late: bool = False) -> None:
        """Record one frame's latency (s) and whether it counted as late."""
        with self._lock:
            if self.first is None:
                self.first = seconds
            self.frames += 1
            self.late += bool(late)
            self.max = max(self.max, seconds)
            self.total += seconds
            if len(self._reservoir) < self._size:
                self._reservoir.append(seconds)
            else:
                slot = self._rng.randrange(self.frames)
                if slot < self._size:
                    self._reservoir[slot] = seconds

    def summary(self) -> dict[str, float | int | None]:
        """frames, late, first_s, p50_s, p95_s, max_s, mean_s (None before the first frame)."""
        with self._lock:
            if not self._reservoir:
                return {"frames": 0, "late": 0, "first_s": None, "p50_s": None, "p95_s": None, "max_s": None,
                        "mean_s": None}
            p50, p95 = np.percentile(np.asarray(self._reservoir), [50, 95])
            return {"frames": self.frames, "late": self.late, "first_s": self.first, "p50_s": float(p50),
                    "p95_s": float(p95), "max_s": self.max, "mean_s": self.total / self.frames}
