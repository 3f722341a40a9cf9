"""Verifier for MuseTalk golden sets (``golden.npz`` + ``manifest.json`` + ``models/`` + ``inputs/``).

Each stage is fed the golden *input* of that stage and its output compared with the golden output; the
chained run then goes from the set's audio, frames and landmarks to blended frames using only our own
intermediate results. Tolerances (float32, CPU) are those of shared/golden/README.md.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from musetalk.testing.golden_common import StageResult, exact, frac_within, guarded, max_abs
from musetalk.weights.registry import WEIGHTS

TOL_AUDIO = 1e-4  # mel, audio windows, positional encoding, latents: max abs
TOL_UNET = 1e-3
TOL_DECODE_LEVELS = 1  # decoded faces: max abs grey levels
MASK_EQUAL = 0.995  # parsing masks: fraction of equal pixels
BLEND_LEVELS, BLEND_FRACTION = 2, 0.995  # blended frames: fraction within 2 grey levels
CROP_LEVELS, CROP_FRACTION = 2, 0.995


class _Set:
    """A golden set opened lazily: manifest parameters, arrays and the models built from its own files."""

    def __init__(self, set_dir: Path, backend: str = "torch") -> None:
        self.dir = set_dir
        self.backend = backend  # torch | mlx: which implementation runs the UNet and the VAE
        self.manifest = json.loads((set_dir / "manifest.json").read_text())
        self.g = np.load(set_dir / "golden.npz")
        inputs = self.manifest.get("inputs", {})
        self.version = self.manifest.get("version", "v15")
        self.bbox_shift = int(inputs.get("bbox_shift", 0))
        self.extra_margin = int(inputs.get("extra_margin", 10 if self.version == "v15" else 0))
        self.n_unet = int(inputs.get("frames_used_for_unet", len(self.g["unet_input_latents"])))
        self.cheek = int(self.manifest.get("cheek_widths", 90 if self.version == "v15" else 80))
        unet_file = self.manifest.get("unet_file", WEIGHTS[f"unet-{self.version}"].dest)
        self.unet_weights = set_dir / "models" / unet_file
        self.unet_config = self.unet_weights.parent / "musetalk.json"
        audio_rel = str(inputs.get("audio", "inputs/speech.wav")).split()[0]
        self.audio_path = set_dir / audio_rel
        self._cache: dict[str, object] = {}

    def model(self, name: str):
        if name not in self._cache:
            models = self.dir / "models"
            if name == "audio":
                from musetalk.stages.audio import AudioEncoder
                self._cache[name] = AudioEncoder.from_pretrained(models / "whisper")
            elif name == "vae" and self.backend == "mlx":
                from musetalk.stages.mlx.vae import MLXVAE
                self._cache[name] = MLXVAE.from_pretrained(models / "sd-vae", cache=False)  # goldens stay read-only
            elif name == "unet" and self.backend == "mlx":
                from musetalk.stages.mlx.unet import MLXUNet
                self._cache[name] = MLXUNet.from_pretrained(self.unet_config, self.unet_weights, cache=False)
            elif name == "vae":
                from musetalk.stages.vae import VAE
                self._cache[name] = VAE.from_pretrained(models / "sd-vae")
            elif name == "unet":
                from musetalk.stages.unet import UNet
                self._cache[name] = UNet.from_pretrained(self.unet_config, self.unet_weights)
            elif name == "parser":
                from musetalk.stages.parsing import FaceParser
                self._cache[name] = FaceParser.from_pretrained(models / WEIGHTS["face-parse"].dest)
        return self._cache[name]

    def face_box(self, coord: np.ndarray, frame_height: int) -> tuple[int, int, int, int]:
        from musetalk.stages.faces.crop import apply_extra_margin
        x1, y1, x2, y2 = (int(v) for v in coord)
        box = (x1, y1, x2, y2)
        return apply_extra_margin(box, self.extra_margin, frame_height) if self.extra_margin else box

    @property
    def unet_fps(self) -> float:
        """The fps whose windows condition the UNet stage: 25 (the reference default) when the set has it."""
        keys = sorted(k for k in self.g.files if k.startswith("audio_windows_fps"))
        key = "audio_windows_fps25" if "audio_windows_fps25" in keys else keys[0]
        return float(key.removeprefix("audio_windows_fps"))

    @property
    def unet_windows(self) -> np.ndarray:
        return self.g[f"audio_windows_fps{self.unet_fps:g}"][: self.n_unet]

    def blend_modes(self) -> list[str]:
        return [m for m in ("raw", "jaw", "neck") if f"blended_{m}" in self.g.files]


def _audio_stages(s: _Set) -> list[StageResult]:
    from musetalk.stages.audio import AudioConfig, add_positional_encoding, load_audio

    wav = load_audio(s.audio_path)
    enc = s.model("audio")
    rows = [exact("audio: n_samples", np.int64(len(wav)), s.g["n_samples"])]
    mels = np.stack([m[0] for m in enc.mel_segments(wav)])
    rows.append(max_abs("audio: whisper log-mel segments", mels, s.g["mel_segments"], TOL_AUDIO))
    for key in sorted(k for k in s.g.files if k.startswith("audio_windows_fps")):
        fps = float(key.removeprefix("audio_windows_fps"))
        rows.append(max_abs(f"audio: windows @ {fps:g} fps", enc.windows(wav, AudioConfig(fps=fps)), s.g[key], TOL_AUDIO))
    windows = torch.from_numpy(s.unet_windows)
    rows.append(max_abs("audio: + positional encoding", add_positional_encoding(windows).numpy(),
                        s.g["audio_cond_with_pe"], TOL_AUDIO))
    return rows


def _face_stages(s: _Set) -> list[StageResult]:
    from musetalk.stages.faces.crop import crop_box, crop_face

    frames, lms = s.g["frames"], s.g["landmarks68"]
    coords = np.array([crop_box(lm, s.bbox_shift) for lm in lms], dtype=np.int64)
    rows = [exact(f"faces: crop boxes (bbox_shift {s.bbox_shift})", coords, s.g["coords"])]
    crops = np.stack([crop_face(f, s.face_box(c, f.shape[0])) for f, c in zip(frames, s.g["coords"])])
    rows.append(frac_within("faces: 256x256 Lanczos crops", crops, s.g["crops256"], CROP_LEVELS, CROP_FRACTION))
    return rows


def _model_stages(s: _Set) -> list[StageResult]:
    vae, unet = s.model("vae"), s.model("unet")
    rows = [max_abs("vae: 8-channel UNet input latents", vae.unet_input(s.g["crops256"]).numpy(),
                    s.g["unet_input_latents"], TOL_AUDIO)]
    out = unet(torch.from_numpy(s.g["unet_input_latents"]), torch.from_numpy(s.unet_windows))
    rows.append(max_abs("unet: one step at t=0", out.float().numpy(), s.g["unet_output_latents"], TOL_UNET))
    decoded = vae.decode(torch.from_numpy(s.g["unet_output_latents"]))
    rows.append(max_abs("vae: decoded faces (grey levels)", decoded, s.g["decoded_faces_bgr"], TOL_DECODE_LEVELS))
    return rows


def _parsing_stages(s: _Set) -> list[StageResult]:
    from musetalk.stages.parsing import face_mask

    parser = s.model("parser")
    frame0_rgb = s.g["frames"][0][..., ::-1]
    parsing = parser.parse(frame0_rgb)
    rows = []
    for key in sorted(k for k in s.g.files if k.startswith("parsing_") and k.endswith("_frame0")):
        mode = key.removeprefix("parsing_").removesuffix("_frame0")
        mask = face_mask(parsing, mode, s.cheek, s.cheek)
        rows.append(frac_within(f"parsing: {mode} mask (frame 0)", mask, s.g[key], 0, MASK_EQUAL))
    return rows


def _blend(s: _Set, faces: np.ndarray, coords: np.ndarray, mode: str, cached: bool) -> np.ndarray:
    from musetalk.config import BLUR_FACTOR_IMAGE, BLUR_FACTOR_REALTIME, BlendConfig
    from musetalk.stages.blending import blend_face, blend_with_material, prepare_blend_material

    parser = s.model("parser")
    # the reference's get_image (blur 0.05) and get_image_prepare_material (blur 0.1), as the goldens ran them
    config = BlendConfig(parsing_mode=mode, left_cheek_width=s.cheek, right_cheek_width=s.cheek,
                         blur_factor=BLUR_FACTOR_REALTIME if cached else BLUR_FACTOR_IMAGE)
    out = []
    for frame, face, coord in zip(s.g["frames"], faces, coords):
        box = s.face_box(coord, frame.shape[0])
        if cached:
            material = prepare_blend_material(frame, box, parser, config)
            out.append(blend_with_material(frame, face, box, material))
        else:
            out.append(blend_face(frame, face, box, parser, config))
    return np.stack(out)


def _blend_stages(s: _Set) -> list[StageResult]:
    n = s.n_unet
    faces, coords = s.g["decoded_faces_bgr"], s.g["coords"][:n]
    rows = [frac_within(f"blending: {mode} (get_image)", _blend(s, faces, coords, mode, cached=False),
                        s.g[f"blended_{mode}"], BLEND_LEVELS, BLEND_FRACTION) for mode in s.blend_modes()]
    for key in sorted(k for k in s.g.files if k.startswith("blended_realtime_")):
        mode = key.removeprefix("blended_realtime_")
        rows.append(frac_within(f"blending: {mode} (cached mask)", _blend(s, faces, coords, mode, cached=True),
                                s.g[key], BLEND_LEVELS, BLEND_FRACTION))
    return rows


def _chained(s: _Set) -> list[StageResult]:
    """Audio file + frames + landmarks -> blended frames, using only our own intermediate results."""
    from musetalk.stages.audio import AudioConfig, load_audio
    from musetalk.stages.faces.crop import crop_box, crop_face

    n = s.n_unet
    frames = s.g["frames"][:n]
    coords = np.array([crop_box(lm, s.bbox_shift) for lm in s.g["landmarks68"][:n]], dtype=np.int64)
    crops = np.stack([crop_face(f, s.face_box(c, f.shape[0])) for f, c in zip(frames, coords)])
    windows = s.model("audio").windows(load_audio(s.audio_path), AudioConfig(fps=s.unet_fps))[:n]
    latents = s.model("unet")(s.model("vae").unet_input(crops), torch.from_numpy(windows))
    faces = s.model("vae").decode(latents)
    rows = [frac_within("chained: decoded faces", faces, s.g["decoded_faces_bgr"], BLEND_LEVELS, BLEND_FRACTION)]
    for mode in s.blend_modes():
        rows.append(frac_within(f"chained: blended {mode}", _blend(s, faces, coords, mode, cached=False),
                                s.g[f"blended_{mode}"], BLEND_LEVELS, BLEND_FRACTION))
    return rows


STAGE_GROUPS = ("audio", "faces", "models", "parsing", "blending", "chained")


def verify(set_dir: Path, backend: str = "torch", groups: Iterable[str] | None = None) -> list[StageResult]:
    """Run the stages of a MuseTalk golden set; one StageResult per compared array.

    ``backend="mlx"`` runs the UNet and the VAE (model stages and the chained run) on MLX, same tolerances.
    ``groups``: a subset of :data:`STAGE_GROUPS` (default all), e.g. ("models", "chained"): the
    groups that run the UNet and the VAE, for a backend check.
    """
    wanted = tuple(groups) if groups is not None else STAGE_GROUPS
    unknown = sorted(set(wanted) - set(STAGE_GROUPS))
    if unknown:
        raise ValueError(f"unknown stage groups {unknown}; known: {', '.join(STAGE_GROUPS)}")
    torch.manual_seed(0)
    s = _Set(Path(set_dir), backend)
    rows: list[StageResult] = []
    for name, fn in (("audio", _audio_stages), ("faces", _face_stages), ("models", _model_stages),
                     ("parsing", _parsing_stages), ("blending", _blend_stages), ("chained", _chained)):
        if name in wanted:
            rows += guarded(name, functools.partial(fn, s))
    return rows
