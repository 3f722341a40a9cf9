"""Memory sampling in a background thread: process RSS/USS, system available memory and the device allocator.

Every number names the counter it comes from (G11). Counters, in bytes:

  rss                           psutil ``memory_info().rss``: resident pages of this process. Metal buffers on
                                Apple Silicon need not show here (macOS accounts them apart): read mps_* for them
  uss                           psutil ``memory_full_info().uss``: pages only this process holds; slow to read
                                (it walks every mapping), so sampled at most once per ``uss_interval``
  system_available              psutil ``virtual_memory().available``; its *minimum* is the interesting number
  cuda_memory_allocated         ``torch.cuda.memory_allocated``: live tensors
  cuda_memory_reserved          ``torch.cuda.memory_reserved``: held by the caching allocator
  cuda_max_memory_allocated     ``torch.cuda.max_memory_allocated``, reset when the monitor starts: exact peak,
                                unlike the sampled counters, which can miss a spike shorter than ``interval``
  mps_current_allocated_memory  ``torch.mps.current_allocated_memory``: live tensors
  mps_driver_allocated_memory   ``torch.mps.driver_allocated_memory``: everything Metal holds for the process
  mlx_active_memory             ``mlx.core.get_active_memory``: live MLX arrays (the MLX backend's UNet + VAE)
  mlx_peak_memory               ``mlx.core.get_peak_memory``, reset when the monitor starts: exact peak
  mlx_cache_memory              ``mlx.core.get_cache_memory``: freed buffers MLX keeps for reuse
                                (the mlx_* counters appear once the process has loaded MLX; on Apple Silicon they
                                count Metal memory that RSS does not show)

Limits (read once): ``system_total``, ``cuda_total_memory``, ``mps_recommended_max_memory`` (the Metal working
set above which allocations start to fail or swap).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

import psutil
import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
Sample = dict[str, float]

DEFAULT_INTERVAL = 0.05  # s; psutil's RSS read costs ~10 us, so 20 Hz is free
DEFAULT_MAX_SAMPLES = 4096  # ~200 s at 20 Hz before the first halving; ~100 kB per 1000 samples
USS_INTERVAL = 1.0  # s between USS reads at least
# memory_full_info took 3 ms for a 250 MB process on Linux and grows with the number of mappings (torch + models:
# tens of ms; macOS is slower). Keep its cost under ~2 % of one core: wait >= 50x the last read's duration.
USS_COST_FACTOR = 50.0


class CappedSeries(Generic[T]):
    """An append-only series that keeps at most ``cap`` items, evenly spread over the whole run.

    When full it drops every other item and from then on keeps only every ``stride``-th append (the stride
    doubles at each halving), so a run of any length is covered from its first to its latest item at a
    resolution that coarsens by powers of two. Memory is O(cap). The most recent append is always kept
    (as ``last``) so the end of a run is never lost between strides.
    """

    def __init__(self, cap: int) -> None:
        if cap < 2:
            raise ValueError(f"cap must be >= 2, got {cap}")
        self.cap = cap
        self.stride = 1
        self.seen = 0  # appends so far, kept or not
        self._items: list[T] = []
        self._last: T | None = None
        self._last_kept = True

    def append(self, item: T) -> None:
        """Add ``item``; it is kept when its index is a multiple of the current stride."""
        index, self.seen = self.seen, self.seen + 1
        self._last = item
        self._last_kept = index % self.stride == 0
        if not self._last_kept:
            return
        self._items.append(item)
        if len(self._items) > self.cap:
            # items kept so far sit at indices 0, s, 2s, ...: keeping the even ones leaves 0, 2s, 4s, ...
            self._items = self._items[::2]
            self.stride *= 2
            self._last_kept = (self.seen - 1) % self.stride == 0

    def items(self) -> list[T]:
        """The kept items in order, plus the latest append when the stride skipped it (at most cap + 1)."""
        if self._last is not None and not self._last_kept:
            return [*self._items, self._last]
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items) + (0 if self._last_kept else 1)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items())


@dataclass(frozen=True)
class Backend:
    """How to read one accelerator's memory; ``None`` where the backend has no such operation (G6)."""

    counters: Callable[[torch.device], dict[str, int]]  # per sample
    limits: Callable[[torch.device], dict[str, int]]  # once
    reset_peak: Callable[[torch.device], None] | None
    name: Callable[[torch.device], str] | None  # None: the CPU's name is the device's (Apple's unified chips)


def _cuda_counters(device: torch.device) -> dict[str, int]:
    return {"cuda_memory_allocated": torch.cuda.memory_allocated(device),
            "cuda_memory_reserved": torch.cuda.memory_reserved(device),
            "cuda_max_memory_allocated": torch.cuda.max_memory_allocated(device)}


def _mps_counters(_device: torch.device) -> dict[str, int]:
    return {"mps_current_allocated_memory": torch.mps.current_allocated_memory(),
            "mps_driver_allocated_memory": torch.mps.driver_allocated_memory()}


def _mps_limits(_device: torch.device) -> dict[str, int]:
    read = getattr(torch.mps, "recommended_max_memory", None)  # torch >= 2.5
    return {"mps_recommended_max_memory": read()} if read is not None else {}


