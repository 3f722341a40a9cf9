"""Streaming video I/O with PyAV: frames in one at a time, H.264 + AAC out in one pass, written atomically.

The reference extracts every frame to PNG with the ffmpeg CLI, holds them all in a list, writes PNGs back and
calls ffmpeg twice (encode, then mux audio). Here memory stays constant in the video's length:

* :func:`open_frames` reads an image, a folder of images or a video and yields BGR uint8 frames one by one;
  iterating again re-opens the source (two passes, e.g. landmarks then generation, never hold the frames).
* :class:`VideoWriter` encodes each frame as it arrives (libx264, yuv420p, crf 18, as the reference) and muxes
  the audio in the same pass, interleaved with the video.
* :func:`probe` reports what a file holds.

No system ffmpeg is needed; :func:`ffmpeg_exe` gives imageio-ffmpeg's binary for users who want the CLI.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np

from musetalk.errors import InputError, MuseTalkError, StorageError
from musetalk.stream.leftovers import Hold, sweep

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
# Output containers we write; the key is the file suffix, the value PyAV's format name.
OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
DEFAULT_FPS = 25.0  # used only when a video declares no frame rate at all
AUDIO_BIT_RATE = 128_000  # ffmpeg's default for its native AAC encoder, which the reference relies on

SourceKind = Literal["image", "video", "folder"]


def _av() -> Any:
    import av  # local: PyAV pulls in the FFmpeg libraries (~0.2 s), only needed once video is touched

    return av


def _natural_key(name: str) -> list[Any]:
    """'frame10.png' sorts after 'frame9.png'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 BGR, as cv2.imread gives (alpha dropped, grey expanded); works with non-ASCII paths."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError(f"cannot read the image {path}",
                         "use a PNG, JPEG, BMP, WebP or TIFF file that opens in an image viewer")
    return image


