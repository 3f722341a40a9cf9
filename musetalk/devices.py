"""Device and dtype resolution (once, at the edge) and the per-backend dispatch table.

This is the only module that names backends ("cuda", "mps") literally.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import threading
from typing import Callable, Iterator, cast

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


def conv_memory_format(device: torch.device, dtype: torch.dtype, *, small_weights: bool = False) -> torch.memory_format:
    """The memory format a convolutional model and its inputs run fastest in on ``device`` (chosen once, at load).

    channels_last on the CPU, where oneDNN's convolutions work in NHWC: full-size, on a Xeon with AMX, bf16 VAE
    decode 2.2 -> 1.0 s/image, encode 1.1 -> 0.4 s, UNet batch 8 4.5 -> 3.1 s; fp32 parser 0.32 -> 0.21 s. In fp32
    the UNet and VAE measured no faster (decode 4.4 s both, UNet ~10 s both), and there their weights stay shared
    with the memory-mapped file, which a layout change would copy: they keep the file's layout unless
    ``small_weights`` says the copy costs nothing. Elsewhere (CUDA, MPS: not measured here) the default layout.
    """
    if device.type != "cpu":
        return torch.contiguous_format
    if dtype in (torch.bfloat16, torch.float16) or small_weights:
        return torch.channels_last
    return torch.contiguous_format


def to_memory_format(module: torch.nn.Module, memory_format: torch.memory_format) -> None:
    """Put ``module``'s 4-d weights in ``memory_format``, one tensor at a time (no copy for those already in it)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dim() == 4 and not tensor.is_contiguous(memory_format=memory_format):
            tensor.data = tensor.data.contiguous(memory_format=memory_format)


@functools.cache
def linux_libc_function(name: str, argtypes: tuple[type, ...], restype: type) -> Callable[..., int] | None:
    """The C library's ``name`` on Linux (ctypes, typed), looked up once; None elsewhere or where it has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), restype
    return cast(Callable[..., int], function)


# Freed blocks up to this size stay in the C heap for reuse while kept (glibc's M_MMAP_THRESHOLD; a free top of
# twice that is not trimmed: M_TRIM_THRESHOLD). Outside, glibc's own steady state: it maps blocks over 32 MB.
HEAP_BLOCK_LIMIT = 256 * 2**20
_GLIBC_MMAP_THRESHOLD_MAX = 4 * 2**20 * ctypes.sizeof(ctypes.c_long)  # where glibc's dynamic threshold stops
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_USER_HEAP_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_heap_lock = threading.Lock()
_heap_keepers = 0  # contexts inside freed_blocks_kept_in_heap, all threads
_heap_kept = False  # whether glibc took the settings of the contexts inside


def _mallopt() -> Callable[..., int] | None:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in _USER_HEAP_SETTINGS) or "threshold" in tunables or "top_pad" in tunables:
        return None  # the user's own settings stand
    return linux_libc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)  # glibc's; musl has none


@contextlib.contextmanager
def freed_blocks_kept_in_heap(limit: int = HEAP_BLOCK_LIMIT) -> Iterator[bool]:
    """Inside, glibc reuses freed blocks of up to ``limit`` bytes instead of unmapping them; yields whether it applies.

    glibc maps every block over 32 MB on its own and unmaps it when freed, so a full-size fp32 VAE encode (blocks
    of 30-270 MB) faulted its activations in page by page on every call: 4 crops took 4.2-4.5 s/frame, 6 s of it
    system time, 2.2 M minor faults; kept in the heap, 3.4 s/frame and no system time. Preparation runs its models
    inside (a cold fp32 run: preparation 1.23x -> 1.01x its models alone, its own peak +0.1 GB). The stream does
    not: its models run in a thread, whose arena maps blocks over 64 MB whatever the threshold, and kept for the
    whole run the rest raised the run's peak (during a decode) by 0.17 GB. Process-wide while any thread is
    inside (glibc before 2.38 grows the heap by a few blocks before it settles); on leaving, glibc's steady state
    (32 MB) comes back; ``release_free_memory`` hands what is free back. A user's own ``MALLOC_*_`` settings (or
    glibc tunables) are left as they are; other C libraries: nothing.
    """
    global _heap_keepers, _heap_kept
    mallopt = _mallopt()
    if mallopt is None:
        yield False
        return
    with _heap_lock:
        if _heap_keepers == 0:  # a glibc that refuses these values changes nothing
            _heap_kept = bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * limit))
        _heap_keepers += 1
    try:
        yield _heap_kept
    finally:
        with _heap_lock:
            _heap_keepers -= 1
            if _heap_keepers == 0:
                mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
                mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); False where there is none.

    glibc keeps memory that was freed inside its heaps, and each thread's heap fragments on its own: a CPU run's
    resident memory crept up batch after batch (full-size bf16, 75 frames: 2.82 -> 3.09 GB). Called once per
    batch of the models on the CPU, it held the run's peak 0.12-0.16 GB lower (bf16 3.27 -> 3.11 GB, fp32
    5.20 -> 5.08 GB) at the cost of faulting the freed pages in again (within the noise of the run's time).
    Costs a walk of the free lists: milliseconds.
    """
    trim = linux_libc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)  # glibc's; musl has none
    if trim is None:
        return False
    trim(0)
    return True
