"""Batch generation on tiny weights: row validation, local mode, and a real local Ray runtime (same outputs frame
for frame, a worker killed in the middle of a job), Ctrl-C. About 2-3 minutes on a loaded 2-core CPU.

Inputs are kept small on purpose: a 256x256 still image (shared by two rows), a 2-frame clip, and 0.40 / 0.48 /
0.56 s cuts of the sample speech, so every output has its own frame count (10, 12, 14 at 25 fps).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from musetalk.frontends import batch
from musetalk.frontends.cli import build_parser, main
from musetalk.config import preset
from musetalk.errors import InputError
from musetalk.stream.video import probe
from tests.conftest import write_wav

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
FRAMES = {"face-a1.mp4": 10, "face-a2.mp4": 12, "clip-a3.mp4": 14}  # output -> frames (audio length x 25 fps)


def _write_wav(path: Path, seconds: float) -> None:
    from musetalk.stages.audio import load_audio

    write_wav(path, load_audio(SAMPLES / "speech.wav")[8000:8000 + int(seconds * 16000)])  # from 0.5 s: speech


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """face.png and clip.mp4 at 256x256 (a quarter of the samples' pixels), three audio cuts and jobs.csv."""
    import cv2

    from musetalk.stream.video import VideoWriter, open_frames

    folder = tmp_path_factory.mktemp("batch-inputs")
    image = cv2.imread(str(SAMPLES / "face.png"))
    cv2.imwrite(str(folder / "face.png"), cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA))
    (folder / "media").mkdir()
    with VideoWriter(folder / "media" / "clip.mp4", fps=25) as writer:
        for i, frame in enumerate(open_frames(SAMPLES / "face.mp4")):
            if i == 2:
                break
            writer.write(cv2.resize(frame, (256, 256), interpolation=cv2.INTER_AREA))
    for name, seconds in (("a1", 0.40), ("a2", 0.48), ("a3", 0.56)):
        _write_wav(folder / "media" / f"{name}.wav", seconds)
    (folder / "jobs.csv").write_text(
        "source,audio,output,#note\n"
        "face.png,media/a1.wav,,shared source\n"
        "media/clip.mp4,media/a3.wav,clip-a3.mp4,\n"
        "face.png,media/a2.wav,face-a2,shared source\n"
        "media/clip.mp4,media/missing.wav,,bad row\n")
    return folder


