"""The building blocks diffusers' UNet2DConditionModel and AutoencoderKL share, written for MLX (NHWC).

Parameter names follow diffusers' module names exactly (``norm1``, ``conv1``, ``to_out.0``, ``ff.net.2`` ...),
so a converted torch state dict loads with a strict name and shape check. Activations are NHWC ``(B, H, W, C)``.
Normalisations run in float32 whatever the model dtype: group statistics over a 512-channel, 256x256 map
overflow or lose digits in half precision, and they cost little next to the convolutions.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def _sum_rows_then_columns(y: mx.array) -> mx.array:
    """(B, H, W, G, Cg) -> (B, 1, 1, G, 1) sums, reduced per row first: MLX's CPU reductions add sequentially in
    float32, which over a 256x256 map loses ~0.2 % of a variance (measured: latents off by 4e-4 vs torch)."""
    return y.sum(axis=(2, 4), keepdims=True).sum(axis=1, keepdims=True)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over NHWC (channel-major groups), in float32, two-pass, returned in the input dtype."""

    def __init__(self, groups: int, channels: int, eps: float) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = x.astype(mx.float32).reshape(b, h, w, self.groups, c // self.groups)
        count = h * w * (c // self.groups)
        y = y - _sum_rows_then_columns(y) / count
        var = _sum_rows_then_columns(y * y) / count
        y = (y * mx.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * self.weight.astype(mx.float32) + self.bias.astype(mx.float32)).astype(x.dtype)


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm over the last axis, computed in float32."""

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x.astype(mx.float32)).astype(x.dtype)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D (time-embedding shift "default", output scale 1): x + conv(silu(norm(...)))."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float,
                 temb_channels: int | None) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(nn.silu(temb))[:, None, None, :]
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int) -> mx.array:
    """(B, Lq, heads*D), (B, Lk, heads*D) x2 -> (B, Lq, heads*D): softmax(q k^T / sqrt(D)) v per head."""
    b, lq, inner = q.shape
    d = inner // heads

    def split(t: mx.array) -> mx.array:
        return t.reshape(b, t.shape[1], heads, d).transpose(0, 2, 1, 3)

    out = mx.fast.scaled_dot_product_attention(split(q), split(k), split(v), scale=1.0 / math.sqrt(d))
    return out.transpose(0, 2, 1, 3).reshape(b, lq, inner)


class Attention(nn.Module):
    """diffusers Attention without its optional norms: to_q/to_k/to_v (bias as asked), to_out.0 with bias."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = [nn.Linear(dim, dim)]

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        context = x if context is None else context
        return self.to_out[0](attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class SpatialSelfAttention(Attention):
    """The VAE's mid-block attention: group norm, one head over all H*W positions, residual added."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__(channels, heads=1, bias=True)
        self.group_norm = GroupNorm(groups, channels, eps)

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        b, h, w, c = x.shape
        y = super().__call__(self.group_norm(x).reshape(b, h * w, c))
        return x + y.reshape(b, h, w, c)


class GEGLU(nn.Module):
    """Linear to 2 x inner, then value * gelu(gate) (exact erf GELU, as torch's default)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def __call__(self, x: mx.array) -> mx.array:
        value, gate = mx.split(self.proj(x), 2, axis=-1)
        return value * nn.gelu(gate)


class FeedForward(nn.Module):
    """diffusers FeedForward: ``net.0`` GEGLU, ``net.1`` dropout (identity at inference), ``net.2`` linear."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = [GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """diffusers BasicTransformerBlock (layer norms): self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """diffusers Transformer2DModel for continuous inputs: norm, proj_in, blocks over H*W tokens, proj_out, residual.

    ``linear_projection``: proj_in/proj_out are Linear layers (config ``use_linear_projection``) instead of 1x1 convs.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, layers: int = 1,
                 linear_projection: bool = False) -> None:
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, channels, 1e-6)
        make = (lambda: nn.Linear(channels, channels)) if linear_projection else \
            (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make()
        self.transformer_blocks = [TransformerBlock(channels, heads, context_dim) for _ in range(layers)]
        self.proj_out = make()

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.norm(x)
        # a 1x1 conv on NHWC and a Linear on the flattened tokens are the same matmul: only the weight shape differs
        y = self.proj_in(y).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y if self.linear_projection else y.reshape(b, h, w, c))
        return x + y.reshape(b, h, w, c)


class Downsample(nn.Module):
    """Strided 3x3 conv. ``padding=0`` is the VAE encoder's variant: pad right and bottom by one first."""

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.padding == 0:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)
