"""Crop-box smoothing: the One-Euro filter, resets at gaps and cuts, and what avatar preparation stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musetalk.config import with_overrides
from musetalk.errors import InputError
from musetalk.stages.faces.crop import apply_extra_margin, crop_box
from musetalk.stages.faces.smoothing import BoxSmoother, OneEuroFilter, box_jitter, is_cut, smooth_boxes
from musetalk.stages.faces.types import FaceLandmarks

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
FPS = 25.0


# -- the filter ------------------------------------------------------------------------------------------------
def test_constant_input_stays_exact_and_the_first_value_passes() -> None:
    f = OneEuroFilter(FPS, min_cutoff=1.0, beta=0.05)
    assert f(np.array([3.0, 7.0])).tolist() == [3.0, 7.0]
    for _ in range(10):
        out = f(np.array([3.0, 7.0]))
    assert out.tolist() == [3.0, 7.0]
    f.reset()
    assert f(np.array([100.0, -4.0])).tolist() == [100.0, -4.0]


def test_jitter_at_rest_is_removed_and_beta_cuts_the_lag_of_fast_moves() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 2.0, 200)
    f = OneEuroFilter(FPS, min_cutoff=1.0, beta=0.0)
    still = np.array([f(np.array([100 + n]))[0] for n in noise])
    assert np.std(np.diff(still[20:])) < 0.3 * np.std(np.diff(100 + noise[20:]))

    ramp = 10.0 * np.arange(60)  # 250 px/s: a fast head move

    def lag(beta: float) -> float:
        g = OneEuroFilter(FPS, min_cutoff=1.0, beta=beta)
        out = np.array([g(np.array([x]))[0] for x in ramp])
        return float(np.mean(ramp[30:] - out[30:]))  # px behind, once settled

    assert lag(0.0) > 30 and lag(0.05) < 0.5 * lag(0.0) and lag(0.5) < lag(0.05)


def test_filter_rejects_bad_parameters() -> None:
    for args in ((0.0, 1.0, 0.0), (FPS, 0.0, 0.0), (FPS, 1.0, -1.0)):
        with pytest.raises(ValueError):
            OneEuroFilter(*args)


# -- boxes -------------------------------------------------------------------------------------------------------
def test_no_face_gap_resets_the_filter() -> None:
    boxes = [(100, 100, 200, 220), (102, 101, 202, 221), None, (130, 110, 230, 230), (131, 111, 231, 231)]
    out = smooth_boxes(boxes, FPS)
    assert out[0] == boxes[0] and out[2] is None
    assert out[3] == boxes[3], "after a gap the box starts fresh, not smeared from before the gap"
    assert out[1] != boxes[1] and out[4] != boxes[4]  # inside a run, the filter acts


def test_scene_cut_resets_the_filter_and_small_moves_do_not() -> None:
    assert is_cut((100, 100, 200, 200), (140, 100, 240, 200))  # 40 px of a 100 px box
    assert not is_cut((100, 100, 200, 200), (105, 102, 205, 203))
    smoother = BoxSmoother(FPS)
    first = smoother((100, 100, 200, 200))
    assert smoother((103, 100, 203, 200)) != (103, 100, 203, 200)
    assert smoother((300, 50, 420, 170)) == (300, 50, 420, 170)
    assert first == (100, 100, 200, 200) and smoother.resets == 1


def test_smoothed_boxes_stay_croppable() -> None:
    out = smooth_boxes([(0, 0, 3, 3), (1, 0, 3, 2), (0, 1, 2, 3)], FPS, min_cutoff=0.1)
    for x1, y1, x2, y2 in out:
        assert x1 >= 0 and y1 >= 0 and x2 > x1 and y2 > y1


def test_box_jitter_is_the_mean_corner_movement() -> None:
    jitter = box_jitter([(0, 0, 10, 10), (3, 4, 10, 10), None, (0, 0, 10, 10), (0, 0, 13, 14)])
    assert jitter.tolist() == pytest.approx([2.5, 2.5])


def test_config_fields_validate() -> None:
    from musetalk.config import preset

    config = with_overrides(preset(), smoothing="one_euro", smoothing_min_cutoff=0.5, smoothing_beta=0.1)
    assert (config.crop.smoothing, config.crop.smoothing_min_cutoff) == ("one_euro", 0.5)
    for bad in ({"smoothing": "kalman"}, {"smoothing_min_cutoff": 0.0}, {"smoothing_beta": -1.0}):
        with pytest.raises(InputError):
            with_overrides(preset(), **bad)


# -- avatar preparation -------------------------------------------------------------------------------------------
class JitteryLandmarks:
    """dlib's landmarks of the sample face plus 1.5 px of noise per frame, and no face on frame 4."""

    name = "dlib"

    def __init__(self) -> None:
        from musetalk.stages.faces import get_landmark_backend
        from musetalk.stream.video import open_frames

        self.base = get_landmark_backend("dlib").detect(next(iter(open_frames(SAMPLES / "face.png"))))
        self.rng = np.random.default_rng(1)
        self.calls = 0

    def detect(self, frame: np.ndarray) -> FaceLandmarks:
        self.calls += 1
        if self.calls == 5:
            return FaceLandmarks(None, None, "dlib")
        noisy = self.base.landmarks + np.rint(self.rng.normal(0, 1.5, self.base.landmarks.shape)).astype(np.int32)
        return FaceLandmarks(noisy, self.base.detector_box, "dlib")


