"""One matplotlib figure per view of a ProfileReport; ``save_figures`` writes them as PNGs.

Figures are built with ``matplotlib.figure.Figure``, not pyplot: no global figure list to leak in a loop, no GUI
backend needed (they save with Agg from any thread), and Jupyter still shows a returned Figure inline.
matplotlib is imported inside each function (it is an optional dependency, G8).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from musetalk.profiling.report import PEAK_LABELS, ProfileReport, load_reports
from musetalk.profiling.timing import PIPELINE_STAGES, order_stages

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIB = 2**20
# sampled counters drawn by plot_memory, with their legend text
MEMORY_SERIES = {
    "rss": "process RSS", "uss": "process USS",
    "cuda_memory_allocated": "CUDA allocated", "cuda_memory_reserved": "CUDA reserved",
    "mps_current_allocated_memory": "MPS allocated", "mps_driver_allocated_memory": "MPS driver allocated",
}


def stage_color(name: str) -> Any:
    """A fixed colour per stage, so every figure (and every run) shows "unet" in the same colour."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    # crc32, not hash(): str hashes change from one process to the next
    extra = len(PIPELINE_STAGES) + zlib.crc32(name.encode()) % 11
    index = PIPELINE_STAGES.index(name) if name in PIPELINE_STAGES else extra
    return cmap(index % cmap.N)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _as_report(report: ProfileReport | str | os.PathLike) -> ProfileReport:
    return report if isinstance(report, ProfileReport) else ProfileReport.load(report)


def plot_stage_times(report: ProfileReport | str | os.PathLike) -> Figure:
    """Horizontal bars: total seconds per stage (pipeline order, top down), labelled calls / median / p90."""
    report = _as_report(report)
    names = list(report.stages)
    fig = _figure(8, 0.45 * max(len(names), 2) + 1.2)
    ax = fig.add_subplot()
    totals = [report.stages[n].total_s for n in names]
    ax.barh(names, totals, color=[stage_color(n) for n in names])
    ax.invert_yaxis()
    for y, name in enumerate(names):
        s = report.stages[name]
        ax.annotate(f" {s.count}x, median {s.median_ms:.1f} ms, p90 {s.p90_ms:.1f} ms", (s.total_s, y),
                    va="center", fontsize=8)
    ax.set_xlim(0, 1.6 * max(totals, default=1.0) or 1.0)  # room for the labels
    ax.set_xlabel("total time (s)")
    ax.set_title(f"Stage times: {report.frames} frames in {report.wall_s:.1f} s")
    return fig


def plot_fps(report: ProfileReport | str | os.PathLike) -> Figure:
    """Frames per second over time (sliding window), with the overall and streaming rates as lines."""
    report = _as_report(report)
    fig = _figure(8, 3.5)
    ax = fig.add_subplot()
    if report.fps_series:
        t, fps = zip(*report.fps_series)
        ax.plot(t, fps, lw=1.2, label="windowed fps")
    for value, label, style in ((report.overall_fps, "overall", ":"), (report.stream_fps, "streaming", "--")):
        if value is not None:
            ax.axhline(value, ls=style, color="gray", label=f"{label} {value:.2f}")
    ax.set_xlim(0, max(report.wall_s, 1e-3))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("frames / s")
    ax.set_title("Output frame rate")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _bands_by_stage(report: ProfileReport, thread: str | None = None) -> dict[str, list[tuple[float, float]]]:
    spans: dict[str, list[tuple[float, float]]] = {}
    for name, t0, t1, th in report.bands:
        if thread is None or th == thread:
            spans.setdefault(name, []).append((t0, t1 - t0))
    return spans


def _draw_timeline(ax: Axes, report: ProfileReport) -> None:
    """One row per thread, one coloured span per stage call."""
    threads = list(dict.fromkeys(band[3] for band in report.bands))
    for row, thread in enumerate(threads):
        for name, spans in _bands_by_stage(report, thread).items():
            ax.broken_barh(spans, (row - 0.4, 0.8), color=stage_color(name))
    ax.set_yticks(range(len(threads)), threads, fontsize=8)
    ax.set_ylim(len(threads) - 0.5, -0.5)


