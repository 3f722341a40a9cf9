"""UNet stage: one denoising step at timestep 0, conditioned on the audio windows.

  latents  (B, 8, 32, 32): masked-half latents || reference latents (see musetalk.stages.vae)
  audio    (B, 50, 384) per-frame windows *before* positional encoding (added here)
  output   (B, 4, 32, 32) predicted latents of the talking face
The architecture comes from the checkpoint's own ``musetalk.json`` (a diffusers UNet2DConditionModel).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from musetalk.stages.audio import add_positional_encoding
from musetalk.devices import conv_memory_format, to_memory_format
from musetalk.errors import WeightsError
from musetalk.weights import DOWNLOAD_HINT, load_model


def read_unet_config(config_path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's own ``musetalk.json`` (a diffusers UNet2DConditionModel config); WeightsError with the fix
    when it is missing or not JSON. Both backends build their UNet from it."""
    config_path = Path(config_path)
    fix = DOWNLOAD_HINT.format(models=config_path.parent.parent)
    if not config_path.is_file():
        raise WeightsError(f"UNet config {config_path} is missing", fix)
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"UNet config {config_path} is not valid JSON ({exc})", fix) from None
    return config


class UNet:
    """The MuseTalk UNet, built once from ``musetalk.json`` + the version's weights file."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 memory_format: torch.memory_format | None = None) -> None:
        """memory_format: of the weights and latents; None: ``devices.conv_memory_format``."""
        self.memory_format = memory_format or conv_memory_format(device, dtype)
        to_memory_format(model, self.memory_format)  # no copy when loaded in it
        self.model = model
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, config_path: str | os.PathLike, weights_path: str | os.PathLike,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "UNet":
        from diffusers import UNet2DConditionModel

        config_path, weights_path = Path(config_path), Path(weights_path)
        fix = DOWNLOAD_HINT.format(models=config_path.parent.parent)
        config = read_unet_config(config_path)
        # built empty, then filled from the (memory-mapped) file in the run dtype: one copy of the weights at most
        memory_format = conv_memory_format(torch.device(device), dtype)
        model = load_model(lambda: UNet2DConditionModel.from_config(config), weights_path, device=device, dtype=dtype,
                           fix=fix, memory_format=memory_format)
        return cls(model, torch.device(device), dtype, memory_format=memory_format)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, audio_windows: torch.Tensor) -> torch.Tensor:
        """(B, 8, 32, 32) + (B, 50, 384) -> (B, 4, 32, 32), same device as the model, model dtype."""
        cond = add_positional_encoding(audio_windows.to(self.device, self.dtype))
        timestep = torch.zeros(1, device=self.device, dtype=torch.long)  # single step at t = 0, no scheduler
        x = latents.to(self.device, self.dtype, memory_format=self.memory_format)
        return self.model(x, timestep, encoder_hidden_states=cond).sample
