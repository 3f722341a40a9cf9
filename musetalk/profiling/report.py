"""``Profiler``: memory + stage times + fps for one run, passed into the pipeline (G11); ``ProfileReport``: its result.

    prof = Profiler(device=pipe.device)
    with prof:
        pipe.generate(src, wav, "out.mp4", config, profiler=prof)
    report = prof.report(meta={"dtype": "fp16", "batch_size": 8, "label": "M2 fp16"})
    report.save("run.json"); print(report.markdown())
    print(compare(["run.json", "other.json"]))

Times in a report are seconds from the profiler's start; memory in bytes, each number named after its counter
(see ``musetalk.profiling.memory``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Sequence

import psutil
import torch

from musetalk.hooks import Hooks
from musetalk.profiling.memory import BACKENDS, DEFAULT_INTERVAL, MemoryMonitor, as_device
from musetalk.profiling.timing import FpsMeter, LatencyMeter, StageStats, StageTimer, order_stages

log = logging.getLogger(__name__)

SCHEMA = 1  # bump when a field changes meaning; load() refuses other versions
# peak counters shown in markdown / compare, in this order, with what they measure
PEAK_LABELS = {
    "rss": "process RSS",
    "uss": "process USS",
    "cuda_max_memory_allocated": "CUDA max allocated",
    "cuda_memory_reserved": "CUDA reserved",
    "mps_current_allocated_memory": "MPS allocated",
    "mps_driver_allocated_memory": "MPS driver allocated",
    "mlx_peak_memory": "MLX peak",
    "mlx_cache_memory": "MLX cache",
    "system_available_min": "system available, lowest",
}


def cpu_name() -> str:
    """The CPU model ("Apple M2 Pro", "AMD EPYC 7B13"): ``platform.processor()`` says only "arm" on a Mac."""
    if sys.platform == "darwin":
        try:
            done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=2, check=True)
            if done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("no CPU name from sysctl: %s", exc)
    elif sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError as exc:
            log.debug("no CPU name from /proc/cpuinfo: %s", exc)
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a reader of a saved report needs to compare machines: OS, CPU, RAM, device name, versions."""
    backend = BACKENDS.get(device.type)
    cpu = cpu_name()
    name = backend.name(device) if backend is not None and backend.name is not None else cpu
    return {"device": str(device), "device_name": name, "cpu": cpu, "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "total_ram": psutil.virtual_memory().total, "python": sys.version.split()[0], "torch": torch.__version__}


@dataclass
class ProfileReport:
    """One profiled run. JSON-serialisable as is (lists, dicts, numbers, strings); ``load(save(r)) == r``."""

    meta: dict[str, Any]  # machine_info() + what the caller passed (dtype, batch_size, label, command, ...)
    stages: dict[str, StageStats]  # in pipeline order
    frames: int  # output frames (frame_done calls)
    wall_s: float  # profiler start -> stop (or -> report() while running)
    overall_fps: float | None  # frames / wall_s: what a user waits for, preparation included
    stream_fps: float | None  # first -> last frame: the steady rate
    fps_series: list[list[float]]  # [t, fps over the last FPS_WINDOW_S]
    memory: list[dict[str, float]]  # samples: t plus counters (bytes)
    bands: list[list[Any]]  # [stage, t0, t1, thread]: when each stage ran (thinned evenly on long runs)
    peaks: dict[str, float]  # max of each counter; system_available_min is the lowest available memory
    limits: dict[str, int] = field(default_factory=dict)  # system_total, cuda_total_memory, mps_recommended_max_memory
    notes: list[str] = field(default_factory=list)  # e.g. why USS is missing
    # live sessions only: frames, late, first_s, p50_s, p95_s, max_s, mean_s (audio that completes a frame ->
    # the frame leaving the pipeline); empty for offline runs
    latency: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA

    # -- persistence ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (what ``save`` writes)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileReport:
        """Inverse of ``to_dict``; raises ValueError for another schema version."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"profile report schema {data.get('schema')!r} is not {SCHEMA}; re-run the profile")
        data = dict(data)
        data["stages"] = {name: StageStats(**stats) for name, stats in data["stages"].items()}
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (a crash leaves the old file or none, never half a report); returns the path."""
        path = Path(path)
        from musetalk.stream.paths import write_text_atomic

        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1, allow_nan=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProfileReport:
        """Read a report written by ``save``."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    # -- views ---------------------------------------------------------------------------------------------
    def ms_per_frame(self, stage: str) -> float | None:
        """Total time of ``stage`` per output frame (ms), or None without frames or without that stage."""
        stats = self.stages.get(stage)
        return 1e3 * stats.total_s / self.frames if stats is not None and self.frames else None

    def markdown(self) -> str:
        """A short summary: the stage table, then memory peaks and frame rates."""
        m = self.meta
        setup = ", ".join(f"{k} {m[k]}" for k in ("dtype", "batch_size") if m.get(k) is not None)
        head = f"**Profile**: {m.get('device', '?')} ({m.get('device_name', '?')}){', ' + setup if setup else ''}; " \
               f"{self.frames} frames in {self.wall_s:.1f} s"
        lines = [head, "", "| stage | calls | total s | share % | median ms | p90 ms |",
                 "|---|---:|---:|---:|---:|---:|"]
        for name, s in self.stages.items():
            share = 100 * s.total_s / self.wall_s if self.wall_s > 0 else 0.0
            lines.append(f"| {name} | {s.count} | {s.total_s:.2f} | {share:.1f} | {s.median_ms:.1f} | {s.p90_ms:.1f} |")
        lines += ["", "share: of the wall time. The model thread and the writer thread run at once, "
                      "so the shares can add up to more than 100 %.", "",
                  "| memory | peak |", "|---|---:|"]
        lines += [f"| {label} (`{key}`) | {format_bytes(self.peaks[key])} |"
                  for key, label in PEAK_LABELS.items() if key in self.peaks]
        lines += [f"| limit `{key}` | {format_bytes(value)} |" for key, value in self.limits.items()]
        lines += ["", f"fps: {_num(self.overall_fps)} overall (frames / wall time), "
                      f"{_num(self.stream_fps)} streaming (first to last frame)"]
        if self.latency.get("frames"):
            lat = self.latency
            lines += [f"latency (audio in -> frame out): first {1e3 * lat['first_s']:.0f} ms, p50 "
                      f"{1e3 * lat['p50_s']:.0f} ms, p95 {1e3 * lat['p95_s']:.0f} ms, max {1e3 * lat['max_s']:.0f} ms; "
                      f"{lat['late']} of {lat['frames']} frames late"]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """1536 MiB -> '1.50 GiB'; below 1 GiB in MiB."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def load_reports(reports: Sequence[ProfileReport | str | os.PathLike],
              labels: Sequence[str] | None) -> tuple[list[ProfileReport], list[str]]:
    """Reports (paths are loaded) and their labels: given, else meta["label"], else the file stem, else "run i"."""
    loaded, names = [], []
    for i, item in enumerate(reports):
        report = item if isinstance(item, ProfileReport) else ProfileReport.load(item)
        default = Path(item).stem if not isinstance(item, ProfileReport) else f"run {i + 1}"
        loaded.append(report)
        names.append(str(report.meta.get("label") or default))
    if labels is not None:
        if len(labels) != len(loaded):
            raise ValueError(f"{len(labels)} labels for {len(loaded)} reports")
        names = [str(label) for label in labels]
    return loaded, names


