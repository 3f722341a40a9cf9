"""Steadier crop boxes over a video: a One-Euro filter on the box corners, reset at cuts and no-face gaps.

The crop box follows each frame's landmarks, so landmark noise (a pixel or two per frame, more on compressed
video) shakes the whole generated mouth region. The One-Euro filter (Casiez, Roussel & Vogel, CHI 2012) is a
low-pass filter whose cutoff rises with speed: at rest it removes jitter, in fast moves it follows with little lag.

Two tunables:
  min_cutoff (Hz)     cutoff when the box is still; lower = steadier, but slow drifts lag more. 0.5 Hz at 25 fps
                      averages over roughly the last 8 frames.
  beta (per px/s)     how much the cutoff rises with speed; higher = less lag in fast head moves, less smoothing
                      there. 0 gives a plain exponential low-pass. The defaults (0.5 Hz, 0.2) were the best
                      trade-off in benchmarks/bench_silence.py (docs/quality.md).

The filter is causal (each box depends on the past only), so it runs inside the single streaming pass of avatar
preparation. A frame without a face ends the run; a box that jumps by more than ``cut_jump`` of its size in one
frame (a scene cut, another face) starts a new run instead of being smeared towards the old position.
Boxes are ``(x1, y1, x2, y2)`` pixels, x2/y2 exclusive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from musetalk.stages.faces.types import Box

D_CUTOFF_HZ = 1.0  # cutoff of the speed estimate (the paper's recommended default)
CUT_JUMP = 0.3  # a corner moving more than 30 % of the box size in one frame is a cut; real heads move < 10 %


def smoothing_factor(cutoff_hz: float | np.ndarray, dt: float) -> float | np.ndarray:
    """Exponential smoothing factor alpha of a first-order low-pass with ``cutoff_hz`` at time step ``dt`` s."""
    tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff_hz, np.float64))
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-Euro filter over a vector of values (each coordinate filtered on its own), at a fixed frame rate."""

    def __init__(self, fps: float, min_cutoff: float = 0.5, beta: float = 0.2, d_cutoff: float = D_CUTOFF_HZ) -> None:
        if fps <= 0 or min_cutoff <= 0 or beta < 0 or d_cutoff <= 0:
            raise ValueError(f"need fps, min_cutoff, d_cutoff > 0 and beta >= 0 (got {fps}, {min_cutoff}, "
                             f"{d_cutoff}, {beta})")
        self.dt = 1.0 / fps
        self.min_cutoff = min_cutoff
        self.beta = beta
        self.d_cutoff = d_cutoff
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next value passes unchanged."""
        self._value: np.ndarray | None = None
        self._speed: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The filtered value of the next sample ``x`` (float64, same shape)."""
        x = np.asarray(x, np.float64)
        if self._value is None:
            self._value, self._speed = x.copy(), np.zeros_like(x)
            return x.copy()
        assert self._speed is not None
        speed = (x - self._value) / self.dt
        a_d = smoothing_factor(self.d_cutoff, self.dt)
        self._speed = a_d * speed + (1 - a_d) * self._speed
        a = smoothing_factor(self.min_cutoff + self.beta * np.abs(self._speed), self.dt)
        self._value = a * x + (1 - a) * self._value
        return self._value.copy()


def is_cut(previous: Box, box: Box, jump: float = CUT_JUMP) -> bool:
    """True when some corner moved more than ``jump`` times the previous box's larger side in one frame."""
    size = max(previous[2] - previous[0], previous[3] - previous[1], 1)
    return max(abs(int(a) - int(b)) for a, b in zip(previous, box)) > jump * size


class BoxSmoother:
    """Feeds one box per frame (None: no face) and returns the smoothed box (None stays None).

    Rounds to whole pixels and keeps x1, y1 >= 0 and a non-empty box, as the crop needs.
    """

    def __init__(self, fps: float, min_cutoff: float = 0.5, beta: float = 0.2, cut_jump: float = CUT_JUMP) -> None:
        self.filter = OneEuroFilter(fps, min_cutoff, beta)
        self.cut_jump = cut_jump
        self._previous_raw: Box | None = None
        self.resets = 0  # runs started after a gap or a cut (not counting the first)

    def __call__(self, box: Box | None) -> Box | None:
        if box is None:
            if self._previous_raw is not None:
                self.filter.reset()
                self.resets += 1
            self._previous_raw = None
            return None
        if self._previous_raw is not None and is_cut(self._previous_raw, box, self.cut_jump):
            self.filter.reset()
            self.resets += 1
        self._previous_raw = tuple(int(v) for v in box)  # type: ignore[assignment]
        x1, y1, x2, y2 = (int(round(v)) for v in self.filter(np.asarray(box, np.float64)))
        x1, y1 = max(0, x1), max(0, y1)
        return (x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))


def smooth_boxes(boxes: Iterable[Box | None], fps: float, min_cutoff: float = 0.5, beta: float = 0.2,
                 cut_jump: float = CUT_JUMP) -> list[Box | None]:
    """The smoothed boxes of a whole sequence (for plots and benchmarks; preparation feeds a BoxSmoother)."""
    smoother = BoxSmoother(fps, min_cutoff, beta, cut_jump)
    return [smoother(box) for box in boxes]


def box_jitter(boxes: Iterable[Box | None]) -> np.ndarray:
    """(N,) px: how far the box corners move between consecutive frames that both have a box.

    Per pair of frames, the mean Euclidean displacement of the top-left and bottom-right corners.
    """
    out = []
    previous = None
    for box in boxes:
        if box is not None and previous is not None:
            a, b = np.asarray(previous, np.float64), np.asarray(box, np.float64)
            out.append(0.5 * (np.hypot(*(b[:2] - a[:2])) + np.hypot(*(b[2:] - a[2:]))))
        previous = box
    return np.asarray(out, np.float64)