def _rotate(image: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a stream's display rotation (degrees counter-clockwise), as the ffmpeg CLI does by default."""
    turns = (int(rotation) // 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _stream_fps(stream: Any) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _stream_duration(stream: Any, container: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


@dataclass(frozen=True)
class FrameSource:
    """A re-iterable stream of BGR uint8 frames, (H, W, 3), from an image, a folder of images or a video.

    kind: "image", "folder" or "video". fps: the video's average frame rate; None for images and folders.
    num_frames: exact for images and folders and for most videos (from the container's header), else an
    estimate from duration x fps. size: (width, height) of every frame, after the video's display rotation.
    """

    path: Path
    kind: SourceKind
    fps: float | None
    num_frames: int
    size: tuple[int, int]
    files: tuple[Path, ...] = field(default=(), repr=False)  # the images of a folder, naturally sorted

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.kind == "video":
            yield from self._iter_video()
        else:
            for path in self.files:
                image = _read_image(path)
                if (image.shape[1], image.shape[0]) != self.size:
                    raise InputError(
                        f"{path.name} is {image.shape[1]}x{image.shape[0]} but the first image is "
                        f"{self.size[0]}x{self.size[1]}", "resize every image of the folder to one size")
                yield image

    def _iter_video(self) -> Iterator[np.ndarray]:
        av = _av()
        index = 0
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"  # let FFmpeg decode with frame and slice threads
                for frame in container.decode(stream):
                    image = frame.to_ndarray(format="bgr24")
                    yield _rotate(image, getattr(frame, "rotation", 0))
                    index += 1
        except (av.FFmpegError, OSError) as err:
            raise InputError(f"decoding {self.path} failed after {index} frames: {err}",
                             "re-encode the video, e.g. ffmpeg -i in.mp4 -c:v libx264 -pix_fmt yuv420p fixed.mp4"
                             ) from None


def open_frames(source: PathLike) -> FrameSource:
    """Open an image file, a folder of images (natural order: 2.png before 10.png) or a video file.

    Nothing is decoded beyond the first frame until the result is iterated. Raises InputError naming the fix for
    a missing path, an empty folder, an unreadable file or a video without frames.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"{path} does not exist", "check the path of the source video, image or folder")
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                       key=lambda p: _natural_key(p.name))
        if not files:
            raise InputError(f"the folder {path} holds no images",
                             f"put frames with one of the suffixes {', '.join(sorted(IMAGE_EXTENSIONS))} in it")
        first = _read_image(files[0])
        return FrameSource(path, "folder", None, len(files), (first.shape[1], first.shape[0]), tuple(files))
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        image = _read_image(path)
        return FrameSource(path, "image", None, 1, (image.shape[1], image.shape[0]), (path,))
    return _open_video(path)


def _open_video(path: Path) -> FrameSource:
    av = _av()
    fix = "use a video that plays (mp4, mov, mkv, webm, avi, gif) or an image; ffmpeg can convert most others"
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream", fix)
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise InputError(f"{path} has a video stream but no frames", fix)
            fps = _stream_fps(stream)
            if fps is None:
                log.warning("%s declares no frame rate; assuming %s fps", path, DEFAULT_FPS)
                fps = DEFAULT_FPS
            num_frames = stream.frames
            if not num_frames:
                duration = _stream_duration(stream, container)
                num_frames = max(1, round(duration * fps)) if duration else 1
            turns = (int(getattr(first, "rotation", 0)) // 90) % 2
            size = (first.height, first.width) if turns else (first.width, first.height)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path} as a video: {err}", fix) from None
    return FrameSource(path, "video", fps, int(num_frames), (int(size[0]), int(size[1])))


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` found. Durations in seconds; width/height as coded (before display rotation)."""

    num_frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    has_audio: bool
    audio_duration_s: float | None
    video_codec: str
    pix_fmt: str


def probe(path: PathLike) -> VideoInfo:
    """Container facts of a video file with PyAV; counts packets when the header has no frame count."""
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video not found: {path}", "check the path of the video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream", "probe a video file")
            vs = container.streams.video[0]
            num_frames = vs.frames or sum(1 for p in container.demux(vs) if p.size)
            fps = _stream_fps(vs) or DEFAULT_FPS
            duration = _stream_duration(vs, container) or num_frames / fps
            audio = container.streams.audio[0] if container.streams.audio else None
            audio_duration = _stream_duration(audio, container) if audio is not None else None
            ctx = vs.codec_context
            return VideoInfo(int(num_frames), fps, duration, ctx.width, ctx.height, audio is not None, audio_duration,
                             ctx.name, ctx.pix_fmt or "")
    except (av.FFmpegError, OSError) as err:
        raise InputError(f"cannot read {path} as a video: {err}", "check that the file is a complete video") from None


@dataclass(frozen=True)
class DeclaredSize:
    """What a source's headers declare, read without decoding any frame (see :func:`declared_size`).

    num_frames: the container's frame count, else duration x fps; None when it declares neither.
    width, height: of one frame, as coded (0 when only the pixel count is known). pixels: of one frame.
    duration_s: None for images and when the container declares none.
    """

    num_frames: int | None
    width: int
    height: int
    duration_s: float | None
    pixels: int


def _image_header_size(path: Path) -> tuple[int, int, int]:
    """(width, height, pixels) from an image's header; Pillow's open reads only the header, never the pixels."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size[0], image.size[1], image.size[0] * image.size[1]
    except Image.DecompressionBombError as err:
        # Pillow will not even describe an image over 2 x its MAX_IMAGE_PIXELS (far above any limit of ours); its
        # message holds the pixel count ("Image size (256000000 pixels) exceeds limit of ...")
        found = re.search(r"\((\d+) pixels\)", str(err))
        return 0, 0, int(found.group(1)) if found else 2 * int(Image.MAX_IMAGE_PIXELS or 0) + 1
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"cannot read the image {path}: {err}",
                         "use a PNG, JPEG, BMP, WebP or TIFF file that opens in an image viewer") from None


def declared_size(source: PathLike) -> DeclaredSize:
    """Frames, frame size and duration of an image, a folder of images or a video, from headers only.

    Cheap whatever the file claims: a 16000x16000 PNG is not decoded, a 10 000-frame clip is not demuxed (FFmpeg's
    stream probing reads at most a few packets). Raises InputError for a missing or unreadable source.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"{path} does not exist", "check the path of the source video, image or folder")
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if not files:
            raise InputError(f"the folder {path} holds no images",
                             f"put frames with one of the suffixes {', '.join(sorted(IMAGE_EXTENSIONS))} in it")
        width, height, pixels = _image_header_size(min(files, key=lambda p: _natural_key(p.name)))
        return DeclaredSize(len(files), width, height, None, pixels)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        width, height, pixels = _image_header_size(path)
        return DeclaredSize(1, width, height, None, pixels)
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream", "use a video or an image")
            stream = container.streams.video[0]
            duration = _stream_duration(stream, container)
            fps = _stream_fps(stream)
            frames = stream.frames or (round(duration * fps) if duration and fps else None)
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            return DeclaredSize(frames, width, height, duration, width * height)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path} as a video: {err}", "use a video that plays, or an image") from None