def plot_memory(report: ProfileReport | str | os.PathLike) -> Figure:
    """Memory counters (MiB) over time with the stage bands shaded, and a per-thread stage timeline below."""
    report = _as_report(report)
    fig = _figure(9, 5)
    ax, strip = fig.subplots(2, 1, sharex=True, height_ratios=[4, 1])
    # bands first, behind the lines; their y spans the axes whatever the memory scale
    for name, spans in _bands_by_stage(report).items():
        ax.broken_barh(spans, (0, 1), transform=ax.get_xaxis_transform(), color=stage_color(name), alpha=0.12,
                       lw=0, label=name)
    for key, label in MEMORY_SERIES.items():
        points = [(s["t"], s[key] / MIB) for s in report.memory if key in s]
        if points:
            t, v = zip(*points)
            ax.plot(t, v, marker="o" if key == "uss" else None, ms=3, lw=1.2, label=f"{label} (peak "
                    f"{report.peaks.get(key, max(v) * MIB) / MIB:.0f})")
    limit = report.limits.get("mps_recommended_max_memory")
    if limit is not None:
        ax.axhline(limit / MIB, color="red", ls="--", lw=1, label="MPS recommended max")
    if not report.memory:
        ax.text(0.5, 0.5, "no memory samples", transform=ax.transAxes, ha="center")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("MiB")
    ax.set_title("Memory over time (shaded: stages running)")
    ax.legend(loc="upper left", fontsize=7, ncols=2)
    _draw_timeline(strip, report)
    strip.set_xlim(0, max(report.wall_s, 1e-3))
    strip.set_xlabel("time since start (s)")
    return fig


def plot_comparison(reports: Sequence[ProfileReport | str | os.PathLike],
                    labels: Sequence[str] | None = None) -> Figure:
    """Several runs side by side: stacked stage ms per output frame, fps, and memory peaks (MiB)."""
    loaded, names = load_reports(reports, labels)
    fig = _figure(4 + 1.6 * len(loaded), 4.5)
    ax_stage, ax_fps, ax_mem = fig.subplots(1, 3, width_ratios=[2, 1, 1])
    x = list(range(len(loaded)))
    bottom = [0.0] * len(loaded)
    for stage in order_stages(name for r in loaded for name in r.stages):
        ms = [r.ms_per_frame(stage) or 0.0 for r in loaded]
        ax_stage.bar(x, ms, bottom=bottom, color=stage_color(stage), label=stage)
        bottom = [b + m for b, m in zip(bottom, ms)]
    ax_stage.set_title("stage time per output frame\n(threads overlap, so bars exceed 1/fps)", fontsize=9)
    ax_stage.set_ylabel("ms / frame")
    ax_stage.legend(fontsize=7)
    _grouped(ax_fps, names, {"overall": [r.overall_fps or 0.0 for r in loaded],
                             "streaming": [r.stream_fps or 0.0 for r in loaded]})
    ax_fps.set_title("frames / s", fontsize=9)
    shown = [key for key in PEAK_LABELS if key != "system_available_min" and any(key in r.peaks for r in loaded)]
    peaks = {PEAK_LABELS[key]: [r.peaks.get(key, 0.0) / MIB for r in loaded] for key in shown}
    _grouped(ax_mem, names, peaks)
    ax_mem.set_title("peak memory (MiB)", fontsize=9)
    ax_stage.set_xticks(x, names, rotation=20, ha="right")
    return fig


def _grouped(ax: Axes, names: list[str], groups: dict[str, list[float]]) -> None:
    width = 0.8 / max(len(groups), 1)
    for i, (label, values) in enumerate(groups.items()):
        ax.bar([j + (i - (len(groups) - 1) / 2) * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.legend(fontsize=7)


def save_figures(report: ProfileReport | str | os.PathLike, folder: str | os.PathLike, dpi: int = 110) -> list[Path]:
    """Write stages.png, fps.png and memory.png into ``folder`` (created if needed); returns their paths."""
    report = _as_report(report)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, plot in (("stages", plot_stage_times), ("fps", plot_fps), ("memory", plot_memory)):
        path = folder / f"{name}.png"
        plot(report).savefig(path, dpi=dpi)
        paths.append(path)
    return paths
