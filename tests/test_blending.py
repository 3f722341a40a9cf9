"""Blending: the golden blended frames (get_image and cached paths) and PIL semantics at the frame border."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from musetalk.config import BlendConfig
from musetalk.stages.blending import (BlendMaterial, blend_face, blend_with_material, expanded_crop_box,
                               material_from_parsing, parser_input, prepare_blend_material)
from musetalk.errors import InputError
from musetalk.stages.parsing import FaceParser, face_mask

BLEND_LEVELS, BLEND_FRACTION = 2, 0.995  # shared/golden/README.md


class StubParser:
    """Returns a fixed blocky class map and records what it was given (no network)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        blocks = rng.choice(np.array([0, 1, 1, 1, 10, 11, 12, 13, 14], dtype=np.uint8), size=(32, 32))
        self.parsing = np.kron(blocks, np.ones((16, 16), dtype=np.uint8))
        self.seen: list[np.ndarray] = []

    def parse(self, image_rgb: np.ndarray) -> np.ndarray:
        self.seen.append(np.array(image_rgb))
        return self.parsing


def _pil_get_image(frame, face, box, mask512, upper=0.5, expand=1.5, blur=0.05):
    """The reference get_image step by step on PIL images, with a given 512x512 parsing mask (test oracle)."""
    body = Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1]))
    x, y, x1, y1 = box
    face = Image.fromarray(np.ascontiguousarray(cv2.resize(face, (x1 - x, y1 - y))[:, :, ::-1]))
    s = int(max(x1 - x, y1 - y) // 2 * expand)
    xc, yc = (x + x1) // 2, (y + y1) // 2
    crop_box = (xc - s, yc - s, xc + s, yc + s)
    xs, ys = crop_box[:2]
    face_large = body.crop(crop_box)
    mask = Image.fromarray(mask512).resize(face_large.size)
    inner = (x - xs, y - ys, x1 - xs, y1 - ys)
    boxed = Image.new("L", face_large.size, 0)
    boxed.paste(mask.crop(inner), inner)
    width, height = boxed.size
    top = int(height * upper)
    cut = Image.new("L", face_large.size, 0)
    cut.paste(boxed.crop((0, top, width, height)), (0, top))
    k = int(blur * face_large.size[0] // 2 * 2) + 1
    alpha = Image.fromarray(cv2.GaussianBlur(np.array(cut), (k, k), 0))
    face_large.paste(face, inner)
    body.paste(face_large, crop_box[:2], alpha)
    return np.array(body)[:, :, ::-1]


def _frame(h: int = 160, w: int = 200) -> np.ndarray:
    rng = np.random.default_rng(2)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _face() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)


# ---- goldens ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden(v15_golden):
    manifest = json.loads((v15_golden / "manifest.json").read_text())
    parser = FaceParser.from_pretrained(v15_golden / "models" / "face-parse-bisent" / "79999_iter.pth")
    return np.load(v15_golden / "golden.npz"), manifest, parser


def _golden_boxes(g, manifest):
    """Golden coords with the extra margin (v1.5) added to y2, clipped to the frame height."""
    margin = int(manifest.get("inputs", {}).get("extra_margin", 0))
    frames, coords = g["frames"], g["coords"][: len(g["decoded_faces_bgr"])]
    return [(int(x1), int(y1), int(x2), min(int(y2) + margin, f.shape[0]))
            for f, (x1, y1, x2, y2) in zip(frames, coords)]


def _within(actual: np.ndarray, expected: np.ndarray) -> float:
    return float((np.abs(actual.astype(np.int16) - expected.astype(np.int16)) <= BLEND_LEVELS).mean())


def test_golden_blended_frames(golden):
    g, manifest, parser = golden
    cheek = int(manifest["cheek_widths"])
    frames, faces = g["frames"], g["decoded_faces_bgr"]
    boxes = _golden_boxes(g, manifest)
    # the class map depends only on the source frame and box: parse each crop once for all modes
    parsings = [parser.parse(parser_input(f, b)) for f, b in zip(frames, boxes)]
    for mode in ("raw", "jaw", "neck"):
        out = np.stack([blend_with_material(f, face, b, material_from_parsing(p, b, _blend(mode, cheek, 0.05)))
                        for f, face, b, p in zip(frames, faces, boxes, parsings)])
        assert _within(out, g[f"blended_{mode}"]) >= BLEND_FRACTION, mode
    cached = np.stack([blend_with_material(f, face, b, material_from_parsing(p, b, _blend("jaw", cheek, 0.1)))
                       for f, face, b, p in zip(frames, faces, boxes, parsings)])
    assert _within(cached, g["blended_realtime_jaw"]) >= BLEND_FRACTION
    # the one-call API is the same computation
    one_call = blend_face(frames[0], faces[0], boxes[0], parser, _blend("jaw", cheek, 0.05))
    assert _within(one_call, g["blended_jaw"][0]) >= BLEND_FRACTION
    material = prepare_blend_material(frames[0], boxes[0], parser, _blend("jaw", cheek, 0.1))
    assert _within(blend_with_material(frames[0], faces[0], boxes[0], material),
                   g["blended_realtime_jaw"][0]) >= BLEND_FRACTION


def _blend(mode: str, cheek: int, blur: float) -> BlendConfig:
    """The reference's settings as a BlendConfig (get_image blurs 0.05, the realtime material 0.1)."""
    return BlendConfig(parsing_mode=mode, left_cheek_width=cheek, right_cheek_width=cheek, blur_factor=blur)


# ---- unit tests ------------------------------------------------------------------------------------------------

def test_expanded_crop_box():
    # w 92, h 128 -> half side int(128 // 2 * 1.5) = 96 around the centre (226, 126)
    assert expanded_crop_box((180, 62, 272, 190)) == (130, 30, 322, 222)
    assert expanded_crop_box(np.array([0, 0, 11, 11]), expand=1.0) == (0, 0, 10, 10)
    with pytest.raises(InputError):
        expanded_crop_box((10, 10, 10, 20))


@pytest.mark.parametrize("mode", ["raw", "jaw", "neck"])
@pytest.mark.parametrize("box", [(60, 40, 140, 130),     # inside the frame
                                 (140, 100, 230, 160),   # past the right edge, touching the bottom
                                 (-30, -20, 50, 60)])    # past the top-left corner
def test_matches_pil_reference(mode, box):
    frame, face, parser = _frame(), _face(), StubParser()
    before = frame.copy()
    out = blend_face(frame, face, box, parser, _blend(mode, 90, 0.05))
    assert np.array_equal(frame, before)  # the input is never mutated
    assert out.shape == frame.shape and out.dtype == np.uint8
    expected = _pil_get_image(frame, face, box, face_mask(parser.parsing, mode, 90, 90))
    assert np.array_equal(out, expected)


def test_border_crop_is_black_padded_and_outside_unchanged():
    frame, face, parser = _frame(), _face(), StubParser()
    box = (140, 100, 230, 160)
    material = prepare_blend_material(frame, box, parser, _blend("raw", 80, 0.1))
    xs, ys, xe, ye = material.crop_box
    assert xe > frame.shape[1] and ye > frame.shape[0]
    seen = parser.seen[0]
    assert seen.shape == (ye - ys, xe - xs, 3)
    assert not seen[frame.shape[0] - ys:].any() and not seen[:, frame.shape[1] - xs:].any()
    assert np.array_equal(seen[: frame.shape[0] - ys, : frame.shape[1] - xs], frame[ys:, xs:, ::-1])
    out = blend_with_material(frame, face, box, material)
    outside = np.ones(frame.shape[:2], dtype=bool)
    outside[max(ys, 0):ye, max(xs, 0):xe] = False
    assert np.array_equal(out[outside], frame[outside])
    assert not np.array_equal(out, frame)


def test_cached_material_blur_and_upper_half():
    frame, face, parser = _frame(), _face(), StubParser()
    box = (60, 40, 140, 130)
    soft = prepare_blend_material(frame, box, parser, _blend("jaw", 80, 0.1))
    sharp = prepare_blend_material(frame, box, parser, _blend("jaw", 80, 0.05))
    assert soft.mask.shape == sharp.mask.shape and not np.array_equal(soft.mask, sharp.mask)
    side = soft.crop_box[2] - soft.crop_box[0]
    unblurred = prepare_blend_material(frame, box, parser, _blend("jaw", 80, 0.0))
    assert not unblurred.mask[: side // 2].any()
    # the face already at box size is pasted as is (no resize)
    small = cv2.resize(face, (box[2] - box[0], box[3] - box[1]))
    assert np.array_equal(blend_with_material(frame, face, box, soft), blend_with_material(frame, small, box, soft))


def test_bad_mode_raises_before_parsing():
    parser = StubParser()
    with pytest.raises(InputError, match="raw, jaw, neck"):
        blend_face(_frame(), _face(), (60, 40, 140, 130), parser, BlendConfig(parsing_mode="lips"))
    assert parser.seen == []


def test_material_must_fit_crop_box():
    frame = _frame()
    bad = BlendMaterial(np.zeros((10, 10), dtype=np.uint8), expanded_crop_box((60, 40, 140, 130)))
    with pytest.raises(InputError, match="does not fit"):
        blend_with_material(frame, _face(), (60, 40, 140, 130), bad)
