"""Stage timing and frame rate, by torch's measurement rules (G11).

``StageTimer.stage(name)`` synchronizes the device before it reads the clock at both ends, so queued kernels
are charged to the stage that launched them; it runs the body under
``torch.profiler.record_function(f"musetalk.{name}")`` so a torch trace uses the same names; it keeps the first
``warmup`` calls of each stage out of the median and p90 (MPS shader compilation, cuDNN autotuning and lazy
allocations land there). Everything is bounded: a reservoir of durations per stage and a capped list of
(name, t0, t1, thread) intervals, so an hour-long run costs the same memory as a minute.

The pipeline calls ``stage`` from two threads: the model worker ("audio", "unet", "vae_decode") and the
consumer ("blend", "encode"). Host-only stages (``HOST_STAGES``) do not synchronize: a device-wide sync there
would wait for the *other* thread's kernels and charge the UNet's time to the blend.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from musetalk.devices import synchronize
from musetalk.profiling.memory import CappedSeries, as_device
from musetalk.stream.latency import LatencyMeter  # noqa: F401  (re-exported: the Profiler uses it)

# The pipeline's stage names, in pipeline order (from_pretrained: load, once per model; prepare: landmarks..vae_encode;
# stream: vad..encode).
PIPELINE_STAGES = ("load", "landmarks", "crop", "parsing", "vae_encode", "vad", "audio", "unet", "vae_decode", "blend",
                   "silence", "encode")
# numpy / PyAV work only (the VAD runs on the CPU): no device sync (see the module docstring)
HOST_STAGES = frozenset({"crop", "vad", "blend", "silence", "encode"})
RESERVOIR_SIZE = 1024  # durations kept per stage for median / p90: +-3 % on p90 is plenty for a report
MAX_INTERVALS = 1024  # stage bands kept per stage (thinned evenly over the run, see CappedSeries)
FPS_WINDOW_S = 2.0  # the pipeline emits frames in batch-size bursts; 2 s smooths a batch of 8 at 4 fps
MAX_FPS_POINTS = 4096

Interval = tuple[str, float, float, str]  # (stage, t0, t1, thread name), perf_counter seconds


@dataclass
class StageStats:
    """Timing of one stage. Times of single calls in ms, totals in s; median/p90 leave out the warm-up calls."""

    count: int  # calls, warm-up included
    total_s: float  # summed duration, warm-up included
    mean_ms: float
    median_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    first_ms: float  # the first call: compare with median_ms to see the warm-up cost
    threads: list[str] = field(default_factory=list)  # thread names that ran this stage


class _Accumulator:
    """Running count/total/min/max plus a reservoir sample (Vitter's algorithm R) of post-warm-up durations."""

    def __init__(self, warmup: int, size: int, seed: int) -> None:
        self.warmup, self.size = warmup, size
        self.count, self.total = 0, 0.0
        self.low, self.high, self.first = float("inf"), 0.0, 0.0
        self.warm: list[float] = []  # the warm-up durations (at most `warmup`)
        self.reservoir: list[float] = []
        self.steady = 0  # post-warm-up durations seen
        self.threads: dict[str, None] = {}  # ordered set
        self._rng = random.Random(seed)

    def add(self, seconds: float, thread: str) -> None:
        if self.count == 0:
            self.first = seconds
        self.count += 1
        self.total += seconds
        self.low, self.high = min(self.low, seconds), max(self.high, seconds)
        self.threads.setdefault(thread, None)
        if len(self.warm) < self.warmup:
            self.warm.append(seconds)
            return
        self.steady += 1
        if len(self.reservoir) < self.size:
            self.reservoir.append(seconds)
        else:
            slot = self._rng.randrange(self.steady)
            if slot < self.size:
                self.reservoir[slot] = seconds

    def stats(self) -> StageStats:
        # a stage called only during warm-up (one avatar batch) still gets a median: its warm-up calls
        sample = self.reservoir or self.warm
        median, p90 = np.percentile(np.asarray(sample), [50, 90]) if sample else (0.0, 0.0)
        return StageStats(count=self.count, total_s=self.total, mean_ms=1e3 * self.total / max(self.count, 1),
                          median_ms=1e3 * float(median), p90_ms=1e3 * float(p90),
                          min_ms=1e3 * (self.low if self.count else 0.0), max_ms=1e3 * self.high,
                          first_ms=1e3 * self.first, threads=list(self.threads))


class StageTimer:
    """Time named stages on ``device``; thread-safe. Use ``with timer.stage("unet"): ...``."""

    def __init__(self, device: str | torch.device | None = None, *, warmup: int = 1,
                 host_stages: frozenset[str] = HOST_STAGES, reservoir_size: int = RESERVOIR_SIZE,
                 max_intervals: int = MAX_INTERVALS) -> None:
        self.device = as_device(device)
        self.warmup = warmup
        self.host_stages = host_stages
        self.reservoir_size = reservoir_size
        self.max_intervals = max_intervals
        self._lock = threading.Lock()
        self._acc: dict[str, _Accumulator] = {}
        # one series per stage, so thinning cannot alias alternating stages away (blend, encode, blend, ...)
        self._intervals: dict[str, CappedSeries[Interval]] = {}

    @contextmanager
    def stage(self, name: str, sync: bool | None = None) -> Iterator[None]:
        """Time the body as stage ``name``; ``sync`` overrides whether the device is synchronized around it.

        The time is recorded even when the body raises (it ran). Nested stages on one thread each count
        their full duration.
        """
        if sync is None:
            sync = name not in self.host_stages
        with torch.profiler.record_function(f"musetalk.{name}"):
            if sync:
                synchronize(self.device)
            t0 = time.perf_counter()
            try:
                yield
            finally:
                if sync:
                    synchronize(self.device)
                t1 = time.perf_counter()
                self.add(name, t0, t1)

    def add(self, name: str, t0: float, t1: float, thread: str | None = None) -> None:
        """Record a call of ``name`` from ``t0`` to ``t1`` (perf_counter s) measured elsewhere."""
        thread = thread if thread is not None else threading.current_thread().name
        with self._lock:
            acc = self._acc.get(name)
            if acc is None:
                acc = self._acc[name] = _Accumulator(self.warmup, self.reservoir_size, seed=len(self._acc))
                self._intervals[name] = CappedSeries(self.max_intervals)
            acc.add(t1 - t0, thread)
            self._intervals[name].append((name, t0, t1, thread))

    def stats(self) -> dict[str, StageStats]:
        """Per-stage statistics, in pipeline order, then any other stage in first-seen order."""
        with self._lock:
            return {name: self._acc[name].stats() for name in order_stages(self._acc)}

    def intervals(self) -> list[Interval]:
        """The kept (stage, t0, t1, thread) intervals of all stages, sorted by start time."""
        with self._lock:
            kept = [iv for series in self._intervals.values() for iv in series]
        return sorted(kept, key=lambda iv: iv[1])


def order_stages(names: Iterable[str]) -> list[str]:
    """``names`` in pipeline order, unknown stages after, in their given order (duplicates dropped)."""
    names = list(dict.fromkeys(names))
    known = [n for n in PIPELINE_STAGES if n in names]
    return known + [n for n in names if n not in PIPELINE_STAGES]


class FpsMeter:
    """Output frame rate: call ``frame_done()`` once per frame (thread-safe).

    ``series()``: (t, fps) after each frame, fps over the frames of the last ``window_s`` seconds (at least the
    last two frames, so a slow CPU run still gets a number); thinned like the memory samples.
    """

    def __init__(self, window_s: float = FPS_WINDOW_S, max_points: int = MAX_FPS_POINTS) -> None:
        self.window_s = window_s
        self.frames = 0
        self.first: float | None = None
        self.last: float | None = None
        self._recent: deque[float] = deque(maxlen=4096)  # bounds the window at very high frame rates
        self._series: CappedSeries[tuple[float, float]] = CappedSeries(max_points)
        self._lock = threading.Lock()

    def frame_done(self, t: float | None = None) -> None:
        """Count one output frame, finished at ``t`` (default: now, ``time.perf_counter()``)."""
        t = time.perf_counter() if t is None else t
        with self._lock:
            self.frames += 1
            if self.first is None:
                self.first = t
            self.last = t
            recent = self._recent
            recent.append(t)
            while len(recent) > 2 and t - recent[0] > self.window_s:
                recent.popleft()
            if len(recent) >= 2 and t > recent[0]:
                self._series.append((t, (len(recent) - 1) / (t - recent[0])))

    def fps(self) -> float | None:
        """The current windowed rate, or None before two frames."""
        with self._lock:
            items = self._series.items()
        return items[-1][1] if items else None

    def series(self) -> list[tuple[float, float]]:
        """(t, windowed fps) points, oldest first."""
        with self._lock:
            return self._series.items()

    def stream_fps(self) -> float | None:
        """Frames per second from the first frame to the last: the steady rate, without the set-up before it."""
        with self._lock:
            if self.frames < 2 or self.first is None or self.last is None or self.last <= self.first:
                return None
            return (self.frames - 1) / (self.last - self.first)

    def overall_fps(self, start: float, end: float) -> float | None:
        """Frames per second over ``start``..``end`` (perf_counter s), e.g. the whole profiled run."""
        with self._lock:
            return self.frames / (end - start) if end > start and self.frames else None

