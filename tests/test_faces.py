"""Landmark backends: dlib on the sample face, faceless frames, the factory and the unavailable-backend errors."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from musetalk.errors import InputError, MuseTalkError
from musetalk.stages.faces import FaceLandmarks, LandmarkBackend, crop_box, get_landmark_backend
from musetalk.stream.video import open_frames

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.fixture(scope="module")
def dlib_backend():
    return get_landmark_backend("dlib")


@pytest.fixture(scope="module")
def face_bgr():
    return cv2.imread(str(SAMPLES / "face.png"))


def test_dlib_finds_68_plausible_points(dlib_backend, face_bgr):
    result = dlib_backend.detect(face_bgr)
    assert isinstance(result, FaceLandmarks) and result.has_face and result.backend == "dlib"
    lm = result.landmarks
    assert lm.shape == (68, 2) and lm.dtype == np.int32
    x1, y1, x2, y2 = result.detector_box
    w, h = x2 - x1, y2 - y1
    assert 80 < w < 300 and 80 < h < 300
    # every point near the detector box (the jaw may extend a little past it)
    assert (lm[:, 0] > x1 - 0.3 * w).all() and (lm[:, 0] < x2 + 0.3 * w).all()
    assert (lm[:, 1] > y1 - 0.3 * h).all() and (lm[:, 1] < y2 + 0.3 * h).all()
    eyes_y, nose_tip_y = lm[36:48, 1].mean(), lm[30, 1]
    mouth_y, chin_y = lm[48:68, 1].mean(), lm[8, 1]
    assert eyes_y < nose_tip_y < mouth_y < chin_y
    assert lm[36:42, 0].mean() < lm[27, 0] < lm[42:48, 0].mean()  # image-left eye, nose bridge, image-right eye
    assert crop_box(lm, 0, result.detector_box) is not None


def test_dlib_on_sample_clip(dlib_backend):
    for index, frame in enumerate(open_frames(SAMPLES / "face.mp4")):
        if index % 10 == 0:
            assert dlib_backend.detect(frame).has_face, f"no face in face.mp4 frame {index}"


def test_flat_grey_frame_has_no_face(dlib_backend):
    result = dlib_backend.detect(np.full((240, 320, 3), 128, dtype=np.uint8))
    assert not result.has_face and result.landmarks is None and result.detector_box is None


def test_largest_face_wins(dlib_backend, face_bgr):
    canvas = np.full((512, 1024, 3), 90, dtype=np.uint8)
    canvas[:, 512:] = face_bgr
    canvas[128:384, :256] = cv2.resize(face_bgr, (256, 256), interpolation=cv2.INTER_AREA)
    result = dlib_backend.detect(canvas)
    assert result.has_face and result.landmarks[:, 0].min() > 512


def test_face_cut_by_left_border_uses_detector_box(dlib_backend, face_bgr):
    cut = np.ascontiguousarray(face_bgr[:, 200:])  # the jaw's left end falls outside the frame
    result = dlib_backend.detect(cut)
    assert result.has_face and result.landmarks[:, 0].min() < 0
    x1, y1, x2, y2 = result.detector_box
    assert 0 == x1 < x2 <= cut.shape[1] and 0 <= y1 < y2 <= cut.shape[0]  # clipped to the frame
    assert crop_box(result.landmarks, 0, result.detector_box) == result.detector_box  # the reference's fallback


@pytest.mark.parametrize("bad", [np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.float32),
                                 np.zeros((64, 64, 4), np.uint8)])
def test_bad_frames_raise_input_error(dlib_backend, bad):
    with pytest.raises(InputError, match="uint8 BGR"):
        dlib_backend.detect(bad)


def test_factory_names(dlib_backend):
    assert isinstance(dlib_backend, LandmarkBackend) and dlib_backend.name == "dlib"
    with pytest.raises(InputError) as err:
        get_landmark_backend("mediapipe")
    assert "dlib" in str(err.value) and "face_alignment" in str(err.value) and "dwpose" in str(err.value)


def test_face_alignment_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "face_alignment", None)  # import fails even where it is installed
    with pytest.raises(MuseTalkError) as err:
        get_landmark_backend("face-alignment", device="cpu")
    assert "pip install" in err.value.fix and "dlib" in err.value.fix


def test_face_alignment_weights_unavailable(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    fake = types.SimpleNamespace(LandmarksType=types.SimpleNamespace(TWO_D=1), FaceAlignment=offline)
    monkeypatch.setitem(sys.modules, "face_alignment", fake)
    with pytest.raises(MuseTalkError) as err:
        get_landmark_backend("face_alignment", device="cpu")
    assert "weights" in str(err.value) and "checkpoints" in err.value.fix


def test_dwpose_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "musetalk.stages.faces.dwpose", None)  # as if another build had no dwpose.py
    with pytest.raises(MuseTalkError, match="dwpose"):
        get_landmark_backend("dwpose", device="cpu")


def test_dwpose_models_dir_names_the_checkpoint(tmp_path):
    pytest.importorskip("musetalk.stages.faces.dwpose")
    with pytest.raises(MuseTalkError, match="dw-ll_ucoco_384.pth"):
        get_landmark_backend("dwpose", device="cpu", models_dir=tmp_path)


def test_predictor_found_without_pkg_resources():
    from musetalk.stages.faces.dlib_backend import predictor_path

    assert predictor_path().is_file()


def test_importing_faces_loads_no_detector():
    code = "import sys, musetalk.stages.faces; print(sorted({'cv2', 'dlib', 'torch', 'av'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