def declared_duration(path: PathLike) -> float | None:
    """Seconds a media file's container declares (its longest stream), without decoding; None when it declares none."""
    av = _av()
    try:
        with av.open(str(Path(path).expanduser())) as container:
            durations = [d for d in (_stream_duration(s, container) for s in container.streams) if d is not None]
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}", "use a media file that plays") from None
    return max(durations) if durations else None


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg (for users and docs; the package never needs it)."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise MuseTalkError(f"no ffmpeg binary found ({err})", "pip install imageio-ffmpeg") from None


class _AudioFeed:
    """Decodes an audio file lazily and hands out float-planar frames at the encoder's rate, from sample 0."""

    def __init__(self, path: Path, rates: tuple[int, ...] | list[int]) -> None:
        av = _av()
        fix = "use an audio file that plays (wav, mp3, m4a, flac, ogg), or a video with a sound track"
        if not path.is_file():
            raise InputError(f"the audio file {path} does not exist", "check the path of the audio")
        try:
            self._container = av.open(str(path))
        except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read {path} as audio: {err}", fix) from None
        if not self._container.streams.audio:
            self._container.close()
            raise InputError(f"{path} has no audio stream", fix)
        stream = self._container.streams.audio[0]
        src_rate = stream.codec_context.sample_rate or 48_000
        # AAC has a fixed set of rates; keep the source's when allowed (16 kHz speech stays 16 kHz).
        self.rate = min(rates, key=lambda r: abs(r - src_rate)) if src_rate not in rates else src_rate
        self.layout = "mono" if stream.codec_context.channels == 1 else "stereo"  # >2 channels are downmixed
        self.path = path
        self._stream = stream
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)

    def chunks(self) -> Iterator[np.ndarray]:
        """(channels, samples) float32 chunks of the whole file at ``rate``, in order."""
        av = _av()
        try:
            for frame in self._container.decode(self._stream):
                frame.pts = None  # restart the timeline at 0: the audio aligns with the first video frame
                for out in self._resampler.resample(frame):
                    yield out.to_ndarray()
            for out in self._resampler.resample(None):
                yield out.to_ndarray()
        except av.FFmpegError as err:
            raise InputError(f"decoding the audio {self.path} failed: {err}", "re-encode the audio file") from None

    def close(self) -> None:
        self._container.close()


