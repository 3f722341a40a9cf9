"""Faces: landmark backends (dlib default, face_alignment, dwpose) and the reference crop rule.

Importing this package loads no detector: backends are built by :func:`get_landmark_backend`.
"""

from musetalk.stages.faces.crop import (
    CROP_SIZE,
    EXTRA_MARGIN_V15,
    apply_extra_margin,
    bbox_shift_range,
    crop_box,
    crop_face,
    describe_bbox_shift_range,
)
from musetalk.stages.faces.registry import DEFAULT_LANDMARK_BACKEND, LANDMARK_BACKENDS, get_landmark_backend
from musetalk.stages.faces.types import Box, FaceLandmarks, LandmarkBackend, check_frame_bgr

__all__ = [
    "CROP_SIZE",
    "DEFAULT_LANDMARK_BACKEND",
    "EXTRA_MARGIN_V15",
    "LANDMARK_BACKENDS",
    "Box",
    "FaceLandmarks",
    "LandmarkBackend",
    "apply_extra_margin",
    "bbox_shift_range",
    "check_frame_bgr",
    "crop_box",
    "crop_face",
    "describe_bbox_shift_range",
    "get_landmark_backend",
]
