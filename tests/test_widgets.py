"""Widgets driven from Python: the rendered views change, landmarks are never recomputed, values are readable.

No kernel and no browser: ipywidgets objects work in a plain process (their comm is a no-op), so the tests set
slider values the way the frontend would and read the Image widgets' PNG bytes back.
"""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from musetalk.frontends.notebook import viz
from musetalk.errors import InputError, NoFaceError

pytest.importorskip("ipywidgets", reason="the notebooks extra is not installed (pip install -e '.[notebooks]')")

from musetalk.frontends.notebook.widgets import BboxShiftTuner, LiveDashboard

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


class CountingLandmarker:
    """The real dlib backend, counting its calls."""

    name = "dlib"

    def __init__(self) -> None:
        from musetalk.stages.faces import get_landmark_backend

        self.inner = get_landmark_backend("dlib")
        self.calls = 0

    def detect(self, frame: np.ndarray):
        self.calls += 1
        return self.inner.detect(frame)


class CountingParser:
    """A stand-in face parser (a fixed skin ellipse and lips), counting its calls: the mask code path is real."""

    def __init__(self) -> None:
        self.calls = 0

    def parse(self, image_rgb: np.ndarray) -> np.ndarray:
        self.calls += 1
        parsing = np.zeros((512, 512), np.uint8)
        cv2.ellipse(parsing, (256, 280), (150, 200), 0, 0, 360, 1, -1)
        cv2.ellipse(parsing, (256, 380), (60, 20), 0, 0, 360, 12, -1)
        return parsing