@pytest.fixture
def jittery_pipe(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from musetalk.stream.pipeline import MuseTalkPipeline

    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    loaded = MuseTalkPipeline.from_pretrained(tiny_models, version="v15", device="cpu", dtype="fp32")

    def build(landmarks: JitteryLandmarks) -> MuseTalkPipeline:
        return MuseTalkPipeline(loaded.audio_encoder, loaded.vae, loaded.unet, loaded.parser, version="v15",
                                landmarker_factory=lambda _name: landmarks)
    return build


@pytest.fixture
def frames_folder(tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        shutil.copy(SAMPLES / "face.png", folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow
def test_preparation_stores_raw_boxes_when_off_and_smoothed_ones_when_on(jittery_pipe, frames_folder: Path) -> None:
    off_pipe = jittery_pipe(JitteryLandmarks())
    config = off_pipe.default_config()
    assert config.crop.smoothing == "off"
    off = off_pipe.prepare_avatar(frames_folder, config, name="steady")
    assert list(off.has_face) == [True] * 4 + [False, True]
    # off: today's rule, frame by frame, from the stored (raw) landmarks
    height = off.meta.height
    raw = [crop_box(off.landmarks[i], 0) if off.has_face[i] else None for i in range(len(off))]
    for i, box in enumerate(raw):
        expected = apply_extra_margin(box, config.crop.extra_margin, height) if box is not None else None
        assert off.face_box(i) == expected

    on_config = with_overrides(config, smoothing="one_euro")
    on = jittery_pipe(JitteryLandmarks()).prepare_avatar(frames_folder, on_config, name="steady")
    np.testing.assert_array_equal(on.landmarks, off.landmarks)  # same noise; landmarks are stored raw
    smoothed = smooth_boxes(raw, off.meta.fps, on_config.crop.smoothing_min_cutoff, on_config.crop.smoothing_beta)
    stored = [on.face_box(i) for i in range(len(on))]
    assert stored == [None if b is None else apply_extra_margin(b, 10, height) for b in smoothed]
    assert stored[5] == off.face_box(5), "the first box after the no-face frame is not smeared across the gap"
    assert box_jitter(stored).mean() < box_jitter([off.face_box(i) for i in range(len(off))]).mean()
    # the cache key follows the smoothing settings; the same settings reuse the avatar
    assert on.meta.key != off.meta.key
    landmarks = JitteryLandmarks()
    again = jittery_pipe(landmarks).prepare_avatar(frames_folder, on_config, name="steady")
    assert again.meta.key == on.meta.key and landmarks.calls == 0
    from musetalk.stream.avatar import avatar_key, hash_source

    def key(cfg) -> str:
        return avatar_key(hash_source(frames_folder), jittery_pipe(landmarks)._avatar_settings(cfg, on.meta.fps))
    assert key(on_config) == on.meta.key
    assert key(with_overrides(on_config, smoothing_beta=0.5)) not in (on.meta.key, off.meta.key)


# -- the bbox_shift tuner shows raw and smoothed boxes over time (headless) -----------------------------------------
def test_tuner_plots_raw_and_smoothed_box_tracks() -> None:
    pytest.importorskip("ipywidgets", reason="the notebooks extra is not installed")
    import cv2

    from musetalk.frontends.notebook.widgets import BboxShiftTuner
    from musetalk.stages.faces import get_landmark_backend

    tuner = BboxShiftTuner(SAMPLES / "face.mp4", get_landmark_backend("dlib"), parser=None, max_frames=5)
    raw, smoothed = tuner.box_tracks()
    assert len(raw) == len(smoothed) == 5 and raw[0] == smoothed[0]
    assert raw == [tuner.face_box(i) for i in range(5)]  # the raw track is what the tuner draws frame by frame
    step = tuner.frame_numbers[1] - tuner.frame_numbers[0]
    crop = tuner.config.crop
    expected = smooth_boxes([crop_box(d.landmarks, tuner.bbox_shift, d.detector_box) for d in tuner.detections],
                            tuner.fps / step, crop.smoothing_min_cutoff, crop.smoothing_beta)
    assert smoothed == [apply_extra_margin(b, crop.extra_margin, 512) for b in expected]
    _ = tuner.widget
    first = bytes(tuner._ui["tracks"].value)
    plot = cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR)
    assert plot is not None and plot.shape[1] > 300
    renders = tuner.renders
    tuner._ui["frame_slider"].value = 2  # another frame: the tracks do not depend on it
    assert bytes(tuner._ui["tracks"].value) == first and tuner.renders == renders + 1
    tuner.bbox_shift = tuner.shift_range[1]  # another shift: other boxes, a new plot
    assert bytes(tuner._ui["tracks"].value) != first
