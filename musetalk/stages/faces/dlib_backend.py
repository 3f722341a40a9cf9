"""The default, offline landmark backend: dlib's HOG frontal face detector + its 68-point shape predictor.

Licence note: the 68-point model (``shape_predictor_68_face_landmarks.dat``, shipped in the
``face_recognition_models`` package) was trained by Davis King on the iBUG 300-W data set, whose licence
excludes commercial use; the model inherits that restriction. dlib itself is under the Boost licence. For
commercial work use another backend (e.g. ``dwpose``, which is also what the reference uses).

dlib's points follow the iBUG-68 order, the same order as DWPose's face keypoints 23..90 that the reference
uses, so the crop rule applies unchanged. The points are not identical to DWPose's: crops from this backend
differ from the reference's by a few pixels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from musetalk.errors import MuseTalkError
from musetalk.stages.faces.types import Box, FaceLandmarks, check_frame_bgr

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
# Frames whose longer side is at most this get a second, 2x-upsampled detection pass when the first finds
# nothing: HOG only sees faces of about 80x80 px and up, and upsampling a 1080p frame costs ~1 s per frame.
UPSAMPLE_RETRY_MAX_SIDE = 1280


def predictor_path() -> Path:
    """Path of the 68-point model inside the installed ``face_recognition_models`` package.

    Found with ``importlib.util.find_spec`` without importing the package: its ``__init__`` imports
    ``pkg_resources``, which recent setuptools no longer ships.
    """
    fix = "pip install face-recognition-models (it ships the dlib 68-point model)"
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MuseTalkError("the dlib 68-point landmark model is not installed", fix)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "models" / PREDICTOR_FILE
        if path.is_file():
            return path
    raise MuseTalkError(f"{PREDICTOR_FILE} is missing from the face_recognition_models package", fix)


class DlibBackend:
    """68 landmarks of the largest face per frame, with dlib (CPU only; ``device`` is accepted and ignored).

    The detector and predictor are built once per instance. Not safe to share across threads: make one
    instance per thread.
    """

    name = "dlib"

    def __init__(self, device: object = None, upsample: int = 0, predictor: str | Path | None = None) -> None:
        """upsample: times dlib upsamples the frame before detecting (0 = as is; 1 finds faces half the size at
        4x the cost); with 0, small frames with no face found are retried once at 1 (see UPSAMPLE_RETRY_MAX_SIDE).
        predictor: another 68-point dlib model file; defaults to :func:`predictor_path`.
        """
        try:
            import dlib
        except ImportError:
            raise MuseTalkError("dlib is not installed", "pip install dlib-bin (prebuilt wheels)") from None
        path = Path(predictor) if predictor is not None else predictor_path()
        try:
            self._predictor = dlib.shape_predictor(str(path))
        except RuntimeError as err:
            raise MuseTalkError(f"cannot load the dlib landmark model {path}: {err}",
                                "reinstall face-recognition-models, or pass a valid 68-point .dat file") from None
        self._detector = dlib.get_frontal_face_detector()
        self.upsample = int(upsample)

    def _detect_boxes(self, rgb: np.ndarray) -> list:
        rects = list(self._detector(rgb, self.upsample))
        if not rects and self.upsample == 0 and max(rgb.shape[:2]) <= UPSAMPLE_RETRY_MAX_SIDE:
            rects = list(self._detector(rgb, 1))
        return rects

    def detect(self, frame_bgr: np.ndarray) -> FaceLandmarks:
        """Landmarks of the largest face in frame_bgr ((H, W, 3) uint8 BGR).

        Returns FaceLandmarks with landmarks (68, 2) int32 (x, y) pixels (points may lie outside the frame for a
        face cut by the border) and detector_box (x1, y1, x2, y2) clipped to the frame; both None without a face.
        """
        frame = check_frame_bgr(frame_bgr)
        rgb = np.ascontiguousarray(frame[:, :, ::-1])  # dlib expects RGB (or grey)
        rects = self._detect_boxes(rgb)
        if not rects:
            return FaceLandmarks(landmarks=None, detector_box=None, backend=self.name)
        rect = max(rects, key=lambda r: r.width() * r.height())
        shape = self._predictor(rgb, rect)
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.int32)
        h, w = frame.shape[:2]
        # dlib's right/bottom are inclusive; our boxes are exclusive, hence +1.
        box: Box = (max(0, rect.left()), max(0, rect.top()), min(w, rect.right() + 1), min(h, rect.bottom() + 1))
        return FaceLandmarks(landmarks=points, detector_box=box, backend=self.name)
