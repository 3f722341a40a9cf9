"""Silence: voice activity per output frame, and the plan of which frames the models generate.

Lip-sync models keep "mumbling" through pauses (the model rarely saw closed mouths in silence). This stage finds
the silent stretches with a real voice-activity detector and plans, per output video frame, how much of the
generated face to show:

  weight 1   the generated face (the UNet and the VAE decoder run)
  weight 0   the reference: the source frame itself (``source``) or a closed-mouth frame (``closed``);
             the UNet and the decoder are skipped for these frames
  0 < w < 1  a cross-fade at the edge of a silent stretch, so nothing pops

The detector is Silero VAD (MIT): its 16 kHz weights ship inside the ``silero-vad`` wheel as safetensors. The small
network is rebuilt here in torch and loaded with safetensors; the package's own code is never imported, because
it sets ``torch.set_num_threads(1)`` for the whole process at import and loads a TorchScript archive. Nothing is
downloaded. webrtcvad was the lighter alternative; Silero is kept for its accuracy on real speech (webrtcvad's
GMM calls breathing and room noise speech, which would shorten every pause).

Shapes: waveform (n,) float32 in [-1, 1], 16 kHz mono; probabilities (C,) float32, one per 512-sample chunk
(32 ms); per-frame arrays (T,) for T output frames at ``fps``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from musetalk.config import SilenceConfig
from musetalk.errors import InputError, WeightsError

SAMPLE_RATE = 16_000  # the VAD's weights are for 16 kHz (the audio stage's rate too)
CHUNK = 512  # samples per speech probability (32 ms)
CONTEXT = 64  # samples of the previous chunk each chunk also sees
BLOCK_CHUNKS = 2048  # chunks per pass through the convolutions (65 s of audio)
SPEECH_PAD_S = 0.04  # speech is widened by this at both ends: lips part before a plosive sounds and close after it
VAD_WEIGHTS = "data/silero_vad_16k.safetensors"  # inside the silero_vad package folder
INSTALL_FIX = "install the voice-activity detector: pip install silero-vad (or use --silence off)"


# -- the detector -------------------------------------------------------------------------------------------------
class SileroVAD(nn.Module):
    """Silero VAD v5, 16 kHz: a learned STFT, four 1-D convolutions, an LSTM cell over chunks, a sigmoid.

    Architecture after ``silero_vad/tinygrad_model.py`` in snakers4/silero-vad (MIT), which documents the same
    safetensors file; written anew in torch. The convolutions see each chunk on its own, so all chunks go through
    them as one batch; only the LSTM cell runs chunk after chunk.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)  # 129 bins x (real, imag)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, kernel_size=1)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "SileroVAD":
        """The model with the weights shipped in the ``silero-vad`` wheel (or the safetensors file at ``path``).

        Always CPU float32: the network has 300 k parameters and runs chunk after chunk, where a GPU would only
        add transfers; one minute of audio takes well under a second.
        """
        from musetalk.weights import load_into, load_state_dict

        file = Path(path) if path is not None else bundled_weights()
        model = cls()
        load_into(model, load_state_dict(file, fix=INSTALL_FIX), source=file, fix=INSTALL_FIX)
        return model.eval()

    @torch.inference_mode()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(n,) float32 16 kHz waveform -> (ceil(n / 512),) speech probabilities in [0, 1].

        Chunks go through the convolutions in blocks of BLOCK_CHUNKS (about a minute of audio, ~2 MB of features),
        so memory does not grow with the length of the audio.
        """
        wav = wav.to(torch.float32).flatten()
        n_chunks = max(1, math.ceil(wav.numel() / CHUNK))
        state = (torch.zeros(1, 128), torch.zeros(1, 128))
        out = []
        for first in range(0, n_chunks, BLOCK_CHUNKS):
            count = min(BLOCK_CHUNKS, n_chunks - first)
            start = first * CHUNK - CONTEXT  # each chunk also sees the 64 samples before it (zeros before the start)
            x = torch.zeros(CONTEXT + count * CHUNK, dtype=torch.float32)
            piece = wav[max(start, 0):first * CHUNK + count * CHUNK]
            x[max(-start, 0):max(-start, 0) + piece.numel()] = piece
            probs, state = self._block(x.unfold(0, CHUNK + CONTEXT, CHUNK), state)
            out.append(probs)
        return torch.cat(out)

    def _block(self, chunks: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(C, 576) chunks with their context -> (C,) probabilities, and the LSTM state after the last one."""
        h = nn.functional.pad(chunks[:, None], (0, CONTEXT), mode="reflect")
        h = self.stft_conv(h)
        h = torch.sqrt(h[:, :129] ** 2 + h[:, 129:] ** 2)  # magnitude spectrum, (C, 129, 4)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            h = torch.relu(conv(h))
        features = h[:, :, 0]  # (C, 128): the strided convolutions leave one step per chunk
        hidden = []
        for c in range(len(features)):
            state = self.lstm_cell(features[c:c + 1], state)
            hidden.append(state[0])
        out = self.final_conv(torch.relu(torch.cat(hidden))[:, :, None])
        return torch.sigmoid(out).flatten(), state


