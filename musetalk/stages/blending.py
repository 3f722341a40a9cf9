"""Blending stage: paste a generated face back into its source frame through a feathered face-parsing mask.

  frame     (H, W, 3) uint8 BGR source frame
  face      (h, w, 3) uint8 BGR generated face, normally 256x256; resized to the face box (cv2 default, bilinear)
  face_box  (x1, y1, x2, y2) ints, x2/y2 exclusive (v1.5: y2 already includes the extra margin)
  crop box  the square of half side ``int(max(w, h) // 2 * expand)`` around the face box centre; it may run
            past the frame, where it reads as black (PIL ``crop`` semantics) and pastes nothing
  mask      (2s, 2s) uint8 over the crop box: the parsing mask of the crop, kept inside the face box only, its top
            ``upper_boundary_ratio`` cleared, Gaussian-blurred

Follows TMElyralab/MuseTalk ``musetalk/utils/blending.py`` (``get_image``, ``get_image_prepare_material``,
``get_image_blending``; MIT licence). The reference does every step on full-frame PIL images; here only the crop
region is touched, in numpy, with PIL's own arithmetic (black padding, ``paste`` through an "L" mask, bicubic
resize of the mask), so the output is the same and a 1080p frame costs a crop, not two full-frame conversions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import cv2
import numpy as np
from PIL import Image

from musetalk.config import BLUR_FACTOR_IMAGE, BLUR_FACTOR_REALTIME, EXPAND, UPPER_BOUNDARY_RATIO, BlendConfig
from musetalk.errors import InputError
from musetalk.stages.parsing import check_mode, face_mask

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), x2/y2 exclusive

__all__ = ["BLUR_FACTOR_IMAGE", "BLUR_FACTOR_REALTIME", "EXPAND", "UPPER_BOUNDARY_RATIO", "BlendConfig",
           "BlendMaterial", "blend_face", "blend_with_material", "material_from_parsing", "parser_input",
           "prepare_blend_material"]


class Parser(Protocol):
    """Anything with ``parse(rgb) -> (512, 512) class map``, e.g. :class:`musetalk.stages.parsing.FaceParser`."""

    def parse(self, image_rgb: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class BlendMaterial:
    """What the blend of one source frame needs besides the face: made once per source frame, reusable.

    mask: (y2 - y1, x2 - x1) of ``crop_box``, uint8 0..255 alpha of the generated face over the crop.
    crop_box: the expanded square (x1, y1, x2, y2) in frame pixels; may extend past the frame.
    """

    mask: np.ndarray
    crop_box: Box


def _as_box(box: Sequence[int] | np.ndarray) -> Box:
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"empty face box {(x1, y1, x2, y2)}", "pass (x1, y1, x2, y2) with x2 > x1 and y2 > y1")
    return x1, y1, x2, y2


def expanded_crop_box(face_box: Sequence[int] | np.ndarray, expand: float = EXPAND) -> Box:
    """The square crop around ``face_box``: half side ``int(max(w, h) // 2 * expand)`` around its integer centre.

    Matches the reference ``get_crop_box``; the result may lie partly outside the frame.
    """
    x1, y1, x2, y2 = _as_box(face_box)
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    half = int(max(x2 - x1, y2 - y1) // 2 * expand)
    if half <= 0:
        raise InputError(f"face box {(x1, y1, x2, y2)} is too small to blend", "use a face box of at least 2x2 px")
    return cx - half, cy - half, cx + half, cy + half


def _overlap(box: Box, width: int, height: int) -> tuple[slice, slice, slice, slice] | None:
    """Slices (rows, cols) of ``box`` clipped to a width x height image, and the same area inside the box."""
    x1, y1, x2, y2 = box
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if cx2 <= cx1 or cy2 <= cy1:
        return None
    return (slice(cy1, cy2), slice(cx1, cx2), slice(cy1 - y1, cy2 - y1), slice(cx1 - x1, cx2 - x1))


def crop_padded(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """``image[y1:y2, x1:x2]`` with zeros where the box leaves the image (what PIL's ``crop`` returns)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    out = np.zeros((y2 - y1, x2 - x1) + image.shape[2:], dtype=image.dtype)
    area = _overlap((x1, y1, x2, y2), image.shape[1], image.shape[0])
    if area is not None:
        rows, cols, box_rows, box_cols = area
        out[box_rows, box_cols] = image[rows, cols]
    return out


def _paste_through_mask(dst: np.ndarray, src: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """PIL ``paste(src, mask=alpha)`` arithmetic on uint8: (dst * (255 - a) + src * a) / 255, PIL's rounding."""
    a = alpha.astype(np.uint32)[..., None]
    tmp = dst.astype(np.uint32) * (255 - a) + src.astype(np.uint32) * a + 128
    return (((tmp >> 8) + tmp) >> 8).astype(np.uint8)


def blur_kernel_size(crop_width: int, blur_factor: float) -> int:
    """Odd Gaussian kernel side for the mask edge: ``int(blur_factor * width // 2 * 2) + 1`` (the reference's)."""
    return int(blur_factor * crop_width // 2 * 2) + 1


def material_from_parsing(parsing: np.ndarray, face_box: Sequence[int] | np.ndarray,
                          config: BlendConfig = BlendConfig()) -> BlendMaterial:
    """Blend material from the class map of the expanded crop (``parser.parse`` of :func:`parser_input`).

    Lets a caller parse a crop once and derive the material of several modes (configs) from it.
    """
    mode, left_cheek_width, right_cheek_width = config.parsing_mode, config.left_cheek_width, config.right_cheek_width
    upper_boundary_ratio, expand, blur_factor = config.upper_boundary_ratio, config.expand, config.blur_factor
    x1, y1, x2, y2 = _as_box(face_box)
    crop_box = expanded_crop_box((x1, y1, x2, y2), expand)
    xs, ys, xe, ye = crop_box
    side = xe - xs
    # 1. parsing mask (512x512) back to the crop size; PIL's resize of an "L" image (bicubic), as the reference
    full = np.asarray(Image.fromarray(face_mask(parsing, mode, left_cheek_width, right_cheek_width))
                      .resize((side, side), Image.Resampling.BICUBIC))
    # 2. keep it inside the face box only
    mask = np.zeros((side, side), dtype=np.uint8)
    area = _overlap((x1 - xs, y1 - ys, x2 - xs, y2 - ys), side, side)
    if area is not None:
        rows, cols, _, _ = area
        mask[rows, cols] = full[rows, cols]
    # 3. the upper part of the crop keeps the source pixels; 4. feather the edge
    mask[: int(side * upper_boundary_ratio)] = 0
    k = blur_kernel_size(side, blur_factor)
    return BlendMaterial(cv2.GaussianBlur(mask, (k, k), 0), crop_box)


def parser_input(frame_bgr: np.ndarray, face_box: Sequence[int] | np.ndarray, expand: float = EXPAND) -> np.ndarray:
    """The expanded crop the parser sees: (2s, 2s, 3) uint8 RGB, black where the crop leaves the frame."""
    return crop_padded(frame_bgr, expanded_crop_box(face_box, expand))[..., ::-1]


def prepare_blend_material(frame_bgr: np.ndarray, face_box: Sequence[int] | np.ndarray, parser: Parser,
                           config: BlendConfig = BlendConfig()) -> BlendMaterial:
    """Parse the expanded crop of a (H, W, 3) uint8 BGR source frame and make its blend mask (``config``: the
    parsing mode raw | jaw | neck, cheek widths, expand, blur). The reference ``get_image_prepare_material`` blurs
    with ``BLUR_FACTOR_REALTIME`` (0.1); the pipeline, like inference.py's ``get_image``, with 0.05.
    """
    check_mode(config.parsing_mode)  # before the network runs
    parsing = parser.parse(parser_input(frame_bgr, face_box, config.expand))
    return material_from_parsing(parsing, face_box, config)


def blend_with_material(frame_bgr: np.ndarray, face_bgr: np.ndarray, face_box: Sequence[int] | np.ndarray,
                        material: BlendMaterial) -> np.ndarray:
    """Paste ``face_bgr`` into ``face_box`` of a copy of ``frame_bgr`` through ``material.mask``.

    frame_bgr (H, W, 3) uint8 BGR; face_bgr (h, w, 3) uint8 BGR, resized to the box with ``cv2.resize`` (default,
    bilinear) unless it already has the box size. Returns a new (H, W, 3) uint8 BGR frame; pixels outside the crop
    box are unchanged. The reference ``get_image_blending``.
    """
    x1, y1, x2, y2 = _as_box(face_box)
    xs, ys, xe, ye = material.crop_box
    if material.mask.shape != (ye - ys, xe - xs):
        raise InputError(f"blend mask {material.mask.shape} does not fit crop box {material.crop_box}",
                         "make the material from the same face box (prepare_blend_material)")
    face: np.ndarray = np.asarray(face_bgr, dtype=np.uint8)
    if face.shape[:2] != (y2 - y1, x2 - x1):
        face = cv2.resize(face, (x2 - x1, y2 - y1))
    # the crop with the face pasted in (the reference's `face_large`)
    face_large = crop_padded(frame_bgr, material.crop_box)
    area = _overlap((x1 - xs, y1 - ys, x2 - xs, y2 - ys), xe - xs, ye - ys)
    if area is not None:
        rows, cols, face_rows, face_cols = area
        face_large[rows, cols] = face[face_rows, face_cols]
    # the crop back into the frame through the mask, on the part of the crop inside the frame
    out = np.array(frame_bgr, dtype=np.uint8, copy=True)
    area = _overlap(material.crop_box, out.shape[1], out.shape[0])
    if area is not None:
        rows, cols, crop_rows, crop_cols = area
        out[rows, cols] = _paste_through_mask(out[rows, cols], face_large[crop_rows, crop_cols],
                                              material.mask[crop_rows, crop_cols])
    return out


def blend_face(frame_bgr: np.ndarray, face_bgr: np.ndarray, face_box: Sequence[int] | np.ndarray, parser: Parser,
               config: BlendConfig = BlendConfig()) -> np.ndarray:
    """Parse, mask and paste in one call (the reference ``get_image``: blur factor 0.05, the config's default).

    frame_bgr (H, W, 3) uint8 BGR, face_bgr (h, w, 3) uint8 BGR (e.g. the 256x256 decoded face) -> a new
    (H, W, 3) uint8 BGR frame. For many output frames per source frame, prepare the material once instead.
    """
    material = prepare_blend_material(frame_bgr, face_box, parser, config)
    return blend_with_material(frame_bgr, face_bgr, face_box, material)
