"""Uploads: content sniffing, :func:`store_upload`, and the :class:`BodyLimit` request-size middleware."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Literal

from musetalk.frontends.server.errors import ApiError
from musetalk.frontends.server.settings import COPY_CHUNK, SNIFF_BYTES, MiB, ServerSettings


# -- content sniffing ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sniffed:
    """What a file's first bytes say it is. kind: image | video | audio. suffix: the name the server gives it."""

    kind: Literal["image", "video", "audio"]
    suffix: str


def sniff(head: bytes) -> Sniffed | None:
    """Identify a file from its magic bytes (the client's file name and content type are never trusted)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Sniffed("image", ".png")
    if head.startswith(b"\xff\xd8\xff"):
        return Sniffed("image", ".jpg")
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return Sniffed("image", ".tif")
    if head.startswith(b"BM") and len(head) >= 14 and head[6:10] == b"\x00\x00\x00\x00":  # reserved fields are 0
        return Sniffed("image", ".bmp")
    riff = head[8:12] if head[:4] == b"RIFF" else b""
    if riff == b"WEBP":
        return Sniffed("image", ".webp")
    if riff == b"WAVE":
        return Sniffed("audio", ".wav")
    if riff == b"AVI ":
        return Sniffed("video", ".avi")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Sniffed("video", ".gif")  # open_frames reads a .gif as a video (every frame)
    if head[4:8] == b"ftyp":  # ISO base media: mp4, mov, m4a
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B ", b"F4A "):
            return Sniffed("audio", ".m4a")
        return Sniffed("video", ".mov" if brand == b"qt  " else ".mp4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return Sniffed("video", ".mkv")  # Matroska and WebM
    if head.startswith(b"fLaC"):
        return Sniffed("audio", ".flac")
    if head.startswith(b"OggS"):
        return Sniffed("audio", ".ogg")
    if head.startswith(b"ID3"):
        return Sniffed("audio", ".mp3")
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
        return Sniffed("audio", ".aac" if head[1] & 0x06 == 0 else ".mp3")  # layer bits 00: ADTS AAC
    return None


SOURCE_KINDS = {"image", "video"}
AUDIO_KINDS = {"audio", "video"}  # a video's sound track is used, as the CLI does
UNSUPPORTED = {
    "source": "upload a PNG, JPEG, BMP, WebP or TIFF image, or an MP4, MOV, MKV/WebM, AVI or GIF video",
    "audio": "upload WAV, MP3, M4A/AAC, FLAC or Ogg audio, or a video with a sound track",
}


def store_upload(stream: IO[bytes], folder: Path, role: Literal["source", "audio"]) -> tuple[Path, Sniffed]:
    """Copy an upload to ``folder/<role><suffix>`` (a name chosen here) after sniffing it; 415 when it isn't media."""
    head = stream.read(SNIFF_BYTES)
    found = sniff(head)
    allowed = SOURCE_KINDS if role == "source" else AUDIO_KINDS
    if found is None or found.kind not in allowed or (role == "audio" and found.suffix == ".gif"):
        what = f"{'an' if found.kind == 'image' else 'a'} {found.kind} ({found.suffix[1:]})" if found \
            else "not a supported media file"
        raise ApiError(415, "unsupported_media_type", f"the {role} upload is {what}", UNSUPPORTED[role])
    path = folder / f"{role}{found.suffix}"
    try:
        with open(path, "wb") as out:
            out.write(head)
            shutil.copyfileobj(stream, out, COPY_CHUNK)
    except OSError as err:  # disk full, file size limit: the caller removes the job folder
        raise ApiError(507, "insufficient_storage", f"the server could not store the {role} upload "
                       f"({err.strerror or err})", "retry later, or send a smaller file") from None
    return path, found


# -- media limits -------------------------------------------------------------------------------------------------
def check_media_limits(source: Path, audio: Path, settings: ServerSettings) -> None:
    """413 when the source or audio declares more work than ``settings`` allows; read from headers, before decoding.

    A limit the header cannot state (a stream without frame count or duration) is enforced later, while decoding:
    the audio length by the job's own check, and the frames by the avatar preparation reading at most what it got.
    """
    from musetalk.stream.video import declared_duration, declared_size

    size = declared_size(source)
    if size.pixels > settings.max_source_pixels:
        dims = f" ({size.width}x{size.height})" if size.width and size.height else ""
        raise ApiError(413, "frame_too_large", f"a source frame has {size.pixels} pixels{dims}; this server's limit "
                       f"(max_source_pixels) is {settings.max_source_pixels}",
                       "downscale the source, e.g. ffmpeg -i in.mp4 -vf scale=-2:720 out.mp4")
    if size.num_frames is not None and size.num_frames > settings.max_source_frames:
        raise ApiError(413, "too_many_frames", f"the source has {size.num_frames} frames; this server's limit "
                       f"(max_source_frames) is {settings.max_source_frames}",
                       "cut the source: a few seconds of video make a good avatar (it is looped)")
    if size.duration_s is not None and size.duration_s > settings.max_source_seconds:
        raise ApiError(413, "source_too_long", f"the source lasts {size.duration_s:.0f} s; this server's limit "
                       f"(max_source_seconds) is {settings.max_source_seconds:g} s",
                       "cut the source: a few seconds of video make a good avatar (it is looped)")
    seconds = declared_duration(audio)
    if seconds is not None and seconds > settings.max_audio_seconds:
        raise ApiError(413, "audio_too_long", f"the audio lasts {seconds:.0f} s; this server's limit "
                       f"(max_audio_seconds) is {settings.max_audio_seconds:g} s", "split the audio into shorter parts")


# -- upload size limit --------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, by its Content-Length or while it streams in.

    Starlette's multipart parser has no size limit for files; this stops a large upload before it is spooled to
    disk. A body found too large mid-stream is cut off (the app sees a disconnect) and whatever the app answers
    is replaced by the 413.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        too_large = False
        started = False

        async def limited_receive() -> dict:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if too_large:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await self._reject(send)

    async def _reject(self, send: Callable) -> None:
        error = ApiError(413, "too_large", f"the request is larger than this server's limit of "
                         f"{self.max_bytes / MiB:g} MiB", "send a smaller file (shorter, or lower resolution)")
        await error.response()({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}