@pytest.fixture(scope="module")
def local_run(inputs: Path, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`musetalk batch` through the CLI, local mode, with --skip-invalid; a private avatar cache."""
    root = tmp_path_factory.mktemp("local")
    # the staging folder of a batch killed with SIGKILL (unheld, an hour old): this batch removes it
    killed = root / "out" / ".musetalk-batch-0123456789ab"
    (killed / "row2").mkdir(parents=True)
    os.utime(killed, (time.time() - 3600,) * 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUSETALK_CACHE", str(root / "cache"))
        started = time.time()
        rc = main(["batch", str(inputs / "jobs.csv"), "--output-dir", str(root / "out"), "--models", str(tiny_models),
                   "--device", "cpu", "--dtype", "fp32", "--skip-invalid", "--quiet"])
        yield {"rc": rc, "out": root / "out", "cache": root / "cache", "started": started}


@pytest.fixture(scope="module")
def ray_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real local Ray runtime (2 CPUs, no dashboard); its workers get their own avatar cache (returned)."""
    ray = pytest.importorskip("ray")
    cache = tmp_path_factory.mktemp("ray-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUSETALK_CACHE", str(cache))  # inherited by the workers: the raylet starts with this env
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield cache
        finally:
            ray.shutdown()


def _summary(path: Path) -> dict[int, list[dict]]:
    rows: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        rows.setdefault(record["row"], []).append(record)
    return rows


def _frames(path: Path) -> np.ndarray:
    from musetalk.stream.video import open_frames

    return np.stack(list(open_frames(path)))


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*")]


# -- validation (no models) -----------------------------------------------------------------------------------
def test_every_bad_row_is_reported_and_nothing_runs(inputs: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        "source,audio,output,bbox_shift,parsing_mode,device\n"
        f"{inputs / 'face.png'},{inputs / 'media/a1.wav'},a.mp4,2,,\n"  # valid
        f"nope.png,{inputs / 'media/a1.wav'},../up.mp4,x,,\n"
        f"{inputs / 'face.png'},{inputs / 'media/a1.wav'},,,foo,cpu\n"
        f"{inputs / 'face.png'},{inputs / 'media/a2.wav'},A.mp4,,,\n")
    with pytest.raises(batch.BatchError) as info:
        batch.run(jobs, tmp_path / "out", progress=False)
    found = {(e.row, e.column) for e in info.value.errors}
    assert found == {(3, "source"), (3, "output"), (3, "bbox_shift"), (4, "parsing_mode"), (4, "device"),
                     (5, "output")}  # row 5: A.mp4 clashes with row 2's a.mp4 (case-insensitive file systems)
    assert all(e.fix for e in info.value.errors)
    assert "3 of 4 rows are invalid" in info.value.message and "--skip-invalid" in info.value.fix
    assert not (tmp_path / "out").exists()


def test_jsonl_rows_types_and_defaults(inputs: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"source": str(inputs / "face.png"), "audio": str(inputs / "media/a1.wav"), "bbox_shift": 3,
              "blur_factor": "0.1"},
             {"source": str(inputs / "face.png"), "audio": str(inputs / "media/a1.wav"), "extra_margin": 2.0},
             "{broken", [1, 2]]
    jobs.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    valid, errors, total = batch.load_jobs(jobs, preset("v15", parsing_mode="neck"))
    assert total == 4 and [(e.row, e.column) for e in errors] == [(3, "-"), (4, "-")]
    assert valid[0].config.crop.bbox_shift == 3 and valid[0].config.blend.blur_factor == 0.1
    assert valid[1].config.crop.extra_margin == 2 and valid[1].config.blend.parsing_mode == "neck"
    assert [j.output for j in valid] == ["face-a1.mp4", "face-a1-row2.mp4"]  # default names made distinct
    with pytest.raises(InputError, match="unknown suffix"):
        batch.load_jobs(tmp_path / "jobs.txt")


def test_cli_flags_and_worker_plan() -> None:
    parse = build_parser().parse_args
    assert parse(["batch", "j.csv", "--output-dir", "o"]).ray is None
    assert parse(["batch", "j.csv", "--output-dir", "o", "--ray"]).ray == "local"
    args = parse(["batch", "j.csv", "--output-dir", "o", "--ray", "ray://head:10001", "--workers", "3",
                  "--retries", "2", "--bbox-shift", "4"])
    assert (args.ray, args.workers, args.retries, args.bbox_shift) == ("ray://head:10001", 3, 2, 4)
    assert batch.plan_workers({"CPU": 64, "GPU": 4}, jobs=10) == (4, {"num_gpus": 1.0, "num_cpus": 1.0})
    assert batch.plan_workers({"CPU": 64, "GPU": 4}, jobs=2)[0] == 2  # never more actors than jobs
    assert batch.plan_workers({"CPU": 2}, jobs=4, workers=2) == (2, {"num_cpus": 1.0})
    assert batch.plan_workers({"CPU": 16}, jobs=9) == (4, {"num_cpus": 4.0})
    assert batch.plan_workers({"CPU": 16}, jobs=9, cpus_per_worker=8) == (2, {"num_cpus": 8.0})


def test_scheduler_keeps_a_source_on_its_actor_and_shares_the_rest() -> None:
    pick = batch.pick_group
    pending = {"face": 2, "clip": 1, "other": 0}
    assert pick("face", pending, owned={"clip"}) == "face"  # same source as last time: its avatar is ready
    assert pick(None, pending, owned={"face"}) == "clip"  # a new actor takes a source nobody is on
    assert pick("other", {"face": 2, "clip": 1}, owned={"face", "clip"}) == "face"  # else helps the largest
    assert pick("face", {"face": 0}, owned=set()) is None


