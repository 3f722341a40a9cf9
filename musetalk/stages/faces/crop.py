"""Crop geometry: landmarks -> crop box -> 256x256 face crop (pure functions, no I/O).

The rule follows ``get_landmark_and_bbox`` in TMElyralab/MuseTalk ``musetalk/utils/preprocessing.py`` (MIT);
this is a reimplementation, not a copy. Boxes are ``(x1, y1, x2, y2)`` in pixels, x2/y2 exclusive (they are used
as ``frame[y1:y2, x1:x2]``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from musetalk.errors import InputError, NoFaceError
from musetalk.stages.faces.types import Box, FaceLandmarks

CROP_SIZE = 256  # the VAE sees 256x256 crops (32x32 latents)
EXTRA_MARGIN_V15 = 10  # v1.5 extends the crop this many pixels below the chin

# iBUG-68 indices the rule uses (MuseTalk's BBOX_SHIFT.md calls them the 28th/29th/30th points, 0-based here).
NOSE_BRIDGE_UPPER = 28
NOSE_BRIDGE_MID = 29  # the crop's "half face" line: the upper bound is mirrored about it
NOSE_BRIDGE_LOWER = 30


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks)
    if lm.shape != (68, 2):
        raise InputError(
            f"landmarks must have shape (68, 2), got {lm.shape}",
            "pass the 68 iBUG points of one face (FaceLandmarks.landmarks)",
        )
    return lm.astype(np.int64)


def crop_box(landmarks: np.ndarray, bbox_shift: int = 0, detector_box: Box | None = None) -> Box | None:
    """The reference crop box of one face.

    landmarks: (68, 2) integer (x, y) pixels, iBUG order (the reference casts DWPose's floats to int32 first).
    bbox_shift: pixels added to the y of point 29 before mirroring; positive moves the box's upper edge down
        by 2*bbox_shift (less face above the mask line, so more mouth is generated).
    detector_box: the face detector's box, returned when the landmark box is empty or starts left of the frame.

    Returns (x1, y1, x2, y2) as Python ints, or None when the landmark box is unusable and there is no detector box.
    """
    lm = _check_landmarks(landmarks)
    half_y = int(lm[NOSE_BRIDGE_MID, 1]) + int(bbox_shift)
    # The reference shifts point 29 in place, so a shift past the chin also moves max(y): the box is then empty
    # either way (y2 <= y1), so taking max(y) over the unshifted points gives the same result.
    max_y = int(lm[:, 1].max())
    dist = max_y - half_y
    upper = max(0, half_y - dist)
    x1, x2 = int(lm[:, 0].min()), int(lm[:, 0].max())
    box = (x1, upper, x2, max_y)
    if box[3] - box[1] <= 0 or box[2] - box[0] <= 0 or box[0] < 0:
        if detector_box is None:
            return None
        dx1, dy1, dx2, dy2 = (int(v) for v in detector_box)
        return (dx1, dy1, dx2, dy2)
    return box


def apply_extra_margin(box: Box, extra_margin: int, frame_height: int) -> Box:
    """v1.5: extend the box ``extra_margin`` pixels down, clipped to the frame: ``y2 = min(y2 + margin, H)``.

    Used for both the crop and the paste-back. v1 uses ``extra_margin=0`` (the box unchanged).
    """
    x1, y1, x2, y2 = box
    return (x1, y1, x2, min(y2 + int(extra_margin), int(frame_height)))


def bbox_shift_range(landmarks_seq: Iterable[np.ndarray | FaceLandmarks | None]) -> tuple[int, int]:
    """The reference's suggested bbox_shift range ``(low, high)`` over the frames that have a face.

    low = -int(mean(lm[30].y - lm[29].y)) and high = int(mean(lm[29].y - lm[28].y)), ``int`` truncating toward
    zero as the reference does. The reference prints it as ``Manually adjust range : [ -{down}~{up} ]``
    (see :func:`describe_bbox_shift_range`). Entries that are None or faceless are skipped.

    Raises NoFaceError when no entry has a face.
    """
    down: list[int] = []
    up: list[int] = []
    for item in landmarks_seq:
        lm = item.landmarks if isinstance(item, FaceLandmarks) else item
        if lm is None:
            continue
        lm = _check_landmarks(lm)
        down.append(int(lm[NOSE_BRIDGE_LOWER, 1] - lm[NOSE_BRIDGE_MID, 1]))
        up.append(int(lm[NOSE_BRIDGE_MID, 1] - lm[NOSE_BRIDGE_UPPER, 1]))
    if not down:
        raise NoFaceError("no frame has a face, so there is no bbox_shift range",
                          "use a source where a face is visible")
    return -int(sum(down) / len(down)), int(sum(up) / len(up))


def describe_bbox_shift_range(shift_range: tuple[int, int], current: int = 0) -> str:
    """The range as the reference prints it, e.g. ``"[ -8~9 ] , the current value: 0"``."""
    low, high = shift_range
    return f"[ {low}~{high} ] , the current value: {current}"


def crop_face(frame_bgr: np.ndarray, box: Box, size: int = CROP_SIZE) -> np.ndarray:
    """``frame[y1:y2, x1:x2]`` resized to (size, size) with Lanczos (cv2.INTER_LANCZOS4), as the reference does.

    frame_bgr: (H, W, 3) uint8 BGR. box: (x1, y1, x2, y2) with x1, y1 >= 0 (apply the extra margin first).
    Returns (size, size, 3) uint8 BGR.
    """
    import cv2  # local: keeps ``import musetalk.stages.faces`` light

    x1, y1, x2, y2 = (int(v) for v in box)
    if x1 < 0 or y1 < 0:
        raise InputError(f"crop box {box} starts outside the frame", "clip the box to the frame before cropping")
    patch = frame_bgr[y1:y2, x1:x2]
    if patch.size == 0:
        raise InputError(
            f"crop box {box} is empty inside a frame of shape {frame_bgr.shape}",
            "skip frames without a face (crop_box returned None) or use a different bbox_shift",
        )
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_LANCZOS4)
