"""Mouth motion on silence: does the mouth stay still while nobody speaks?

LSE-D / LSE-C say whether lips and speech agree; they say little about silent stretches, where lip-sync models
tend to keep "mumbling" (audio features of silence are not all alike, and the model was trained mostly on
speech). This measures the inner-lip gap from the 68 landmarks of every frame and compares silent frames
with speaking ones. Pure numpy: landmarks and audio in, numbers out.

Landmarks: (T, 68, 2) float (x, y) in iBUG-68 order (0-based), NaN for frames without a face.
Audio: 16 kHz mono int16, aligned with frame 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))  # upper / lower inner-lip points facing each other
EYE_CORNERS = (36, 45)  # outer eye corners: a face-size scale that does not move with the mouth
SILENCE_DB = -35.0  # a frame is silent when its RMS is this far below the clip's speech level
SPEECH_LEVEL_PERCENTILE = 95  # the clip's speech level: this percentile of the per-frame RMS
MIN_SILENCE_FRAMES = 5  # shorter quiet runs (pauses between syllables, stop closures) are not silence


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """(T,) inner-lip gap over the outer-eye-corner distance; NaN where the landmarks are NaN.

    0 for a closed mouth; about 0.3-0.5 for a wide-open one.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim == 2:
        lm = lm[None]
    if lm.shape[1:] != (68, 2):
        raise ValueError(f"need (T, 68, 2) landmarks, got {lm.shape}")
    gap = np.mean([np.linalg.norm(lm[:, a] - lm[:, b], axis=-1) for a, b in INNER_LIP_PAIRS], axis=0)
    scale = np.linalg.norm(lm[:, EYE_CORNERS[0]] - lm[:, EYE_CORNERS[1]], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, gap / scale, np.nan)


def silent_frames(audio: np.ndarray, n_frames: int, fps: float = 25.0, sample_rate: int = 16_000,
                  threshold_db: float = SILENCE_DB, min_run: int = MIN_SILENCE_FRAMES) -> np.ndarray:
    """(n_frames,) bool: frames whose audio is ``threshold_db`` below the clip's speech level, in runs >= min_run.

    Frames past the end of the audio count as silent. Digital silence of a whole clip is all silent.
    """
    x = np.asarray(audio, dtype=np.float64)
    rms = np.zeros(n_frames)
    for i in range(n_frames):
        seg = x[int(round(i * sample_rate / fps)):int(round((i + 1) * sample_rate / fps))]
        rms[i] = np.sqrt(np.mean(seg ** 2)) if seg.size else 0.0
    level = np.percentile(rms, SPEECH_LEVEL_PERCENTILE) if n_frames else 0.0
    if level <= 0:
        return np.ones(n_frames, bool)
    with np.errstate(divide="ignore"):
        quiet = 20 * np.log10(np.maximum(rms, 1e-12) / level) < threshold_db
    # keep only runs of at least min_run quiet frames
    out = np.zeros(n_frames, bool)
    start = None
    for i, q in enumerate(np.append(quiet, False)):
        if q and start is None:
            start = i
        elif not q and start is not None:
            if i - start >= min_run:
                out[start:i] = True
            start = None
    return out


@dataclass(frozen=True)
class MouthMotion:
    """Mouth opening and motion in silent vs speaking frames (frames without a face are left out).

    motion_*: mean absolute frame-to-frame change of the opening (both frames of a pair in the same class).
    motion_ratio: motion_silence / motion_speech; near 0 is a still mouth in silence, near 1 or above means
    the mouth moves as much in silence as in speech.
    """

    silent_frames: int
    speech_frames: int
    opening_silence: float
    opening_speech: float
    motion_silence: float
    motion_speech: float

    @property
    def motion_ratio(self) -> float:
        return self.motion_silence / self.motion_speech if self.motion_speech > 0 else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        """Fields plus ``motion_ratio``, JSON-ready (NaN for a class with no frames)."""
        return {**asdict(self), "motion_ratio": self.motion_ratio}


def mouth_motion(openings: np.ndarray, silent: np.ndarray) -> MouthMotion:
    """Summarise per-frame openings (NaN = no face) by the silent mask of the same length."""
    o = np.asarray(openings, dtype=np.float64)
    s = np.asarray(silent, dtype=bool)
    if o.shape != s.shape:
        raise ValueError(f"openings {o.shape} and silent mask {s.shape} differ")
    valid = np.isfinite(o)
    step = np.abs(np.diff(o))
    pair_ok = valid[1:] & valid[:-1]

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    return MouthMotion(
        silent_frames=int((s & valid).sum()), speech_frames=int((~s & valid).sum()),
        opening_silence=mean(o[s & valid]), opening_speech=mean(o[~s & valid]),
        motion_silence=mean(step[pair_ok & s[1:] & s[:-1]]), motion_speech=mean(step[pair_ok & ~s[1:] & ~s[:-1]]))
