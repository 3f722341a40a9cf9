"""MFCC features exactly as ``python_speech_features.mfcc`` computes them with its defaults.

SyncNet's audio stream was trained on these features (13 cepstra at 100 Hz from 16 kHz audio), so the
LSE scores are only comparable across papers when the features match bit for bit in float64. This is a
numpy re-implementation of the package's defaults (jameslyons/python_speech_features 0.6, MIT licence):
25 ms rectangular frames every 10 ms, zero-padded at the end; pre-emphasis 0.97; 512-point power
spectrum; 26 triangular mel filters from 0 Hz to Nyquist; log; orthonormal DCT-II; lifter 22; the first
coefficient replaced by the log frame energy. Written here to avoid a dependency for ~40 lines of numpy.
"""

from __future__ import annotations

import decimal
import math

import numpy as np
from scipy.fft import dct

SAMPLE_RATE = 16_000
WIN_SECONDS = 0.025  # python_speech_features' winlen
STEP_SECONDS = 0.01  # winstep: 100 MFCC frames per second
N_CEPSTRA = 13  # numcep
N_FILTERS = 26  # nfilt
N_FFT = 512  # nfft: the smallest power of two >= 400 samples (the package's calculate_nfft)
PREEMPHASIS = 0.97
CEP_LIFTER = 22


def _round_half_up(value: float) -> int:
    # The package rounds frame sizes with decimal ROUND_HALF_UP (Python's round() would round 0.5 to even).
    return int(decimal.Decimal(value).quantize(decimal.Decimal("1"), rounding=decimal.ROUND_HALF_UP))


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale, as the package uses it."""
    return 2595 * np.log10(1 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    return 700 * (10 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1)


def mel_filterbank(n_filters: int = N_FILTERS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular mel filters on FFT bins: (n_filters, n_fft // 2 + 1) float64, edges floored to bins."""
    mel_points = np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_filters + 2)
    bins = np.floor((n_fft + 1) * mel_to_hz(mel_points) / sample_rate)
    bank = np.zeros((n_filters, n_fft // 2 + 1))
    for j in range(n_filters):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        rise = np.arange(int(lo), int(mid))
        bank[j, rise] = (rise - lo) / (mid - lo)
        fall = np.arange(int(mid), int(hi))
        bank[j, fall] = (hi - fall) / (hi - mid)
    return bank


def frame_signal(signal: np.ndarray, frame_len: int, frame_step: int) -> np.ndarray:
    """Overlapping frames (n_frames, frame_len); the tail is zero-padded so every sample is covered."""
    n = len(signal)
    n_frames = 1 if n <= frame_len else 1 + int(math.ceil((1.0 * n - frame_len) / frame_step))
    padded = np.concatenate([signal, np.zeros((n_frames - 1) * frame_step + frame_len - n)])
    idx = np.arange(frame_len)[None, :] + frame_step * np.arange(n_frames)[:, None]
    return padded[idx]


def mfcc(signal: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """MFCC of a mono signal: (n_frames, 13) float64, n_frames = 1 + ceil((len - 400) / 160) at 16 kHz.

    ``signal`` is used at its own scale (SyncNet feeds int16 sample values, not [-1, 1] floats).
    """
    signal = np.asarray(signal)
    if signal.ndim != 1 or signal.size == 0:
        raise ValueError(f"mfcc needs a non-empty mono signal, got shape {signal.shape}")
    x = signal.astype(np.float64)
    x = np.append(x[0], x[1:] - PREEMPHASIS * x[:-1])
    frames = frame_signal(x, _round_half_up(WIN_SECONDS * sample_rate), _round_half_up(STEP_SECONDS * sample_rate))
    power = np.square(np.abs(np.fft.rfft(frames, N_FFT))) / N_FFT
    eps = np.finfo(float).eps
    energy = power.sum(axis=1)
    energy = np.where(energy == 0, eps, energy)  # silence would give log(0)
    feat = power @ mel_filterbank(N_FILTERS, N_FFT, sample_rate).T
    feat = np.where(feat == 0, eps, feat)
    cep = dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :N_CEPSTRA]
    cep = cep * (1 + (CEP_LIFTER / 2.0) * np.sin(np.pi * np.arange(N_CEPSTRA) / CEP_LIFTER))
    cep[:, 0] = np.log(energy)
    return cep
