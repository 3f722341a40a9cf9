"""All weight I/O: the official ``models/`` layout, safe loading and strict key checks.

Files are read by :mod:`musetalk.weights.reader` (every official format, weights_only-level safety: a pickle that
would run code is refused); :mod:`musetalk.weights.registry` is the one table of files. ``torch.load`` is never
patched. Importing this package is cheap (no torch): the CLI reads the registry before any command runs.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from musetalk.errors import WeightsError
from musetalk.weights.registry import VERSIONS, WEIGHTS, WeightFile, version_files, weight_file

if TYPE_CHECKING:
    import torch

    from musetalk.weights.reader import OpaqueObject, converted_path, load_state_dict, read_checkpoint, sniff_format

# the reader (torch, numpy) is imported on first use, so that the registry and layouts stay cheap to import
_FROM_READER = ("OpaqueObject", "converted_path", "load_state_dict", "read_checkpoint", "sniff_format")


def __getattr__(name: str) -> Any:
    if name in _FROM_READER:
        return getattr(importlib.import_module("musetalk.weights.reader"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DOWNLOAD_HINT", "LAYOUTS", "ModelLayout", "OpaqueObject", "WEIGHTS", "WeightFile", "converted_path",
           "default_models_dir", "file_fingerprint", "find_weights_file", "layout", "load_into", "load_state_dict",
           "read_checkpoint", "sniff_format", "weight_file"]

DOWNLOAD_HINT = "run `musetalk download --dir {models}` (or `musetalk tiny-weights --dir {models}` for random test weights)"


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str | os.PathLike,
              fix: str | None = None) -> torch.nn.Module:
    """Strictly load ``state_dict`` into ``module``; mismatches raise :class:`WeightsError` with the key lists.

    Values are cast to each parameter's dtype (some checkpoints store float16 values for float32 modules).
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" … (+{len(items) - 5})" if len(items) > 5 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {head(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches: {head(wrong_shape)}")
        raise WeightsError(f"{source} does not match {type(module).__name__}: " + "; ".join(parts),
                           fix or "check that the file and its config belong together (right version?)")
    cast = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(cast, strict=True)
    return module


def _folder(key: str) -> str:
    return WEIGHTS[key].dest.rsplit("/", 1)[0]


@dataclass(frozen=True)
class ModelLayout:
    """Where each part lives inside a ``models/`` folder (the official MuseTalk layout, from the registry)."""

    unet_dir: str
    unet_weights: str
    vae_dir: str = _folder("vae")
    whisper_dir: str = _folder("whisper")
    face_parse: str = WEIGHTS["face-parse"].dest
    face_parse_backbone: str = WEIGHTS["face-parse-backbone"].dest  # optional
    version: str = "v15"

    @property
    def unet_config(self) -> str:
        return WEIGHTS[f"unet-{self.version}-config"].dest

    def required_files(self) -> list[str]:
        """Files generation needs under these exact names (the VAE and Whisper weights may also be safetensors)."""
        return [w.dest for w in version_files(self.version) if w.required and w.alternative is None]


def _layout_from_registry(version: str) -> ModelLayout:
    unet_dir, unet_weights = WEIGHTS[f"unet-{version}"].dest.rsplit("/", 1)
    return ModelLayout(unet_dir=unet_dir, unet_weights=unet_weights, version=version)


LAYOUTS: dict[str, ModelLayout] = {version: _layout_from_registry(version) for version in VERSIONS}


def layout(version: str) -> ModelLayout:
    try:
        return LAYOUTS[version]
    except KeyError:
        raise WeightsError(f"unknown MuseTalk version {version!r}", f"use one of {sorted(LAYOUTS)}") from None


def find_weights_file(folder: Path, stem: str) -> Path:
    """``stem.safetensors`` when present, else ``stem.bin`` (diffusers / transformers naming)."""
    for suffix in (".safetensors", ".bin"):
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    raise WeightsError(f"no {stem}.safetensors or {stem}.bin in {folder}",
                       DOWNLOAD_HINT.format(models=folder.parent))


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a weights file (name, size, modification time): part of cache keys built on its output."""
    stat = Path(path).stat()
    return f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}"


def default_models_dir() -> Path:
    """The models folder: ``$MUSETALK_MODELS`` when set, else ``models/`` in the current directory."""
    return Path(os.environ.get("MUSETALK_MODELS", "models"))
