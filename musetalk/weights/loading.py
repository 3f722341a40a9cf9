"""Build a model without allocating, then fill it from its checkpoint tensor by tensor (the build side of weight I/O).

``load_model(build, path, device=..., dtype=...)``:
  1. ``build()`` runs under ``torch.device("meta")``: every parameter and buffer has a shape and no storage.
  2. The checkpoint is opened memory-mapped (``load_state_dict(..., mmap=True)``: safetensors, torch zip files);
     its names and shapes are checked strictly against the empty model (:class:`WeightsError` by name).
  3. Tensors are assigned to the module (``load_state_dict(assign=True)``):
     - file dtype == run dtype on the CPU: the mapped tensors themselves (zero copy). The weights are read
       from the page cache when first used, and shared with it: a clean page the kernel may drop and re-read
       under memory pressure instead of swapping. Files are replaced atomically (``musetalk download``), so
       a running process keeps the old file's pages.
     - otherwise (a cast, another device, another memory format): each tensor is copied, cast to the run dtype
       (4-d ones in the asked memory format) on the run device.
       Only the model in its run dtype is held, plus the checkpoint pages read since the last re-open: the
       mapping is dropped and re-opened every ``CHUNK_BYTES`` so the pages it has read leave the process (a
       mapped page counts in the RSS while the mapping lives).

Reading files (formats, safety, mmap) is :func:`musetalk.weights.load_state_dict`'s job; this module never
opens a checkpoint itself.
"""

from __future__ import annotations

import ctypes
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

import torch

from musetalk.devices import linux_libc_function
from musetalk.errors import WeightsError

# Checkpoint bytes read before the mapping is dropped and re-opened: bounds the load's peak to the model in its
# run dtype + this. Re-opening costs one unpickling of the index (~20 ms for the 686 tensors of the UNet).
CHUNK_BYTES = 256 * 2**20
KEY_CHECK_FIX = "check that the file and its config belong together (right version?)"

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)
StateDict = dict[str, torch.Tensor]


@contextmanager
def empty_init() -> Iterator[None]:
    """Modules built in this block get parameters and buffers on the meta device: shapes, no memory, no init."""
    with torch.device("meta"):
        yield