def compare(reports: Sequence[ProfileReport | str | os.PathLike], labels: Sequence[str] | None = None) -> str:
    """A markdown table with one column per run: setup, fps, memory peaks and each stage's ms per output frame.

    ``reports``: ProfileReport objects or paths of saved ones. Plot the same with ``plots.plot_comparison``.
    """
    loaded, names = load_reports(reports, labels)
    rows: list[tuple[str, list[str]]] = [
        ("device", [f"{r.meta.get('device', '?')} ({r.meta.get('device_name', '?')})" for r in loaded]),
        ("dtype", [str(r.meta.get("dtype", "–")) for r in loaded]),
        ("batch size", [str(r.meta.get("batch_size", "–")) for r in loaded]),
        ("frames", [str(r.frames) for r in loaded]),
        ("wall s", [f"{r.wall_s:.1f}" for r in loaded]),
        ("fps overall", [_num(r.overall_fps) for r in loaded]),
        ("fps streaming", [_num(r.stream_fps) for r in loaded]),
    ]
    for key, label in PEAK_LABELS.items():
        if any(key in r.peaks for r in loaded):
            rows.append((f"peak {label}", [format_bytes(r.peaks[key]) if key in r.peaks else "–" for r in loaded]))
    for stage in order_stages(name for r in loaded for name in r.stages):
        rows.append((f"{stage} ms/frame", [_num(r.ms_per_frame(stage), 1) for r in loaded]))
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


