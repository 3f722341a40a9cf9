"""Face parsing: BiSeNet loading, the class map, the three mask modes, and the golden masks of frame 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from musetalk.errors import InputError, WeightsError
from musetalk.stages.parsing import (MASK_MODES, NOSE, SKIN, BiSeNet, FaceParser, cone_kernel, face_mask,
                              to_parser_input)

MASK_EQUAL = 0.995  # shared/golden/README.md: parsing masks >= 99.5 % pixels equal


@pytest.fixture(scope="module")
def golden_parser(v15_golden) -> FaceParser:
    return FaceParser.from_pretrained(v15_golden / "models" / "face-parse-bisent" / "79999_iter.pth")


@pytest.fixture(scope="module")
def random_parser() -> FaceParser:
    torch.manual_seed(0)
    return FaceParser(BiSeNet().eval(), torch.device("cpu"), torch.float32)


def _face_map() -> np.ndarray:
    """A synthetic 512x512 class map: a wide skin blob, a nose inside it, lips and mouth below, a neck under it."""
    parsing = np.zeros((512, 512), dtype=np.uint8)
    parsing[100:380, 60:452] = SKIN
    parsing[200:260, 236:276] = NOSE
    parsing[300:320, 200:312] = 12  # upper lip
    parsing[320:330, 200:312] = 11  # mouth
    parsing[330:350, 200:312] = 13  # lower lip
    parsing[380:500, 150:362] = 14  # neck
    return parsing


def test_golden_masks_frame0(v15_golden, golden_parser):
    g = np.load(v15_golden / "golden.npz")
    cheek = int(json.loads((v15_golden / "manifest.json").read_text())["cheek_widths"])
    parsing = golden_parser.parse(g["frames"][0][..., ::-1])  # the reference: BGR frame -> PIL RGB -> parse
    assert parsing.shape == (512, 512) and parsing.dtype == np.uint8
    for mode in MASK_MODES:
        key = f"parsing_{mode}_frame0"
        if key not in g.files:
            continue
        equal = float((face_mask(parsing, mode, cheek, cheek) == g[key]).mean())
        assert equal >= MASK_EQUAL, f"{mode}: {equal:.4%} equal"


def test_strict_load_rejects_wrong_state_dict(tmp_path):
    state = BiSeNet().state_dict()
    state.pop("conv_out.conv_out.weight")
    state["head.extra"] = torch.zeros(3)
    path = tmp_path / "79999_iter.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="missing keys.*unexpected keys"):
        FaceParser.from_pretrained(path)


def test_parse_any_size_and_pil(random_parser):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    from_array = random_parser.parse(image)
    assert from_array.shape == (512, 512) and from_array.dtype == np.uint8 and from_array.max() < 19
    assert np.array_equal(random_parser.parse(Image.fromarray(image)), from_array)
    with pytest.raises(InputError, match="uint8 RGB"):
        random_parser.parse(image[..., 0])


def test_parser_input_normalisation():
    image = np.full((512, 512, 3), (255, 0, 124), dtype=np.uint8)
    x = to_parser_input(image)
    assert x.shape == (1, 3, 512, 512) and x.dtype == torch.float32
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (124 / 255 - 0.406) / 0.225]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected), atol=1e-6)


def test_cone_kernel():
    kernel = cone_kernel()
    assert kernel.shape == (33, 33)
    widths = kernel.sum(axis=1)
    assert widths[:10].sum() == 0
    assert list(widths[10:21]) == list(range(1, 22, 2))
    assert set(widths[21:]) == {21}
    assert np.array_equal(kernel, kernel[:, ::-1])  # symmetric about the centre column 16


def test_raw_and_neck_modes():
    parsing = _face_map()
    raw, neck = face_mask(parsing, "raw"), face_mask(parsing, "neck")
    assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255}
    assert np.array_equal(raw == 255, np.isin(parsing, (1, 11, 12, 13)))
    assert np.array_equal(neck == 255, np.isin(parsing, (1, 11, 12, 13, 14)))


def test_jaw_mode_extends_down_and_drops_nose():
    parsing = _face_map()
    jaw = face_mask(parsing, "jaw", 80, 80)
    assert not jaw[200:260, 236:276].any()  # nose removed
    assert (jaw[300:350, 200:312] == 255).all()  # lips and mouth kept
    # OpenCV applies the cone kernel unreflected: the skin (rows 100..379) grows 16 rows up at full width and
    # ends in a point 6 rows below the chin
    assert (jaw[84:386, 220] == 255).all()  # column 220: off the nose, inside the cheek widths
    assert not jaw[:84].any() and not jaw[386:].any()
    assert (jaw[385] == 255).sum() < (jaw[380] == 255).sum()


def test_cheek_widths_change_jaw_mask():
    parsing = _face_map()
    narrow, wide = face_mask(parsing, "jaw", 20, 20), face_mask(parsing, "jaw", 150, 150)
    assert not np.array_equal(narrow, wide)
    # the cheek columns are eroded (smaller); the protected centre columns get the full dilation
    assert (wide == 255).sum() > (narrow == 255).sum()
    assert np.array_equal(narrow[:, 237:276], wide[:, 237:276])  # centre columns of both
    # only the left width moves the left side
    left_only = face_mask(parsing, "jaw", 150, 20)
    assert np.array_equal(left_only[:, 256:], narrow[:, 256:])
    assert not np.array_equal(left_only[:, :256], narrow[:, :256])


def test_bad_mode_names_valid_values():
    with pytest.raises(InputError, match="raw, jaw, neck"):
        face_mask(_face_map(), "mouth")


def test_parse_batch_gives_each_images_map_image_by_image_on_the_cpu(golden_parser: FaceParser) -> None:
    """On the CPU image by image is faster and holds one image's activations: the network sees batches of one
    there; the maps are those of ``parse`` either way."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((300, 280), (512, 512), (97, 130))]
    batched = FaceParser(golden_parser.net, torch.device("cpu"), torch.float32, one_image_at_a_time=False)
    seen: list[int] = []
    hook = golden_parser.net.cp.resnet.conv1.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    try:
        assert golden_parser.one_image_at_a_time  # the default on the CPU
        one_by_one = golden_parser.parse_batch(images)
        assert seen == [1, 1, 1]
        seen.clear()
        together = batched.parse_batch(images)
        assert seen == [3]
    finally:
        hook.remove()
    expected = np.stack([golden_parser.parse(image) for image in images])
    assert one_by_one.shape == (3, 512, 512) and np.array_equal(one_by_one, expected)
    assert (together != expected).mean() < 1e-4  # batched rounding may flip a class on an exact tie
    assert golden_parser.parse_batch([]).shape == (0, 512, 512)


def test_on_the_cpu_the_parser_runs_channels_last_with_the_default_layouts_maps(golden_parser: FaceParser) -> None:
    """oneDNN's convolutions want NHWC: the full-size parser runs 1.5x faster in fp32 with channels_last weights
    and inputs. Its 50 MB are copied into that layout at load; the class maps stay those of the default layout."""
    import copy

    convs = [p for p in golden_parser.net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    plain = FaceParser(copy.deepcopy(golden_parser.net), torch.device("cpu"), torch.float32,
                       memory_format=torch.contiguous_format)
    images = np.random.default_rng(3).integers(0, 256, (2, 300, 280, 3), dtype=np.uint8)
    maps, plain_maps = golden_parser.parse_batch(list(images)), plain.parse_batch(list(images))
    assert (maps == plain_maps).mean() >= 0.999  # a class flips only on a near-tie of two logits
