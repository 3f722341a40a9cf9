"""Verifier for DWPose golden sets (``golden_dwpose.npz`` + ``manifest.json`` + one mmpose ``.pth``).

A set is mmpose's ``inference_topdown`` run with the reference DWPose config at some depth/width on random
weights. We build :class:`~musetalk.stages.faces.dwpose.DWPoseNet` from the manifest's parameters, load the set's own
checkpoint strictly, run the set's frames and compare:

- ``face68`` (keypoints 23..90, what MuseTalk crops with): every coordinate within 1 px (max abs <= 1);
- all 133 keypoints: >= 99 % within 1 px (Euclidean distance per keypoint);
- scores (raw SimCC maxima, any magnitude on random weights): max relative error <= 1e-4, relative to
  max(1, |expected|). Measured on dwpose-tiny: 1.4e-6 (float32 summation order); keypoints were exact.

Expected arrays are only compared, never fed into the computation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from musetalk.testing.golden_common import StageResult, frac_within, guarded, max_abs

GOLDEN_FILE = "golden_dwpose.npz"
TOL_FACE_PX = 1.0  # every face68 coordinate
KEYPOINT_PX, KEYPOINT_FRACTION = 1.0, 0.99  # share of all keypoints within this distance
TOL_SCORE_REL = 1e-4


def find_checkpoint(set_dir: Path) -> Path:
    """The one ``.pth`` file in the set folder (a set holds exactly one checkpoint)."""
    found = sorted(set_dir.glob("*.pth"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected exactly one .pth in {set_dir}, found {[p.name for p in found]}")
    return found[0]


def _score_check(actual: np.ndarray, expected: np.ndarray) -> StageResult:
    rule = f"<= {TOL_SCORE_REL:g}"
    if actual.shape != expected.shape:
        return StageResult("dwpose scores", "max rel err", float("inf"), rule, False,
                           f"shape {actual.shape} != expected {expected.shape}")
    err = np.abs(actual.astype(np.float64) - expected) / np.maximum(1.0, np.abs(expected.astype(np.float64)))
    value = float(err.max()) if err.size else 0.0
    return StageResult("dwpose scores", "max rel err", value, rule, bool(value <= TOL_SCORE_REL))


def verify(set_dir: Path) -> list[StageResult]:
    """Run our DWPose on the set's frames and compare keypoints, face68 and scores with mmpose's."""
    from musetalk.stages.faces.dwpose import FACE_SLICE, DWPoseConfig, estimate_wholebody, load_dwpose

    set_dir = Path(set_dir)
    state: dict[str, np.ndarray] = {}

    def run() -> list[StageResult]:
        manifest = json.loads((set_dir / "manifest.json").read_text())
        golden = np.load(set_dir / GOLDEN_FILE)
        model = load_dwpose(find_checkpoint(set_dir), DWPoseConfig.from_manifest(manifest), device="cpu")
        frames = list(golden["frames"])
        # Sets made with explicit person boxes would store them; the whole frame otherwise (as MuseTalk).
        boxes = list(golden["bboxes"]) if "bboxes" in golden.files else None
        poses = estimate_wholebody(model, frames, boxes)
        state["keypoints"] = np.stack([p.keypoints for p in poses])
        state["scores"] = np.stack([p.scores for p in poses])
        for name in ("keypoints", "keypoint_scores", "face68"):
            state["expected_" + name] = golden[name]
        return []

    results = guarded("dwpose inference", run)
    if results:  # the model could not be built or run: one FAIL row says why
        return results

    def keypoints_within() -> StageResult:
        actual, expected = state["keypoints"], state["expected_keypoints"]
        if actual.shape != expected.shape:
            return frac_within("dwpose keypoints (133)", actual, expected, KEYPOINT_PX, KEYPOINT_FRACTION)
        dist = np.linalg.norm(actual.astype(np.float64) - expected, axis=-1)
        row = frac_within("dwpose keypoints (133)", dist, np.zeros_like(dist), KEYPOINT_PX, KEYPOINT_FRACTION)
        return StageResult(row.stage, "% keypoints within 1 px", row.value, row.tolerance, row.passed,
                           f"max distance {dist.max():.3g} px")

    return [
        *guarded("dwpose face68", lambda: max_abs("dwpose face68 (px)", state["keypoints"][:, FACE_SLICE],
                                                  state["expected_face68"], TOL_FACE_PX)),
        *guarded("dwpose keypoints (133)", keypoints_within),
        *guarded("dwpose scores", lambda: _score_check(state["scores"], state["expected_keypoint_scores"])),
    ]
