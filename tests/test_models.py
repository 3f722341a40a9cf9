"""VAE and UNet stages on tiny weights: shapes, colour order, masking, dtypes, legacy checkpoints, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.config import preset, with_overrides
from musetalk.errors import InputError
from musetalk.stages.unet import UNet
from musetalk.stages.vae import VAE, crops_to_tensor


@pytest.fixture(scope="module")
def vae(tiny_models: Path) -> VAE:
    return VAE.from_pretrained(tiny_models / "sd-vae")


@pytest.fixture(scope="module")
def unet(tiny_models: Path) -> UNet:
    return UNet.from_pretrained(tiny_models / "musetalkV15" / "musetalk.json", tiny_models / "musetalkV15" / "unet.pth")


def test_crop_preprocessing_is_rgb_and_masks_the_lower_half() -> None:
    crops = np.zeros((1, 256, 256, 3), np.uint8)
    crops[..., 2] = 255  # red in BGR
    x = crops_to_tensor(crops, mask_lower_half=False)
    assert x.shape == (1, 3, 256, 256) and x.is_contiguous()
    assert torch.all(x[:, 0] == 1) and torch.all(x[:, 1:] == -1)  # channel 0 is R after BGR->RGB
    masked = crops_to_tensor(crops, mask_lower_half=True)
    assert torch.all(masked[:, :, 128:] == -1) and torch.equal(masked[:, :, :128], x[:, :, :128])


def test_unet_input_is_masked_then_full(vae: VAE) -> None:
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    latents = vae.unet_input(crops)
    assert latents.shape == (2, 8, 32, 32) and latents.dtype == torch.float32
    torch.testing.assert_close(latents[:, 4:], vae.encode(crops), rtol=0, atol=1e-5)
    torch.testing.assert_close(latents[:, :4], vae.encode(crops, mask_lower_half=True), rtol=0, atol=1e-5)
    changed = crops.copy()
    changed[:, 200:] = 0  # only the lower half differs: the masked latents must not see it
    torch.testing.assert_close(vae.unet_input(changed)[:, :4], latents[:, :4], rtol=0, atol=1e-5)


def test_decode_gives_uint8_bgr_faces(vae: VAE, unet: UNet) -> None:
    latents = torch.randn(3, 8, 32, 32)
    out = unet(latents, torch.randn(3, 50, 384))
    assert out.shape == (3, 4, 32, 32)
    faces = vae.decode(out)
    assert faces.shape == (3, 256, 256, 3) and faces.dtype == np.uint8


def test_on_the_cpu_the_vae_runs_image_by_image_with_the_batched_result(tiny_models: Path) -> None:
    """On the CPU a batch buys no speed but holds every image's activations at once (0.6-0.8 GB for 8 full-size
    crops in bf16): the encoder and decoder see one image at a time there, and give what the batched call gives."""
    sliced = VAE.from_pretrained(tiny_models / "sd-vae")
    model = VAE.from_pretrained(tiny_models / "sd-vae").model
    batched = VAE(model, torch.device("cpu"), torch.float32, one_image_at_a_time=False)
    seen: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
             for vae in (sliced, batched) for m in (vae.model.encoder.conv_in, vae.model.decoder.conv_in)]
    crops = np.random.default_rng(1).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    latents = torch.randn(3, 4, 32, 32)
    try:
        sliced_latents, sliced_faces = sliced.encode(crops), sliced.decode(latents)
        assert seen == [1] * 6
        seen.clear()
        batched_latents, batched_faces = batched.encode(crops), batched.decode(latents)
        assert seen == [3, 3]
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(sliced_latents, batched_latents, rtol=0, atol=1e-5)
    assert np.abs(sliced_faces.astype(int) - batched_faces.astype(int)).max() <= 1


def test_bf16_runs_close_to_fp32(tiny_models: Path) -> None:
    args = (tiny_models / "musetalkV15" / "musetalk.json", tiny_models / "musetalkV15" / "unet.pth")
    fp32, bf16 = UNet.from_pretrained(*args), UNet.from_pretrained(*args, dtype=torch.bfloat16)
    latents, windows = torch.randn(2, 8, 32, 32), torch.randn(2, 50, 384)
    a, b = fp32(latents, windows), bf16(latents, windows)
    assert b.dtype == torch.bfloat16
    assert torch.allclose(a, b.float(), atol=0.1 * a.abs().max().item())


def test_legacy_vae_attention_keys_load(tiny_models: Path, tmp_path: Path) -> None:
    """sd-vae-ft-mse's .bin predates diffusers' attention rename (query/key/value/proj_attn, 1x1 convs)."""
    import shutil

    state = torch.load(tiny_models / "sd-vae" / "diffusion_pytorch_model.bin", weights_only=True)
    legacy = {}
    for key, value in state.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            if new in key:
                key = key.replace(new, old)
                value = value[:, :, None, None] if value.ndim == 2 else value
        legacy[key] = value
    folder = tmp_path / "sd-vae"
    folder.mkdir()
    shutil.copy(tiny_models / "sd-vae" / "config.json", folder / "config.json")
    torch.save(legacy, folder / "diffusion_pytorch_model.bin")
    crops = np.full((1, 256, 256, 3), 100, np.uint8)
    reference = VAE.from_pretrained(tiny_models / "sd-vae").encode(crops)
    torch.testing.assert_close(VAE.from_pretrained(folder).encode(crops), reference)


def test_presets_and_validation() -> None:
    v1, v15 = preset("v1"), preset("v15")
    assert (v1.crop.extra_margin, v1.blend.parsing_mode, v1.blend.left_cheek_width) == (0, "raw", 80)
    assert (v15.crop.extra_margin, v15.blend.parsing_mode, v15.blend.left_cheek_width) == (10, "jaw", 90)
    assert with_overrides(v15, bbox_shift=-5, batch_size=2, fps=30).crop.bbox_shift == -5
    for bad in ({"parsing_mode": "lips"}, {"batch_size": 0}, {"fps": 0}, {"nonsense": 1}):
        with pytest.raises(InputError):
            with_overrides(v15, **bad)
    with pytest.raises(InputError, match="unknown version"):
        preset("v2")


def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]


def test_on_the_cpu_bf16_models_run_channels_last_with_the_default_layouts_result(tiny_models: Path) -> None:
    """oneDNN's bf16 convolutions want NHWC: full-size on a Xeon with AMX, channels_last makes the VAE decode 2.2x,
    its encode 2.6x and the UNet 1.45x faster. bf16 models load in it (weights and inputs) and give what the
    default layout gives; fp32 ones, measured no faster, keep the file's layout (their weights stay mapped)."""
    import copy

    crops = np.random.default_rng(2).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    latents, windows = torch.randn(2, 8, 32, 32), torch.randn(2, 50, 384)
    unet_args = (tiny_models / "musetalkV15" / "musetalk.json", tiny_models / "musetalkV15" / "unet.pth")

    vae = VAE.from_pretrained(tiny_models / "sd-vae", dtype=torch.bfloat16)
    unet = UNet.from_pretrained(*unet_args, dtype=torch.bfloat16)
    for model in (vae.model, unet.model):
        assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                   for w in _conv_weights(model))
    plain_vae = VAE(copy.deepcopy(vae.model), torch.device("cpu"), torch.bfloat16,
                    memory_format=torch.contiguous_format)
    plain_unet = UNet(copy.deepcopy(unet.model), torch.device("cpu"), torch.bfloat16,
                      memory_format=torch.contiguous_format)
    assert all(w.is_contiguous() for w in _conv_weights(plain_vae.model) + _conv_weights(plain_unet.model))

    torch.testing.assert_close(vae.unet_input(crops), plain_vae.unet_input(crops), rtol=0, atol=0.02)
    out, plain_out = unet(latents, windows), plain_unet(latents, windows)
    torch.testing.assert_close(out.float(), plain_out.float(), rtol=0, atol=0.02 * plain_out.abs().max().item())
    # bf16 rounds differently in either layout (up to ~6 levels apart on random tiny weights): both are as close to
    # the fp32 decode (measured: mean 0.54 levels each)
    fp32_vae = VAE.from_pretrained(tiny_models / "sd-vae")
    fp32_faces = fp32_vae.decode(out.float()).astype(int)
    error = np.abs(vae.decode(out.float()).astype(int) - fp32_faces).mean()
    plain_error = np.abs(plain_vae.decode(out.float()).astype(int) - fp32_faces).mean()
    assert error <= 1.2 * plain_error + 0.05, (error, plain_error)

    for model in (fp32_vae.model, UNet.from_pretrained(*unet_args).model):
        assert all(w.is_contiguous() for w in _conv_weights(model))
