"""All weight I/O: the official ``models/`` layout, safe loading and strict key checks.

Checkpoints are read with ``safetensors`` or ``torch.load(..., weights_only=True)``; a pickle that tries
to run code is refused. ``torch.load`` is never patched.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from musetalk.errors import WeightsError
from musetalk.weights.loading import check_keys, empty_init, inference_ready, load_into, load_model

__all__ = ["DOWNLOAD_HINT", "LAYOUTS", "ModelLayout", "check_keys", "default_models_dir", "empty_init",
           "file_fingerprint", "find_weights_file", "inference_ready", "layout", "load_into", "load_model",
           "load_state_dict"]

DOWNLOAD_HINT = "run `musetalk download --dir {models}` (or `musetalk tiny-weights --dir {models}` for random test weights)"
_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"


def _looks_like_lfs_pointer(path: Path) -> bool:
    if path.stat().st_size > 1024:
        return False
    with open(path, "rb") as f:
        return f.read(len(_LFS_POINTER_PREFIX)) == _LFS_POINTER_PREFIX


def load_state_dict(path: str | os.PathLike, *, fix: str | None = None, mmap: bool = False
                    ) -> dict[str, torch.Tensor]:
    """Load a plain state dict (``.safetensors``, ``.pth``, ``.bin``, ``.pt``, ``.model``) on the CPU.

    mmap: map a torch zip file instead of reading it (tensors are read from the page cache when first touched);
    safetensors files are always mapped; legacy (pre-zip) pickles are read whole either way.

    Raises :class:`WeightsError` naming the file and ``fix`` for a missing, truncated, Git-LFS-pointer,
    unsafe (code-running pickle) or non-state-dict file.
    """
    path = Path(path)
    fix = fix or "download the official file again (`musetalk download`)"
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}", fix)
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file is empty: {path}", fix)
    if _looks_like_lfs_pointer(path):
        raise WeightsError(f"{path} is a Git LFS pointer, not the weights", "run `git lfs pull` or " + fix)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"cannot read {path} as safetensors ({exc})", fix) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, zipfile errors...
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "unpickl" in text.lower():
            raise WeightsError(
                f"refused to load {path}: it is not a plain tensor checkpoint (a pickle that would run code or "
                "build arbitrary objects); MuseTalk Studio only loads weights with weights_only=True",
                "use the official checkpoint; never load files from untrusted sources") from None
        if isinstance(exc, (EOFError, zipfile.BadZipFile)) or "zip archive" in text or "truncat" in text.lower() \
                or "central directory" in text or "PytorchStreamReader" in text:
            raise WeightsError(f"{path} is truncated or corrupt ({type(exc).__name__}: {text.splitlines()[0]})",
                               fix) from None
        raise WeightsError(f"cannot load {path} ({type(exc).__name__}: {text.splitlines()[0] if text else ''})",
                           fix) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})", fix)
    return dict(obj)


@dataclass(frozen=True)
class ModelLayout:
    """Where each part lives inside a ``models/`` folder (the official MuseTalk layout)."""

    unet_dir: str
    unet_weights: str
    vae_dir: str = "sd-vae"
    whisper_dir: str = "whisper"
    face_parse: str = "face-parse-bisent/79999_iter.pth"
    face_parse_backbone: str = "face-parse-bisent/resnet18-5c106cde.pth"  # optional

    @property
    def unet_config(self) -> str:
        return f"{self.unet_dir}/musetalk.json"

    def required_files(self) -> list[str]:
        return [self.unet_config, f"{self.unet_dir}/{self.unet_weights}", f"{self.vae_dir}/config.json",
                f"{self.whisper_dir}/config.json", f"{self.whisper_dir}/preprocessor_config.json", self.face_parse]


LAYOUTS: dict[str, ModelLayout] = {
    "v15": ModelLayout(unet_dir="musetalkV15", unet_weights="unet.pth"),
    "v1": ModelLayout(unet_dir="musetalk", unet_weights="pytorch_model.bin"),
}


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
