"""Device and dtype resolution (once, at the edge) and the per-backend dispatch table.

This is the only module that names backends ("cuda", "mps") literally.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit device that is absent raises a clear error."""
    from musetalk.errors import InputError

    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            chosen = torch.device("cuda")
        elif mps_available():
            chosen = torch.device("mps")
        else:
            chosen = torch.device("cpu")
        log.info("device auto -> %s", chosen)
        return chosen
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA was asked for but torch sees no CUDA device", "use --device auto or --device cpu")
    if name == "mps" and not mps_available():
        raise InputError("MPS was asked for but this torch build or machine has no MPS", "use --device auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}", "use auto, cpu, cuda or mps") from None


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto``: fp16 on cuda/mps, bf16 on CPUs that pay for it, else fp32 (see docs/benchmarks.md)."""
    from musetalk.errors import InputError

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        device = device or resolve_device("auto")
        if device.type in ("cuda", "mps"):
            return torch.float16
        # bf16 doubles model-only fps on a CPU with native bf16 (docs/benchmarks.md: 0.35 -> 0.75 fps); without it
        # bf16 is emulated and slower than fp32. MUSETALK_CPU_DTYPE overrides the choice.
        choice = os.environ.get("MUSETALK_CPU_DTYPE") or ("bf16" if cpu_has_fast_bf16() else "fp32")
        return DTYPES[choice]
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}", f"use auto or one of {sorted(DTYPES)}") from None


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 natively (oneDNN's check: AVX-512 BF16 / AMX on x86, BF16 on Arm)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so a clock read measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
