"""The reference crop rule: golden coords and crops, borders, fallbacks and the bbox_shift range."""

from __future__ import annotations

import json

import numpy as np
import pytest

from musetalk.errors import InputError, NoFaceError
from musetalk.stages.faces import (
    FaceLandmarks,
    apply_extra_margin,
    bbox_shift_range,
    crop_box,
    crop_face,
    describe_bbox_shift_range,
)


@pytest.fixture(scope="module")
def golden(v15_golden):
    arrays = np.load(v15_golden / "golden.npz")
    manifest = json.loads((v15_golden / "manifest.json").read_text())
    return {k: arrays[k] for k in ("frames", "landmarks68", "coords", "crops256")}, manifest["inputs"]


def test_coords_match_golden(golden):
    arrays, params = golden
    boxes = [crop_box(lm, params["bbox_shift"]) for lm in arrays["landmarks68"]]
    assert np.array_equal(np.array(boxes), arrays["coords"])


def test_crops_match_golden(golden):
    arrays, params = golden
    for frame, coords, expected in zip(arrays["frames"], arrays["coords"], arrays["crops256"], strict=True):
        box = apply_extra_margin(tuple(int(v) for v in coords), params["extra_margin"], frame.shape[0])
        crop = crop_face(frame, box)
        assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
        diff = np.abs(crop.astype(np.int16) - expected.astype(np.int16))
        assert (diff <= 2).mean() >= 0.995
        assert diff.max() == 0  # the same cv2 Lanczos call: expect bit-exact


def _face(dx: int = 0, dy: int = 0) -> np.ndarray:
    """A synthetic 68-point face: the golden's layout is not needed, only the points the rule reads."""
    lm = np.zeros((68, 2), dtype=np.int32)
    lm[:, 0] = np.linspace(100, 200, 68).astype(np.int32)
    lm[:, 1] = 150
    lm[8] = (150, 260)  # chin: max y
    lm[28], lm[29], lm[30] = (150, 140), (150, 150), (150, 160)
    return lm + np.array([dx, dy], dtype=np.int32)


def test_rule_by_hand():
    # half = 150, dist = 260 - 150 = 110, upper = 40
    assert crop_box(_face()) == (100, 40, 200, 260)
    assert crop_box(_face(), bbox_shift=5) == (100, 50, 200, 260)  # y1 moves by 2 * shift


def test_upper_edge_clamped_at_frame_top():
    assert crop_box(_face(dy=-60)) == (100, 0, 200, 200)  # 90 - 110 < 0


def test_left_of_frame_falls_back_to_detector_box():
    assert crop_box(_face(dx=-120), detector_box=(0, 10, 90, 120)) == (0, 10, 90, 120)
    assert crop_box(_face(dx=-120)) is None


def test_shift_past_chin_falls_back():
    assert crop_box(_face(), bbox_shift=200, detector_box=(1, 2, 3, 4)) == (1, 2, 3, 4)
    assert crop_box(_face(), bbox_shift=200) is None


def test_extra_margin_clipped_to_frame():
    assert apply_extra_margin((10, 20, 30, 40), 10, frame_height=100) == (10, 20, 30, 50)
    assert apply_extra_margin((10, 20, 30, 95), 10, frame_height=100) == (10, 20, 30, 100)


def test_crop_at_frame_border():
    frame = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    box = apply_extra_margin((100, 0, 160, 115), 10, frame.shape[0])  # touches top, right and bottom edges
    crop = crop_face(frame, box)
    assert crop.shape == (256, 256, 3)
    with pytest.raises(InputError, match="empty"):
        crop_face(frame, (50, 50, 50, 80))
    with pytest.raises(InputError, match="outside"):
        crop_face(frame, (-1, 0, 20, 20))


def test_bbox_shift_range_matches_reference(golden):
    arrays, _ = golden
    # by hand from the golden landmarks: lm30.y - lm29.y = 8,8,8,8,9,9 (mean 8.3); lm29.y - lm28.y = 8,8,8,9,8,8
    assert bbox_shift_range(arrays["landmarks68"]) == (-8, 8)


def test_bbox_shift_range_truncates_and_skips_faceless():
    a, b = _face(), _face()
    b[30, 1] += 1  # down distances 10 and 11: mean 10.5 -> 10
    empty = FaceLandmarks(None, None, "dlib")
    assert bbox_shift_range([a, None, FaceLandmarks(b, None, "dlib"), empty]) == (-10, 10)
    assert describe_bbox_shift_range((-10, 10), 3) == "[ -10~10 ] , the current value: 3"
    with pytest.raises(NoFaceError):
        bbox_shift_range([None, empty])


def test_bbox_shift_at_both_ends_of_range(golden):
    arrays, _ = golden
    low, high = bbox_shift_range(arrays["landmarks68"])
    for lm in arrays["landmarks68"]:
        x1, y1, x2, y2 = crop_box(lm, 0)
        for shift in (low, high):
            box = crop_box(lm, shift)
            assert box == (x1, max(0, y1 + 2 * shift), x2, y2)
            assert box[3] - box[1] > 0


def test_bad_landmarks_shape():
    with pytest.raises(InputError, match="68, 2"):
        crop_box(np.zeros((5, 2)))
