"""evaluate_video end to end on generated clips: offsets, controls, face tracks, bad inputs, the CLI adapter.

Most tests use a stand-in scorer whose embeddings make the answer known: a lip window embeds as the brightness
of its 5 frames, an audio window as the loudness of the same 5 frames. A clip whose brightness follows its
loudness is then in sync (offset 0), and shifting one against the other by k frames must give offset k.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.errors import InputError, NoFaceError, WeightsError
from musetalk.frontends import evaluate as cli
from musetalk.quality import evaluate as ev
from musetalk.quality.evaluate import EvaluateConfig, LSEResult, evaluate_video
from musetalk.quality.track import Detection, TrackConfig

FPS, SR, SPF = 25, 16_000, 640
N_FRAMES = 60


def _pattern(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, n)


def write_clip(path: Path, brightness: np.ndarray, loudness: np.ndarray | None, size: int = 224) -> Path:
    """An H.264 clip whose frame i is uniformly grey (40 + 170 * brightness[i]) with a PCM tone of loudness[i]."""
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "10"}
        audio = out.add_stream("pcm_s16le", rate=SR, layout="mono") if loudness is not None else None
        for b in brightness:
            frame = np.full((size, size, 3), int(40 + 170 * b), np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        out.mux(video.encode(None))
        if audio is not None:
            t = np.arange(len(loudness) * SPF) / SR
            wav = (np.sin(2 * np.pi * 440 * t) * np.repeat(100 + 9000 * loudness, SPF)).astype(np.int16)
            aframe = av.AudioFrame.from_ndarray(wav[None], format="s16", layout="mono")
            aframe.sample_rate = SR
            out.mux(audio.encode(aframe))
            out.mux(audio.encode(None))
    return path


def _zscore(x: np.ndarray) -> torch.Tensor:
    std = x.std()
    return torch.from_numpy(((x - x.mean()) / std if std > 0 else np.zeros_like(x)).astype(np.float32))


class PatternScorer:
    """Stands in for SyncNetScorer (same methods): brightness / loudness windows as embeddings."""

    batch_size = 20
    device = torch.device("cpu")

    def embed_lips(self, frames) -> torch.Tensor:
        means = np.array([f.mean() for f in frames], np.float64)
        if len(means) < 5:
            return torch.zeros(0, 5)
        return _zscore(np.lib.stride_tricks.sliding_window_view(means, 5))

    def embed_audio(self, audio: np.ndarray, n: int) -> torch.Tensor:
        frames = audio[:len(audio) // SPF * SPF].astype(np.float64).reshape(-1, SPF)
        rms = np.sqrt((frames ** 2).mean(1))
        return _zscore(np.lib.stride_tricks.sliding_window_view(rms, 5)[:n])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    p = _pattern(N_FRAMES)
    delayed = np.concatenate([_pattern(3, seed=9), p[:-3]])  # the picture is 3 frames late
    return {"sync": write_clip(d / "sync.mkv", p, p),
            "late": write_clip(d / "late.mkv", delayed, p),
            "mute": write_clip(d / "mute.mkv", p, None),
            "short": write_clip(d / "short.mkv", p[:5], p[:5]),
            "full": write_clip(d / "full.mkv", p, p, size=160)}


def test_in_sync_clip_scores_offset_zero_and_controls_fall(clips):
    res = evaluate_video(clips["sync"], crop="none", controls=True, scorer=PatternScorer())
    assert isinstance(res, LSEResult)
    assert res.offset == 0 and res.lse_c > 0.5
    assert res.replicates_jpeg_step is True and res.detector == "none" and res.n_frames == N_FRAMES
    assert res.dist_curve.shape == (31,) and res.per_frame_confidence.shape == (N_FRAMES - 5,)
    assert set(res.controls) == {"shifted_1s", "silence"}
    for name, (lse_d, lse_c, _) in res.controls.items():
        assert lse_c < 0.5 * res.lse_c, name
        assert lse_d > res.lse_d, name
    data = json.loads(res.to_json())
    assert data["offset"] == 0 and data["dist_curve_offsets"][0] == 15 and data["controls"]["silence"]["lse_c"] >= 0


def test_late_picture_gives_positive_offset(clips):
    res = evaluate_video(clips["late"], crop="none", scorer=PatternScorer(),
                         config=EvaluateConfig(jpeg_step=False))
    assert res.offset == 3 and not res.replicates_jpeg_step
    assert any("JPEG step skipped" in n for n in res.notes)


def test_separate_audio_file_and_missing_audio_track(clips, tmp_path):
    with pytest.raises(InputError, match="no audio track") as err:
        evaluate_video(clips["mute"], crop="none", scorer=PatternScorer())
    assert "--audio" in err.value.fix
    # the speech from another file: the synced clip's own audio
    res = evaluate_video(clips["mute"], audio=clips["sync"], crop="none", scorer=PatternScorer())
    assert res.offset == 0


def test_too_short_clip_and_missing_file(clips, tmp_path):
    with pytest.raises(InputError, match="too short"):
        evaluate_video(clips["short"], crop="none", scorer=PatternScorer())
    with pytest.raises(InputError, match="not found"):
        evaluate_video(tmp_path / "absent.mp4", crop="none", scorer=PatternScorer())
    with pytest.raises(InputError, match="unknown crop"):
        evaluate_video(clips["sync"], crop="mouth", scorer=PatternScorer())


def _fake_detector(first_frame: int):
    def factory(name, device):
        def detect(frame, index):
            return [Detection(index, (40.0, 30.0, 100.0, 90.0))] if index >= first_frame else []
        return detect
    return factory


def test_landmark_track_is_cropped_and_its_audio_aligned(clips, monkeypatch):
    """The face appears at frame 7: the track's audio must start at frame 7 too (offset stays 0)."""
    monkeypatch.setattr(ev, "_landmark_detector", _fake_detector(7))
    config = EvaluateConfig(track=TrackConfig(min_track=20, min_face_size=20), jpeg_step=False)
    res = evaluate_video(clips["full"], crop="landmarks", scorer=PatternScorer(), config=config)
    assert res.detector == "landmarks:dlib" and res.offset == 0 and res.lse_c > 0.5
    assert [(t.first_frame, t.last_frame) for t in res.tracks] == [(7, N_FRAMES - 1)]
    assert res.per_frame_confidence.shape == (N_FRAMES - 7 - 5,)