# The only place in profiling that names backends; everything else dispatches on ``device.type``.
BACKENDS: dict[str, Backend] = {
    "cuda": Backend(counters=_cuda_counters,
                    limits=lambda d: {"cuda_total_memory": torch.cuda.get_device_properties(d).total_memory},
                    reset_peak=torch.cuda.reset_peak_memory_stats, name=torch.cuda.get_device_name),
    "mps": Backend(counters=_mps_counters, limits=_mps_limits, reset_peak=None, name=None),
}


def _mlx_counters() -> dict[str, int]:
    """MLX's allocator, read only when the process has imported MLX (profiling never imports it itself)."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return {}
    return {"mlx_active_memory": mx.get_active_memory(), "mlx_peak_memory": mx.get_peak_memory(),
            "mlx_cache_memory": mx.get_cache_memory()}


def as_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cpu; a string -> ``torch.device`` (no availability check: the pipeline resolved it already)."""
    return torch.device("cpu") if device is None else torch.device(device)


class MemoryMonitor:
    """Sample memory every ``interval`` seconds in a daemon thread, from ``start()`` (or ``with``) to ``stop()``.

    ``samples``: dicts with ``t`` (``time.perf_counter()`` seconds, the clock the stage timer uses) and the
    counters listed in the module docstring; backend counters only for a device of that type, ``uss`` only on
    the samples where it was read. At most ``max_samples`` are kept (see :class:`CappedSeries`), but ``peak()``
    and ``lowest()`` see every sample taken.

    ``uss=False`` skips USS altogether; it is also dropped, with a note in ``notes``, where psutil cannot read it.
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL, device: str | torch.device | None = None, *,
                 uss: bool = True, uss_interval: float = USS_INTERVAL, max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 s, got {interval}")
        self.interval = interval
        self.device = as_device(device)
        self.backend = BACKENDS.get(self.device.type)
        self.uss_interval = uss_interval
        self.notes: list[str] = []
        self.error: BaseException | None = None  # what stopped the sampling thread, if anything did
        self._uss = uss
        self._next_uss = 0.0
        self._process = psutil.Process()
        self._series: CappedSeries[Sample] = CappedSeries(max_samples)
        self._peak: dict[str, float] = {}
        self._low: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.limits: dict[str, int] = {"system_total": psutil.virtual_memory().total}

    # -- sampling ------------------------------------------------------------------------------------------
    def _read_uss(self, now: float) -> int | None:
        if not self._uss or now < self._next_uss:
            return None
        started = time.perf_counter()
        try:
            uss = self._process.memory_full_info().uss
        except (psutil.Error, NotImplementedError, AttributeError, OSError) as exc:
            self._uss = False
            self.notes.append(f"uss disabled: psutil memory_full_info failed ({type(exc).__name__}: {exc})")
            return None
        cost = time.perf_counter() - started
        self._next_uss = now + max(self.uss_interval, USS_COST_FACTOR * cost)
        return uss

    def sample(self) -> Sample:
        """Read every counter now, record the sample (thread-safe) and return it."""
        now = time.perf_counter()
        sample: Sample = {"t": now, "rss": self._process.memory_info().rss}
        uss = self._read_uss(now)
        if uss is not None:
            sample["uss"] = uss
        sample["system_available"] = psutil.virtual_memory().available
        if self.backend is not None:
            sample.update(self.backend.counters(self.device))
        sample.update(_mlx_counters())
        with self._lock:
            self._series.append(sample)
            for key, value in sample.items():
                if key == "t":
                    continue
                if value > self._peak.get(key, float("-inf")):
                    self._peak[key] = value
                if value < self._low.get(key, float("inf")):
                    self._low[key] = value
        return sample

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.sample()
        except Exception as exc:  # noqa: BLE001 - a broken probe must not kill the run being profiled
            self.error = exc
            log.warning("memory sampling stopped: %s: %s", type(exc).__name__, exc)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> MemoryMonitor:
        """Reset the backend's peak counter, take a first sample and start the sampling thread."""
        if self._thread is not None:
            raise RuntimeError("MemoryMonitor already started")
        if self.backend is not None:
            self.limits.update(self.backend.limits(self.device))
            if self.backend.reset_peak is not None:
                self.backend.reset_peak(self.device)
        if "mlx.core" in sys.modules:
            sys.modules["mlx.core"].reset_peak_memory()
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="musetalk-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and take a last sample, so even a run shorter than ``interval`` has two."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.sample()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- results -------------------------------------------------------------------------------------------
    @property
    def samples(self) -> list[Sample]:
        """The kept samples, oldest first (a copy of the list; at most ``max_samples`` + 1)."""
        with self._lock:
            return self._series.items()

    @property
    def samples_taken(self) -> int:
        """How many samples were read, including those the cap later thinned out."""
        return self._series.seen

    def peak(self) -> dict[str, float]:
        """Largest value of each counter over every sample taken (bytes)."""
        with self._lock:
            return dict(self._peak)

    def lowest(self) -> dict[str, float]:
        """Smallest value of each counter over every sample taken (bytes); use it for ``system_available``."""
        with self._lock:
            return dict(self._low)
