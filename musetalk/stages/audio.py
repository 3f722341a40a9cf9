"""Audio stage: any audio file -> 16 kHz mono -> Whisper encoder states -> per-video-frame windows.

Shapes (v1 and v1.5 alike):
  waveform           (n,) float32 in [-1, 1], 16 kHz mono
  mel segment        (1, 80, 3000) float32 Whisper log-mel, one per 30 s of audio (padded)
  encoder states     (1, T, 5, 384): embedding output + 4 layers of whisper-tiny, stacked on axis 2
  per-frame windows  (N, 50, 384) float32: 10 encoder steps x 5 layers, time-major, before positional encoding
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from musetalk.errors import InputError, WeightsError
from musetalk.weights import DOWNLOAD_HINT, find_weights_file, load_model

if TYPE_CHECKING:
    from transformers import WhisperFeatureExtractor

SAMPLE_RATE = 16_000
SEGMENT_SECONDS = 30
SEGMENT_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE  # 480 000: Whisper's fixed input length
WHISPER_FPS = 50  # encoder steps per second (3000 mel frames / 2 conv stride / 30 s)
WHISPER_DIM = 384  # whisper-tiny d_model
PAD_LEFT = PAD_RIGHT = 2  # the reference's audio_padding_length_left/right
STEPS_PER_FRAME = 2 * (PAD_LEFT + PAD_RIGHT + 1)  # 10 encoder steps per video frame
WINDOW_TOKENS = STEPS_PER_FRAME * 5  # 50 = 10 steps x 5 hidden states


@dataclass(frozen=True)
class AudioConfig:
    """How audio is turned into per-frame conditioning."""

    fps: float = 25.0  # video frame rate the windows are cut for
    pad_left: int = PAD_LEFT  # reference audio_padding_length_left
    pad_right: int = PAD_RIGHT  # reference audio_padding_length_right


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """Decode any audio (or the audio track of a video) PyAV/ffmpeg can read to 16 kHz mono float32.

    Channels are averaged (as librosa does); other rates are resampled with a polyphase filter.
    Raises InputError for a missing file, a file with no audio stream, or undecodable data.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise InputError(f"audio file not found: {path}", "check the --audio path")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"{path} has no audio stream", "pass a file with speech (wav, mp3, m4a, flac, ...)")
            stream = container.streams.audio[0]
            chunks: list[np.ndarray] = []
            rate = None
            for frame in container.decode(stream):
                rate = frame.sample_rate
                data = frame.to_ndarray()
                if data.dtype.kind in "iu":  # integer PCM -> [-1, 1) like libsndfile/librosa
                    data = data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
                data = data.astype(np.float32)
                if frame.format.is_planar:
                    data = data.reshape(len(frame.layout.channels), -1)
                else:  # packed: (1, samples * channels)
                    data = data.reshape(-1, len(frame.layout.channels)).T
                chunks.append(data.mean(axis=0))
    except InputError:
        raise
    except Exception as exc:  # av.error.*: not a media file, truncated, ...
        raise InputError(f"cannot decode audio from {path} ({type(exc).__name__}: {exc})",
                         "pass a readable audio file (wav, mp3, m4a, flac, ogg) or a video with an audio track") from None
    if not chunks or rate is None:
        raise InputError(f"{path} holds no audio samples", "pass a non-empty audio file")
    wav = np.concatenate(chunks)
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        ratio = Fraction(SAMPLE_RATE, rate)
        wav = resample_poly(wav, ratio.numerator, ratio.denominator).astype(np.float32)
    return np.ascontiguousarray(wav, dtype=np.float32)


def check_speech(wav: np.ndarray, fps: float, source: str = "audio") -> None:
    """Refuse audio that cannot drive a video: shorter than one frame, or digital silence."""
    if num_video_frames(len(wav), fps) < 1:
        raise InputError(f"{source} is {len(wav) / SAMPLE_RATE:.3f} s long, shorter than one video frame at {fps:g} fps",
                         "use a longer audio clip")
    if not np.any(np.abs(wav) > 1e-4):
        raise InputError(f"{source} is silent (all samples are zero)", "pass audio with speech in it")


