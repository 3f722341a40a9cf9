"""Video and audio input of the lip-sync metric, through PyAV (no ffmpeg subprocess, no temp files).

The reference (syncnet_python ``SyncNetInstance.evaluate``) first runs
``ffmpeg -i video -f image2 %06d.jpg`` and ``ffmpeg -i video -ac 1 -ar 16000 -acodec pcm_s16le audio.wav``,
then reads the JPEGs with ``cv2.imread``. The JPEG step is lossy (ffmpeg's mjpeg default is rate control at
200 kb/s, so small frames are coded at qscale up to 31) and moves LSE-D by ~0.3 % and LSE-C by ~1 % on the
golden clip. :class:`FfmpegJpegStep` reproduces it in memory: the same libavcodec mjpeg encoder with the
CLI's settings (200 kb/s, time base 1/fps, one thread), fed the same full-range planes, decoded by the same
``cv2.imdecode``. On the golden clip the frames come out bit-identical to the reference's.
"""

from __future__ import annotations

import fractions
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from musetalk.errors import InputError
from musetalk.stream.video import VideoInfo, probe

if TYPE_CHECKING:
    import av

MJPEG_DEFAULT_BIT_RATE = 200_000  # AVCodecContext's default bit rate: what ffmpeg uses without -q:v / -b:v