class VideoWriter:
    """Encode BGR frames to H.264 (libx264, yuv420p, crf 18 like the reference) with optional AAC audio.

    Use as a context manager::

        with VideoWriter("out.mp4", fps=25, audio="speech.wav") as writer:
            for frame in frames:          # (H, W, 3) uint8 BGR, all the same size
                writer.write(frame)

    The file is written under a temporary name in the target folder and renamed onto ``path`` only when
    everything succeeded; on an exception (KeyboardInterrupt included) the temporary file is removed and
    ``path`` is left untouched.

    Odd sizes: yuv420p needs even width and height (the reference's ffmpeg call fails on odd ones), so an odd
    dimension is padded by repeating the last column/row; the output is then up to 1 px wider/taller.

    Audio: any file PyAV can read, decoded, resampled (mono stays mono, more channels become stereo; the
    source rate is kept when AAC allows it) and encoded to AAC 128 kb/s in the same pass, interleaved with the
    video and starting with the first frame. With ``trim_audio`` (default) the audio stops where the video does, to
    the sample; the reference keeps the whole audio track (at most one frame longer for its own outputs).
    Shorter audio is left as is (silence after it).
    """

    def __init__(self, path: PathLike, fps: float | Fraction, size: tuple[int, int] | None = None,
                 audio: PathLike | None = None, crf: int = 18, preset: str = "medium",
                 trim_audio: bool = True) -> None:
        """path: .mp4 (or .mov/.m4v/.mkv). fps: frames per second. size: (width, height) expected of every frame;
        None takes it from the first frame. crf: libx264 quality, 0 (lossless) to 51."""
        self.path = Path(path).expanduser()
        if self.path.suffix.lower() not in OUTPUT_FORMATS:
            raise InputError(f"cannot write {self.path.name}: unknown video suffix",
                             f"use one of {', '.join(OUTPUT_FORMATS)}")
        if not self.path.parent.is_dir():
            raise InputError(f"the output folder {self.path.parent} does not exist", "create it first")
        try:
            self.fps = Fraction(fps).limit_denominator(1001)  # 29.97002997 -> 30000/1001
        except (TypeError, ValueError):
            raise InputError(f"fps must be a number, got {fps!r}", "pass e.g. fps=25") from None
        if self.fps <= 0:
            raise InputError(f"fps must be positive, got {fps}", "pass e.g. fps=25")
        if not 0 <= int(crf) <= 51:
            raise InputError(f"crf must be in 0..51, got {crf}", "use 18 (the reference's value)")
        self.size = size
        self.crf = int(crf)
        self.preset = preset
        self.trim_audio = trim_audio
        self.frames_written = 0
        self._audio: _AudioFeed | None = None
        if audio is not None:
            self._audio = _AudioFeed(Path(audio).expanduser(), _av().codec.Codec("aac", "w").audio_rates)
        self._tmp: Path | None = None
        self._hold: Hold | None = None  # on the partial file while this run lives
        self._container: Any = None
        self._vstream: Any = None
        self._astream: Any = None
        self._audio_chunks: Iterator[np.ndarray] | None = None
        self._audio_sent = 0
        self._closed = False

    # ---- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- writing ---------------------------------------------------------------------------------------------
    def _open(self, width: int, height: int) -> None:
        av = _av()
        # A killed run (SIGKILL: no exit path runs) left its partial file here: removed once nobody holds it.
        sweep(self.path.parent, re.compile(rf"\.{re.escape(self.path.stem)}\.[0-9a-f]{{12}}\.partial"
                                           rf"{re.escape(self.path.suffix)}"))
        # A hidden, unique name beside the target (same file system, so the final rename is atomic), with the usual
        # umask permissions (tempfile.mkstemp would leave it 0600).
        self._tmp = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:12]}.partial{self.path.suffix}")
        self._tmp.touch(exist_ok=False)  # created here to be held from the start (FFmpeg opens it only later)
        self._hold = Hold(self._tmp)
        self._container = av.open(str(self._tmp), mode="w", format=OUTPUT_FORMATS[self.path.suffix.lower()])
        vs = self._container.add_stream("libx264", rate=self.fps)
        vs.width, vs.height, vs.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        vs.options = {"crf": str(self.crf), "preset": self.preset}
        # x264's own frame threading with an automatic count, as the ffmpeg CLI runs it. PyAV's default (slice
        # threads) changes the bitstream; with this and the conversion in write() the decoded frames are identical to
        # those of the reference's ffmpeg command (measured on a 50-frame 512x512 clip).
        vs.codec_context.thread_type = "FRAME"
        vs.codec_context.thread_count = 0
        self._vstream = vs
        if self._audio is not None:
            ast = self._container.add_stream("aac", rate=self._audio.rate)
            ast.codec_context.layout = self._audio.layout
            ast.codec_context.format = "fltp"
            ast.codec_context.bit_rate = AUDIO_BIT_RATE
            self._astream = ast
            self._audio_chunks = self._audio.chunks()

    def write(self, frame_bgr: np.ndarray) -> None:
        """Encode one frame: (H, W, 3) uint8 BGR, the same size as the first (or as ``size``)."""
        av = _av()
        if self._closed:
            raise MuseTalkError("this VideoWriter is already closed", "open a new VideoWriter")
        frame = np.asarray(frame_bgr)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise InputError(f"a frame must be (H, W, 3) uint8 BGR, got {frame.shape} {frame.dtype}",
                             "convert with np.clip(x, 0, 255).astype(np.uint8) and keep 3 channels (BGR)")
        height, width = frame.shape[:2]
        if self.size is None:
            self.size = (width, height)
        if (width, height) != tuple(self.size):
            raise InputError(f"frame {self.frames_written} is {width}x{height}, expected {self.size[0]}x{self.size[1]}",
                             "write frames of one size (resize them first)")
        if width % 2 or height % 2:
            frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        try:
            if self._container is None:
                self._open(width, height)
            # rgb24 in, bicubic chroma (the ffmpeg CLI's defaults for the reference's PNGs): the yuv420p planes are
            # then bit-exact with the reference's. From bgr24, or with PyAV's default bilinear, up to 5 levels differ.
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:, :, ::-1]), format="rgb24")
            vf = vf.reformat(format="yuv420p", interpolation="BICUBIC")
            vf.pts = self.frames_written
            self._mux(self._vstream.encode(vf))
            self.frames_written += 1
            if self._audio is not None:  # keep the audio level with the video so the muxer interleaves them
                self._send_audio(self._samples_until(self.frames_written))
        except (av.FFmpegError, OSError) as err:
            self.abort()
            raise StorageError(f"writing {self.path} failed at frame {self.frames_written}: {err}",
                                "check free disk space and write permission on the output folder") from None

    def _mux(self, packets: Any) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _samples_until(self, n_frames: int) -> int:
        assert self._audio is not None
        return round(Fraction(n_frames) / self.fps * self._audio.rate)

    def _send_audio(self, limit: int | None) -> None:
        """Encode audio until ``limit`` samples are sent (None: all). Splits a chunk only at the final limit."""
        av = _av()
        assert self._audio is not None and self._audio_chunks is not None
        while limit is None or self._audio_sent < limit:
            chunk = next(self._audio_chunks, None)
            if chunk is None:
                return
            if limit is not None and self._audio_sent + chunk.shape[1] > limit:
                rest = chunk[:, limit - self._audio_sent:]
                chunk = chunk[:, :limit - self._audio_sent]
                self._audio_chunks = _prepend(rest, self._audio_chunks)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk, dtype=np.float32), format="fltp",
                                               layout=self._audio.layout)
            frame.sample_rate = self._audio.rate
            frame.pts = self._audio_sent
            frame.time_base = Fraction(1, self._audio.rate)
            self._mux(self._astream.encode(frame))
            self._audio_sent += chunk.shape[1]

    # ---- finishing -------------------------------------------------------------------------------------------
    def close(self) -> Path:
        """Flush the encoders, finish the file and rename it onto ``path``. Returns ``path``."""
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise InputError(f"no frames were written to {self.path}", "write at least one frame before closing")
        av = _av()
        try:
            self._mux(self._vstream.encode(None))
            if self._audio is not None:
                self._send_audio(self._samples_until(self.frames_written) if self.trim_audio else None)
                self._mux(self._astream.encode(None))
                self._audio.close()
            self._container.close()
            assert self._tmp is not None
            os.replace(self._tmp, self.path)  # atomic on one file system: readers never see a partial file
            self._release()
        except BaseException as err:
            self.abort()
            if isinstance(err, (av.FFmpegError, OSError)):
                raise StorageError(f"finishing {self.path} failed: {err}",
                                    "check free disk space and write permission on the output folder") from None
            raise
        self._closed = True
        log.info("wrote %s: %d frames at %s fps", self.path, self.frames_written, self.fps)
        return self.path

    def abort(self) -> None:
        """Stop without output: close everything and delete the temporary file. Safe to call twice."""
        self._closed = True
        for closer in (self._container, self._audio):
            if closer is not None:
                try:
                    closer.close()
                except Exception as err:  # cleanup after a failure; the original error is what matters
                    log.debug("ignored while aborting %s: %s", self.path, err)
        self._container = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        self._release()

    def _release(self) -> None:
        if self._hold is not None:
            self._hold.release()
            self._hold = None


def _prepend(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest
