"""Tiny random weights in the official ``models/`` layout, for tests, notebooks and the offline demo.

``python -m musetalk.stages.tiny DIR`` (or ``musetalk tiny-weights --dir DIR``) writes, in seconds:
  musetalkV15/{musetalk.json, unet.pth}, musetalk/{musetalk.json, pytorch_model.bin},
  sd-vae/{config.json, diffusion_pytorch_model.bin}, whisper/{config.json, pytorch_model.bin,
  preprocessor_config.json}, face-parse-bisent/79999_iter.pth (full size: its keys fix its shapes).
The files load through exactly the code paths the real weights take. Their output is noise, not a face.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from musetalk.weights.registry import TINY_MARKER, WEIGHTS

TINY_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [32, 64], "center_input_sample": False, "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 8, "layers_per_block": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 32, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
# The real v1 / v1.5 musetalk.json (850 M parameters): used by the throughput benchmark, never saved.
FULL_UNET: dict[str, Any] = {
    **TINY_UNET, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 32,
    "sample_size": 256, "scaling_factor": 0.18215,
}
# stabilityai/sd-vae-ft-mse's config.json
FULL_VAE: dict[str, Any] = {**TINY_VAE, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}
TINY_WHISPER: dict[str, Any] = {
    "model_type": "whisper", "d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 256,
    "decoder_layers": 1, "decoder_attention_heads": 6, "decoder_ffn_dim": 256, "num_mel_bins": 80, "vocab_size": 128,
    "max_source_positions": 1500, "max_target_positions": 64, "pad_token_id": 1, "bos_token_id": 2,
    "eos_token_id": 3, "decoder_start_token_id": 2,
}
# openai/whisper-tiny's encoder/decoder sizes (the real vocabulary is not needed for the encoder)
FULL_WHISPER: dict[str, Any] = {**TINY_WHISPER, "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536, "decoder_layers": 4}
WHISPER_PREPROCESSOR: dict[str, Any] = {
    "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80, "hop_length": 160,
    "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
    "return_attention_mask": False, "sampling_rate": 16000,
}


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def build_unet(config: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config)


def build_vae(config: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(config)


def write_tiny_models(models_dir: str | os.PathLike, seed: int = 0, parsing: bool = True,
                      full_size: bool = False) -> Path:
    """Write a complete tiny ``models/`` folder (both UNet versions); returns its path. Idempotent.

    ``full_size=True`` writes the real architectures instead (850 M-parameter UNet, sd-vae-ft-mse, whisper-tiny),
    still random, v1.5 only (about 4 GB): for benchmarks of the real cost through the real loading path.
    """
    from transformers import WhisperConfig, WhisperModel

    models_dir = Path(models_dir)
    torch.manual_seed(seed)
    unet_cfg, vae_cfg, whisper_cfg = (FULL_UNET, FULL_VAE, FULL_WHISPER) if full_size else (TINY_UNET, TINY_VAE,
                                                                                            TINY_WHISPER)
    versions = ("v15",) if full_size else ("v15", "v1")
    for version in versions:  # every path below comes from the registry (musetalk.weights.registry)
        _write_json(unet_cfg, models_dir / WEIGHTS[f"unet-{version}-config"].dest)
        _save(build_unet(unet_cfg).state_dict(), models_dir / WEIGHTS[f"unet-{version}"].dest)
    _write_json(vae_cfg, models_dir / WEIGHTS["vae-config"].dest)
    _save(build_vae(vae_cfg).state_dict(), models_dir / WEIGHTS["vae"].dest)
    whisper_config = WhisperConfig(**{k: v for k, v in whisper_cfg.items() if k != "model_type"})
    whisper_dir = (models_dir / WEIGHTS["whisper-config"].dest).parent
    whisper_config.save_pretrained(whisper_dir)
    _write_json(WHISPER_PREPROCESSOR, models_dir / WEIGHTS["whisper-preprocessor"].dest)
    _save(WhisperModel(whisper_config).state_dict(), models_dir / WEIGHTS["whisper"].dest)
    if parsing:
        from musetalk.stages.parsing import BiSeNet

        _save(BiSeNet().state_dict(), models_dir / WEIGHTS["face-parse"].dest)
    marker = "RANDOM_WEIGHTS" if full_size else TINY_MARKER
    (models_dir / marker).write_text("random weights from musetalk.stages.tiny: output is noise\n")
    return models_dir


def is_tiny(models_dir: str | os.PathLike) -> bool:
    """True when the folder was written by :func:`write_tiny_models`."""
    return (Path(models_dir) / TINY_MARKER).is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m musetalk.stages.tiny", description="write tiny random weights")
    parser.add_argument("dir", type=Path, help="models folder to write (official layout)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_models(args.dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
