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
from typing import TYPE_CHECKING, Any

from musetalk.errors import WeightsError
from musetalk.weights.registry import VERSIONS, WEIGHTS, WeightFile, version_files, weight_file

if TYPE_CHECKING:
    from musetalk.weights.loading import check_keys, empty_init, inference_ready, load_into, load_model
    from musetalk.weights.reader import OpaqueObject, converted_path, load_state_dict, read_checkpoint, sniff_format

# the reader and the loader (torch, numpy) are imported on first use, so the registry and layouts stay cheap
_LAZY = {**dict.fromkeys(("OpaqueObject", "converted_path", "load_state_dict", "read_checkpoint", "sniff_format"),
                         "musetalk.weights.reader"),
         **dict.fromkeys(("check_keys", "empty_init", "inference_ready", "load_into", "load_model"),
                         "musetalk.weights.loading")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DOWNLOAD_HINT", "LAYOUTS", "ModelLayout", "OpaqueObject", "WEIGHTS", "WeightFile", "check_keys",
           "converted_path", "default_models_dir", "empty_init", "file_fingerprint", "find_weights_file",
           "inference_ready", "layout", "load_into", "load_model", "load_state_dict", "read_checkpoint",
           "sniff_format", "weight_file"]

DOWNLOAD_HINT = "run `musetalk download --dir {models}` (or `musetalk tiny-weights --dir {models}` for random test weights)"


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
