"""Profiling: memory sampling and its cap, synchronized stage timing from two threads, fps, reports, plots.

Timing assertions use sleeps with generous upper bounds: the CI machine has 2 shared cores.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.profiling import (CappedSeries, FpsMeter, MemoryMonitor, ProfileReport, Profiler, StageTimer, compare,
                                plot_comparison, plot_fps, plot_memory, plot_stage_times, save_figures)
from musetalk.profiling import timing

MB = 2**20


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# -- memory -----------------------------------------------------------------------------------------------
def test_monitor_samples_process_counters_only_on_cpu() -> None:
    with MemoryMonitor(interval=0.01, device="cpu") as monitor:
        wait_for(lambda: len(monitor.samples) >= 4)
    samples = monitor.samples
    ts = [s["t"] for s in samples]
    assert ts == sorted(ts)
    assert all(s["rss"] > 0 and s["system_available"] > 0 for s in samples)
    assert "uss" in samples[0] or monitor.notes  # the first read is immediate; later ones wait uss_interval
    assert not any(k.startswith(("cuda", "mps")) for s in samples for k in s)
    assert monitor.peak()["rss"] == max(s["rss"] for s in samples)
    assert monitor.limits["system_total"] > 0 and not monitor.running


def test_rss_peak_sees_a_200mb_allocation() -> None:
    with MemoryMonitor(interval=0.01, uss=False) as monitor:
        before = monitor.peak()["rss"]
        block = np.ones(200 * MB, dtype=np.uint8)  # np.ones writes every page, so it is resident
        seen = monitor.samples_taken
        wait_for(lambda: monitor.samples_taken >= seen + 2)
        del block
    assert monitor.peak()["rss"] - before > 150 * MB


def test_uss_can_be_turned_off() -> None:
    monitor = MemoryMonitor(uss=False)
    assert "uss" not in monitor.sample()


def test_capped_series_keeps_the_whole_run_in_bounded_memory() -> None:
    series: CappedSeries[int] = CappedSeries(8)
    for i in range(1000):
        series.append(i)
        assert len(series) <= 9
    items = series.items()
    assert items[0] == 0 and items[-1] == 999  # first and latest kept
    steps = np.diff(items[:-1])
    assert (steps == steps[0]).all() and steps[0] == series.stride  # evenly spread


def test_monitor_sample_list_is_capped_but_peak_sees_every_sample() -> None:
    monitor = MemoryMonitor(uss=False, max_samples=32)
    for _ in range(600):
        monitor.sample()
    samples = monitor.samples
    assert len(samples) <= 33 and monitor.samples_taken == 600
    assert monitor.peak()["rss"] >= max(s["rss"] for s in samples)


# -- timing -----------------------------------------------------------------------------------------------
def test_stage_timer_times_sleeps_and_drops_warmup_from_the_median() -> None:
    timer = StageTimer("cpu")
    for seconds in (0.12, 0.02, 0.02, 0.02):
        with timer.stage("unet"):
            time.sleep(seconds)
    stats = timer.stats()["unet"]
    assert stats.count == 4
    assert 0.17 <= stats.total_s < 0.6
    assert 19 <= stats.median_ms < 80 and stats.first_ms >= 115
    assert stats.threads == [threading.current_thread().name]


def test_concurrent_stages_from_two_threads_are_both_recorded() -> None:
    timer = StageTimer("cpu")
    barrier = threading.Barrier(2)

    def worker() -> None:
        barrier.wait()
        for _ in range(3):
            with timer.stage("unet"):
                time.sleep(0.04)

    thread = threading.Thread(target=worker, name="musetalk-models")
    thread.start()
    barrier.wait()
    for _ in range(3):
        with timer.stage("blend"):
            time.sleep(0.04)
    thread.join()
    stats = timer.stats()
    assert list(stats) == ["unet", "blend"]  # pipeline order
    for name, thread_name in (("unet", "musetalk-models"), ("blend", "MainThread")):
        assert stats[name].count == 3 and 0.11 <= stats[name].total_s < 0.5
        assert stats[name].threads == [thread_name]
    bands = timer.intervals()
    assert len(bands) == 6 and [b[1] for b in bands] == sorted(b[1] for b in bands)
    unet = [b for b in bands if b[0] == "unet"]
    blend = [b for b in bands if b[0] == "blend"]
    assert any(u[1] < b[2] and b[1] < u[2] for u in unet for b in blend)  # they overlapped in time


def test_device_stages_synchronize_and_host_stages_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.device] = []
    monkeypatch.setattr(timing, "synchronize", calls.append)
    timer = StageTimer("cpu")
    with timer.stage("unet"):
        pass
    assert len(calls) == 2  # before t0 and before t1
    with timer.stage("blend"):
        pass
    with timer.stage("encode"):
        pass
    assert len(calls) == 2
    with timer.stage("blend", sync=True):
        pass
    assert len(calls) == 4


def test_stage_is_recorded_when_the_body_raises() -> None:
    timer = StageTimer()
    with pytest.raises(KeyError), timer.stage("audio"):
        raise KeyError("x")
    assert timer.stats()["audio"].count == 1


def test_stages_carry_record_function_labels() -> None:
    timer = StageTimer()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with timer.stage("vae_decode"):
            torch.ones(4) + 1
    assert "musetalk.vae_decode" in {e.key for e in prof.key_averages()}


def test_stage_timer_is_bounded() -> None:
    timer = StageTimer(reservoir_size=16, max_intervals=16)
    for i in range(3000):
        timer.add("blend" if i % 2 else "encode", i, i + 0.5)
    assert len(timer.intervals()) <= 2 * 17
    assert {b[0] for b in timer.intervals()} == {"blend", "encode"}  # no aliasing of alternating stages
    acc = timer._acc["blend"]
    assert len(acc.reservoir) == 16 and timer.stats()["blend"].count == 1500


def test_fps_meter() -> None:
    meter = FpsMeter(window_s=1.0)
    assert meter.fps() is None and meter.stream_fps() is None
    for i in range(21):
        meter.frame_done(t=10.0 + 0.1 * i)  # 10 fps for 2 s
    assert meter.frames == 21
    assert meter.stream_fps() == pytest.approx(10.0)
    assert meter.fps() == pytest.approx(10.0)
    assert meter.overall_fps(8.0, 12.0) == pytest.approx(21 / 4)
    assert len(meter.series()) == 20


# -- report -----------------------------------------------------------------------------------------------
def make_report(unet_s: float = 0.03, frames: int = 6, label: str | None = None) -> ProfileReport:
    """A real (short) profiled run: model thread + consumer thread, like the pipeline's stream()."""
    prof = Profiler(device="cpu", interval=0.01)
    with prof:
        with prof.stage("landmarks"):
            time.sleep(0.01)

        def worker() -> None:
            for _ in range(frames // 2):
                with prof.stage("unet"):
                    time.sleep(unet_s)

        thread = threading.Thread(target=worker, name="musetalk-models")
        thread.start()
        for _ in range(frames):
            with prof.stage("blend"):
                time.sleep(0.005)
            prof.frame_done()
        thread.join()
    return prof.report(meta={"dtype": "fp32", "batch_size": 2, **({"label": label} if label else {})})


@pytest.fixture(scope="module")
def report() -> ProfileReport:
    return make_report()


def test_report_contents(report: ProfileReport) -> None:
    assert list(report.stages) == ["landmarks", "unet", "blend"]
    assert report.frames == 6 and report.wall_s > 0.09
    assert report.overall_fps == pytest.approx(6 / report.wall_s)
    assert report.memory and report.memory[0]["t"] >= 0
    assert {b[0] for b in report.bands} == {"landmarks", "unet", "blend"}
    assert report.peaks["rss"] > 0 and report.peaks["system_available_min"] > 0
    for key in ("device", "cpu_count", "total_ram", "torch", "platform"):
        assert report.meta[key]
    assert report.meta["dtype"] == "fp32" and report.meta["batch_size"] == 2


def test_report_json_round_trip(report: ProfileReport, tmp_path: Path) -> None:
    path = report.save(tmp_path / "run.json")
    json.loads(path.read_text())  # strict JSON (no NaN)
    assert ProfileReport.load(path) == report
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp file left behind


def test_markdown_has_the_stage_rows(report: ProfileReport) -> None:
    text = report.markdown()
    assert "| stage | calls | total s | share % | median ms | p90 ms |" in text
    for name, calls in (("landmarks", 1), ("unet", 3), ("blend", 6)):
        assert f"| {name} | {calls} |" in text
    assert "process RSS (`rss`)" in text and "fps:" in text


def test_compare_two_runs(report: ProfileReport, tmp_path: Path) -> None:
    slow = make_report(unet_s=0.06, label="slow")
    path = slow.save(tmp_path / "slow-run.json")
    table = compare([report, path])
    assert table.splitlines()[0] == "| | run 1 | slow |"
    assert "| unet ms/frame |" in table and "| fps overall |" in table
    unet_row = next(line for line in table.splitlines() if line.startswith("| unet ms/frame"))
    fast_ms, slow_ms = (float(c) for c in unet_row.strip("|").split("|")[1:])
    assert slow_ms > fast_ms
    assert compare([report, slow], labels=["a", "b"]).splitlines()[0] == "| | a | b |"
    with pytest.raises(ValueError):
        compare([report, slow], labels=["only one"])


def test_plots_return_figures_and_save_pngs(report: ProfileReport, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    for plot in (plot_stage_times, plot_fps, plot_memory):
        assert isinstance(plot(report), Figure)
    assert isinstance(plot_comparison([report, report], ["a", "b"]), Figure)
    paths = save_figures(report, tmp_path / "figs")
    assert [p.name for p in paths] == ["stages.png", "fps.png", "memory.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_backend_counters_appear_only_through_the_dispatch_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU in CI: a fake backend for "cpu" checks the dispatch (peak reset at start, limits, counters)."""
    from musetalk.profiling import memory

    resets: list[torch.device] = []
    fake = memory.Backend(counters=lambda d: {"fake_allocated": 7}, limits=lambda d: {"fake_total": 9},
                          reset_peak=resets.append, name=lambda d: "Fake GPU")
    monkeypatch.setitem(memory.BACKENDS, "cpu", fake)
    prof = Profiler(device="cpu", interval=0.01, uss=False)
    with prof:
        pass
    report = prof.report()
    assert resets == [torch.device("cpu")]
    assert all(s["fake_allocated"] == 7 for s in report.memory)
    assert report.limits["fake_total"] == 9 and report.peaks["fake_allocated"] == 7
    assert report.meta["device_name"] == "Fake GPU"
