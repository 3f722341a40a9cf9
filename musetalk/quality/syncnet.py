"""SyncNet (Chung & Zisserman, "Out of time", 2016) and the LSE-D / LSE-C lip-sync scores.

Faithful to joonson/syncnet_python (``SyncNetModel.py`` and ``SyncNetInstance.evaluate``, MIT licence):
the same network with the same parameter names, so the official ``syncnet_v2.model`` state dict loads as is,
and the same scoring arithmetic. Written anew for this package (no code copied).

Scoring, as the reference does it:

1. lips: windows of 5 consecutive 224x224 BGR frames, raw 0..255 values, start at every frame
   ``0 .. n - 6`` with ``n = min(frames, samples // 640)`` (so ``n - 5`` windows; the reference leaves the last
   possible window out and so do we);
2. audio: MFCC (13 x 100 Hz, :mod:`musetalk.quality.mfcc`) windows of 20 frames starting at ``4 * frame``;
3. each lip embedding is compared with the audio embeddings of frames ``i - vshift .. i + vshift``
   (zero vectors beyond the ends) by Euclidean distance;
4. the distance curve is the mean over frames per shift: LSE-D is its minimum, LSE-C its median minus its
   minimum, and the AV offset ``vshift - argmin``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from scipy import signal as scipy_signal
from torch import nn

from musetalk.errors import InputError
from musetalk.weights import load_state_dict, load_into

FPS = 25  # SyncNet's video rate: one lip window step = 40 ms
SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps
LIP_WINDOW = 5  # frames per lip window
AUDIO_WINDOW = 20  # MFCC frames per audio window (= 5 video frames)
CROP_SIZE = 224  # face crop side the lip stream expects
VSHIFT = 15  # offsets searched: -15..15 frames (run_syncnet.py default)
BATCH_SIZE = 20  # windows per forward pass (run_syncnet.py default)
CONF_MEDFILT = 9  # kernel of the median filter on the per-frame confidence
EMBED_DIM = 1024  # num_layers_in_fc_layers of the official checkpoint
SYNCNET_FIX = ("use the official syncnet_v2.model from joonson/syncnet_python "
               "(http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model)")


def _fc(embed_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))


class SyncNet(nn.Module):
    """The two-stream SyncNet ``S`` network; attribute names match the official state dict.

    ``forward_audio``: (N, 1, 13, 20) MFCC windows -> (N, D).
    ``forward_lips``: (B, 3, T, 224, 224) float BGR 0..255 frames -> (B * (T - 4), D), one embedding per
    window of 5 frames (the temporal kernel is 5 in the first layer and 1 after it, so a clip of T frames is
    T - 4 windows at once, without copying each frame five times as the reference's batches do).
    """

    def __init__(self, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.embed_dim = embed_dim  # D, the width of both streams' embeddings
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731 - keeps the layer lists readable
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, 3, 1, 1), nn.BatchNorm2d(64), relu(), nn.MaxPool2d(1, 1),
            nn.Conv2d(64, 192, 3, 1, 1), nn.BatchNorm2d(192), relu(), nn.MaxPool2d(3, (1, 2)),
            nn.Conv2d(192, 384, 3, padding=1), nn.BatchNorm2d(384), relu(),
            nn.Conv2d(384, 256, 3, padding=1), nn.BatchNorm2d(256), relu(),
            nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), relu(), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 512, (5, 4)), nn.BatchNorm2d(512), nn.ReLU(),
        )
        self.netfcaud = _fc(embed_dim)
        self.netfclip = _fc(embed_dim)
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2)), nn.BatchNorm3d(96), relu(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), nn.BatchNorm3d(256), relu(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), relu(),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), relu(),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), relu(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(256, 512, (1, 6, 6)), nn.BatchNorm3d(512), relu(),
        )

    def forward_audio(self, mfcc_windows: torch.Tensor) -> torch.Tensor:
        """(N, 1, 13, 20) float MFCC windows -> (N, D) audio embeddings."""
        mid = self.netcnnaud(mfcc_windows)  # (N, 512, 1, 1)
        return self.netfcaud(mid.flatten(1))

    def forward_lips(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, 224, 224) float BGR 0..255 -> (B * (T - 4), D) lip embeddings, clip-major."""
        if tuple(clips.shape[-2:]) != (CROP_SIZE, CROP_SIZE):
            raise InputError(f"SyncNet needs {CROP_SIZE}x{CROP_SIZE} face crops, got {tuple(clips.shape[-2:])}",
                             "crop the face first (crop='s3fd' or 'landmarks') or resize the frames")
        mid = self.netcnnlip(clips)  # (B, 512, T - 4, 1, 1)
        return self.netfclip(mid.flatten(2).transpose(1, 2).flatten(0, 1))


def load_syncnet(path: str | os.PathLike, device: torch.device | str = "cpu") -> SyncNet:
    """Build :class:`SyncNet` and strictly load the official ``syncnet_v2.model`` state dict (float32, eval mode).

    The embedding size is read from the file. A file of another network (e.g. Wav2Lip's or LatentSync's
    SyncNet) raises :class:`~musetalk.errors.WeightsError` with the mismatching keys.
    """
    state = load_state_dict(path, fix=SYNCNET_FIX)
    last = state.get("netfcaud.3.weight")
    net = SyncNet(embed_dim=int(last.shape[0]) if last is not None and last.ndim == 2 else EMBED_DIM)
    own = net.state_dict()
    # BatchNorm's num_batches_tracked counters are training bookkeeping (unused in eval); checkpoints saved
    # before torch 0.4.1 lack them, and the reference loader copies only the keys the file has.
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state}, **state}
    load_into(net, state, source=path, fix=SYNCNET_FIX)
    return net.to(torch.device(device)).eval()


