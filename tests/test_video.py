"""Streaming video I/O: sources, the H.264 + AAC writer, atomic writes, probe and input errors."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from musetalk.errors import InputError
from musetalk.stream.video import VideoWriter, ffmpeg_exe, open_frames, probe

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SPEECH = SAMPLES / "speech.wav"


def _frames(n: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """Smooth coloured gradients that move: compress well, survive H.264 nearly unchanged."""
    y, x = np.mgrid[0:height, 0:width]
    return [np.stack([(x * 4 + i * 3) % 256, (y * 5) % 256, np.full_like(x, 40 + i)], axis=-1).astype(np.uint8)
            for i in range(n)]


def _speech_seconds() -> float:
    with wave.open(str(SPEECH)) as w:
        return w.getnframes() / w.getframerate()


def test_round_trip_with_audio(tmp_path):
    frames = _frames(30)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, fps=25, audio=SPEECH) as writer:
        for frame in frames:
            writer.write(frame)
    info = probe(out)
    assert (info.num_frames, info.fps, info.width, info.height) == (30, 25.0, 64, 48)
    assert info.duration_s == pytest.approx(1.2, abs=1e-6)
    assert info.has_audio and info.audio_duration_s == pytest.approx(1.2, abs=0.03)  # trimmed to the video
    assert (info.video_codec, info.pix_fmt) == ("h264", "yuv420p")
    source = open_frames(out)
    assert (source.kind, source.fps, source.num_frames, source.size) == ("video", 25.0, 30, (64, 48))
    back = list(source)
    assert len(back) == 30
    assert np.abs(np.array(back, np.int16) - np.array(frames, np.int16)).mean() < 3


def test_untrimmed_audio_keeps_whole_track(tmp_path):
    out = tmp_path / "out.mp4"
    with VideoWriter(out, fps=25, audio=SPEECH, trim_audio=False) as writer:
        for frame in _frames(10):
            writer.write(frame)
    assert probe(out).audio_duration_s == pytest.approx(_speech_seconds(), abs=0.03)


def test_odd_size_is_padded_to_even(tmp_path):
    out = tmp_path / "odd.mp4"
    frames = _frames(3, width=63, height=47)
    with VideoWriter(out, fps=30) as writer:
        for frame in frames:
            writer.write(frame)
    info = probe(out)
    assert (info.width, info.height, info.num_frames, info.has_audio) == (64, 48, 3, False)
    first = next(iter(open_frames(out)))
    assert np.abs(first[:47, :63].astype(np.int16) - frames[0]).mean() < 3


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_nothing(tmp_path, interrupt):
    out = tmp_path / "out.mp4"
    with pytest.raises(interrupt):
        with VideoWriter(out, fps=25, audio=SPEECH) as writer:
            for frame in _frames(5):
                writer.write(frame)
            raise interrupt()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_survives_a_failed_rewrite(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(InputError, match="expected 64x48"):
        with VideoWriter(out, fps=25) as writer:
            writer.write(_frames(1)[0])
            writer.write(np.zeros((10, 10, 3), np.uint8))
    assert out.read_bytes() == b"previous result" and len(list(tmp_path.iterdir())) == 1


def test_no_frames_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no frames"):
        with VideoWriter(tmp_path / "out.mp4", fps=25):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writer_argument_errors(tmp_path):
    with pytest.raises(InputError, match="suffix"):
        VideoWriter(tmp_path / "out.avi2", fps=25)
    with pytest.raises(InputError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "out.mp4", fps=25)
    with pytest.raises(InputError, match="fps"):
        VideoWriter(tmp_path / "out.mp4", fps=0)
    with pytest.raises(InputError, match="audio file"):
        VideoWriter(tmp_path / "out.mp4", fps=25, audio=tmp_path / "nope.wav")
    with pytest.raises(InputError, match="no audio stream"):
        VideoWriter(tmp_path / "out.mp4", fps=25, audio=SAMPLES / "face.mp4")


def test_image_source():
    source = open_frames(SAMPLES / "face.png")
    assert (source.kind, source.fps, source.num_frames, source.size) == ("image", None, 1, (512, 512))
    (frame,) = list(source)
    assert frame.shape == (512, 512, 3) and frame.dtype == np.uint8


def test_sample_clip_source():
    source = open_frames(SAMPLES / "face.mp4")
    assert (source.kind, source.fps, source.num_frames, source.size) == ("video", 25.0, 50, (512, 512))
    info = probe(SAMPLES / "face.mp4")
    assert (info.video_codec, info.pix_fmt) == ("h264", "yuv420p")
    assert (SAMPLES / "face.mp4").stat().st_size < 300_000


def test_folder_source_is_naturally_sorted(tmp_path):
    for value in (1, 10, 2):
        cv2.imwrite(str(tmp_path / f"frame{value}.png"), np.full((8, 6, 3), value, np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_frames(tmp_path)
    assert (source.kind, source.fps, source.num_frames, source.size) == ("folder", None, 3, (6, 8))
    assert [int(frame[0, 0, 0]) for frame in source] == [1, 2, 10]


def test_folder_with_mixed_sizes(tmp_path):
    cv2.imwrite(str(tmp_path / "0.png"), np.zeros((8, 6, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "1.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="one size"):
        list(open_frames(tmp_path))


def test_source_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_frames(tmp_path / "missing.mp4")
    with pytest.raises(InputError, match="no images"):
        open_frames(tmp_path)
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"\x00not a video\x01" * 64)
    with pytest.raises(InputError, match="cannot read"):
        open_frames(garbage)
    fake_png = tmp_path / "fake.png"
    fake_png.write_text("not an image")
    with pytest.raises(InputError, match="cannot read the image"):
        open_frames(fake_png)
    with pytest.raises(InputError, match="no video stream"):
        open_frames(SPEECH)


def test_rotated_video_is_turned_upright(tmp_path):
    plain, rotated = tmp_path / "plain.mp4", tmp_path / "rotated.mp4"
    frames = _frames(2, width=64, height=32)
    with VideoWriter(plain, fps=25) as writer:
        for frame in frames:
            writer.write(frame)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", str(plain), "-c", "copy",
                    str(rotated)], check=True)
    source = open_frames(rotated)
    assert source.size == (32, 64)
    first = next(iter(source))
    assert first.shape == (64, 32, 3)
    # ffmpeg's autorotate of a +90 degree display matrix turns the picture counter-clockwise
    assert np.abs(first.astype(np.int16) - np.rot90(frames[0]).astype(np.int16)).mean() < 3


def test_ffmpeg_exe_exists():
    assert Path(ffmpeg_exe()).is_file()
