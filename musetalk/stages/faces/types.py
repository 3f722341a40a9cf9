"""The one result type every landmark backend returns, and the backend protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2) in pixels, x2/y2 exclusive as used for slicing


@dataclass(frozen=True)
class FaceLandmarks:
    """Landmarks of the main face in one frame.

    landmarks: (68, 2) int32 (x, y) in iBUG-68 order, or None when no face was found.
    detector_box: the detector's face box (x1, y1, x2, y2), used by the crop rule as its fallback; None if no face.
    backend: name of the backend that made it ("dlib", "face_alignment", "dwpose").
    """

    landmarks: np.ndarray | None
    detector_box: Box | None
    backend: str

    @property
    def has_face(self) -> bool:
        return self.landmarks is not None


@runtime_checkable
class LandmarkBackend(Protocol):
    """Detects the 68 face landmarks of the main face in a BGR uint8 frame (H, W, 3)."""

    name: str

    def detect(self, frame_bgr: np.ndarray) -> FaceLandmarks: ...


def check_frame_bgr(frame_bgr: np.ndarray) -> np.ndarray:
    """Validate a frame for a landmark backend: (H, W, 3) uint8 BGR; returns it C-contiguous.

    Raises InputError (with the fix) for any other shape or dtype.
    """
    from musetalk.errors import InputError

    frame = np.asarray(frame_bgr)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or min(frame.shape[:2]) < 1:
        raise InputError(
            f"a frame must be an (H, W, 3) uint8 BGR array, got shape {frame.shape} dtype {frame.dtype}",
            "read frames with musetalk.stream.video.open_frames (or cv2.imread), which give BGR uint8",
        )
    return np.ascontiguousarray(frame)