@dataclass(frozen=True)
class SyncScore:
    """Scores of one face track against one audio track (all from ``SyncNetInstance.evaluate``).

    lse_d: LSE-D, the minimum of ``mean_dists`` (lower = better sync).
    lse_c: LSE-C, ``median(mean_dists) - min(mean_dists)`` (higher = more confident sync).
    offset: AV offset in frames, ``vshift - argmin(mean_dists)``: lip window i matches audio window i - offset.
    dists: (N, 2 * vshift + 1) float32 distance of lip window i to audio window i + k - vshift.
    mean_dists: (2 * vshift + 1,) float32, the distance curve over offsets (mean over windows).
    frame_confidence: (N,) float32, ``median(mean_dists) - dists[:, argmin]`` median-filtered (kernel 9).
    """

    lse_d: float
    lse_c: float
    offset: int
    dists: np.ndarray
    mean_dists: np.ndarray
    frame_confidence: np.ndarray


def num_windows(n_frames: int, n_samples: int) -> int:
    """Number of scored windows: ``min(frames, samples // 640) - 5`` (the reference's ``lastframe``)."""
    return min(n_frames, n_samples // SAMPLES_PER_FRAME) - LIP_WINDOW


def check_lengths(n_frames: int, n_samples: int) -> int:
    """:func:`num_windows`, raising :class:`InputError` when the clip gives no window at all."""
    n = num_windows(n_frames, n_samples)
    if n < 1:
        raise InputError(
            f"clip too short for SyncNet: {n_frames} frames and {n_samples / SAMPLE_RATE:.2f} s of audio give "
            f"{max(n, 0)} windows of {LIP_WINDOW} frames",
            f"use a clip of at least {LIP_WINDOW + 1} frames ({(LIP_WINDOW + 1) / FPS:.2f} s at {FPS} fps) "
            "with audio over the same span")
    return n


def audio_windows(mfcc_feat: np.ndarray, n: int) -> np.ndarray:
    """(n, 1, 13, 20) float32 windows of an (M, 13) MFCC: window i covers MFCC frames 4i .. 4i + 19."""
    starts = MFCC_PER_FRAME * np.arange(n)
    idx = starts[:, None] + np.arange(AUDIO_WINDOW)[None, :]
    if n and idx[-1, -1] >= len(mfcc_feat):
        raise InputError(f"audio too short for {n} windows ({len(mfcc_feat)} MFCC frames)",
                         "give audio as long as the video")
    return mfcc_feat.astype(np.float32)[idx].transpose(0, 2, 1)[:, None]


def sync_scores(lip_emb: torch.Tensor | np.ndarray, aud_emb: torch.Tensor | np.ndarray, vshift: int = VSHIFT,
                chunk: int = 512) -> SyncScore:
    """Distances over offsets and the LSE scores from paired embeddings (N, D) and (N, D).

    Pure arithmetic, as ``calc_pdist`` + ``evaluate``: the audio embeddings are zero-padded by ``vshift``
    rows at both ends and ``pairwise_distance`` (which adds eps 1e-6 to the difference) is taken against the
    2 * vshift + 1 neighbours. Works in chunks of ``chunk`` windows so long videos stay small in memory.
    """
    lip = torch.as_tensor(lip_emb, dtype=torch.float32).cpu()
    aud = torch.as_tensor(aud_emb, dtype=torch.float32).cpu()
    if lip.ndim != 2 or lip.shape != aud.shape or len(lip) == 0:
        raise ValueError(f"need two (N, D) embedding arrays of one shape, N >= 1; got {tuple(lip.shape)} "
                         f"and {tuple(aud.shape)}")
    width = 2 * vshift + 1
    padded = torch.nn.functional.pad(aud, (0, 0, vshift, vshift))
    rows = []
    for s in range(0, len(lip), chunk):
        e = min(s + chunk, len(lip))
        neigh = padded[s:e + width - 1].unfold(0, width, 1).transpose(1, 2)  # (n, width, D)
        rows.append(torch.nn.functional.pairwise_distance(lip[s:e, None, :], neigh))
    dists = torch.cat(rows)  # (N, width)
    mean_dists = dists.mean(0)
    min_val, min_idx = torch.min(mean_dists, 0)
    median = torch.median(mean_dists)  # odd length: the middle value, as the reference
    frame_conf = (median - dists[:, min_idx]).numpy()
    with warnings.catch_warnings():  # fewer than 9 windows: medfilt zero-pads, as in the reference, and says so
        warnings.simplefilter("ignore", UserWarning)
        frame_conf = scipy_signal.medfilt(frame_conf, kernel_size=CONF_MEDFILT).astype(np.float32)
    return SyncScore(
        lse_d=float(min_val), lse_c=float(median - min_val), offset=int(vshift - int(min_idx)),
        dists=dists.numpy(), mean_dists=mean_dists.numpy(),
        frame_confidence=frame_conf)


class SyncNetScorer:
    """A loaded SyncNet on one device: embeds lips and audio in batches and scores them.

    >>> scorer = SyncNetScorer.from_pretrained("models/syncnet/syncnet_v2.model", device="auto")
    >>> score = scorer.score(frames_bgr, audio_int16)     # frames: iterable of (224, 224, 3) uint8 BGR
    """

    def __init__(self, net: SyncNet, batch_size: int = BATCH_SIZE) -> None:
        self.net = net.eval()
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "auto",
                        batch_size: int = BATCH_SIZE) -> "SyncNetScorer":
        """Load ``syncnet_v2.model`` onto ``device`` (``auto``: cuda > mps > cpu)."""
        from musetalk.devices import resolve_device

        return cls(load_syncnet(path, resolve_device(device)), batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def embed_audio(self, audio: np.ndarray, n: int | None = None) -> torch.Tensor:
        """(n, D) float32 CPU audio embeddings of 16 kHz mono samples (int16 scale) for windows 0..n-1.

        ``n`` defaults to every window the audio holds (``samples // 640 - 5``).
        """
        from musetalk.quality.mfcc import mfcc

        audio = np.asarray(audio)
        if n is None:
            n = len(audio) // SAMPLES_PER_FRAME - LIP_WINDOW
        windows = audio_windows(mfcc(audio, SAMPLE_RATE), n)
        out = [self.net.forward_audio(torch.from_numpy(windows[s:s + self.batch_size]).to(self.device)).float().cpu()
               for s in range(0, n, self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.net.embed_dim)

    @torch.inference_mode()
    def iter_lip_embeddings(self, frames: Iterable[np.ndarray]) -> Iterator[torch.Tensor]:
        """Stream (k, D) float32 CPU lip embeddings from (224, 224, 3) uint8 BGR frames, ``batch_size`` at a time.

        Holds at most ``batch_size + 4`` frames: consecutive batches overlap by the 4 frames two windows share.
        """
        buf: list[np.ndarray] = []
        for frame in frames:
            buf.append(frame)
            if len(buf) == self.batch_size + LIP_WINDOW - 1:
                yield self._embed_clip(buf)
                buf = buf[-(LIP_WINDOW - 1):]
        if len(buf) >= LIP_WINDOW:
            yield self._embed_clip(buf)

    def _embed_clip(self, frames: list[np.ndarray]) -> torch.Tensor:
        clip = torch.from_numpy(np.stack(frames)).to(self.device)  # (T, H, W, 3) uint8 BGR
        clip = clip.permute(3, 0, 1, 2).unsqueeze(0).float()  # (1, 3, T, H, W), 0..255 as the reference
        return self.net.forward_lips(clip).float().cpu()

    def embed_lips(self, frames: Iterable[np.ndarray]) -> torch.Tensor:
        """(T - 4, D) lip embeddings of every window of a frame sequence (see :meth:`iter_lip_embeddings`)."""
        chunks = list(self.iter_lip_embeddings(frames))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.net.embed_dim)

    def score(self, frames: Iterable[np.ndarray], audio: np.ndarray, vshift: int = VSHIFT) -> SyncScore:
        """LSE-D / LSE-C / offset of 25 fps face crops against 16 kHz mono audio (int16 scale)."""
        count = [0]

        def counted() -> Iterator[np.ndarray]:
            for frame in frames:
                count[0] += 1
                yield frame

        lips = self.embed_lips(counted())
        n = check_lengths(count[0], len(audio))
        return sync_scores(lips[:n], self.embed_audio(audio, n), vshift)