class Profiler(Hooks):
    """Memory monitor + stage timer + fps meter for one run: run hooks (:mod:`musetalk.hooks`) for
    ``generate``/``stream``/``prepare_avatar`` (``hooks=`` or ``profiler=``).

    ``with Profiler(device) as prof:`` starts memory sampling and the wall clock; ``prof.stage(name)`` and
    ``prof.frame_done()`` are what the pipeline calls (from any thread); ``prof.report()`` after (or during) it.
    ``meta`` is stored in the report; pass dtype and batch_size there (or to ``report``).
    """

    def __init__(self, device: str | torch.device | None = "cpu", interval: float = DEFAULT_INTERVAL, *,
                 uss: bool = True, warmup: int = 1, meta: dict[str, Any] | None = None) -> None:
        self.device = as_device(device)
        self.memory = MemoryMonitor(interval, self.device, uss=uss)
        self.timer = StageTimer(self.device, warmup=warmup)
        self.fps_meter = FpsMeter()
        self.latency = LatencyMeter()
        self.meta = dict(meta or {})
        self._start: float | None = None
        self._stop: float | None = None

    def stage(self, name: str, sync: bool | None = None) -> ContextManager[None]:
        """Time ``name`` (see ``StageTimer.stage``)."""
        return self.timer.stage(name, sync)

    def frame_done(self) -> None:
        """Count one output frame now."""
        self.fps_meter.frame_done()

    def frame_latency(self, seconds: float, late: bool = False) -> None:
        """Record a live frame's latency (s): called by live sessions, once per frame, with ``frame_done``."""
        self.latency.add(seconds, late)

    def start(self) -> Profiler:
        """Start the wall clock and the memory sampler."""
        self._start, self._stop = time.perf_counter(), None
        self.memory.start()
        return self

    def stop(self) -> None:
        """Stop the memory sampler and the wall clock."""
        self.memory.stop()
        self._stop = time.perf_counter()

    def __enter__(self) -> Profiler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _origin(self) -> float:
        if self._start is not None:
            return self._start
        # used without start(): the earliest thing recorded
        times = [iv[1] for iv in self.timer.intervals()[:1]] + [s["t"] for s in self.memory.samples[:1]]
        times += [self.fps_meter.first] if self.fps_meter.first is not None else []
        return min(times, default=time.perf_counter())

    def report(self, meta: dict[str, Any] | None = None) -> ProfileReport:
        """Snapshot everything recorded so far into a ProfileReport; ``meta`` adds to (and overrides) the defaults."""
        origin = self._origin()
        end = self._stop if self._stop is not None else time.perf_counter()
        peaks = self.memory.peak()
        low = self.memory.lowest()
        peaks.pop("system_available", None)
        if "system_available" in low:
            peaks["system_available_min"] = low["system_available"]
        notes = list(self.memory.notes)
        if self.memory.error is not None:
            notes.append(f"memory sampling stopped early: {type(self.memory.error).__name__}: {self.memory.error}")
        return ProfileReport(
            meta={**machine_info(self.device), "memory_interval_s": self.memory.interval,
                  "memory_samples_taken": self.memory.samples_taken, **self.meta, **(meta or {})},
            stages=self.timer.stats(), frames=self.fps_meter.frames, wall_s=end - origin,
            overall_fps=self.fps_meter.overall_fps(origin, end), stream_fps=self.fps_meter.stream_fps(),
            fps_series=[[t - origin, fps] for t, fps in self.fps_meter.series()],
            memory=[{**s, "t": s["t"] - origin} for s in self.memory.samples],
            bands=[[name, t0 - origin, t1 - origin, thread] for name, t0, t1, thread in self.timer.intervals()],
            peaks=peaks, limits=dict(self.memory.limits), notes=notes,
            latency=self.latency.summary() if self.latency.frames else {})
