"""VAE stage: 256x256 BGR crops <-> 4x32x32 latents (diffusers AutoencoderKL, sd-vae-ft-mse layout).

  crops    (B, 256, 256, 3) uint8 BGR
  latents  (B, 4, 32, 32) float, already multiplied by the scaling factor (0.18215)
  UNet input (B, 8, 32, 32): latents of the crop with its lower half zeroed, then of the full crop

Deliberate deviation: we use the posterior *mean*, where the reference draws a random sample from the
posterior. The goldens use the mean too; it makes a run deterministic and the per-source latents cacheable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from musetalk.devices import conv_memory_format, to_memory_format
from musetalk.errors import WeightsError
from musetalk.weights import DOWNLOAD_HINT, file_fingerprint, find_weights_file, load_model
from musetalk.weights.loading import release_mapped_pages

if TYPE_CHECKING:  # the defining module: the package's lazy export is typed as a placeholder
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

CROP_SIZE = 256
LATENT_SIZE = CROP_SIZE // 8


def crops_to_tensor(crops_bgr: np.ndarray, mask_lower_half: bool) -> torch.Tensor:
    """(B, 256, 256, 3) uint8 BGR -> (B, 3, 256, 256) float32 RGB in [-1, 1], lower half zeroed (in [0, 1]) if asked."""
    x = torch.from_numpy(np.ascontiguousarray(crops_bgr[..., ::-1])).float() / 255.0
    x = x.permute(0, 3, 1, 2).contiguous()  # NCHW-contiguous: a channels-last view takes other conv kernels
    if mask_lower_half:
        x = x.clone()
        x[:, :, x.shape[2] // 2:, :] = 0
    return (x - 0.5) / 0.5


def convert_legacy_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the pre-0.14 diffusers attention keys (query/key/value/proj_attn) that sd-vae-ft-mse's .bin uses.

    Values stay views of the file's tensors (a 1x1 conv weight is sliced, not copied).
    """
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for key, value in state.items():
        if ".attentions." in key:
            for old, new in renames.items():
                key = key.replace(old, new)
            # old checkpoints store the attention projections as 1x1 convs
            if value.ndim == 4 and any(t in key for t in (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")):
                value = value[:, :, 0, 0]
        out[key] = value
    return out


class VAE:
    """AutoencoderKL built once from ``models/sd-vae``; encodes crops and decodes latents."""

    def __init__(self, model: AutoencoderKL, device: torch.device, dtype: torch.dtype,
                 fingerprint: str | None = None, one_image_at_a_time: bool | None = None,
                 memory_format: torch.memory_format | None = None) -> None:
        """one_image_at_a_time: run encoder and decoder image by image inside a batch (diffusers' slicing);
        None: on the CPU only. There a batch buys no speed (full-size bf16, 8 crops: encode 10.1 s sliced vs
        12.3 s batched, decode 10.2 s both) while the activations of 8-16 images at 256x256 cost 0.6-0.8 GB;
        a GPU needs the batch to be busy.
        memory_format: of the weights and inputs; None: ``devices.conv_memory_format`` (channels_last on the CPU in
        bf16/fp16)."""
        self.memory_format = memory_format or conv_memory_format(device, dtype)
        to_memory_format(model, self.memory_format)  # no copy when loaded in it
        if one_image_at_a_time is None:
            one_image_at_a_time = device.type == "cpu"
        if one_image_at_a_time:
            model.enable_slicing()
        else:
            model.disable_slicing()
        self.model = model
        self.fingerprint = fingerprint  # identity of the weights file (None: built in memory)
        self.device = device
        self.dtype = dtype
        self.scaling_factor = float(model.config["scaling_factor"])

    @classmethod
    def from_pretrained(cls, vae_dir: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "VAE":
        from diffusers import AutoencoderKL

        vae_dir = Path(vae_dir)
        fix = DOWNLOAD_HINT.format(models=vae_dir.parent)
        if not (vae_dir / "config.json").is_file():
            raise WeightsError(f"{vae_dir / 'config.json'} is missing", fix)
        config = json.loads((vae_dir / "config.json").read_text())
        weights = find_weights_file(vae_dir, "diffusion_pytorch_model")
        memory_format = conv_memory_format(torch.device(device), dtype)
        model = load_model(lambda: AutoencoderKL.from_config(config), weights, device=device, dtype=dtype,
                           convert=convert_legacy_attention, fix=fix, memory_format=memory_format)
        return cls(model, torch.device(device), dtype, fingerprint=file_fingerprint(weights),
                   memory_format=memory_format)

    @torch.inference_mode()
    def encode(self, crops_bgr: np.ndarray, mask_lower_half: bool = False) -> torch.Tensor:
        """(B, 256, 256, 3) uint8 BGR -> (B, 4, 32, 32) float32 latents (posterior mean x scaling factor), CPU."""
        x = crops_to_tensor(crops_bgr, mask_lower_half).to(self.device, self.dtype, memory_format=self.memory_format)
        posterior = self.model.encode(x).latent_dist
        return (posterior.mean * self.scaling_factor).float().cpu()

    def unet_input(self, crops_bgr: np.ndarray) -> torch.Tensor:
        """(B, 256, 256, 3) uint8 BGR -> (B, 8, 32, 32): masked-half latents, then full-crop latents."""
        return torch.cat([self.encode(crops_bgr, mask_lower_half=True), self.encode(crops_bgr)], dim=1)

    def release_encoder_pages(self) -> int:
        """Once avatars are prepared: the encoder's weights leave the resident memory where they are views of the
        mapped checkpoint (fp32 on the CPU; 0.13 GB full size); the next encode reads them from the page cache
        again. Returns the bytes released (0 elsewhere: copies are kept)."""
        encoder = [self.model.encoder, self.model.quant_conv]
        return release_mapped_pages([t for part in encoder if part is not None
                                     for t in [*part.parameters(), *part.buffers()]])

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, 4, 32, 32) latents -> (B, 256, 256, 3) uint8 BGR faces."""
        z = latents.to(self.device, self.dtype, memory_format=self.memory_format) / self.scaling_factor
        x = self.model.decode(z).sample
        # fp16 decoders can overflow to inf/NaN on rare latents; map those to grey/white/black, not garbage bytes
        x = torch.nan_to_num(x.float() / 2 + 0.5, nan=0.5, posinf=1.0, neginf=0.0).clamp(0, 1)
        img = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return np.ascontiguousarray(img[..., ::-1])
