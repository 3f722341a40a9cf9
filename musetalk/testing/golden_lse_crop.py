"""Golden verifier of the face track + crop rule (sets holding ``golden_lse_crop.npz``).

Runs :mod:`musetalk.quality.track` on the set's own detections (``det_frame``, ``det_box_conf``) and frames
(``inputs/frames/*.jpg``, read with ``cv2.imread`` as ``crop_video`` does), with every parameter from
``manifest.json``, and compares each track's frames, boxes, smoothed size/centre and 224x224 crops.
Tolerances (golden README): frames exact, boxes and s/x/y <= 1e-6, crops >= 99.5 % of values within 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from musetalk.quality.track import CropConfig, Detection, TrackConfig, iter_track_crops, smooth_track, track_faces
from musetalk.testing.golden_common import StageResult, exact, frac_within, guarded, max_abs

GOLDEN_FILE = "golden_lse_crop.npz"
GEOMETRY_TOL = 1e-6


def configs_from_manifest(manifest: dict) -> tuple[TrackConfig, CropConfig]:
    """Tracker and crop settings of a set: ``params`` plus the top-level constants, defaults where absent."""
    p = manifest.get("params", {})
    track = TrackConfig(iou_threshold=float(manifest.get("iou_threshold", TrackConfig.iou_threshold)),
                        num_failed_det=int(p.get("num_failed_det", TrackConfig.num_failed_det)),
                        min_track=int(p.get("min_track", TrackConfig.min_track)),
                        min_face_size=float(p.get("min_face_size", TrackConfig.min_face_size)))
    crop = CropConfig(crop_scale=float(p.get("crop_scale", CropConfig.crop_scale)),
                      medfilt_kernel=int(manifest.get("medfilt_kernel", CropConfig.medfilt_kernel)),
                      pad_value=int(manifest.get("pad_value", CropConfig.pad_value)))
    return track, crop


def detections_by_frame(det_frame: np.ndarray, det_box_conf: np.ndarray, n_frames: int) -> list[list[Detection]]:
    """Per-frame detection lists (detector order kept) from the flat golden arrays."""
    per_frame: list[list[Detection]] = [[] for _ in range(n_frames)]
    for f, row in zip(det_frame.tolist(), det_box_conf.tolist()):
        per_frame[int(f)].append(Detection(int(f), (row[0], row[1], row[2], row[3]), row[4]))
    return per_frame


def _frames(frame_dir: Path):
    for path in sorted(frame_dir.glob("*.jpg")):
        image = cv2.imread(str(path))
        if image is None:
            raise OSError(f"cannot read {path}")
        yield image


def verify(set_dir: Path) -> list[StageResult]:
    """Verify one lse-crop golden set; one row per compared array."""
    set_dir = Path(set_dir)
    manifest = json.loads((set_dir / "manifest.json").read_text())
    gold = np.load(set_dir / GOLDEN_FILE)
    frame_dir = set_dir / "inputs" / "frames"
    n_frames = len(list(frame_dir.glob("*.jpg")))
    track_cfg, crop_cfg = configs_from_manifest(manifest)
    tracks = track_faces(detections_by_frame(gold["det_frame"], gold["det_box_conf"], n_frames), track_cfg)

    results = [exact("n_tracks", np.int64(len(tracks)), gold["n_tracks"])]
    for k in range(int(gold["n_tracks"])):
        key = f"track{k}"
        if k >= len(tracks):
            results.append(StageResult(key, "missing", float("nan"), "-", False, f"only {len(tracks)} tracks made"))
            continue
        results += _verify_track(key, tracks[k], gold, frame_dir, crop_cfg)
    return results


def _verify_track(key: str, track, gold, frame_dir: Path, crop_cfg: CropConfig) -> list[StageResult]:
    rows = [exact(f"{key}_frames", track.frames, gold[f"{key}_frames"])]
    if rows[0].passed is not True:
        return rows  # geometry of a different track would only repeat the same failure
    rows.append(max_abs(f"{key}_boxes", track.boxes, gold[f"{key}_boxes"], GEOMETRY_TOL))
    smooth = smooth_track(track, crop_cfg)
    for name in ("s", "x", "y"):
        rows.append(max_abs(f"{key}_{name}", getattr(smooth, name), gold[f"{key}_{name}"], GEOMETRY_TOL))

    def crops() -> StageResult:
        wanted = set(gold[f"{key}_crop_index"].tolist())
        got = [c for i, c in enumerate(iter_track_crops(_frames(frame_dir), smooth, crop_cfg)) if i in wanted]
        return frac_within(f"{key}_crops224", np.stack(got), gold[f"{key}_crops224"], 2, 0.995)

    return rows + guarded(f"{key}_crops224", crops)