# -- local mode -------------------------------------------------------------------------------------------------
def test_local_batch_makes_three_videos_and_a_summary(local_run: dict) -> None:
    out = local_run["out"]
    assert local_run["rc"] == 1  # one row was skipped as invalid
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(FRAMES)
    for name, frames in FRAMES.items():
        info = probe(out / name)
        assert info.num_frames == frames and info.has_audio and info.video_codec == "h264"
    rows = _summary(out / "summary.jsonl")
    assert sorted(rows) == [2, 3, 4, 5] and all(len(v) == 1 for v in rows.values())
    assert rows[5][0]["state"] == "invalid" and "missing.wav" in rows[5][0]["error"]
    assert rows[5][0]["error"].startswith("audio:")
    for row, name in ((2, "face-a1.mp4"), (3, "clip-a3.mp4"), (4, "face-a2.mp4")):
        assert rows[row][0]["state"] == "done" and rows[row][0]["output"] == str(out / name)
        assert rows[row][0]["frames"] == FRAMES[name] and rows[row][0]["seconds"] > 0
    assert not _hidden(out)  # the staging folders (its own, a killed batch's) are gone, no partial files


def test_local_batch_prepares_the_shared_source_once(local_run: dict) -> None:
    from musetalk.stream.avatar import list_avatars

    avatars = list_avatars(local_run["cache"])
    assert sorted(Path(m.source).name for m in avatars) == ["clip.mp4", "face.png"]  # 2 sources -> 2 avatars
    face = next(m for m in avatars if Path(m.source).name == "face.png")
    out = local_run["out"]
    first_video = min((out / "face-a1.mp4").stat().st_mtime, (out / "face-a2.mp4").stat().st_mtime)
    # prepared before the first of its two videos was written, and not again for the second
    assert local_run["started"] < face.created < first_video


def test_ctrl_c_cancels_and_leaves_no_partial_file(inputs: Path, tiny_models: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, python_ctrl_c: None) -> None:
    from musetalk.hooks import Hooks

    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    running: dict = {}

    def started(event: batch.JobStarted) -> None:
        running.update(row=event.row, staged=event.staged, frames=0)

    class CtrlCWhileEncoding(Hooks):
        """A real Ctrl-C at a known point, not after a race with a watcher thread (a 10-frame job can finish before
        a busy machine schedules one): at row 2's third frame, once its partial file exists (waited for, not
        asserted: an exception raised here would only fail the row). Local jobs run in this (the main) thread,
        which the signal interrupts."""

        def frame_done(self) -> None:
            running["frames"] += 1
            if running["row"] == 2 and running["frames"] == 3:
                deadline = time.monotonic() + 60
                while not any(running["staged"].parent.glob("*")) and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        batch.run(inputs / "jobs.csv", out, config=preset("v15", device="cpu", dtype="fp32"),
                  models=tiny_models, skip_invalid=True, progress=False, on_job_start=started,
                  hooks=CtrlCWhileEncoding())
    assert not list(out.glob("*.mp4")) and not _hidden(out)
    states = {row: records[0]["state"] for row, records in _summary(out / "summary.jsonl").items()}
    assert states == {2: "cancelled", 3: "cancelled", 4: "cancelled", 5: "invalid"}


# -- Ray --------------------------------------------------------------------------------------------------------
def test_ray_gives_the_same_videos_as_local_mode(local_run: dict, ray_runtime: Path, inputs: Path,
                                                 tiny_models: Path, tmp_path: Path) -> None:
    """Two actors, --collect (inputs shipped, videos streamed back): decoded frames equal local mode's exactly."""
    report = batch.run(inputs / "jobs.csv", tmp_path / "out", config=preset("v15", device="cpu", dtype="fp32"),
                       models=tiny_models, ray=True, workers=2, collect=True, skip_invalid=True, progress=False)
    assert report.mode == "ray" and report.workers == 2
    assert sorted((r.row, r.state) for r in report.results) == [(2, "done"), (3, "done"), (4, "done"), (5, "invalid")]
    for name in FRAMES:
        ours, local = _frames(tmp_path / "out" / name), _frames(local_run["out"] / name)
        assert ours.shape == local.shape and np.array_equal(ours, local), name
    assert not _hidden(tmp_path / "out")


