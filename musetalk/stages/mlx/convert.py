"""Official torch checkpoints -> MLX weights, converted at load and cached beside the originals.

The torch file is read with the project's safe reader (``musetalk.weights.load_state_dict``: safetensors or
``torch.load(weights_only=True)``); nothing is downloaded twice. Conversion is a layout change only: conv kernels
go from torch's (O, I, kH, kW) to MLX's (O, kH, kW, I); every other tensor keeps its shape. Values are stored as
float32 (exact for float32, float16 and bfloat16 sources) and cast to the model dtype when loaded.

Cache: ``<source>.mlx-<key>.safetensors`` in the source's folder, where ``key`` hashes the source file's
identity (``musetalk.weights.file_fingerprint``: name, size, mtime) and the converter version. A changed source
gets a new key; the stale file is removed when the new one is written. Writes are atomic (temp file +
``os.replace``); an unwritable folder only costs the conversion at every load.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from mlx.utils import tree_flatten

from musetalk.errors import WeightsError
from musetalk.weights import file_fingerprint

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when the conversion changes: caches written by older code are then ignored
CACHE_INFIX = ".mlx-"


def to_mlx_layout(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torch state dict -> float32 numpy arrays in MLX layout (4-D conv kernels OIHW -> OHWI)."""
    out = {}
    for key, tensor in state.items():
        array = tensor.detach().to(torch.float32).cpu().numpy()  # numpy has no bfloat16: go through float32
        out[key] = np.ascontiguousarray(array.transpose(0, 2, 3, 1)) if array.ndim == 4 else array
    return out


def cache_path(source: str | os.PathLike) -> Path:
    """Where the converted weights of ``source`` are cached: beside it, named after its identity."""
    source = Path(source)
    key = hashlib.sha256(f"{file_fingerprint(source)}|converter {CONVERTER_VERSION}".encode()).hexdigest()[:16]
    return source.with_name(f"{source.name}{CACHE_INFIX}{key}.safetensors")


def _stale_caches(source: Path, keep: Path) -> list[Path]:
    return [p for p in source.parent.glob(f"{source.name}{CACHE_INFIX}*.safetensors") if p != keep]


def _write_cache(path: Path, arrays: dict[str, np.ndarray], source: Path) -> None:
    """Write atomically; remove caches of earlier versions of the same source. Failure only logs a warning."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), {k: mx.array(v) for k, v in arrays.items()},
                            metadata={"source": file_fingerprint(source), "converter": str(CONVERTER_VERSION)})
        os.replace(tmp, path)
        for stale in _stale_caches(source, keep=path):
            stale.unlink(missing_ok=True)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("could not cache MLX weights beside %s (%s); converting at every load", source, exc)


def _read_cache(path: Path, source: Path) -> dict[str, mx.array] | None:
    """The cached arrays when the file exists and names this source; None otherwise (then converted again)."""
    if not path.is_file():
        return None
    try:
        # mx.load is typed for every format and flag; a .safetensors file with return_metadata is (arrays, metadata)
        arrays, meta = cast("tuple[dict[str, mx.array], dict[str, Any]]", mx.load(str(path), return_metadata=True))
    except (OSError, RuntimeError, ValueError) as exc:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable MLX weights cache %s (%s)", path, exc)
        return None
    if meta.get("source") != file_fingerprint(source) or meta.get("converter") != str(CONVERTER_VERSION):
        return None
    return arrays


def load_converted(source: str | os.PathLike, convert: Callable[[], Mapping[str, torch.Tensor]],
                   cache: bool = True) -> dict[str, mx.array]:
    """MLX-layout float32 weights of ``source``: from the cache when valid, else ``convert()`` (torch state dict)
    converted and, with ``cache``, written beside the source."""
    source = Path(source)
    path = cache_path(source)
    if cache:
        cached = _read_cache(path, source)
        if cached is not None:
            log.info("MLX weights from cache %s", path)
            return cached
    arrays = to_mlx_layout(convert())
    if cache:
        _write_cache(path, arrays, source)
    return {k: mx.array(v) for k, v in arrays.items()}


def load_weights_strict(model: nn.Module, weights: Mapping[str, mx.array], dtype: mx.Dtype,
                        source: str | os.PathLike) -> nn.Module:
    """Cast ``weights`` to ``dtype`` and load them into ``model``; any missing, unexpected or misshapen key raises
    WeightsError with the lists (as ``musetalk.weights.load_into`` does for torch modules)."""
    own = dict(tree_flatten(model.parameters()))
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" … (+{len(items) - 5})" if len(items) > 5 else "")
        parts = [f"{len(items)} {what}: {head(items)}" for what, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if items]
        raise WeightsError(f"{source} does not match the MLX {type(model).__name__}: " + "; ".join(parts),
                           "check that the file and its config belong together (right version?)")
    model.load_weights([(k, v.astype(dtype)) for k, v in weights.items()], strict=True)
    # evaluate on the loading thread: MLX >= 0.31.2 streams are thread-local, and the pipeline calls the models
    # from its worker thread, where only finished arrays may arrive
    mx.eval(model.parameters())
    return model.eval()