def num_video_frames(n_samples: int, fps: float) -> int:
    """Number of output frames for n samples at fps: floor(n / 16000 * fps) (the reference rule)."""
    return int(math.floor(n_samples / SAMPLE_RATE * fps))


def split_segments(wav: np.ndarray) -> list[np.ndarray]:
    """Cut the waveform into 30 s segments (the last one shorter); each becomes one mel input."""
    return [wav[i:i + SEGMENT_SAMPLES] for i in range(0, len(wav), SEGMENT_SAMPLES)]


def stack_hidden_states(hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(embedding output, layer 1..L) each (1, T, 384) -> (1, T, L+1, 384)."""
    return torch.stack(hidden_states, dim=2)


def frame_windows(encoder_states: torch.Tensor | np.ndarray, n_samples: int, config: AudioConfig = AudioConfig()
                  ) -> np.ndarray:
    """Per-video-frame audio windows, exactly as the reference cuts them.

    encoder_states: (1, T, 5, 384) (segments concatenated on T). Returns (N, 50, 384) float32, N =
    floor(n / 16000 * fps). Steps are trimmed to floor(n / 16000 * 50), zero-padded by p * pad_left before
    and p * 3 * pad_right after (p = ceil(50 / fps)); frame i takes steps [floor(i * 50 / fps), +10).
    """
    states = np.asarray(encoder_states.float().cpu() if isinstance(encoder_states, torch.Tensor) else encoder_states,
                        dtype=np.float32)
    step = WHISPER_FPS / config.fps
    pad = math.ceil(step)
    length = int(math.floor(n_samples / SAMPLE_RATE * WHISPER_FPS))
    states = states[:, :length]
    before = np.zeros((1, pad * config.pad_left) + states.shape[2:], dtype=np.float32)
    after = np.zeros((1, pad * 3 * config.pad_right) + states.shape[2:], dtype=np.float32)
    padded = np.concatenate([before, states, after], axis=1)[0]  # (T', 5, 384)
    n_frames = num_video_frames(n_samples, config.fps)
    per_frame = 2 * (config.pad_left + config.pad_right + 1)
    out = np.empty((n_frames, per_frame * padded.shape[1], padded.shape[2]), dtype=np.float32)
    for i in range(n_frames):
        start = int(math.floor(i * step))
        window = padded[start:start + per_frame]
        if window.shape[0] != per_frame:  # cannot happen with the reference padding; guard against odd fps
            window = np.concatenate([window, np.zeros((per_frame - window.shape[0],) + window.shape[1:], np.float32)])
        out[i] = window.reshape(-1, padded.shape[2])
    return out


def positional_encoding(length: int = WINDOW_TOKENS, d_model: int = WHISPER_DIM) -> torch.Tensor:
    """Sinusoidal encoding (length, d_model): pe[p, 2k] = sin(p / 10000^(2k/d)), pe[p, 2k+1] = cos(same)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def add_positional_encoding(windows: torch.Tensor) -> torch.Tensor:
    """(B, 50, 384) windows + the sinusoidal encoding (the reference PositionalEncoding module, no dropout)."""
    pe = positional_encoding(windows.shape[1], windows.shape[2]).to(windows.device, windows.dtype)
    return windows + pe.unsqueeze(0)


class AudioEncoder:
    """Whisper feature extractor + encoder, built once from ``models/whisper`` (HF whisper-tiny layout)."""

    def __init__(self, feature_extractor: WhisperFeatureExtractor, encoder: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.feature_extractor = feature_extractor
        self.encoder = encoder
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, whisper_dir: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "AudioEncoder":
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        whisper_dir = Path(whisper_dir)
        for name in ("config.json", "preprocessor_config.json"):
            if not (whisper_dir / name).is_file():
                raise WeightsError(f"{whisper_dir / name} is missing", DOWNLOAD_HINT.format(models=whisper_dir.parent))
        weights_path = _whisper_weights(whisper_dir)
        config = WhisperConfig.from_pretrained(whisper_dir)
        extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir)
        # only the encoder is built; the decoder's tensors in the file are mapped, never read
        encoder = load_model(lambda: WhisperEncoder(config), weights_path, device=device, dtype=dtype,
                             convert=_encoder_keys, fix=DOWNLOAD_HINT.format(models=whisper_dir.parent))
        return cls(extractor, encoder, torch.device(device), dtype)

    def mel_segments(self, wav: np.ndarray) -> list[np.ndarray]:
        """One (1, 80, 3000) float32 log-mel per 30 s segment."""
        return [self.feature_extractor(seg, return_tensors="np", sampling_rate=SAMPLE_RATE).input_features
                .astype(np.float32) for seg in split_segments(wav)]

    @torch.inference_mode()
    def encode(self, mel: np.ndarray) -> torch.Tensor:
        """(1, 80, 3000) log-mel -> (1, 1500, 5, 384) float32 stacked hidden states, on the CPU."""
        features = torch.from_numpy(mel).to(self.device, self.dtype)
        hidden = self.encoder(features, output_hidden_states=True).hidden_states
        return stack_hidden_states(hidden).float().cpu()

    def windows(self, wav: np.ndarray, config: AudioConfig = AudioConfig()) -> np.ndarray:
        """Waveform -> (N, 50, 384) per-frame windows (all 30 s segments encoded, then cut)."""
        states = torch.cat([self.encode(mel) for mel in self.mel_segments(wav)], dim=1)
        return frame_windows(states, len(wav), config)


def iter_frame_windows(encoder: AudioEncoder, wav: np.ndarray, config: AudioConfig = AudioConfig()
                       ) -> Iterator[np.ndarray]:
    """Streaming form of ``encoder.windows``: yields each frame's (50, 384) window in order.

    30 s segments are encoded only when a window first needs them and dropped once passed, so memory stays
    bounded (two segments of encoder states, ~23 MB) however long the audio is. Values equal ``windows()``.
    """
    step = WHISPER_FPS / config.fps
    lead = math.ceil(step) * config.pad_left  # zero steps the reference pads in front
    length = int(math.floor(len(wav) / SAMPLE_RATE * WHISPER_FPS))
    per_frame = 2 * (config.pad_left + config.pad_right + 1)
    steps_per_segment = SEGMENT_SECONDS * WHISPER_FPS
    segments: dict[int, np.ndarray] = {}

    def state(t: int) -> np.ndarray | None:
        if t < 0 or t >= length:
            return None
        k = t // steps_per_segment
        if k not in segments:
            for old in [j for j in segments if j < k - 1]:  # a window may still straddle k-1 | k
                del segments[old]
            seg = wav[k * SEGMENT_SAMPLES:(k + 1) * SEGMENT_SAMPLES]
            mel = encoder.feature_extractor(seg, return_tensors="np", sampling_rate=SAMPLE_RATE).input_features
            segments[k] = encoder.encode(mel.astype(np.float32))[0].numpy()  # (1500, 5, 384)
        return segments[k][t % steps_per_segment]

    for i in range(num_video_frames(len(wav), config.fps)):
        start = int(math.floor(i * step)) - lead
        window = np.zeros((per_frame, 5, WHISPER_DIM), dtype=np.float32)
        for j in range(per_frame):
            value = state(start + j)
            if value is not None:
                window[j] = value
        yield window.reshape(-1, WHISPER_DIM)


def _whisper_weights(whisper_dir: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (whisper_dir / name).is_file():
            return whisper_dir / name
    return find_weights_file(whisper_dir, "pytorch_model")  # raises the missing-file error


def _encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the encoder's weights from a WhisperModel or WhisperForConditionalGeneration state dict."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("model.")
        if key.startswith("encoder."):
            out[key.removeprefix("encoder.")] = value
    return out