def inference_ready(module: ModuleT, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> ModuleT:
    """``module`` in eval mode, without gradients, on ``device`` / in ``dtype`` (None: left as is).

    Plain ``torch.nn.Module.to``: diffusers' override warns about keep-in-fp32 modules these models don't have.
    """
    module.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        torch.nn.Module.to(module, device=device, dtype=dtype)
    return module


def _head(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" … (+{len(items) - 5})" if len(items) > 5 else "")


def check_keys(expected: Mapping[str, torch.Size | tuple[int, ...]], state: Mapping[str, torch.Tensor], *,
               model: str, source: str | os.PathLike, fix: str | None = None) -> None:
    """Raise :class:`WeightsError` naming the missing, unexpected and wrongly shaped keys of ``state``.

    ``expected``: key -> shape of the model's state dict (meta tensors' shapes will do).
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(shape)}"
                   for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape)]
    if not (missing or unexpected or wrong_shape):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {_head(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_head(unexpected)}")
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} shape mismatches: {_head(wrong_shape)}")
    raise WeightsError(f"{source} does not match {model}: " + "; ".join(parts), fix or KEY_CHECK_FIX)


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str | os.PathLike,
              fix: str | None = None) -> torch.nn.Module:
    """Strictly load an in-memory ``state_dict`` into a built ``module``; mismatches raise :class:`WeightsError`.

    Values are cast to each parameter's dtype (some checkpoints store float16 values for float32 modules).
    For a checkpoint on disk prefer :func:`load_model`, which never holds the file beside the model.
    """
    own = module.state_dict()
    check_keys({k: v.shape for k, v in own.items()}, state_dict, model=type(module).__name__, source=source, fix=fix)
    cast = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(cast, strict=True)
    return module


def is_mappable(path: str | os.PathLike) -> bool:
    """True for the formats ``load_state_dict(mmap=True)`` maps instead of reading: safetensors, torch zip files."""
    path = Path(path)
    return path.suffix == ".safetensors" or zipfile.is_zipfile(path)


def _file_identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _materialize(src: torch.Tensor, dtype: torch.dtype, device: torch.device, memory_format: torch.memory_format,
                 *, mapped: bool, share_mapping: bool) -> torch.Tensor:
    """``src`` in ``dtype`` on ``device``, dense in ``memory_format`` if 4-d (else contiguous), copied only when it
    must be.

    A tensor already in the right dtype, device and layout is used as is when ``share_mapping`` allows a view of
    the mapped file, or when it was read into memory (not ``mapped``) and owns its storage (not a slice).
    """
    layout = memory_format if src.dim() == 4 else torch.contiguous_format
    if src.dtype == dtype and src.device == device and src.is_contiguous(memory_format=layout):
        if share_mapping or (not mapped and src.untyped_storage().nbytes() == src.nbytes):
            return src
    return src.to(device=device, dtype=dtype, copy=True, memory_format=layout)


def load_model(build: Callable[[], ModuleT], path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, convert: Callable[[StateDict], StateDict] | None = None,
               fix: str | None = None, chunk_bytes: int = CHUNK_BYTES,
               memory_format: torch.memory_format = torch.contiguous_format) -> ModuleT:
    """``build()`` without allocating, filled from the checkpoint ``path``, in ``dtype`` on ``device``, for inference.

    convert: maps the file's state dict to the model's keys (renames, a sub-model's keys); it must return views of
        the file's tensors (slicing is fine), so it costs no memory. Floating-point tensors are cast to ``dtype``,
        the others (BatchNorm's ``num_batches_tracked``) keep the model's dtype.
    fix: the hint of a :class:`WeightsError` for an unreadable file (default: download it again).
    memory_format: the layout of 4-d weights (``torch.channels_last``: see ``devices.conv_memory_format``); a
        layout the file does not have means a copy of every tensor, as a cast does.
    Raises :class:`WeightsError` for a missing, unsafe or corrupt file and for missing, unexpected or wrongly
    shaped keys (each named), before any tensor is copied.
    """
    from musetalk.weights import load_state_dict  # the read side; imported here: it re-exports this module

    path, device = Path(path), torch.device(device)
    with empty_init():
        module = build()
    expected = module.state_dict()
    mapped = is_mappable(path) if path.is_file() else False

    def read() -> StateDict:
        state = load_state_dict(path, fix=fix, mmap=mapped)
        return convert(state) if convert is not None else state

    identity = _file_identity(path) if path.is_file() else None
    first = read()
    check_keys({k: v.shape for k, v in expected.items()}, first, model=type(module).__name__, source=path,
               fix=KEY_CHECK_FIX)
    targets = {k: dtype if meta.is_floating_point() else meta.dtype for k, meta in expected.items()}
    # zero copy only when nothing is cast: a cast tensor's pages would stay resident in a mapping kept alive
    share_mapping = (mapped and device.type == "cpu" and all(first[k].dtype == t for k, t in targets.items())
                     and all(t.is_contiguous(memory_format=memory_format) for t in first.values() if t.dim() == 4))
    state: StateDict | None = first
    del first  # `state` holds the only reference: setting it to None below unmaps the file
    loaded: StateDict = {}
    read_since_open = 0
    for key, target in targets.items():
        if state is None:
            if _file_identity(path) != identity:
                raise WeightsError(f"{path} changed while it was being loaded", "load it again once it is written")
            state = read()
        src = state.pop(key)
        loaded[key] = _materialize(src, target, device, memory_format, mapped=mapped, share_mapping=share_mapping)
        read_since_open += src.nbytes
        del src
        if mapped and not share_mapping and read_since_open >= chunk_bytes:
            state, read_since_open = None, 0  # unmaps the file: the pages read so far stop counting in the RSS
    del state
    module.load_state_dict(loaded, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer: not in any checkpoint, so it cannot be built on the meta device
        raise WeightsError(f"{type(module).__name__} has tensors no checkpoint provides: {_head(left)}",
                           "build this model without empty_init (musetalk bug: please report it)")
    return inference_ready(module)


# -- resident pages of mapped weights ---------------------------------------------------------------------------
_MADV_DONTNEED = 4  # Linux


def _unwritten_file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of files none of whose pages was ever written (no copy-on-write
    page: ``Anonymous: 0`` in /proc/self/smaps)."""
    spans: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if not fields[0].endswith(":"):  # "start-end perms offset dev inode [path]" opens a mapping
                current = None
                if len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0":
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    current = (start, end)
            elif fields[0] == "Anonymous:" and current is not None:
                if int(fields[1]) == 0:
                    spans.append(current)
                current = None
    return spans


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """First and one-past-last byte addresses of ``t``'s elements (any strides >= 0)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def release_mapped_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages of ``tensors`` that are views of a memory-mapped weights file; returns their bytes.

    The weights stay valid: the next use reads them back from the page cache (the file's, not a copy). For
    weights a run no longer needs for a while, e.g. the VAE encoder once the avatar is prepared: in fp32 on the
    CPU they are views of the mapped checkpoint, and pages read once otherwise count in the resident memory until
    the process ends. Only whole pages inside a file mapping that was never written are dropped (nothing there
    can be lost); copies (a cast, another device), other systems and other mappings are left as they are (0).
    """
    advise = linux_libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int)
    if advise is None:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    extents = sorted(_extent(t) for t in tensors if t.device.type == "cpu" and t.numel() > 0)
    merged: list[list[int]] = []
    for start, end in extents:  # neighbours in the file (a zip entry's header between them) become one range
        if merged and start <= merged[-1][1] + page:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    mappings = _unwritten_file_mappings() if merged else []
    released = 0
    for start, end in merged:
        first, stop = -(-start // page) * page, end // page * page  # whole pages only
        if stop > first and any(lo <= first and stop <= hi for lo, hi in mappings):
            if advise(first, stop - first, _MADV_DONTNEED) == 0:
                released += stop - first
    return released
