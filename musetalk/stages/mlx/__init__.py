"""MLX backend for the per-frame models (UNet, VAE) on Apple Silicon: ``pip install "musetalk[mlx]"``.

Importing this package does not import MLX; ``MLXUNet`` and ``MLXVAE`` (in ``.unet`` / ``.vae``) do.
``resolve_backend`` turns the ``RuntimeConfig.backend`` setting (auto | torch | mlx) into the backend to build:
``auto`` is MLX on Apple Silicon (macOS arm64) when MLX is importable, torch everywhere else.
"""

from __future__ import annotations

import importlib
import logging
import platform
from typing import TYPE_CHECKING

import torch

from musetalk.errors import InputError

if TYPE_CHECKING:
    import mlx.core as mx

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "mlx")
INSTALL_HINT = 'pip install "musetalk[mlx]"'


def mlx_available() -> bool:
    """Whether ``mlx.core`` imports (the package may be absent, or present without a usable build)."""
    try:
        importlib.import_module("mlx.core")
    except ImportError:
        return False
    return True


def is_apple_silicon(system: str | None = None, machine: str | None = None) -> bool:
    """macOS on arm64 (M-series); arguments override the detection (tests)."""
    return (system or platform.system()) == "Darwin" and (machine or platform.machine()) == "arm64"


def resolve_backend(backend: str = "auto", *, apple_silicon: bool | None = None,
                    available: bool | None = None) -> str:
    """``auto`` | ``torch`` | ``mlx`` -> ``torch`` or ``mlx``; asking for MLX where it is missing raises InputError.

    ``apple_silicon`` and ``available`` override the detection (tests).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    available = mlx_available() if available is None else available
    if backend == "mlx":
        if not available:
            raise InputError("the MLX backend was asked for but MLX is not installed", INSTALL_HINT)
        return "mlx"
    apple_silicon = is_apple_silicon() if apple_silicon is None else apple_silicon
    chosen = "mlx" if apple_silicon and available else "torch"
    log.info("backend auto -> %s (Apple Silicon: %s, MLX installed: %s)", chosen, apple_silicon, available)
    return chosen


def mlx_dtype(dtype: torch.dtype) -> mx.Dtype:
    """torch float dtype -> the MLX dtype of the same name (float32, float16, bfloat16)."""
    import mlx.core as mx

    table = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}
    if dtype not in table:
        raise InputError(f"the MLX backend has no {dtype}", "use fp32, fp16 or bf16")
    return table[dtype]
