"""The avatar folder (musetalk.stream.avatar): what AvatarWriter stores reads back, and a damaged folder is a clear
error, not a crash further down the blend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musetalk.errors import InputError
from musetalk.stream.avatar import Avatar, AvatarMeta, AvatarWriter


def one_face_avatar(root: Path) -> Avatar:
    """Two 64x64 frames: the first with a face (box 8..40, mask box 4..52), the second without."""
    writer = AvatarWriter(root / "avatar")
    frame = np.zeros((64, 64, 3), np.uint8)
    writer.add_frame(frame, None, (8, 8, 40, 40), np.full((48, 48), 255, np.uint8), (4, 4, 52, 52))
    writer.add_frame(frame, None, None, None, None)
    writer.add_latents(np.zeros((2, 8, 32, 32), np.float32))
    meta = AvatarMeta(key="k", source="s", num_frames=2, fps=25.0, width=64, height=64, faces=1, settings={},
                      created=0.0)
    return writer.commit(meta)


def test_boxes_and_masks_read_back(tmp_path: Path) -> None:
    avatar = one_face_avatar(tmp_path)
    box = avatar.face_box(0)
    assert box == (8, 8, 40, 40) and all(type(v) is int for v in box)
    assert avatar.face_box(1) is None
    assert avatar.mask_boxes[0].tolist() == [4, 4, 52, 52] and avatar.mask_boxes[1].tolist() == [-1, -1, -1, -1]
    mask = avatar.mask(0)
    assert mask.shape == (48, 48) and mask.dtype == np.uint8 and (mask == 255).all()


def test_a_missing_mask_is_a_clear_error(tmp_path: Path) -> None:
    # Avatar.mask used to return None here (cv2.imread's answer), and the blend failed later without a word about
    # the avatar (found by mypy: imread's result is Optional)
    avatar = one_face_avatar(tmp_path)
    (avatar.path / "masks" / "000000.png").unlink()
    with pytest.raises(InputError, match=r"is damaged \(mask 0 unreadable\)") as info:
        avatar.mask(0)
    assert "prepare it again" in info.value.fix
