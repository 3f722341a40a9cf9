"""The MuseTalk UNet in MLX: diffusers' UNet2DConditionModel as configured by the checkpoint's ``musetalk.json``.

``MLXUNet`` is a drop-in for ``musetalk.unet.UNet`` (same call, same shapes, torch tensors at the boundary):
  latents  (B, 8, 32, 32): masked-half latents || reference latents
  audio    (B, 50, 384) per-frame windows *before* positional encoding (added here)
  output   (B, 4, 32, 32) float32 CPU tensor, one denoising step at timestep 0
Inside, activations are NHWC. The architecture is read from the JSON, never re-typed here; options this port
does not implement raise WeightsError instead of silently computing something else.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch

from musetalk.stages.audio import add_positional_encoding
from musetalk.errors import WeightsError
from musetalk.stages.mlx import mlx_dtype
from musetalk.stages.mlx.convert import load_converted, load_weights_strict
from musetalk.stages.mlx.layers import Downsample, GroupNorm, ResnetBlock, Transformer2D, Upsample
from musetalk.weights import DOWNLOAD_HINT, file_fingerprint, load_state_dict

# diffusers options this port implements only at these values (their diffusers defaults, and MuseTalk's)
_FIXED_OPTIONS = {
    "act_fn": "silu", "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "encoder_hid_dim": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "cross_attention_norm": None, "timestep_post_act": None,
    "reverse_transformer_layers_per_block": None, "mid_block_scale_factor": 1,
}
_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"}


def _per_block(value: int | list[int], n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def check_config(config: dict, source: str) -> None:
    """Raise WeightsError naming the option when ``config`` asks for something this port does not implement."""
    for key, supported in _FIXED_OPTIONS.items():
        if key in config and config[key] != supported:
            raise WeightsError(f"{source}: {key}={config[key]!r} is not supported by the MLX UNet (only {supported!r})",
                               "use --backend torch for this checkpoint")
    unknown = sorted((set(config["down_block_types"]) | set(config["up_block_types"])) - _BLOCKS)
    if unknown:
        raise WeightsError(f"{source}: block types {unknown} are not supported by the MLX UNet",
                           "use --backend torch for this checkpoint")


def timestep_embedding(timesteps: mx.array, dim: int, flip_sin_to_cos: bool, shift: float) -> mx.array:
    """diffusers get_timestep_embedding: (B,) -> (B, dim) sinusoids, cos first when ``flip_sin_to_cos``."""
    half = dim // 2
    freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / (half - shift))
    args = timesteps.astype(mx.float32)[:, None] * freqs[None, :]
    parts = [mx.cos(args), mx.sin(args)] if flip_sin_to_cos else [mx.sin(args), mx.cos(args)]
    return mx.concatenate(parts, axis=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (``heads`` set) or DownBlock2D: resnets (+ transformers), then a strided conv."""

    def __init__(self, in_ch: int, out_ch: int, temb: int, layers: int, groups: int, eps: float,
                 heads: int | None, context_dim: int, transformer_layers: int, linear_projection: bool,
                 downsample_padding: int | None) -> None:
        super().__init__()
        self.resnets = [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, eps, temb) for i in range(layers)]
        if heads is not None:
            self.attentions = [Transformer2D(out_ch, heads, context_dim, groups, transformer_layers, linear_projection)
                               for _ in range(layers)]
        if downsample_padding is not None:
            self.downsamplers = [Downsample(out_ch, downsample_padding)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> tuple[mx.array, list[mx.array]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if "attentions" in self:
                x = self.attentions[i](x, context)
            skips.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn with one layer: resnet, transformer, resnet."""

    def __init__(self, ch: int, temb: int, groups: int, eps: float, heads: int, context_dim: int,
                 transformer_layers: int, linear_projection: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock(ch, ch, groups, eps, temb), ResnetBlock(ch, ch, groups, eps, temb)]
        self.attentions = [Transformer2D(ch, heads, context_dim, groups, transformer_layers, linear_projection)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> mx.array:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (``heads`` set) or UpBlock2D: each resnet takes the next skip, concatenated on channels."""

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, temb: int, layers: int, groups: int, eps: float,
                 heads: int | None, context_dim: int, transformer_layers: int, linear_projection: bool,
                 upsample: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock((prev_ch if i == 0 else out_ch) + (in_ch if i == layers - 1 else out_ch), out_ch,
                                    groups, eps, temb) for i in range(layers)]
        if heads is not None:
            self.attentions = [Transformer2D(out_ch, heads, context_dim, groups, transformer_layers, linear_projection)
                               for _ in range(layers)]
        if upsample:
            self.upsamplers = [Upsample(out_ch)]

    def __call__(self, x: mx.array, skips: list[mx.array], temb: mx.array, context: mx.array) -> mx.array:
        for i, resnet in enumerate(self.resnets):
            x = resnet(mx.concatenate([x, skips.pop()], axis=-1), temb)
            if "attentions" in self:
                x = self.attentions[i](x, context)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class UNet2DCondition(nn.Module):
    """diffusers UNet2DConditionModel (the SD-1.x family MuseTalk uses), NHWC, built from its config dict."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        channels = list(config["block_out_channels"])
        n = len(channels)
        self.flip_sin_to_cos = bool(config.get("flip_sin_to_cos", True))
        self.freq_shift = float(config.get("freq_shift", 0))
        groups, eps = int(config.get("norm_num_groups", 32)), float(config.get("norm_eps", 1e-5))
        context_dim = int(config["cross_attention_dim"])
        layers = _per_block(config.get("layers_per_block", 2), n)
        # diffusers' naming quirk: without num_attention_heads, attention_head_dim is the number of heads
        heads = _per_block(config.get("num_attention_heads") or config.get("attention_head_dim", 8), n)
        tlayers = _per_block(config.get("transformer_layers_per_block", 1), n)
        linear = bool(config.get("use_linear_projection", False))
        temb = channels[0] * 4

        self.conv_in = nn.Conv2d(int(config["in_channels"]), channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        self.down_blocks: list[DownBlock] = []
        out_ch = channels[0]
        for i, kind in enumerate(config["down_block_types"]):
            in_ch, out_ch = out_ch, channels[i]
            self.down_blocks.append(DownBlock(
                in_ch, out_ch, temb, layers[i], groups, eps, heads[i] if kind.startswith("CrossAttn") else None,
                context_dim, tlayers[i], linear, None if i == n - 1 else int(config.get("downsample_padding", 1))))
        self.mid_block = MidBlock(channels[-1], temb, groups, eps, heads[-1], context_dim, tlayers[-1], linear)
        rev, rev_heads, rev_layers, rev_t = channels[::-1], heads[::-1], layers[::-1], tlayers[::-1]
        self.up_blocks: list[UpBlock] = []
        out_ch = rev[0]
        for i, kind in enumerate(config["up_block_types"]):
            prev, out_ch, in_ch = out_ch, rev[i], rev[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(
                in_ch, prev, out_ch, temb, rev_layers[i] + 1, groups, eps,
                rev_heads[i] if kind.startswith("CrossAttn") else None, context_dim, rev_t[i], linear,
                upsample=i != n - 1))
        self.conv_norm_out = GroupNorm(groups, channels[0], eps)
        self.conv_out = nn.Conv2d(channels[0], int(config["out_channels"]), 3, padding=1)

    def __call__(self, x: mx.array, timesteps: mx.array, context: mx.array) -> mx.array:
        """x (B, H, W, C_in) NHWC, timesteps (B,), context (B, L, cross_attention_dim) -> (B, H, W, C_out)."""
        t = timestep_embedding(timesteps, self.conv_in.weight.shape[0], self.flip_sin_to_cos, self.freq_shift)
        temb = self.time_embedding(t.astype(x.dtype))
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        x = self.mid_block(x, temb, context)
        for up in self.up_blocks:
            x = up(x, skips, temb, context)  # pops exactly len(block.resnets) skips
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


def unet_weights(weights_path: str | os.PathLike, cache: bool = True, fix: str | None = None) -> dict[str, mx.array]:
    """The UNet checkpoint (v1 ``musetalk/pytorch_model.bin`` or v1.5 ``musetalkV15/unet.pth``: both are plain
    diffusers state dicts) converted to MLX layout, through the cache."""
    return load_converted(weights_path, lambda: load_state_dict(weights_path, fix=fix), cache=cache)


class MLXUNet:
    """The MuseTalk UNet on MLX, built once from ``musetalk.json`` + the version's weights file.

    ``device`` is the torch device the rest of the pipeline runs on (reported for the profiler's syncs; tensors
    come back on the CPU, which is the same memory on Apple Silicon); ``dtype`` the torch name of the MLX dtype.
    """

    backend = "mlx"

    def __init__(self, model: UNet2DCondition, dtype: torch.dtype, device: torch.device | str = "cpu",
                 fingerprint: str | None = None) -> None:
        self.model = model
        self.dtype = dtype
        self.mx_dtype = mlx_dtype(dtype)
        self.device = torch.device(device)
        self.fingerprint = fingerprint  # "mlx:" + identity of the weights file (None: built in memory)

    @classmethod
    def from_pretrained(cls, config_path: str | os.PathLike, weights_path: str | os.PathLike,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        cache: bool = True) -> "MLXUNet":
        """Build from the official files; ``cache=False`` converts in memory and writes nothing."""
        from musetalk.stages.unet import read_unet_config

        config_path, weights_path = Path(config_path), Path(weights_path)
        fix = DOWNLOAD_HINT.format(models=config_path.parent.parent)
        config = read_unet_config(config_path)
        check_config(config, str(config_path))
        model = UNet2DCondition(config)
        load_weights_strict(model, unet_weights(weights_path, cache=cache, fix=fix), mlx_dtype(dtype), weights_path)
        return cls(model, dtype, device, fingerprint="mlx:" + file_fingerprint(weights_path))

    def __call__(self, latents: torch.Tensor | np.ndarray, audio_windows: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, 8, 32, 32) + (B, 50, 384) -> (B, 4, 32, 32) float32 CPU tensor."""
        windows = torch.as_tensor(audio_windows).detach().to("cpu", torch.float32)
        cond = mx.array(add_positional_encoding(windows).numpy()).astype(self.mx_dtype)
        lat = torch.as_tensor(latents).detach().to("cpu", torch.float32).numpy()
        x = mx.array(np.ascontiguousarray(lat.transpose(0, 2, 3, 1))).astype(self.mx_dtype)
        timesteps = mx.zeros((x.shape[0],), dtype=mx.int32)  # single step at t = 0, no scheduler
        out = self.model(x, timesteps, cond).astype(mx.float32)
        return torch.from_numpy(np.array(out).transpose(0, 3, 1, 2).copy())
