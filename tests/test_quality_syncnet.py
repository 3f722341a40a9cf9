"""SyncNet scoring: MFCC, the offset logic, the network's windows, checkpoint checks and the golden set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import golden_set
from musetalk.errors import InputError, WeightsError
from musetalk.quality.mfcc import mfcc
from musetalk.quality.syncnet import (
    SyncNet,
    SyncNetScorer,
    audio_windows,
    check_lengths,
    load_syncnet,
    num_windows,
    sync_scores,
)


def test_mfcc_shape_and_silence():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(16000) * 1000).astype(np.int16)
    feat = mfcc(x)
    assert feat.shape == (1 + int(np.ceil((16000 - 400) / 160)), 13) and feat.dtype == np.float64
    silent = mfcc(np.zeros(8000, np.int16))
    assert np.isfinite(silent).all() and np.ptp(silent, axis=0).max() == 0  # constant, no log(0)


def test_window_counts_and_too_short_clip():
    assert num_windows(75, 48128) == 70  # the golden clip: min(75, 75) - 5
    assert num_windows(100, 640 * 30) == 25  # audio shorter than video limits it
    with pytest.raises(InputError, match="at least 6 frames"):
        check_lengths(5, 640 * 100)
    w = audio_windows(np.arange(40 * 13, dtype=np.float64).reshape(40, 13), 5)
    assert w.shape == (5, 1, 13, 20) and w[1, 0, 0, 0] == 4 * 13  # window 1 starts at MFCC frame 4


def _embeddings(n: int, k: int, d: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lip and audio embeddings where lip window i equals audio window i - k (offset k by definition)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n + 2 * abs(k), d)).astype(np.float32)
    aud = base[abs(k):abs(k) + n]
    lip = base[abs(k) - k:abs(k) - k + n]
    return lip, aud


@pytest.mark.parametrize("k", [0, 3, -4, 15])
def test_offset_logic_on_built_embeddings(k):
    lip, aud = _embeddings(60, k)
    s = sync_scores(lip, aud, vshift=15)
    assert s.offset == k
    assert s.dists.shape == (60, 31) and s.mean_dists.shape == (31,) and s.frame_confidence.shape == (60,)
    assert s.lse_d == pytest.approx(float(s.mean_dists.min())) and s.lse_c > 1.0
    assert s.lse_c == pytest.approx(float(np.median(s.mean_dists) - s.mean_dists.min()), abs=1e-5)
    # the exact-match column holds the distance of identical vectors (eps 1e-6 per dim, as pairwise_distance),
    # except for windows whose partner lies beyond the ends (compared with the zero padding)
    col = s.dists[:, 15 - k]
    inside = [i for i in range(60) if 0 <= i - k < 60]
    assert np.allclose(col[inside], np.sqrt(32) * 1e-6, atol=1e-6)


def test_offset_out_of_range_is_not_found():
    lip, aud = _embeddings(60, 20)
    assert abs(sync_scores(lip, aud, vshift=15).offset - 20) > 0
    # in range with a larger search window
    assert sync_scores(lip, aud, vshift=25).offset == 20


def test_scores_are_chunk_independent():
    lip, aud = _embeddings(50, 2)
    a, b = sync_scores(lip, aud, chunk=7), sync_scores(lip, aud, chunk=512)
    np.testing.assert_array_equal(a.dists, b.dists)


@pytest.fixture(scope="module")
def scorer() -> SyncNetScorer:
    torch.manual_seed(0)
    net = SyncNet()
    with torch.no_grad():  # random BatchNorm statistics so that eval mode does something non-trivial
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return SyncNetScorer(net.eval(), batch_size=3)


def test_lip_windows_batched_equal_single(scorer):
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(9)]
    streamed = scorer.embed_lips(iter(frames))  # batches of 3 windows: 7 + 4 frames, overlapping by 4
    assert streamed.shape == (5, 1024)
    with torch.inference_mode():
        for i in (0, 4):
            clip = torch.from_numpy(np.stack(frames[i:i + 5])).permute(3, 0, 1, 2)[None].float()
            single = scorer.net.forward_lips(clip)
            assert torch.allclose(streamed[i], single[0], atol=1e-4)


def test_wrong_crop_size_is_a_clear_error(scorer):
    frames = [np.zeros((128, 128, 3), np.uint8)] * 6
    with pytest.raises(InputError, match="224x224"):
        scorer.embed_lips(iter(frames))


def test_checkpoint_checks(tmp_path, scorer):
    good = tmp_path / "syncnet_v2.model"
    state = {k: v.half() if v.is_floating_point() else v for k, v in scorer.net.state_dict().items()}
    # an old-torch file without BatchNorm's num_batches_tracked counters still loads (the reference ignores them)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, good)
    net = load_syncnet(good)
    assert not net.training and next(net.parameters()).dtype == torch.float32
    # another network's file: a clear error naming the keys
    bad = tmp_path / "wav2lip_syncnet.pth"
    torch.save({"face_encoder.0.conv_block.0.weight": torch.zeros(32, 15, 7, 7)}, bad)
    with pytest.raises(WeightsError, match="missing keys"):
        load_syncnet(bad)
    with pytest.raises(WeightsError, match="not found"):
        load_syncnet(tmp_path / "absent.model")


def test_syncnet_verifier_fails_an_altered_set(tmp_path):
    """Network stages on an altered copy of the golden set (the full run on the real set is tests/test_golden.py's)."""
    from musetalk.testing.golden_syncnet import verify

    src = golden_set("syncnet-random")
    for name in ("manifest.json", "syncnet_v2.model", "inputs"):
        (tmp_path / name).symlink_to(src / name)
    gold = dict(np.load(src / "golden_syncnet.npz"))
    gold["lip_embeddings"] = gold["lip_embeddings"] + 1e-3
    gold["av_offset"] = gold["av_offset"] + 1
    np.savez(tmp_path / "golden_syncnet.npz", **gold)
    rows = {r.stage: r for r in verify(tmp_path, end_to_end=False)}
    assert len(rows) == 8
    assert rows["lip_embeddings"].passed is False and rows["av_offset"].passed is False
    # everything else is computed from the inputs, never from expected arrays, and still matches
    others = [r for name, r in rows.items() if name not in ("lip_embeddings", "av_offset")]
    assert all(r.passed is True for r in others), "\n".join(r.line() for r in others)


def test_jpeg_step_reproduces_the_reference_frames():
    """The in-memory ffmpeg mp4 -> JPEG -> cv2 round trip gives the frames the reference's network saw."""
    from musetalk.quality.media import iter_frames_bgr, read_audio

    src = golden_set("syncnet-random")
    gold = np.load(src / "golden_syncnet.npz")
    report: dict = {}
    frames = np.stack(list(iter_frames_bgr(src / "inputs" / "clip.mp4", 25.0, jpeg_step=True, report=report)))
    assert report == {"n_frames": 75, "jpeg_exact": True}
    assert np.array_equal(frames, gold["frames_bgr"])
    raw = np.stack(list(iter_frames_bgr(src / "inputs" / "clip.mp4", 25.0)))
    assert np.abs(raw.astype(int) - gold["frames_bgr"]).mean() > 1  # the JPEG step matters
    audio = read_audio(src / "inputs" / "clip.mp4")
    assert audio.shape == gold["audio_int16"].shape and np.abs(audio.astype(int) - gold["audio_int16"]).max() <= 1
