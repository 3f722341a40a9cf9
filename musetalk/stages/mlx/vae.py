"""The VAE in MLX: diffusers AutoencoderKL (sd-vae-ft-mse layout), encoder and decoder, from ``models/sd-vae``.

``MLXVAE`` is a drop-in for ``musetalk.vae.VAE`` (same methods, same shapes and colour order):
  crops    (B, 256, 256, 3) uint8 BGR
  latents  (B, 4, 32, 32) float32 CPU tensor, posterior mean x scaling factor (0.18215)
  UNet input (B, 8, 32, 32): latents of the crop with its lower half zeroed, then of the full crop
  faces    (B, 256, 256, 3) uint8 BGR from ``decode``
The legacy attention keys of sd-vae-ft-mse's ``.bin`` (query/key/value/proj_attn as 1x1 convs) are renamed with
the torch stage's own converter before the layout change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch

from musetalk.errors import WeightsError
from musetalk.stages.mlx import mlx_dtype
from musetalk.stages.mlx.convert import load_converted, load_weights_strict
from musetalk.stages.mlx.layers import Downsample, GroupNorm, ResnetBlock, SpatialSelfAttention, Upsample
from musetalk.stages.vae import convert_legacy_attention
from musetalk.weights import DOWNLOAD_HINT, file_fingerprint, find_weights_file, load_state_dict

VAE_EPS = 1e-6  # diffusers' Encoder/Decoder build every norm with eps 1e-6


def check_config(config: dict, source: str) -> None:
    """Raise WeightsError for AutoencoderKL options this port does not implement."""
    blocks = set(config.get("down_block_types", [])) | set(config.get("up_block_types", []))
    if (blocks - {"DownEncoderBlock2D", "UpDecoderBlock2D"} or config.get("act_fn", "silu") != "silu"
            or config.get("use_quant_conv", True) is not True or config.get("use_post_quant_conv", True) is not True
            or config.get("mid_block_add_attention", True) is not True):
        raise WeightsError(f"{source}: this AutoencoderKL variant is not supported by the MLX VAE",
                           "use --backend torch for this checkpoint")


class MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, single-head spatial self-attention, resnet."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.resnets = [ResnetBlock(ch, ch, groups, VAE_EPS, None), ResnetBlock(ch, ch, groups, VAE_EPS, None)]
        self.attentions = [SpatialSelfAttention(ch, groups, VAE_EPS)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class SampleBlock(nn.Module):
    """DownEncoderBlock2D (``down``) or UpDecoderBlock2D (``up``): resnets, then the resampler if any."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, down: bool = False,
                 up: bool = False) -> None:
        super().__init__()
        self.resnets = [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, VAE_EPS, None) for i in range(layers)]
        if down:
            self.downsamplers = [Downsample(out_ch, padding=0)]
        if up:
            self.upsamplers = [Upsample(out_ch)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, in_ch: int, latent_ch: int, channels: list[int], layers: int, groups: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, channels[0], 3, padding=1)
        self.down_blocks = [SampleBlock(channels[max(i - 1, 0)], ch, layers, groups, down=i < len(channels) - 1)
                            for i, ch in enumerate(channels)]
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = GroupNorm(groups, channels[-1], VAE_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_ch, 3, padding=1)  # mean and log-variance

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, latent_ch: int, out_ch: int, channels: list[int], layers: int, groups: int) -> None:
        super().__init__()
        rev = channels[::-1]
        self.conv_in = nn.Conv2d(latent_ch, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        self.up_blocks = [SampleBlock(rev[max(i - 1, 0)], ch, layers + 1, groups, up=i < len(rev) - 1)
                          for i, ch in enumerate(rev)]
        self.conv_norm_out = GroupNorm(groups, channels[0], VAE_EPS)
        self.conv_out = nn.Conv2d(channels[0], out_ch, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL, NHWC, built from its config dict; ``encode`` returns the posterior mean."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        channels = list(config["block_out_channels"])
        layers, groups = int(config.get("layers_per_block", 2)), int(config.get("norm_num_groups", 32))
        latent = int(config.get("latent_channels", 4))
        self.encoder = Encoder(int(config.get("in_channels", 3)), latent, channels, layers, groups)
        self.decoder = Decoder(latent, int(config.get("out_channels", 3)), channels, layers, groups)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, x: mx.array) -> mx.array:
        """(B, H, W, 3) in [-1, 1] -> posterior mean (B, H/8, W/8, latent)."""
        moments = self.quant_conv(self.encoder(x))
        return moments[..., : moments.shape[-1] // 2]

    def decode(self, z: mx.array) -> mx.array:
        """(B, h, w, latent) unscaled latents -> (B, 8h, 8w, 3) roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


def vae_weights(weights_path: str | os.PathLike, cache: bool = True, fix: str | None = None) -> dict[str, mx.array]:
    """The VAE checkpoint (legacy attention keys renamed) converted to MLX layout, through the cache."""
    return load_converted(weights_path, lambda: convert_legacy_attention(load_state_dict(weights_path, fix=fix)),
                          cache=cache)


def crops_to_array(crops_bgr: np.ndarray, mask_lower_half: bool) -> np.ndarray:
    """(B, 256, 256, 3) uint8 BGR -> (B, 256, 256, 3) float32 RGB NHWC in [-1, 1], lower half zeroed (in [0, 1])
    if asked: the same arithmetic as ``musetalk.vae.crops_to_tensor``, channels last."""
    x = np.ascontiguousarray(crops_bgr[..., ::-1]).astype(np.float32) / np.float32(255.0)
    if mask_lower_half:
        x[:, x.shape[1] // 2:] = 0
    return (x - np.float32(0.5)) / np.float32(0.5)


class MLXVAE:
    """AutoencoderKL on MLX, built once from ``models/sd-vae``; encodes crops and decodes latents.

    ``fingerprint`` is ``"mlx:"`` + the weights file's identity, so avatars keep the latents of the backend that
    made them. ``device``: see ``MLXUNet``.
    """

    backend = "mlx"

    def __init__(self, model: AutoencoderKL, dtype: torch.dtype, scaling_factor: float,
                 device: torch.device | str = "cpu", fingerprint: str | None = None) -> None:
        self.model = model
        self.dtype = dtype
        self.mx_dtype = mlx_dtype(dtype)
        self.device = torch.device(device)
        self.scaling_factor = float(scaling_factor)
        self.fingerprint = fingerprint

    @classmethod
    def from_pretrained(cls, vae_dir: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, cache: bool = True) -> "MLXVAE":
        """Build from ``config.json`` + ``diffusion_pytorch_model.{safetensors,bin}``; ``cache=False`` writes nothing."""
        vae_dir = Path(vae_dir)
        fix = DOWNLOAD_HINT.format(models=vae_dir.parent)
        if not (vae_dir / "config.json").is_file():
            raise WeightsError(f"{vae_dir / 'config.json'} is missing", fix)
        config = json.loads((vae_dir / "config.json").read_text())
        check_config(config, str(vae_dir / "config.json"))
        weights = find_weights_file(vae_dir, "diffusion_pytorch_model")
        model = AutoencoderKL(config)
        load_weights_strict(model, vae_weights(weights, cache=cache, fix=fix), mlx_dtype(dtype), weights)
        return cls(model, dtype, float(config.get("scaling_factor", 0.18215)), device,
                   fingerprint="mlx:" + file_fingerprint(weights))

    def encode(self, crops_bgr: np.ndarray, mask_lower_half: bool = False) -> torch.Tensor:
        """(B, 256, 256, 3) uint8 BGR -> (B, 4, 32, 32) float32 latents (posterior mean x scaling factor), CPU."""
        x = mx.array(crops_to_array(crops_bgr, mask_lower_half)).astype(self.mx_dtype)
        mean = (self.model.encode(x) * self.scaling_factor).astype(mx.float32)
        return torch.from_numpy(np.array(mean).transpose(0, 3, 1, 2).copy())

    def unet_input(self, crops_bgr: np.ndarray) -> torch.Tensor:
        """(B, 256, 256, 3) uint8 BGR -> (B, 8, 32, 32): masked-half latents, then full-crop latents."""
        return torch.cat([self.encode(crops_bgr, mask_lower_half=True), self.encode(crops_bgr)], dim=1)

    def release_encoder_pages(self) -> int:
        """As the torch VAE's; MLX holds its own copy of the weights, nothing is mapped: 0."""
        return 0

    def decode(self, latents: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, 4, 32, 32) latents -> (B, 256, 256, 3) uint8 BGR faces."""
        z = torch.as_tensor(latents).detach().to("cpu", torch.float32).numpy().transpose(0, 2, 3, 1)
        z = mx.array(np.ascontiguousarray(z)).astype(self.mx_dtype) / self.scaling_factor
        x = np.array(self.model.decode(z).astype(mx.float32))
        # as the torch stage: half-precision overflow maps to grey/white/black, not garbage bytes
        x = np.clip(np.nan_to_num(x / 2 + 0.5, nan=0.5, posinf=1.0, neginf=0.0), 0, 1)
        return np.ascontiguousarray((x * 255).round().astype(np.uint8)[..., ::-1])
