"""DWPose in plain PyTorch: golden match with mmpose, strict loading, no mm* imports, full-size shapes, backend contract."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.errors import InputError, WeightsError
from musetalk.stages.faces.dwpose import (
    FACE_SLICE,
    DWPoseBackend,
    DWPoseConfig,
    DWPoseNet,
    crop_to_input,
    decode_simcc,
    default_checkpoint_path,
    estimate_wholebody,
    load_dwpose,
    wholebody_flip_indices,
)
from musetalk.stages.faces.types import LandmarkBackend
from tests.conftest import golden_set

REPO = Path(__file__).resolve().parents[1]
# The tiny golden set's architecture: cheap to build and run (~1 M parameters).
TINY = DWPoseConfig(deepen_factor=0.167, widen_factor=0.25, in_channels=256)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weights checkpoint of TINY in mmpose's format ({'state_dict': ...}); needs no ../shared."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dwpose") / "tiny.pth"
    torch.save({"state_dict": DWPoseNet(TINY).state_dict()}, path)
    return path


def _frame(h: int = 360, w: int = 480, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- golden -------------------------------------------------------------------------------------------------


def test_golden_dwpose_tiny_matches_mmpose() -> None:
    from musetalk.testing.golden_dwpose import verify

    results = verify(golden_set("dwpose-tiny"))
    assert len(results) == 3
    assert all(r.passed is True for r in results), "\n".join(r.line() for r in results)


def test_verifier_fails_when_the_flip_test_is_left_out(tmp_path: Path) -> None:
    """The verifier has teeth: the same set with the flip test switched off in its manifest must FAIL."""
    from musetalk.testing.golden_dwpose import verify

    src = golden_set("dwpose-tiny")
    for item in src.iterdir():
        if item.name != "manifest.json":
            (tmp_path / item.name).symlink_to(item)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["model"]["preprocess"]["flip_test"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    results = verify(tmp_path)
    assert any(r.passed is False for r in results), "\n".join(r.line() for r in results)


def test_verifier_reports_a_set_without_checkpoint(tmp_path: Path) -> None:
    from musetalk.testing.golden_dwpose import verify

    src = golden_set("dwpose-tiny")
    for name in ("manifest.json", "golden_dwpose.npz"):
        shutil.copy(src / name, tmp_path / name)
    results = verify(tmp_path)
    assert len(results) == 1 and results[0].passed is False and ".pth" in results[0].detail


# --- strict loading -----------------------------------------------------------------------------------------


def test_checkpoint_for_another_architecture_is_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(WeightsError, match="does not match DWPoseNet") as exc:
        load_dwpose(tiny_checkpoint, replace(TINY, widen_factor=0.5, in_channels=512))
    assert "shape mismatches" in exc.value.message


def test_surplus_keys_fail_unless_training_only(tiny_checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    extra = tmp_path / "extra.pth"
    torch.save({"state_dict": {**state, "head.extra.weight": torch.ones(3)}}, extra)
    with pytest.raises(WeightsError, match="unexpected keys: head.extra.weight"):
        load_dwpose(extra, TINY)
    missing = tmp_path / "missing.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "head.cls_x.weight"}}, missing)
    with pytest.raises(WeightsError, match="missing keys: head.cls_x.weight"):
        load_dwpose(missing, TINY)
    training = tmp_path / "training.pth"
    torch.save({"state_dict": {**state, "head.loss_module.weights": torch.ones(3)}}, training)
    assert isinstance(load_dwpose(training, TINY), DWPoseNet)  # dropped by name, the rest loads strictly


def test_missing_checkpoint_says_how_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsError, match="not found") as exc:
        DWPoseBackend(checkpoint_path=tmp_path / "nope.pth", device="cpu")
    assert "musetalk download" in exc.value.fix
    monkeypatch.setenv("MUSETALK_MODELS", str(tmp_path / "models"))
    assert default_checkpoint_path() == tmp_path / "models" / "dwpose" / "dw-ll_ucoco_384.pth"
    with pytest.raises(WeightsError, match=re.escape(str(default_checkpoint_path()))):
        DWPoseBackend(device="cpu")


# --- no OpenMMLab -------------------------------------------------------------------------------------------

_MM = r"(mmcv|mmpose|mmengine|mmdet)"


def test_no_openmmlab_import_anywhere_in_the_package() -> None:
    pattern = re.compile(rf"^\s*(import\s+{_MM}\b|from\s+{_MM}\b)|import_module\(\s*['\"]{_MM}", re.M)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "musetalk").rglob("*.py")
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
    loaded = [m for m in sys.modules if re.match(_MM, m)]
    assert loaded == [], f"{loaded} were imported while running the DWPose tests"


# --- architecture and pre/post-processing -------------------------------------------------------------------


def test_full_size_architecture_shapes() -> None:
    """The real DWPose-L config on random weights: 384x288 input -> 12x9x1024 features -> SimCC 576 / 768."""
    torch.manual_seed(0)
    model = DWPoseNet().eval()
    with torch.inference_mode():
        x = torch.randn(1, 3, 384, 288)
        feats = model.backbone(x)
        simcc_x, simcc_y = model.head(feats[-1])
    assert [tuple(f.shape) for f in feats] == [(1, 1024, 12, 9)]
    assert tuple(simcc_x.shape) == (1, 133, 576) and tuple(simcc_y.shape) == (1, 133, 768)
    assert torch.isfinite(simcc_x).all() and torch.isfinite(simcc_y).all()
    n_params = sum(p.numel() for p in model.parameters())
    assert 33e6 < n_params < 34e6  # RTMPose-L body is 27.7 M; 133 keypoints add ~5.9 M in the 7x7 final conv


def test_flip_indices_are_the_coco_wholebody_mirror_pairs() -> None:
    flip = wholebody_flip_indices()
    assert len(flip) == 133 and all(flip[flip[i]] == i for i in range(133))
    assert flip[:5] == [0, 2, 1, 4, 3] and flip[17:23] == [20, 21, 22, 17, 18, 19]
    assert flip[23] == 39 and flip[31] == 31 and flip[59] == 68 and flip[63] == 70 and flip[88] == 90
    assert flip[91] == 112 and flip[132] == 111
    assert [i for i in range(23, 91) if flip[i] == i] == [31, 50, 51, 52, 53, 56, 74, 80, 85, 89]


def test_whole_frame_box_center_scale_and_warp() -> None:
    crop, center, scale = crop_to_input(_frame(512, 512), None, DWPoseConfig())
    assert crop.shape == (384, 288, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(center, [256, 256])
    np.testing.assert_allclose(scale, [640, 640 / 0.75], rtol=1e-6)  # padding 1.25, then aspect 288:384


def test_simcc_decode_takes_argmax_and_the_smaller_maximum() -> None:
    sx = np.zeros((1, 2, 8), np.float32)
    sy = np.zeros((1, 2, 6), np.float32)
    sx[0, 0, 5], sy[0, 0, 3] = 2.0, 1.5
    sx[0, 1, 1], sy[0, 1, 2] = 1.0, -1.0  # the y vector peaks at 0, so this keypoint's score is 0
    points, scores = decode_simcc(sx, sy, 2.0)
    np.testing.assert_allclose(points[0, 0], [2.5, 1.5])
    np.testing.assert_allclose(scores[0], [1.5, 0.0])
    np.testing.assert_allclose(points[0, 1], [-0.5, -0.5])  # score <= 0 -> location -1, then / split ratio


# --- the landmark backend -----------------------------------------------------------------------------------


def test_backend_contract(tiny_checkpoint: Path) -> None:
    backend = DWPoseBackend(checkpoint_path=tiny_checkpoint, device="cpu", config=TINY)
    assert isinstance(backend, LandmarkBackend) and backend.name == "dwpose"
    frames = [_frame(seed=0), _frame(200, 300, seed=1)]  # two sizes in one batch
    result = backend.detect(frames[0])
    assert result.has_face and result.backend == "dwpose"
    assert result.landmarks.shape == (68, 2) and result.landmarks.dtype == np.int32
    assert result.detector_box == (0, 0, 480, 360)
    pose = estimate_wholebody(backend.model, [frames[0]])[0]
    np.testing.assert_array_equal(result.landmarks, pose.keypoints[FACE_SLICE].astype(np.int32))
    # Batched and streamed (one frame per call) equal one by one.
    singles = [result, backend.detect(frames[1])]
    backend.batch_size = 1
    for got in (backend.detect_batch(frames), list(backend.detect_many(iter(frames)))):
        for a, b in zip(got, singles, strict=True):
            np.testing.assert_array_equal(a.landmarks, b.landmarks)
            assert a.detector_box == b.detector_box


def test_optional_face_detector_decides_face_and_box(tiny_checkpoint: Path) -> None:
    boxes = iter([(10, 20, 110, 140), None])
    backend = DWPoseBackend(tiny_checkpoint, "cpu", config=TINY, face_detector=lambda frame: next(boxes))
    found, missing = backend.detect_batch([_frame(seed=0), _frame(seed=1)])
    assert found.detector_box == (10, 20, 110, 140) and found.landmarks.shape == (68, 2)
    assert not missing.has_face and missing.detector_box is None


def test_bad_frames_are_refused(tiny_checkpoint: Path) -> None:
    backend = DWPoseBackend(tiny_checkpoint, "cpu", config=TINY)
    with pytest.raises(InputError, match="BGR uint8"):
        backend.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match="BGR uint8"):
        backend.detect(np.zeros((10, 10, 3), np.float32))
