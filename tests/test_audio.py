"""Audio stage: decoding, per-frame windows at any fps, streaming windows, edge cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.stages import audio
from musetalk.errors import InputError


def _write_wav(path: Path, wav: np.ndarray, rate: int, channels: int = 1) -> Path:
    import av

    data = (np.clip(wav, -1, 1) * 32767).astype(np.int16)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono" if channels == 1 else "stereo")
        frame = av.AudioFrame.from_ndarray(np.tile(data, (1, channels)).reshape(1, -1) if channels > 1
                                           else data.reshape(1, -1), format="s16",
                                           layout="mono" if channels == 1 else "stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def test_load_resamples_and_downmixes(tmp_path: Path) -> None:
    t = np.arange(44100) / 44100
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    wav = audio.load_audio(_write_wav(tmp_path / "stereo.wav", tone, 44100, channels=2))
    assert wav.dtype == np.float32 and abs(len(wav) - 16000) <= 1
    assert 0.45 < np.abs(wav).max() < 0.55  # the mean of two equal channels keeps the level
    mono = audio.load_audio(_write_wav(tmp_path / "mono16k.wav", tone[:16000], 16000))
    np.testing.assert_allclose(mono, np.trunc(tone[:16000] * 32767) / 32768, atol=1e-6)


def test_bad_audio_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        audio.load_audio(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(InputError, match="cannot decode|no audio"):
        audio.load_audio(junk)
    with pytest.raises(InputError, match="silent"):
        audio.check_speech(np.zeros(16000, np.float32), 25)
    with pytest.raises(InputError, match="shorter than one video frame"):
        audio.check_speech(np.ones(100, np.float32) * 0.1, 25)


@pytest.mark.parametrize("fps", [24, 25, 30, 60])
def test_windows_follow_the_reference_rule(fps: int) -> None:
    n = 16000 * 2 + 1234
    steps = math.floor(n / 16000 * 50)
    states = np.random.default_rng(0).normal(size=(1, 1500, 5, 384)).astype(np.float32)
    windows = audio.frame_windows(states, n, audio.AudioConfig(fps=fps))
    assert windows.shape == (math.floor(n / 16000 * fps), 50, 384)
    pad = math.ceil(50 / fps) * 2
    padded = np.concatenate([np.zeros((pad, 5, 384), np.float32), states[0, :steps],
                             np.zeros((math.ceil(50 / fps) * 6 + 10, 5, 384), np.float32)])
    # (+10: at 60 fps the last window reaches one step past the reference padding; it reads zeros)
    for i in (0, len(windows) // 2, len(windows) - 1):
        start = math.floor(i * 50 / fps)
        np.testing.assert_array_equal(windows[i], padded[start:start + 10].reshape(50, 384))
    # first frame starts with the left zero padding, the last one reaches the right padding
    assert not windows[0][: pad * 5].any()


def test_audio_shorter_than_one_frame_gives_no_windows() -> None:
    states = np.ones((1, 1500, 5, 384), np.float32)
    assert audio.frame_windows(states, 500, audio.AudioConfig(fps=25)).shape == (0, 50, 384)


def test_positional_encoding_formula() -> None:
    pe = audio.positional_encoding(50, 384)
    pos, k = 7, 11
    assert pe[pos, 2 * k].item() == pytest.approx(math.sin(pos / 10000 ** (2 * k / 384)), abs=1e-5)
    assert pe[pos, 2 * k + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * k / 384)), abs=1e-5)
    x = torch.zeros(2, 50, 384)
    assert torch.equal(audio.add_positional_encoding(x)[1], pe)


def test_streaming_windows_equal_batch_windows(tiny_models: Path) -> None:
    encoder = audio.AudioEncoder.from_pretrained(tiny_models / "whisper")
    rng = np.random.default_rng(1)
    wav = (0.1 * rng.standard_normal(16000 * 31 + 500)).astype(np.float32)  # crosses a 30 s segment boundary
    for fps in (25, 30):
        config = audio.AudioConfig(fps=fps)
        full = encoder.windows(wav, config)
        streamed = np.stack(list(audio.iter_frame_windows(encoder, wav, config)))
        np.testing.assert_array_equal(full, streamed)
