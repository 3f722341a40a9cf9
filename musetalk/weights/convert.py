"""`musetalk convert --to safetensors`: a safetensors copy beside each official weight file.

Later loads read the copy (a memory map, no unpickling at all): :func:`musetalk.weights.load_state_dict` prefers
``<stem>.safetensors`` while it is current, i.e. while its recorded source size and modification time match the
file it was made from. The copy holds exactly the state dict the loaders take (for a training checkpoint such as
DWPose's: its ``state_dict`` entry), with every tensor's dtype and values unchanged.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from musetalk.errors import WeightsError
from musetalk.weights.reader import converted_is_current, converted_path, load_state_dict, source_identity
from musetalk.weights.registry import WEIGHTS, WeightFile

# torch dtype -> safetensors dtype name (the format's own spelling)
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_WRITE_CHUNK = 64 << 20


def write_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state`` as a safetensors file, tensor by tensor (memory stays flat), atomically (``.part`` + rename).

    Tensors are laid out by decreasing element size, so every tensor starts aligned to its element size, as the
    safetensors library does; the header is padded to 8 bytes.
    """
    path = Path(path)
    order = sorted(state, key=lambda k: (-state[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = state[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{name} has dtype {tensor.dtype}, which safetensors cannot store",
                               "keep the original file for this checkpoint")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in order:
                flat = state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                for start in range(0, flat.numel(), _WRITE_CHUNK):
                    f.write(flat[start:start + _WRITE_CHUNK].numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def convert_file(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``<stem>.safetensors`` beside ``path`` from its state dict; returns it (kept when already current)."""
    path = Path(path)
    target = converted_path(path)
    if not force and converted_is_current(path, target):
        return target
    state = load_state_dict(path, prefer_converted=False)
    return write_safetensors(state, target, metadata=source_identity(path))


def convert_models(models_dir: str | os.PathLike, entries: Iterable[WeightFile] | None = None, *,
                   log: Callable[[str], None] = print) -> list[Path]:
    """Convert every registered weight file present in ``models_dir`` (absent ones are skipped)."""
    models_dir = Path(models_dir)
    written = []
    for entry in entries if entries is not None else WEIGHTS.values():
        source = models_dir / entry.dest
        if not entry.is_weights or not source.is_file():
            continue
        target = converted_path(source)
        if converted_is_current(source, target):
            log(f"current  {target.relative_to(models_dir)}")
        else:
            convert_file(source, force=True)
            log(f"wrote    {target.relative_to(models_dir)}")
        written.append(target)
    return written