def _open(path: str | os.PathLike):
    import av

    path = Path(path)
    if not path.is_file():
        raise InputError(f"video not found: {path}", "check the path")
    try:
        return av.open(str(path))
    except av.error.FFmpegError as exc:
        raise InputError(f"cannot open {path} as a video ({exc})", "give an mp4/mov/avi/mkv/webm file") from None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read the stream headers of ``path`` (the stream's own probe: one VideoInfo for the whole package)."""
    return probe(path)


def iter_video_frames(path: str | os.PathLike, fps: float | None = 25.0) -> Iterator[av.VideoFrame]:
    """Decoded frames of the first video stream, resampled to ``fps`` when the source rate differs.

    Resampling keeps, for output frame k, the last source frame that starts at or before (k + 0.5) / fps
    (frames are dropped or repeated, as ``ffmpeg -r 25`` in run_pipeline.py does; not bit-exact to ffmpeg's
    vsync). ``fps=None`` keeps every frame.
    """
    info = probe_video(path)
    resample = fps is not None and info.fps > 0 and abs(info.fps - fps) > 1e-3
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if not resample:
            yield from container.decode(stream)
            return
        assert fps is not None  # resampling implies a target rate
        k = 0
        previous, previous_t = None, 0.0
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else previous_t + 1 / info.fps
            while previous is not None and (k + 0.5) / fps < t:
                yield previous
                k += 1
            previous, previous_t = frame, t
        if previous is not None:
            end = previous_t + 1 / info.fps
            while (k + 0.5) / fps < end:
                yield previous
                k += 1


def read_audio(path: str | os.PathLike, sample_rate: int = 16_000) -> np.ndarray:
    """The first audio stream of a media file as mono int16 at ``sample_rate`` (libswresample, like ffmpeg -ac 1 -ar).

    Raises :class:`InputError` when the file has no audio stream or no samples.
    """
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise InputError(f"{path} has no audio track", "pass the speech separately (--audio speech.wav)")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        chunks = []
        for frame in container.decode(container.streams.audio[0]):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    audio = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
    if audio.size == 0:
        raise InputError(f"the audio track of {path} is empty", "give a file with speech")
    return audio


def _expand_range(plane: np.ndarray, chroma: bool) -> np.ndarray:
    """Limited (16..235 / 16..240) to full range, with libswscale's integer arithmetic on 15-bit values.

    This is swscale's lumRangeToJpeg / chrRangeToJpeg followed by rounding to 8 bits: what the ffmpeg CLI
    applies when it hands yuv420p video to the mjpeg encoder (which wants full-range yuvj420p). Rounding
    differently shifts chroma by ~0.5 on average and changes the JPEG coefficients.
    """
    v = plane.astype(np.int64) << 7
    if chroma:
        v = (np.minimum(v, 30775) * 4663 - 9289992) >> 12
    else:
        v = (np.minimum(v, 30189) * 19077 - 39057361) >> 14
    return np.clip((v + 64) >> 7, 0, 255).astype(np.uint8)


class FfmpegJpegStep:
    """The reference's mp4 -> JPEG -> ``cv2.imread`` round trip, frame by frame, in memory.

    One instance per video: the encoder's rate control carries state from frame to frame, as in one ffmpeg run.
    ``exact`` becomes False once a frame needed an approximate conversion (not 4:2:0 8-bit YUV, or odd size).
    """

    def __init__(self, fps: float = 25.0, bit_rate: int = MJPEG_DEFAULT_BIT_RATE) -> None:
        self.fps = fps
        self.bit_rate = bit_rate
        self.exact = True
        self._encoder: av.VideoCodecContext | None = None
        self._index = 0

    def _open_encoder(self, width: int, height: int) -> av.VideoCodecContext:
        import av

        enc = av.CodecContext.create("mjpeg", "w")
        enc.width, enc.height = width, height
        enc.pix_fmt = "yuvj420p"
        enc.time_base = fractions.Fraction(1, int(round(self.fps)))
        enc.bit_rate = self.bit_rate
        # More than one thread makes libavcodec code slices with restart markers and default Huffman tables:
        # other bit counts, so the rate control picks other quantisers (the reference runs ffmpeg -threads 1).
        enc.thread_count = 1
        return enc

    def _full_range_yuv420(self, frame: av.VideoFrame) -> av.VideoFrame:
        import av

        name = frame.format.name
        even = frame.width % 2 == 0 and frame.height % 2 == 0
        if name in ("yuv420p", "yuvj420p") and even:
            planes = [np.frombuffer(memoryview(p), np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in frame.planes]
            if name == "yuv420p" and int(frame.color_range) != 2:  # unspecified or MPEG: limited range
                planes = [_expand_range(p, chroma=i > 0) for i, p in enumerate(planes)]
            # from_ndarray's yuvj420p layout: Y rows, then U and V each folded into rows of full width
            stacked = np.concatenate([planes[0]] + [p.reshape(-1, frame.width) for p in planes[1:]])
            return av.VideoFrame.from_ndarray(stacked, format="yuvj420p")
        self.exact = False  # let swscale convert; close to, but not exactly, what the ffmpeg CLI would feed
        return frame.reformat(format="yuvj420p")

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        """One decoded ``av.VideoFrame`` -> (H, W, 3) uint8 BGR after the JPEG round trip."""
        import cv2

        if self._encoder is None:
            self._encoder = self._open_encoder(frame.width, frame.height)
        yuv = self._full_range_yuv420(frame)
        yuv.pts = self._index
        yuv.time_base = self._encoder.time_base
        self._index += 1
        packets = self._encoder.encode(yuv)
        if len(packets) != 1:  # mjpeg is intra-only with no delay: one packet per frame
            raise RuntimeError(f"mjpeg encoder returned {len(packets)} packets for one frame")
        image = cv2.imdecode(np.frombuffer(bytes(packets[0]), np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise RuntimeError("OpenCV could not decode the mjpeg encoder's packet")
        return image

    def bgr(self, image: np.ndarray) -> np.ndarray:
        """The round trip for a BGR image (e.g. a face crop): BGR -> limited-range yuv420p (swscale) -> JPEG -> BGR."""
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24").reformat(format="yuv420p")
        return self(frame)


def iter_frames_bgr(path: str | os.PathLike, fps: float | None = 25.0, jpeg_step: bool = False,
                    report: dict | None = None) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 BGR frames of a video at ``fps``; ``jpeg_step`` applies :class:`FfmpegJpegStep`.

    ``report`` (optional dict) receives ``jpeg_exact`` (bool) and ``n_frames`` when the stream ends.
    """
    step = FfmpegJpegStep(fps or 25.0) if jpeg_step else None
    n = 0
    for frame in iter_video_frames(path, fps):
        n += 1
        yield step(frame) if step else frame.to_ndarray(format="bgr24")
    if report is not None:
        report["n_frames"] = n
        report["jpeg_exact"] = bool(step and step.exact)
