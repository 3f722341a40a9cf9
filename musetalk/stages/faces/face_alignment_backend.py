"""Optional landmark backend: the ``face_alignment`` package (S3FD detector + 2D-FAN-4 landmarks).

S3FD is the detector the reference uses to decide whether a frame has a face (and as the crop's fallback box);
2D-FAN gives iBUG-68 points. The package (BSD-3) is an optional extra (``pip install musetalk[face-alignment]``)
and downloads its weights (``s3fd-619a316812.pth``, ``2DFAN4-*.zip``) into torch hub's cache
(``$TORCH_HOME/hub/checkpoints``) on first use. Offline, copy those files there first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from musetalk.errors import MuseTalkError
from musetalk.stages.faces.types import Box, FaceLandmarks, check_frame_bgr

if TYPE_CHECKING:
    import torch

INSTALL_FIX = "pip install 'musetalk[face-alignment]' (or pip install face-alignment), or use --landmarks dlib"


def _weights_fix() -> str:
    try:
        import torch

        cache = f"{torch.hub.get_dir()}/checkpoints"
    except Exception:  # torch missing is reported separately; this only words the hint
        cache = "$TORCH_HOME/hub/checkpoints"
    return (f"run once with internet access so face_alignment can download its S3FD and 2DFAN4 weights, or copy "
            f"them into {cache}; or use --landmarks dlib")


class FaceAlignmentBackend:
    """68 landmarks of the main face (highest S3FD score, as the reference takes the first detection).

    The S3FD and FAN networks are built once per instance, on ``device``.
    """

    name = "face_alignment"

    def __init__(self, device: str | torch.device = "auto") -> None:
        try:
            import face_alignment
        except ImportError:
            raise MuseTalkError("the face_alignment landmark backend is not installed", INSTALL_FIX) from None
        from musetalk.devices import resolve_device

        self.device = resolve_device(device)
        landmarks_type = getattr(face_alignment.LandmarksType, "TWO_D", None)
        if landmarks_type is None:  # face_alignment < 1.4 spelled it _2D
            landmarks_type = face_alignment.LandmarksType._2D
        try:
            self._fa = face_alignment.FaceAlignment(landmarks_type, device=str(self.device), flip_input=False)
        except MuseTalkError:
            raise
        except Exception as err:  # a failed download surfaces as URLError, HTTPError, OSError or RuntimeError
            raise MuseTalkError(f"face_alignment could not load its weights ({type(err).__name__}: {err})",
                                _weights_fix()) from None

    def detect(self, frame_bgr: np.ndarray) -> FaceLandmarks:
        """Landmarks of the main face in frame_bgr ((H, W, 3) uint8 BGR).

        Returns landmarks (68, 2) int32 (FAN's float pixels truncated, as the reference casts DWPose's) and the S3FD
        box clipped at 0 and truncated to int, as the reference's ``get_detections_for_batch`` does.
        """
        frame = check_frame_bgr(frame_bgr)
        rgb = np.ascontiguousarray(frame[:, :, ::-1])  # face_alignment takes RGB
        boxes = self._fa.face_detector.detect_from_image(rgb.copy())
        if len(boxes) == 0:
            return FaceLandmarks(landmarks=None, detector_box=None, backend=self.name)
        best = max(boxes, key=lambda d: float(d[4]))
        points = self._fa.get_landmarks_from_image(rgb, detected_faces=[best])
        if not points:
            return FaceLandmarks(landmarks=None, detector_box=None, backend=self.name)
        clipped = np.clip(np.asarray(best[:4], dtype=np.float64), 0, None)
        box: Box = (int(clipped[0]), int(clipped[1]), int(clipped[2]), int(clipped[3]))
        return FaceLandmarks(landmarks=np.asarray(points[0])[:, :2].astype(np.int32), detector_box=box,
                             backend=self.name)
