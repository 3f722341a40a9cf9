"""Mouth motion on silence: opening from landmarks, the silence mask, the summary, and the evaluate hook."""

from __future__ import annotations

import numpy as np
import pytest

from musetalk.stages.faces.types import FaceLandmarks
from musetalk.quality import evaluate as ev
from musetalk.quality.mouth import mouth_motion, mouth_opening, silent_frames


def face(opening: float) -> np.ndarray:
    """68 landmarks with eye corners 100 px apart and the inner lips ``opening * 100`` px apart."""
    lm = np.zeros((68, 2))
    lm[36], lm[45] = (50, 100), (150, 100)
    for top, bottom in ((61, 67), (62, 66), (63, 65)):
        lm[top] = (100, 200)
        lm[bottom] = (100, 200 + opening * 100)
    return lm


def test_mouth_opening_is_scaled_by_eye_distance():
    lms = np.stack([face(0.0), face(0.3), np.full((68, 2), np.nan)])
    np.testing.assert_allclose(mouth_opening(lms), [0.0, 0.3, np.nan])
    assert mouth_opening(face(0.2) * 3).item() == pytest.approx(0.2)  # same face, 3x larger
    with pytest.raises(ValueError):
        mouth_opening(np.zeros((5, 2)))


def test_silent_frames_ignore_short_pauses():
    sr, spf = 16_000, 640
    loud = np.sin(np.arange(spf) / 3) * 8000
    quiet = np.zeros(spf)
    # 10 speech, 3 quiet (a pause: not silence), 10 speech, 8 quiet (silence), 2 frames beyond the audio
    audio = np.concatenate([loud] * 10 + [quiet] * 3 + [loud] * 10 + [quiet] * 8)
    mask = silent_frames(audio, 33, 25, sr)
    assert mask[:23].sum() == 0 and mask[23:].all()
    assert silent_frames(np.zeros(spf * 10), 10).all()  # digital silence throughout


def test_mouth_motion_summary():
    openings = np.array([0.0, 0.3, 0.0, 0.3, 0.0, 0.1, 0.1, 0.1, np.nan, 0.1])
    silent = np.array([False] * 5 + [True] * 5)
    m = mouth_motion(openings, silent)
    assert (m.silent_frames, m.speech_frames) == (4, 5)
    assert m.motion_speech == pytest.approx(0.3) and m.motion_silence == pytest.approx(0.0)
    assert m.motion_ratio == 0.0 and m.to_dict()["motion_ratio"] == 0.0
    with pytest.raises(ValueError):
        mouth_motion(openings, silent[:-1])


class _MumblingBackend:
    """A landmark backend whose mouth opens and closes every frame, whatever the audio."""

    name = "fake"

    def __init__(self) -> None:
        self.i = 0

    def detect(self, frame_bgr: np.ndarray) -> FaceLandmarks:
        self.i += 1
        return FaceLandmarks(face(0.3 * (self.i % 2)).astype(np.int32), (40, 30, 100, 90), "fake")


def test_evaluate_reports_mouth_motion_on_silence(tmp_path, monkeypatch):
    from tests.test_quality_evaluate import PatternScorer, write_clip

    n = 40
    loudness = np.r_[np.ones(20), np.zeros(20)]  # speech, then silence
    clip = write_clip(tmp_path / "clip.mkv", np.random.default_rng(0).uniform(0, 1, n), loudness)
    monkeypatch.setattr(ev, "_landmark_backend", lambda name, device: _MumblingBackend())
    res = ev.evaluate_video(clip, crop="none", scorer=PatternScorer(), mouth=True,
                            config=ev.EvaluateConfig(jpeg_step=False))
    assert res.mouth is not None and res.mouth["silent_frames"] == 20
    assert res.mouth["motion_ratio"] == pytest.approx(1.0)  # mumbling in silence as much as in speech
    assert '"mouth"' in res.to_json()
