"""Face tracks and 224x224 face crops, by the rule of the published lip-sync evaluation.

The LSE numbers of talking-face papers are computed by joonson/syncnet_python only after its own face
pipeline (``run_pipeline.py``: ``track_shot`` and ``crop_video``, MIT licence). This module re-implements
that rule (no code copied) so our crops, and so our scores, match:

* tracking: detections are linked greedily, frame by frame, to the last box of the current track when
  their IoU is above 0.5 and they are at most ``num_failed_det`` frames after it; missing frames are filled by
  linear interpolation of the boxes; a track is kept when it has more than ``min_track`` detections and its
  mean box width or height is above ``min_face_size`` pixels;
* cropping: the half size ``s = max(w, h) / 2`` and the centre of each box are median-filtered over the
  track (kernel 13, zero-padded ends, as ``scipy.signal.medfilt``); the frame is padded with grey 110 and the
  window of ``s`` above and ``s * (1 + 2 * crop_scale)`` below the centre, ``2 * s * (1 + crop_scale)`` wide,
  is resized to 224x224 (bilinear). The window reaches down to the chin and neck on purpose.

Boxes are (x1, y1, x2, y2) float pixels; frames are (H, W, 3) uint8 BGR; frame indices count from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from scipy import signal as scipy_signal


@dataclass(frozen=True)
class TrackConfig:
    """Settings of the tracker (run_pipeline.py defaults)."""

    iou_threshold: float = 0.5  # a detection joins a track when its IoU with the track's last box is above this
    num_failed_det: int = 25  # frames a track may go without a detection (1 s at 25 fps); gaps are interpolated
    min_track: int = 100  # a track needs more than this many detections (4 s at 25 fps)
    min_face_size: float = 100.0  # mean box width or height (px) must be above this


@dataclass(frozen=True)
class CropConfig:
    """Settings of the crop rule (run_pipeline.py defaults)."""

    crop_scale: float = 0.4  # the window reaches 1 + 2 * crop_scale half-sizes below the box centre
    medfilt_kernel: int = 13  # median filter over the track for the size and centre (about half a second)
    pad_value: int = 110  # grey used beyond the frame border
    size: int = 224  # output side: SyncNet's input


@dataclass(frozen=True)
class Detection:
    """One face detection: frame index, box (x1, y1, x2, y2) in pixels and detector confidence."""

    frame: int
    box: tuple[float, float, float, float]
    conf: float = 1.0


@dataclass(frozen=True)
class FaceTrack:
    """A kept track: consecutive frame indices (n,) int64 and their boxes (n, 4) float64, gaps interpolated."""

    frames: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)


@dataclass(frozen=True)
class SmoothedTrack:
    """What cuts the crops: frames (n,) int64, half size ``s`` and centre ``x``, ``y`` (n,) float64 each."""

    frames: np.ndarray
    s: np.ndarray
    x: np.ndarray
    y: np.ndarray


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (no +1 pixel convention, as the reference)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / float(union)


def _take_one_track(per_frame: list[list[Detection]], config: TrackConfig) -> list[Detection]:
    """Greedily pull one track out of ``per_frame`` (the detections it takes are removed from the lists).

    The reference iterates ``for face in framefaces`` while calling ``framefaces.remove(face)``; Python's list
    iterator then skips the detection right after a taken one. We keep that behaviour (``i += 1`` after a
    deletion) because it decides which of two overlapping detections in one frame starts or extends a track.
    """
    track: list[Detection] = []
    for faces in per_frame:
        i = 0
        while i < len(faces):
            face = faces[i]
            if not track:
                track.append(face)
                del faces[i]
            elif face.frame - track[-1].frame <= config.num_failed_det:
                if iou(face.box, track[-1].box) > config.iou_threshold:
                    track.append(face)
                    del faces[i]
            else:
                break  # this frame is past the gap limit: the track has ended
            i += 1
    return track


def interpolate_track(track: Sequence[Detection]) -> FaceTrack:
    """Fill the frames between the first and last detection by linear interpolation of each box coordinate."""
    frames = np.array([d.frame for d in track], dtype=np.int64)
    boxes = np.array([d.box for d in track], dtype=np.float64)
    all_frames = np.arange(frames[0], frames[-1] + 1)
    filled = np.stack([np.interp(all_frames, frames, boxes[:, k]) for k in range(4)], axis=1)
    return FaceTrack(frames=all_frames.astype(np.int64), boxes=filled)


def track_faces(detections: Iterable[Iterable[Detection]], config: TrackConfig = TrackConfig()) -> list[FaceTrack]:
    """Face tracks of one shot from per-frame detections (list ``k`` holds frame k's detections, in detector order).

    Tracks come out in the order they are found (the first starts at the earliest unused detection).
    Detections that make too short or too small a track are dropped, as the reference does.
    """
    per_frame = [list(faces) for faces in detections]
    tracks: list[FaceTrack] = []
    while True:
        track = _take_one_track(per_frame, config)
        if not track:
            return tracks
        if len(track) <= config.min_track:
            continue
        filled = interpolate_track(track)
        size = max(np.mean(filled.boxes[:, 2] - filled.boxes[:, 0]), np.mean(filled.boxes[:, 3] - filled.boxes[:, 1]))
        if size > config.min_face_size:
            tracks.append(filled)


def smooth_track(track: FaceTrack, config: CropConfig = CropConfig()) -> SmoothedTrack:
    """Median-filtered half size and centre of each box of a track (``crop_video``'s ``dets``)."""
    b = track.boxes
    s = np.maximum(b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]) / 2
    y = (b[:, 1] + b[:, 3]) / 2
    x = (b[:, 0] + b[:, 2]) / 2
    k = config.medfilt_kernel
    return SmoothedTrack(frames=track.frames, s=scipy_signal.medfilt(s, k), x=scipy_signal.medfilt(x, k),
                         y=scipy_signal.medfilt(y, k))


def crop_face(frame: np.ndarray, s: float, x: float, y: float, config: CropConfig = CropConfig()) -> np.ndarray:
    """The (size, size, 3) uint8 BGR crop of one frame for half size ``s`` and centre (``x``, ``y``).

    Same integer rounding as the reference: the pad is ``int(s * (1 + 2 * crop_scale))`` and each window edge is
    truncated with ``int()`` in padded coordinates.
    """
    cs = config.crop_scale
    pad = int(s * (1 + 2 * cs))
    padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="constant", constant_values=config.pad_value)
    my, mx = y + pad, x + pad
    window = padded[int(my - s):int(my + s * (1 + 2 * cs)), int(mx - s * (1 + cs)):int(mx + s * (1 + cs))]
    if window.size == 0:
        raise ValueError(f"empty crop window for s={s:.1f} at ({x:.1f}, {y:.1f}) in a frame of {frame.shape[:2]}")
    return cv2.resize(window, (config.size, config.size))


def iter_track_crops(frames: Iterable[np.ndarray], track: SmoothedTrack,
                     config: CropConfig = CropConfig()) -> Iterator[np.ndarray]:
    """Stream the crops of ``track`` from the frames of the whole video (frame 0 first); one crop per track frame."""
    first, last = int(track.frames[0]), int(track.frames[-1])
    for index, frame in enumerate(frames):
        if index > last:
            return
        if index >= first:
            k = index - first
            yield crop_face(frame, track.s[k], track.x[k], track.y[k], config)
