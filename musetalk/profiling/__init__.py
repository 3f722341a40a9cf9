"""Profiling for MuseTalk runs: stage times (device-synchronized, median/p90), fps, and memory per backend counter.

    from musetalk.profiling import Profiler, compare, plot_memory
    with Profiler(device=pipe.device) as prof:
        pipe.generate(src, wav, "out.mp4", config, profiler=prof)
    report = prof.report(meta={"dtype": "fp16", "batch_size": 8})
    report.save("run.json"); report.markdown(); plot_memory(report)

matplotlib is imported only when a plot is drawn.
"""

from musetalk.profiling.memory import CappedSeries, MemoryMonitor
from musetalk.profiling.plots import plot_comparison, plot_fps, plot_memory, plot_stage_times, save_figures
from musetalk.profiling.report import ProfileReport, Profiler, compare, machine_info
from musetalk.profiling.timing import HOST_STAGES, PIPELINE_STAGES, FpsMeter, LatencyMeter, StageStats, StageTimer

__all__ = [
    "CappedSeries", "FpsMeter", "HOST_STAGES", "LatencyMeter", "MemoryMonitor", "PIPELINE_STAGES", "ProfileReport", "Profiler",
    "StageStats", "StageTimer", "compare", "machine_info", "plot_comparison", "plot_fps", "plot_memory",
    "plot_stage_times", "save_figures",
]