def test_ray_replaces_a_killed_actor_and_retries_its_job(local_run: dict, ray_runtime: Path, inputs: Path,
                                                         tiny_models: Path, tmp_path: Path) -> None:
    import ray

    killed: list[int] = []

    def kill_mid_job(event: batch.JobStarted) -> None:
        def watch() -> None:  # wait until the job writes its video (it is then surely mid-job), then kill the actor
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not any(event.staged.parent.glob("*")):
                time.sleep(0.02)
            ray.kill(event.actor)
            killed.append(event.row)

        if event.row == 3 and event.attempt == 1:
            threading.Thread(target=watch, daemon=True).start()

    report = batch.run(inputs / "jobs.csv", tmp_path / "out", config=preset("v15", device="cpu", dtype="fp32"),
                       models=tiny_models, ray=True, workers=2, retries=1, skip_invalid=True, progress=False,
                       on_job_start=kill_mid_job)
    assert killed == [3]
    rows = _summary(report.summary)
    assert {row: [r["state"] for r in records] for row, records in rows.items()} == \
        {2: ["done"], 3: ["done"], 4: ["done"], 5: ["invalid"]}  # every valid job done exactly once
    assert rows[3][0]["attempts"] == 2 and rows[2][0]["attempts"] == rows[4][0]["attempts"] == 1
    for name in FRAMES:
        assert np.array_equal(_frames(tmp_path / "out" / name), _frames(local_run["out"] / name)), name
    assert not _hidden(tmp_path / "out")  # neither the killed job's partial file nor the staging folder is left


# -- SIGTERM / SIGHUP (issue #11): as clean as Ctrl-C ---------------------------------------------------------------
def test_ray_init_cannot_take_sigterm_away_from_the_cli() -> None:
    """ray.init installs its own SIGTERM handler (sys.exit(15): no cleanup message, status 15); _connect takes the
    CLI's back."""
    from musetalk.frontends.batch.ray_mode import _connect
    from musetalk.frontends.signals import stop_signals_as_interrupt

    class FakeRay:  # what ray.init does to the driver's SIGTERM handler, without starting Ray
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**_kwargs) -> None:
            signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(signum))

    with stop_signals_as_interrupt():
        ours = signal.getsignal(signal.SIGTERM)
        assert _connect(FakeRay, True) is True
        assert signal.getsignal(signal.SIGTERM) is ours


def test_ray_batch_stops_cleanly_on_sigterm(inputs: Path, ray_runtime: Path, tiny_models: Path,
                                            tmp_path: Path) -> None:
    """SIGTERM on the driver mid-job: a KeyboardInterrupt (Ray re-raises our Terminated as a plain one when the signal
    lands in ray.wait; the exit status still says SIGTERM), rows cancelled, actors stopped, no file left."""
    from musetalk.frontends.signals import exit_status, stop_signals_as_interrupt

    out = tmp_path / "out"

    def terminate_when_encoding(event: batch.JobStarted) -> None:
        def watch() -> None:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not any(event.staged.parent.glob("*")):
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)

        if event.attempt == 1 and not getattr(terminate_when_encoding, "armed", False):
            terminate_when_encoding.armed = True
            threading.Thread(target=watch, daemon=True).start()

    with stop_signals_as_interrupt():
        with pytest.raises(KeyboardInterrupt) as info:
            batch.run(inputs / "jobs.csv", out, config=preset("v15", device="cpu", dtype="fp32"), models=tiny_models,
                      ray=True, workers=1, skip_invalid=True, progress=False, on_job_start=terminate_when_encoding)
        status = exit_status(info.value)  # read inside the block, as the CLI does
    assert status == 128 + signal.SIGTERM
    assert not list(out.glob("*.mp4")) and not _hidden(out)
    states = {row: records[0]["state"] for row, records in _summary(out / "summary.jsonl").items()}
    assert states == {2: "cancelled", 3: "cancelled", 4: "cancelled", 5: "invalid"}