def test_no_face_track_is_a_clear_error(clips, monkeypatch):
    monkeypatch.setattr(ev, "_landmark_detector", _fake_detector(10**6))
    with pytest.raises(NoFaceError, match="faces found in 0 of 60 frames") as err:
        evaluate_video(clips["full"], crop="landmarks", scorer=PatternScorer())
    assert "--crop none" in err.value.fix
    # a face too briefly on screen for the default min_track (100 detections)
    monkeypatch.setattr(ev, "_landmark_detector", _fake_detector(0))
    with pytest.raises(NoFaceError, match="more than 100 detections"):
        evaluate_video(clips["full"], crop="landmarks", scorer=PatternScorer())


def test_missing_weights(clips, tmp_path):
    with pytest.raises(WeightsError, match="SyncNet weights not found"):
        evaluate_video(clips["sync"], crop="none", syncnet_path=tmp_path / "nope.model")
    with pytest.raises(WeightsError, match="S3FD"):
        evaluate_video(clips["full"], crop="s3fd", sfd_path=tmp_path / "nope.pth", scorer=PatternScorer())
    assert ev.resolve_crop("auto", tmp_path / "nope.pth") == "landmarks"


def test_cli_folder_table_and_json(clips, tmp_path, capsys):
    from musetalk.quality.syncnet import SyncNet

    torch.manual_seed(0)
    weights = tmp_path / "syncnet_v2.model"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in SyncNet().state_dict().items()}, weights)
    folder = tmp_path / "videos"
    folder.mkdir()
    write_clip(folder / "a.mkv", _pattern(12), _pattern(12))
    (folder / "broken.mp4").write_bytes(b"not a video")
    parser = argparse.ArgumentParser()
    cli.add_evaluate_arguments(parser)
    out = tmp_path / "scores.json"
    args = parser.parse_args([str(folder), "--syncnet", str(weights), "--crop", "none", "--json", str(out),
                              "--device", "cpu", "--controls"])
    assert cli.run_evaluate(args) == 1  # one video could not be scored
    table = capsys.readouterr().out
    assert "a.mkv" in table and "broken.mp4" in table and "error" in table
    data = json.loads(out.read_text())
    assert [d["video"].split("/")[-1] for d in data] == ["a.mkv", "broken.mp4"]
    assert np.isfinite(data[0]["lse_d"]) and len(data[0]["per_frame_confidence"]) == 7
    assert set(data[0]["controls"]) == {"shifted_1s", "silence"} and "error" in data[1]


def test_frame_rate_conversion_to_25(tmp_path):
    """A 30 fps second becomes 25 frames; output frame k shows the last source frame starting by (k + 0.5) / 25."""
    import av

    from musetalk.quality.media import iter_frames_bgr

    path = tmp_path / "30fps.mkv"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=30)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "0"}
        for i in range(30):
            out.mux(video.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 8 * i, np.uint8), format="bgr24")))
        out.mux(video.encode(None))
    got = [int(round(f.mean() / 8)) for f in iter_frames_bgr(path, 25.0)]
    want = [int(np.floor((k + 0.5) / 25 * 30 + 1e-9)) for k in range(25)]
    assert got == want


def test_a_batch_summary_scores_its_finished_videos(tmp_path):
    """`musetalk evaluate summary.jsonl`: the done rows' outputs (relative to the summary), in order."""
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "b.mp4").write_bytes(b"x")
    lines = [{"row": 2, "output": "a.mp4", "state": "done"}, {"row": 3, "output": None, "state": "invalid"},
             {"row": 4, "output": str(tmp_path / "b.mp4"), "state": "done"}, {"row": 5, "output": "c.mp4",
                                                                               "state": "failed"}]
    summary = tmp_path / "summary.jsonl"
    summary.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert cli._videos(summary) == [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    summary.write_text(json.dumps({"row": 1, "state": "failed", "output": None}) + "\n")
    with pytest.raises(InputError, match="no finished videos"):
        cli._videos(summary)
