"""The face track + crop rule of the published lip-sync evaluation (syncnet_python run_pipeline.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import golden_set
from musetalk.quality.track import (
    CropConfig,
    Detection,
    TrackConfig,
    crop_face,
    iou,
    iter_track_crops,
    smooth_track,
    track_faces,
)

SMALL = TrackConfig(min_track=10, min_face_size=20)


def _box(x: float, y: float, size: float = 60.0) -> tuple[float, float, float, float]:
    return (x, y, x + size, y + size)


def _per_frame(n: int, *faces: dict[int, tuple]) -> list[list[Detection]]:
    """Per-frame detection lists from {frame: box} maps (one map per face, in detector order)."""
    out: list[list[Detection]] = [[] for _ in range(n)]
    for face in faces:
        for f, box in face.items():
            out[f].append(Detection(f, box))
    return out


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_gap_is_bridged_by_linear_interpolation():
    face = {f: _box(10 + f, 20) for f in range(40) if not 15 <= f < 25}  # 10 missed frames
    (track,) = track_faces(_per_frame(40, face), SMALL)
    assert track.frames.tolist() == list(range(40))
    # the box moves 1 px per frame, so the interpolated boxes continue the motion exactly
    np.testing.assert_allclose(track.boxes[:, 0], 10 + np.arange(40))
    np.testing.assert_allclose(track.boxes[:, 1], 20)


def test_gap_longer_than_num_failed_det_splits_the_track():
    config = TrackConfig(num_failed_det=5, min_track=10, min_face_size=20)
    face = {f: _box(50, 50) for f in range(60) if not 20 <= f < 26}  # 6 missed frames: a jump of 7 > 5
    tracks = track_faces(_per_frame(60, face), config)
    assert [(t.frames[0], t.frames[-1]) for t in tracks] == [(0, 19), (26, 59)]
    # with a 5-frame hole (jump of 6 > 5) it still splits; with 4 missed frames (jump 5 <= 5) it bridges
    face = {f: _box(50, 50) for f in range(60) if not 20 <= f < 24}
    assert len(track_faces(_per_frame(60, face), config)) == 1


def test_two_faces_make_two_tracks_and_a_false_positive_none():
    left = {f: _box(10, 10) for f in range(30)}
    right = {f: _box(200, 10) for f in range(30)}
    blip = {12: _box(100, 150)}  # one-frame false positive
    tracks = track_faces(_per_frame(30, left, right, blip), SMALL)
    assert len(tracks) == 2
    assert tracks[0].boxes[0, 0] == 10 and tracks[1].boxes[0, 0] == 200


def test_too_short_or_too_small_tracks_are_dropped():
    # min_track counts detections and needs *more* than it: 10 detections are not enough, 11 are
    assert track_faces(_per_frame(30, {f: _box(0, 0) for f in range(10)}), SMALL) == []
    assert len(track_faces(_per_frame(30, {f: _box(0, 0) for f in range(11)}), SMALL)) == 1
    tiny = {f: _box(0, 0, size=20) for f in range(30)}  # mean size 20 is not above min_face_size 20
    assert track_faces(_per_frame(30, tiny), SMALL) == []


def test_detection_after_a_taken_one_in_the_same_frame_is_skipped():
    # The reference removes a taken detection from the list it iterates, so the next one in that frame is
    # skipped: the duplicate of frame 0 never joins the track, which keeps 11 detections. With min_track 11
    # that is one too few; had the duplicate joined (12 detections), the track would have been kept.
    config = TrackConfig(min_track=11, min_face_size=20)
    first = {f: _box(10, 10) for f in range(11)}
    dup = {0: _box(11, 10)}
    assert track_faces(_per_frame(20, first, dup), config) == []
    assert len(track_faces(_per_frame(20, first, {1: _box(11, 10)}), config)) == 0  # skipped after frame 1's take
    assert len(track_faces(_per_frame(20, {f: _box(10, 10) for f in range(12)}), config)) == 1


def test_smooth_track_and_crop_geometry():
    face = {f: (100.0, 80.0, 160.0, 150.0) for f in range(20)}  # w 60, h 70 -> s 35, centre (130, 115)
    (track,) = track_faces(_per_frame(20, face), SMALL)
    smooth = smooth_track(track)
    # medfilt zero-pads the ends: the first/last 6 of 13 values are the median of 7 real values and 6 zeros
    assert smooth.s[10] == 35.0 and smooth.x[10] == 130.0 and smooth.y[10] == 115.0
    assert smooth.s[0] == 35.0  # 7 of 13 values are 35, so the median is still 35

    frame = np.zeros((240, 320, 3), np.uint8)
    frame[115:, :] = 255  # white below the box centre
    crop = crop_face(frame, 35.0, 130.0, 115.0)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    # the window spans s above and s * 1.8 below the centre: the white part starts at 35 / (35 + 63) of the height
    col = crop[:, 112, 0].astype(int)
    edge = int(np.argmax(col > 128))
    assert abs(edge - round(224 * 35 / 98)) <= 1
    # a box at the border pulls in the grey padding
    assert (crop_face(frame, 35.0, 10.0, 10.0)[0, 0] == CropConfig().pad_value).all()


def test_iter_track_crops_streams_only_the_track_frames():
    face = {f: (40.0, 40.0, 100.0, 100.0) for f in range(5, 25)}
    (track,) = track_faces(_per_frame(30, face), SMALL)
    frames = (np.full((160, 160, 3), i, np.uint8) for i in range(30))
    crops = list(iter_track_crops(frames, smooth_track(track)))
    assert len(crops) == 20
    assert crops[0][112, 112, 0] == 5 and crops[-1][112, 112, 0] == 24


def test_lse_crop_golden_set_passes():
    from musetalk.testing.golden_lse_crop import verify

    results = verify(golden_set("lse-crop"))
    assert results and all(r.passed is True for r in results), "\n".join(r.line() for r in results)
