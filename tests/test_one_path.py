"""One generation path: the CLI, the server, batch runs and the notebooks all produce their videos through
``MuseTalkPipeline.generate``, byte for byte the same; cancelling works through the run hooks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, write_wav

SAMPLES = REPO / "samples"
FPS = 10


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from musetalk.stages.audio import SAMPLE_RATE, load_audio

    root = tmp_path_factory.mktemp("one-path")
    wav = load_audio(SAMPLES / "speech.wav")[: int(0.8 * SAMPLE_RATE)]
    return {"source": SAMPLES / "face.png", "audio": write_wav(root / "speech.wav", wav), "root": root}


@pytest.fixture(scope="module")
def pipe(tiny_models: Path):
    from musetalk.stream.pipeline import MuseTalkPipeline

    return MuseTalkPipeline.from_pretrained(tiny_models, device="cpu", dtype="fp32")


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every call of MuseTalkPipeline.generate (by output name) while still running it."""
    from musetalk.stream.pipeline import MuseTalkPipeline

    seen: list[str] = []
    original = MuseTalkPipeline.generate

    def spy(self, source, audio, output, *args, **kwargs):
        seen.append(Path(output).name)
        return original(self, source, audio, output, *args, **kwargs)

    monkeypatch.setattr(MuseTalkPipeline, "generate", spy)
    return seen


def test_every_front_end_makes_the_same_bytes_through_generate(pipe, inputs, tiny_models, calls, tmp_path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from musetalk.config import preset
    from musetalk.frontends import batch, notebook
    from musetalk.frontends.server import ServerSettings, create_app

    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    config = preset("v15", fps=FPS, batch_size=4, device="cpu", dtype="fp32")
    videos: dict[str, bytes] = {}

    pipe.generate(inputs["source"], inputs["audio"], tmp_path / "api.mp4", config, progress=False)
    videos["python"] = (tmp_path / "api.mp4").read_bytes()

    report = batch.run([{"source": str(inputs["source"]), "audio": str(inputs["audio"]), "output": "batch.mp4"}],
                       tmp_path / "batch", config=config, pipeline=pipe, progress=False)
    assert report.ok, report.results
    videos["batch"] = (tmp_path / "batch" / "batch.mp4").read_bytes()

    notebook.profile_generate(pipe, inputs["source"], inputs["audio"], config=config,
                              output=tmp_path / "notebook.mp4")
    videos["notebook"] = (tmp_path / "notebook.mp4").read_bytes()

    with TestClient(create_app(pipe, ServerSettings(work_dir=tmp_path / "work"))) as client:
        response = client.post("/generate", files={
            "source": ("face.png", inputs["source"].read_bytes(), "image/png"),
            "audio": ("speech.wav", inputs["audio"].read_bytes(), "audio/wav")},
            data={"fps": str(FPS), "batch_size": "4"})
        assert response.status_code == 200, response.text
        videos["server"] = response.content

    assert calls == ["api.mp4", "batch.mp4", "notebook.mp4", "result.mp4"], calls  # all through generate

    env = {**os.environ, "MUSETALK_CACHE": str(tmp_path / "cache-cli")}
    proc = subprocess.run([sys.executable, "-m", "musetalk", "generate", "--source", str(inputs["source"]),
                           "--audio", str(inputs["audio"]), "--output", str(tmp_path / "cli.mp4"), "--models",
                           str(tiny_models), "--fps", str(FPS), "--batch-size", "4", "--device", "cpu", "--dtype",
                           "fp32", "--quiet"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    videos["cli"] = (tmp_path / "cli.mp4").read_bytes()

    reference = videos["python"]
    assert len(reference) > 1000
    for name, data in videos.items():
        assert data == reference, f"{name} made other bytes than pipeline.generate"


class CancelAfter:
    """Run hooks that cancel once ``frames`` output frames were made (and count the phases they saw)."""

    def __init__(self, frames: int) -> None:
        from musetalk.hooks import Hooks

        self.base = Hooks()
        self.frames = frames
        self.done = 0
        self.phases: set[str] = set()

    def stage(self, name: str):
        return self.base.stage(name)

    def frame_done(self) -> None:
        self.done += 1

    def progress(self, phase: str, done: int, total: int | None) -> None:
        self.phases.add(phase)

    def cancelled(self) -> bool:
        return self.done >= self.frames


def test_batch_cancels_through_the_hooks(pipe, inputs, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from musetalk.config import preset
    from musetalk.errors import Cancelled
    from musetalk.frontends import batch

    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    hooks = CancelAfter(frames=2)
    rows = [{"source": str(inputs["source"]), "audio": str(inputs["audio"]), "output": f"row{i}.mp4"}
            for i in range(2)]
    with pytest.raises(Cancelled):
        batch.run(rows, tmp_path / "out", config=preset("v15", fps=FPS, batch_size=1), pipeline=pipe,
                  progress=False, hooks=hooks)
    assert hooks.phases == {"prepare", "generate"} and hooks.done == 2
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.mp4")) == []  # nothing half-written
    lines = (tmp_path / "out" / "summary.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all('"cancelled"' in line for line in lines)


def test_generate_cancelled_by_hooks_leaves_nothing(pipe, inputs, tmp_path) -> None:
    from musetalk.config import preset
    from musetalk.errors import Cancelled

    out = tmp_path / "out.mp4"
    with pytest.raises(Cancelled):
        pipe.generate(inputs["source"], inputs["audio"], out, preset("v15", fps=FPS, batch_size=2),
                      progress=False, hooks=CancelAfter(frames=3))
    assert list(tmp_path.iterdir()) == []


def test_partial_hooks_objects_still_work(pipe, inputs) -> None:
    """An object with only stage/frame_done (an older profiler) is accepted; the missing methods do nothing."""
    from musetalk.config import preset
    from musetalk.hooks import combine

    class Counter:
        frames = 0

        def stage(self, name):
            from contextlib import nullcontext
            return nullcontext()

        def frame_done(self):
            Counter.frames += 1

    avatar = pipe.prepare_avatar(inputs["source"], preset("v15", fps=FPS))
    with avatar:
        frames = list(pipe.stream(avatar, inputs["audio"], preset("v15", fps=FPS), hooks=Counter()))
    assert Counter.frames == len(frames) == 8
    assert combine(None, None).cancelled() is False
    assert np.asarray(frames[0]).dtype == np.uint8