def decode(png: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a PNG"
    return image


@pytest.fixture(scope="module")
def video_tuner() -> tuple[BboxShiftTuner, CountingLandmarker, CountingParser]:
    landmarker, parser = CountingLandmarker(), CountingParser()
    tuner = BboxShiftTuner(SAMPLES / "face.mp4", landmarker, parser, max_frames=6)
    return tuner, landmarker, parser


def test_tuner_detects_landmarks_once_per_kept_frame(video_tuner) -> None:
    tuner, landmarker, _ = video_tuner
    assert len(tuner) == 6 and landmarker.calls == 6
    assert tuner.frame_numbers == [0, 9, 18, 27, 36, 45]  # evenly spaced over the 50-frame clip
    low, high = tuner.shift_range
    assert low < 0 < high  # samples/README.md: [ -11~11 ] over the whole clip
    assert low <= tuner.bbox_shift <= high


def test_moving_bbox_shift_changes_the_crop_without_new_landmarks(video_tuner) -> None:
    tuner, landmarker, _ = video_tuner
    widget = tuner.widget  # builds the ipywidgets and draws once
    ui = tuner._ui
    calls = landmarker.calls
    before = {name: ui[name].value for name in ("frame", "crop", "mask")}
    renders = tuner.renders
    low, high = tuner.shift_range
    ui["shift_slider"].value = high  # what the browser does
    assert tuner.bbox_shift == high and tuner.renders == renders + 1
    assert ui["crop"].value != before["crop"], "the crop did not change"
    assert ui["frame"].value != before["frame"], "the crop box drawn on the frame did not change"
    assert ui["mask"].value != before["mask"], "the blend mask view did not change"
    crop = decode(ui["crop"].value)
    assert crop.shape == (256, 2 * 256 + 4, 3)  # the crop and its masked half, side by side
    np.testing.assert_array_equal(crop[128:, 260:], 0)  # the masked half is black
    assert landmarker.calls == calls, "moving a slider must not detect landmarks again"
    # a positive shift moves the crop's upper edge down
    assert tuner.face_box(bbox_shift=high)[1] > tuner.face_box(bbox_shift=low)[1]
    assert widget is tuner.widget


def test_frame_slider_and_python_setters_drive_the_same_state(video_tuner) -> None:
    tuner, landmarker, parser = video_tuner
    _ = tuner.widget
    ui = tuner._ui
    calls, parses = landmarker.calls, parser.calls
    shown = ui["frame"].value
    ui["frame_slider"].value = 3
    assert tuner.frame == 3 and ui["frame"].value != shown
    tuner.bbox_shift = 0  # from Python: the slider follows
    assert ui["shift_slider"].value == 0 and "bbox_shift 0" in ui["status"].value
    tuner.frame = 0
    tuner.bbox_shift = tuner.shift_range[1]
    parses_after = parser.calls
    tuner.frame, tuner.bbox_shift = 3, 0  # both views were drawn before: the blend masks come from the cache
    assert parser.calls == parses_after
    assert landmarker.calls == calls and parser.calls > parses
    assert tuner.config_with_choice().crop.bbox_shift == 0
    with pytest.raises(InputError, match="suggested range"):
        tuner.bbox_shift = tuner.shift_range[1] + 1
    with pytest.raises(InputError):
        tuner.frame = len(tuner)


def test_tuner_on_an_image_without_parser() -> None:
    tuner = BboxShiftTuner(SAMPLES / "face.png", CountingLandmarker(), parser=None)
    assert len(tuner) == 1 and tuner.renders == 0  # nothing drawn before it is shown
    views = tuner.views()
    assert views["crop"].shape == (256, 516, 3) and views["frame"].shape[1] == 384
    tuner.widget  # noqa: B018 - building it draws it
    assert tuner._ui["frame_slider"].disabled and tuner.renders == 1


def test_tuner_refuses_a_source_without_a_face(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((200, 200, 3), 120, np.uint8))
    with pytest.raises(NoFaceError):
        BboxShiftTuner(grey, CountingLandmarker())


def test_tuner_from_pipeline_uses_its_landmarker_and_parser(tiny_models: Path) -> None:
    from musetalk.stream.pipeline import MuseTalkPipeline

    pipe = MuseTalkPipeline.from_pretrained(tiny_models, device="cpu", dtype="fp32")
    tuner = BboxShiftTuner.from_pipeline(pipe, SAMPLES / "face.png", pipe.default_config(bbox_shift=99))
    assert tuner.parser is pipe.parser and tuner.landmarker is pipe.landmarker("dlib")
    assert tuner.bbox_shift == tuner.shift_range[1], "a start value past the range is clamped into it"
    assert tuner.material() is not None and tuner.material().mask.ndim == 2


# -- the live dashboard -----------------------------------------------------------------------------------------
def test_dashboard_redraws_every_n_frames_from_the_profiler_hooks() -> None:
    dash = LiveDashboard(total=12, every=4, min_interval=0.0)
    ui_box = dash.widget
    ui = dash._ui
    assert ui["progress"].max == 12 and dash.refreshes == 1
    seen = []
    with dash:
        for i in range(12):
            with dash.stage("unet"):
                time.sleep(0.005)
            dash.frame_done()
            seen.append(dash.refreshes)
    assert ui["progress"].value == 12
    # start() draws once, then frames 4, 8 and 12, then stop()
    assert seen[3] - seen[2] == 1 and seen[7] - seen[6] == 1 and seen[2] == seen[0]
    assert dash.refreshes == 1 + 1 + 3 + 1
    outputs = ui["output"].outputs
    assert len(outputs) == 1 and "image/png" in outputs[0]["data"]
    png = base64.b64decode(outputs[0]["data"]["image/png"])
    assert decode(png).shape[1] > 300
    assert "12/12 frames" in ui["status"].value and "stage: done" in ui["status"].value
    report = dash.report()
    assert report.frames == 12 and report.stages["unet"].count == 12
    assert ui_box is dash.widget


def test_dashboard_plot_changes_as_frames_arrive() -> None:
    dash = LiveDashboard(total=None, every=2, min_interval=0.0)
    dash.widget  # noqa: B018
    ui = dash._ui
    pictures = []
    with dash:
        for _ in range(6):
            time.sleep(0.02)
            dash.frame_done()
            pictures.append(ui["output"].outputs[0]["data"]["image/png"])
    assert len(set(pictures)) >= 3, "the plot must be redrawn, not just shown once"
    assert "6/? frames" in ui["status"].value


def test_dashboard_throttles_and_accepts_calls_from_a_worker_thread() -> None:
    dash = LiveDashboard(total=100, every=1, min_interval=60.0)
    dash.widget  # noqa: B018

    def model_worker() -> None:  # the pipeline times unet / vae_decode on its worker thread
        for _ in range(5):
            with dash.stage("vae_decode"):
                time.sleep(0.001)

    with dash:
        worker = threading.Thread(target=model_worker, name="musetalk-models")
        worker.start()
        for _ in range(50):
            dash.frame_done()
        worker.join()
    # built, started, stopped, nothing in between: every frame was due but the 60 s interval had not passed
    assert dash.refreshes == 1 + 1 + 1
    stats = dash.report().stages["vae_decode"]
    assert stats.count == 5 and stats.threads == ["musetalk-models"]


def test_dashboard_drives_a_real_generation(tiny_models: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from musetalk.stages.audio import load_audio, num_video_frames
    from musetalk.stream.pipeline import MuseTalkPipeline
    from musetalk.profiling import Profiler

    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    pipe = MuseTalkPipeline.from_pretrained(tiny_models, device="cpu", dtype="fp32")
    wav = load_audio(SAMPLES / "speech.wav")[: 16000 * 32 // 100]  # 0.32 s: 8 frames
    total = num_video_frames(len(wav), 25)
    dash = LiveDashboard(Profiler(device=pipe.device), total=total, every=4, min_interval=0.0)
    dash.widget  # noqa: B018
    config = pipe.default_config(fps=25, batch_size=4)
    avatar = pipe.prepare_avatar(SAMPLES / "face.png", config, profiler=dash)
    with dash:
        frames = sum(1 for _ in pipe.stream(avatar, wav, config, profiler=dash))
    assert frames == total == dash.frames
    report = dash.report()
    assert {"landmarks", "parsing", "unet", "vae_decode", "blend"} <= set(report.stages)
    assert dash._ui["progress"].value == total and report.memory


def test_viz_helpers_keep_shapes_and_colour_order() -> None:
    frame = np.zeros((100, 200, 3), np.uint8)
    drawn = viz.draw_face(frame, np.array([[50, 50]] * 68), (10, 10, 90, 90), width=100)
    assert drawn.shape == (50, 100, 3) and drawn[..., 1].max() == 255  # green landmarks in BGR
    crop = np.full((256, 256, 3), 200, np.uint8)
    half = viz.masked_half(crop)
    assert half[:128].min() == 200 and half[128:].max() == 0
    assert viz.hstack([crop, crop[..., 0]], height=64, gap=2).shape == (64, 130, 3)
    assert decode(viz.to_png(crop)).shape == crop.shape
    assert viz.difference(crop, crop).max() == 0