def bundled_weights() -> Path:
    """The 16 kHz safetensors file inside the installed ``silero-vad`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("silero_vad")  # locates the folder; runs none of the package's code
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        file = Path(folder) / VAD_WEIGHTS
        if file.is_file():
            return file
    raise WeightsError("the silero-vad package (voice-activity detector) is not installed", INSTALL_FIX)


def speech_probabilities(model: SileroVAD, wav: np.ndarray) -> np.ndarray:
    """(C,) float32 speech probability of each 32 ms chunk of a 16 kHz mono waveform."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise InputError(f"the VAD needs a mono waveform, got shape {wav.shape}", "load audio with load_audio()")
    return model(torch.from_numpy(wav)).numpy().astype(np.float32)


# -- per-frame decisions (pure) -------------------------------------------------------------------------------------
def frame_probabilities(chunk_probs: np.ndarray, n_frames: int, fps: float) -> np.ndarray:
    """(n_frames,) speech probability per output frame: the largest of the chunks the frame overlaps."""
    probs = np.asarray(chunk_probs, dtype=np.float32)
    out = np.zeros(n_frames, np.float32)
    for j in range(n_frames):
        first = int(j * SAMPLE_RATE / fps) // CHUNK
        last = max(first, math.ceil((j + 1) * SAMPLE_RATE / fps / CHUNK) - 1)
        window = probs[first:last + 1]
        out[j] = window.max() if window.size else 0.0  # past the end of the audio: silence
    return out


def silent_runs(silent: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True as half-open ``(start, stop)`` frame ranges, in order."""
    mask = np.concatenate([[False], np.asarray(silent, bool), [False]])
    edges = np.flatnonzero(mask[1:] != mask[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def silent_frames(frame_probs: np.ndarray, fps: float, threshold: float = 0.5, min_silence_s: float = 0.3,
                  pad_s: float = SPEECH_PAD_S) -> np.ndarray:
    """(T,) bool: frames inside a silence of at least ``min_silence_s`` seconds.

    A frame is speech when its probability reaches ``threshold``; speech is widened by ``pad_s`` at both ends,
    then quiet runs shorter than ``min_silence_s`` count as speech. Runs at the start or end of the audio
    are silence like any other.
    """
    speech = np.asarray(frame_probs) >= threshold
    pad = int(round(pad_s * fps))
    if pad > 0 and speech.any():
        widened = speech.copy()
        for k in range(1, pad + 1):
            widened[k:] |= speech[:-k]
            widened[:-k] |= speech[k:]
        speech = widened
    out = np.zeros(len(speech), bool)
    min_frames = max(1, int(math.ceil(min_silence_s * fps - 1e-9)))
    for start, stop in silent_runs(~speech):
        if stop - start >= min_frames:
            out[start:stop] = True
    return out


def generated_weights(silent: np.ndarray, fade_frames: int = 3) -> np.ndarray:
    """(T,) float32 weight of the generated face per frame: 1 in speech, 0 deep in silence, ramps between.

    Each silent run fades out over its first ``fade_frames`` frames and back in over its last ones:
    weights ``F/(F+1), ..., 1/(F+1)`` then 0, then ``1/(F+1), ..., F/(F+1)``. A run shorter than two fades gets the
    lower of both ramps. No fade where a run touches the start or end of the audio: there is nothing to fade from.
    """
    silent = np.asarray(silent, bool)
    n = len(silent)
    weights = np.ones(n, np.float32)
    for start, stop in silent_runs(silent):
        k = np.arange(start, stop)
        since_speech = (k - start + 1) if start > 0 else np.full(k.shape, np.inf)  # frames since speech stopped
        until_speech = (stop - k) if stop < n else np.full(k.shape, np.inf)  # frames until speech starts
        steps = np.minimum(since_speech, until_speech)
        weights[start:stop] = np.where(steps <= fade_frames, 1.0 - steps / (fade_frames + 1), 0.0)
    return weights


def closed_mouth_frame(openings: np.ndarray, has_face: np.ndarray) -> int:
    """Index of the face frame with the smallest mouth opening (ties: the first); raises without any face.

    openings: (S,) inner-lip gap over face scale per source frame (see :func:`mouth_openings`), NaN allowed.
    """
    o = np.where(np.asarray(has_face, bool), np.asarray(openings, np.float64), np.nan)
    if not np.isfinite(o).any():
        raise InputError("no source frame has a face to take a closed mouth from", "use --silence source or off")
    return int(np.nanargmin(o))


INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))  # iBUG-68 upper / lower inner-lip points facing each other
EYE_CORNERS = (36, 45)  # outer eye corners: a scale that does not move with the mouth


def mouth_openings(landmarks: np.ndarray) -> np.ndarray:
    """(S,) inner-lip gap over outer-eye-corner distance of (S, 68, 2) landmarks; NaN where the scale is 0.

    The same measure as ``musetalk.quality.mouth.mouth_opening`` (stages do not import the quality tools).
    """
    lm = np.asarray(landmarks, np.float64).reshape(-1, 68, 2)
    gap = np.mean([np.linalg.norm(lm[:, a] - lm[:, b], axis=-1) for a, b in INNER_LIP_PAIRS], axis=0)
    scale = np.linalg.norm(lm[:, EYE_CORNERS[0]] - lm[:, EYE_CORNERS[1]], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, gap / scale, np.nan)


@dataclass(frozen=True)
class SilencePlan:
    """Per output frame: the weight of the generated face (1 = generated only, 0 = reference only).

    ``reference_frame`` is the closed-mouth source frame in ``closed`` mode, else None (each frame's own source).
    """

    weights: np.ndarray  # (T,) float32
    silent: np.ndarray  # (T,) bool, what the VAD + minimum duration found
    frame_probs: np.ndarray  # (T,) float32 speech probability per frame
    reference_frame: int | None

    @property
    def generated(self) -> np.ndarray:
        """(T,) bool: frames whose face the models must produce (weight above 0)."""
        return self.weights > 0

    @property
    def skipped(self) -> int:
        return int((~self.generated).sum())


def plan_silence(chunk_probs: np.ndarray, n_frames: int, fps: float, config: SilenceConfig,
                 reference_frame: int | None = None) -> SilencePlan:
    """The per-frame plan from the VAD's chunk probabilities; mode ``off`` generates every frame (all weights 1).

    ``config`` is validated by ``GenerationConfig.validate``; ``reference_frame`` is kept in ``closed`` mode only.
    """
    probs = frame_probabilities(chunk_probs, n_frames, fps)
    if config.silence == "off":
        return SilencePlan(np.ones(n_frames, np.float32), np.zeros(n_frames, bool), probs, None)
    silent = silent_frames(probs, fps, config.silence_threshold, config.silence_min_s)
    weights = generated_weights(silent, config.silence_fade)
    return SilencePlan(weights, silent, probs, reference_frame if config.silence == "closed" else None)


def mix(generated: np.ndarray, reference: np.ndarray, weight: float) -> np.ndarray:
    """``weight * generated + (1 - weight) * reference`` of two (H, W, 3) uint8 frames, rounded to uint8.

    Weight 1 returns ``generated`` itself and 0 ``reference`` itself, so both ends are exact.
    """
    if weight >= 1.0:
        return generated
    if weight <= 0.0:
        return reference
    out = weight * generated.astype(np.float32) + (1.0 - weight) * reference.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
