"""Live over a WebSocket: ``/avatars/{id}/live``, plus the /avatars routes (:func:`add_live_routes`).

Protocol (docs/api.md has the full text):

  client -> {"type": "start", "sample_rate": 16000, "format": "pcm_s16le" | "pcm_f32le", "channels": 1,
             "fps": <the avatar's>, "options": {"lookahead_ms": 200 | "exact", "batch_size": 4,
             "late_after_ms": 500, "image_format": "jpeg" | "png", "jpeg_quality": 85, "coalesce": false}}
  server -> {"type": "ready", "session": id, "fps", "width", "height", "sample_rate", "lookahead_ms", "batch_size"}
  client -> binary messages: raw little-endian PCM, mono, any length (whole samples) ... then {"type": "end"}
  server -> one binary message per frame, as soon as it is made:
            4-byte big-endian header length N | N bytes of JSON header | the image (JPEG or PNG)
            header: {"type": "frame", "index", "timestamp", "latency_ms", "late"}
  server -> {"type": "summary", "frames", "late_frames", "audio_s", "wall_s", "latency_ms": {first, p50, p95, max},
             ...} then closes with 1000.
  errors -> {"type": "error", "error": code, "message", "fix"} then a close code 4000 + the HTTP-like status
            (4400 bad request, 4404 unknown avatar, 4408 timeout, 4413 too large, 4429 busy, 4500, 4503).

One live session per server at a time (``ServerSettings.live_max_sessions``, ``--live-max-sessions``): the model
thread of a session needs the device to itself to keep up with speech; another client gets ``busy`` at once. Jobs of POST /generate keep
running on their worker meanwhile (they share the device, and slow the session down).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import uuid
from dataclasses import dataclass
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, File, Path as PathParam, UploadFile, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from musetalk.errors import MuseTalkError
from musetalk.frontends.server.avatars import AVATAR_ID_PATTERN, AvatarStore, ServerAvatar
from musetalk.frontends.server.errors import ApiError, http_error
from musetalk.frontends.server.schemas import _errors
from musetalk.frontends.options import FORM_INT_BOUND, overrides_from, with_form_settings
from musetalk.frontends.server.settings import ServerSettings

if TYPE_CHECKING:
    from musetalk.frontends.server.jobs import GenerationService
    from musetalk.stream.live import LiveFrame, LiveSession

log = logging.getLogger("musetalk.frontends.server")
SAMPLE_RATE = 16_000  # Whisper's rate; the server does not resample a stream
FORMATS: dict[str, np.dtype] = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
OPTION_KEYS = {"lookahead_ms", "batch_size", "late_after_ms", "image_format", "jpeg_quality", "coalesce"}
START_KEYS = {"type", "sample_rate", "format", "channels", "fps", "options"}


class LiveError(MuseTalkError):
    """A protocol-level error: sent as {"type": "error", ...}, then the socket closes with ``4000 + status``."""

    def __init__(self, status: int, code: str, message: str, fix: str | None = None) -> None:
        super().__init__(message, fix)
        self.status = status
        self.code = code

    @classmethod
    def of(cls, exc: BaseException) -> "LiveError":
        if isinstance(exc, LiveError):
            return exc
        api = http_error(exc)
        return cls(api.status, api.code, api.message, api.fix)


@dataclass(frozen=True)
class StartRequest:
    """A checked start message."""

    format: np.dtype
    lookahead_s: float | None
    batch_size: int | None
    late_after_s: float | None
    image_format: str
    jpeg_quality: int
    coalesce: bool


class LiveService:
    """Avatar store + live session slots + the WebSocket loop. One per app (``app.state.live``)."""

    def __init__(self, service: "GenerationService") -> None:
        self.service = service
        self.settings = service.settings  # the live_* fields and max_avatars
        self.avatars = AvatarStore(service, self.settings.max_avatars)
        self._lock = threading.Lock()
        self._sessions: dict[str, "LiveSession | None"] = {}  # id -> session (None while starting)
        self._closing = False

    # -- slots ----------------------------------------------------------------------------------------------
    def _reserve(self) -> str:
        with self._lock:
            if self._closing:
                raise LiveError(503, "shutting_down", "the server is shutting down", "retry when it is back")
            if len(self._sessions) >= self.settings.live_max_sessions:
                raise LiveError(429, "busy", f"{len(self._sessions)} live session(s) already running on this "
                                f"server (the limit is {self.settings.live_max_sessions})",
                                "retry when it has ended, or use another server")
            session_id = uuid.uuid4().hex
            self._sessions[session_id] = None
            return session_id

    def active(self) -> int:
        """Live sessions running (or starting) now."""
        with self._lock:
            return len(self._sessions)

    def close(self) -> None:
        """Server stop: abort running sessions, then remove every avatar."""
        with self._lock:
            self._closing = True
            sessions = [s for s in self._sessions.values() if s is not None]
        for session in sessions:
            session.abort()
        self.avatars.close()

    # -- the socket ---------------------------------------------------------------------------------------------
    async def run(self, ws: WebSocket, avatar_id: str) -> None:
        """One live session over ``ws`` (accepted already); every outcome ends with a message and a close."""
        session_id: str | None = None
        record: ServerAvatar | None = None
        session: LiveSession | None = None
        try:
            try:
                record = self.avatars.acquire(avatar_id)
            except ApiError as exc:
                raise LiveError(exc.status, exc.code, exc.message, exc.fix) from None
            session_id = self._reserve()
            start = await self._receive_start(ws, record)
            session = await run_in_threadpool(self._open, record, start)
            with self._lock:
                self._sessions[session_id] = session
            meta = record.avatar.meta
            await ws.send_json({"type": "ready", "session": session_id, "fps": session.fps, "width": meta.width,
                                "height": meta.height, "sample_rate": SAMPLE_RATE, "format": start.format.name,
                                "lookahead_ms": None if start.lookahead_s is None else 1e3 * start.lookahead_s,
                                "batch_size": session.batch_size, "image_format": start.image_format})
            await self._stream(ws, session, start)
        except LiveError as exc:
            await _send_error(ws, exc)
        except (WebSocketDisconnect, OSError):  # uvicorn's ClientDisconnected is an OSError
            log.info("live client went away")
        except Exception as exc:  # a bug or a model failure: the client gets a clean error, the log the traceback
            log.exception("live session failed")
            await _send_error(ws, LiveError.of(exc))
        finally:
            if session is not None:
                await run_in_threadpool(session.abort)
                log.info("live session %s: %s", session_id, session.summary())
            if session_id is not None:
                with self._lock:
                    self._sessions.pop(session_id, None)
            if record is not None:
                self.avatars.release(record)

    async def _receive_start(self, ws: WebSocket, record: ServerAvatar) -> StartRequest:
        message = await _receive(ws, self.settings.live_start_timeout_s, LiveError(
            408, "start_timeout", f"no start message within {self.settings.live_start_timeout_s:g} s",
            'send {"type": "start", "sample_rate": 16000, "format": "pcm_s16le"} first'))
        return parse_start(message.get("text"), record, self.settings, self.service.settings.max_batch_size)

    def _open(self, record: ServerAvatar, start: StartRequest) -> "LiveSession":
        from musetalk.stream.live import LiveConfig

        fields = {k: v for k, v in record.fields.items() if v is not None}
        if start.batch_size is not None:
            fields["batch_size"] = start.batch_size
        config = self.service.make_config(record.version, **fields)
        late: dict[str, Any] = {} if start.late_after_s is None else {"late_after_s": start.late_after_s}
        options = LiveConfig(lookahead_s=start.lookahead_s, coalesce=start.coalesce, **late)
        return self.service.pipeline(record.version).live(record.avatar, config, options)

    async def _stream(self, ws: WebSocket, session: "LiveSession", start: StartRequest) -> None:
        """Receive audio and send frames at once; ends with the summary, or raises what went wrong."""
        receiver = asyncio.create_task(self._receive_audio(ws, session, start))
        frames = session.frames()
        encode = _encoder(start)

        def next_message() -> bytes | None:
            frame = next(frames, None)
            return None if frame is None else encode(frame)

        try:
            while True:
                sender = asyncio.ensure_future(run_in_threadpool(next_message))
                await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if receiver.done() and receiver.exception() is not None:
                    session.abort(wait=False)  # ends the frame iteration (quietly): the sender returns
                    await asyncio.wait({sender})
                    raise receiver.exception()  # type: ignore[misc]
                message = await sender
                if message is None:
                    break
                await ws.send_bytes(message)
            if self._closing:  # close() aborted the session: its frames stopped early
                raise LiveError(503, "shutting_down", "the server is shutting down", "start again when it is back")
            summary = session.summary()
            await ws.send_json({"type": "summary", **summary_body(summary)})
            await ws.close(1000)
        finally:
            if not receiver.done():
                receiver.cancel()
                await asyncio.gather(receiver, return_exceptions=True)
            session.abort(wait=False)  # the frame iteration ends at its next batch; close() needs it idle
            try:
                await run_in_threadpool(frames.close)
            except ValueError:  # still running in a thread (a cancelled task): abort() ends it
                pass

    async def _receive_audio(self, ws: WebSocket, session: "LiveSession", start: StartRequest) -> None:
        """Audio messages -> session.feed (in a thread: feed blocks under back-pressure) until "end"."""
        max_samples = int(self.service.settings.max_audio_seconds * SAMPLE_RATE)
        received = 0
        width = start.format.itemsize
        while True:
            message = await _receive(ws, self.settings.live_idle_timeout_s, LiveError(
                408, "idle_timeout", f"no audio for {self.settings.live_idle_timeout_s:g} s",
                'send audio continuously (silence is fine) and {"type": "end"} at the end'))
            data = message.get("bytes")
            if data is None:
                text = message.get("text") or ""
                try:
                    kind = json.loads(text).get("type")
                except (ValueError, AttributeError):
                    kind = None
                if kind == "end":
                    session.close()
                    return
                raise LiveError(400, "bad_message", f"unexpected text message {text[:80]!r}",
                                'send audio as binary messages and {"type": "end"} at the end')
            if len(data) > self.settings.live_max_chunk_bytes:
                raise LiveError(413, "chunk_too_large", f"an audio message of {len(data)} bytes is over the "
                                f"limit of {self.settings.live_max_chunk_bytes}", "send smaller chunks (20-200 ms)")
            if len(data) % width:
                raise LiveError(400, "bad_chunk", f"an audio message of {len(data)} bytes is not a whole number "
                                f"of {start.format.name} samples ({width} bytes each)",
                                "send whole samples, little-endian, mono")
            pcm = np.frombuffer(data, dtype=start.format)
            if pcm.dtype.kind == "f" and not np.all(np.isfinite(pcm)):
                raise LiveError(400, "bad_chunk", "an audio message holds NaN or infinite samples",
                                "send finite float32 samples in [-1, 1]")
            received += len(pcm)
            if received > max_samples:
                raise LiveError(413, "too_long", f"the session's audio passed this server's limit of "
                                f"{self.service.settings.max_audio_seconds:g} s", "start a new session")
            samples = pcm.astype(np.int16 if pcm.dtype.kind == "i" else np.float32)
            await run_in_threadpool(session.feed, samples)


def parse_start(text: str | None, record: ServerAvatar, settings: ServerSettings,
                max_batch_size: int) -> StartRequest:
    """Check a start message; LiveError 400 (with what to send instead) for anything off."""
    fix = 'e.g. {"type": "start", "sample_rate": 16000, "format": "pcm_s16le", "channels": 1}'
    try:
        start = json.loads(text) if text is not None else None
    except ValueError:
        start = None
    if not isinstance(start, dict) or start.get("type") != "start":
        raise LiveError(400, "bad_start", "the first message must be a JSON start message", fix)
    unknown = set(start) - START_KEYS
    if unknown:
        raise LiveError(400, "bad_start", f"unknown start field(s): {', '.join(sorted(unknown))}", fix)
    rate = start.get("sample_rate")
    if rate != SAMPLE_RATE:
        raise LiveError(400, "unsupported_sample_rate", f"sample_rate {rate!r} is not supported; live audio must be "
                        f"{SAMPLE_RATE} Hz", f"resample to {SAMPLE_RATE} Hz mono before sending")
    fmt = start.get("format", "pcm_s16le")
    if fmt not in FORMATS:
        raise LiveError(400, "unsupported_format", f"format {fmt!r} is not supported",
                        f"use one of {', '.join(FORMATS)}")
    if start.get("channels", 1) != 1:
        raise LiveError(400, "unsupported_channels", f"channels={start.get('channels')!r}: live audio is mono",
                        "mix down to one channel")
    fps = start.get("fps")
    if fps is not None and (not isinstance(fps, (int, float)) or abs(fps - record.avatar.meta.fps) > 1e-6):
        raise LiveError(400, "fps_mismatch", f"fps {fps!r} differs from the avatar's {record.avatar.meta.fps:g}",
                        "leave fps out, or prepare the avatar with that fps (POST /avatars with fps=...)")
    options = start.get("options") or {}
    if not isinstance(options, dict) or set(options) - OPTION_KEYS:
        raise LiveError(400, "bad_start", f"options must be an object with keys among {', '.join(sorted(OPTION_KEYS))}",
                        fix)
    lookahead = options.get("lookahead_ms", settings.live_lookahead_ms)
    if lookahead == "exact":
        lookahead_s = None
    elif isinstance(lookahead, (int, float)) and not isinstance(lookahead, bool) and 0 <= lookahead <= 30_000:
        lookahead_s = lookahead / 1e3
    else:
        raise LiveError(400, "bad_start", f"lookahead_ms {lookahead!r} must be 0..30000 or \"exact\"", fix)
    batch = options.get("batch_size")
    if batch is not None and not (isinstance(batch, int) and 1 <= batch <= min(max_batch_size, FORM_INT_BOUND)):
        raise LiveError(400, "bad_start", f"batch_size {batch!r} must be an integer 1..{max_batch_size}", fix)
    late = options.get("late_after_ms")
    if late is not None and not (isinstance(late, (int, float)) and late > 0):
        raise LiveError(400, "bad_start", f"late_after_ms {late!r} must be a positive number", fix)
    image = options.get("image_format", "jpeg")
    quality = options.get("jpeg_quality", settings.live_jpeg_quality)
    if image not in ("jpeg", "png") or not (isinstance(quality, int) and 1 <= quality <= 100):
        raise LiveError(400, "bad_start", "image_format must be jpeg or png, jpeg_quality 1..100", fix)
    return StartRequest(FORMATS[fmt], lookahead_s, batch, None if late is None else late / 1e3, image, quality,
                        bool(options.get("coalesce", False)))


def _encoder(start: StartRequest):
    """frame -> one binary message: 4-byte big-endian header length, the JSON header, the image."""
    import cv2

    ext, params = (".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]) if start.image_format == "png" \
        else (".jpg", [cv2.IMWRITE_JPEG_QUALITY, start.jpeg_quality])

    def encode(frame: "LiveFrame") -> bytes:
        ok, data = cv2.imencode(ext, frame.image, params)
        if not ok:
            raise MuseTalkError(f"could not encode frame {frame.index}", "see the server log")
        header = json.dumps({"type": "frame", "index": frame.index, "timestamp": round(frame.timestamp_s, 6),
                             "latency_ms": round(1e3 * frame.latency_s, 3), "late": frame.late}).encode()
        return struct.pack(">I", len(header)) + header + data.tobytes()

    return encode


def summary_body(summary: Any) -> dict[str, Any]:
    """A LiveSummary as the summary message's fields (latencies in ms)."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1e3 * value, 3)

    return {"frames": summary.frames, "late_frames": summary.late_frames, "audio_s": round(summary.audio_s, 6),
            "wall_s": round(summary.wall_s, 3), "fps": summary.fps, "batch_size": summary.batch_size,
            "lookahead_ms": ms(summary.lookahead_s),
            "latency_ms": {"first": ms(summary.first_frame_latency_s), "p50": ms(summary.latency_p50_s),
                           "p95": ms(summary.latency_p95_s), "max": ms(summary.latency_max_s)}}


async def _send_error(ws: WebSocket, exc: LiveError) -> None:
    """Send the error message and close with 4000 + status, unless the client is gone already."""
    if ws.client_state != WebSocketState.CONNECTED or ws.application_state != WebSocketState.CONNECTED:
        return
    try:
        await ws.send_json({"type": "error", "error": exc.code, "message": exc.message, "fix": exc.fix})
        await ws.close(4000 + exc.status, exc.code)
    except (WebSocketDisconnect, RuntimeError, OSError):  # the client left meanwhile
        pass


# -- routes -------------------------------------------------------------------------------------------------------
def add_live_routes(app: FastAPI, service: "GenerationService") -> LiveService:
    """Register /avatars (POST, GET, GET {id}, DELETE {id}) and the /avatars/{id}/live WebSocket; limits from the
    service's :class:`ServerSettings` (``live_*``, ``max_avatars``)."""
    live = LiveService(service)

    @app.post("/avatars", status_code=201, summary="Prepare an avatar from a source, for live sessions",
              responses=_errors(413, 415, 422, 429, 503))
    @with_form_settings  # the same settings fields as /generate (bbox_shift, parsing_mode, fps, ...): options.py
    async def create_avatar(
        source: UploadFile = File(..., description="face image (png/jpg/bmp/webp/tiff) or video (mp4/mov/mkv/avi)"),
        **settings: Any,
    ) -> JSONResponse:
        """Landmarks, crops, latents and masks of every source frame, kept until DELETE or server stop."""
        fields = overrides_from(settings)
        config = service.make_config(fields.pop("version", None), **fields)
        record = await run_in_threadpool(live.avatars.create, config, fields, source.file)
        return JSONResponse(record.describe(), status_code=201, headers={"Location": f"/avatars/{record.id}"})

    @app.get("/avatars", summary="The prepared avatars")
    def list_avatars() -> dict[str, Any]:
        """Every avatar this server holds, oldest first, and the live sessions running."""
        return {"avatars": [r.describe() for r in live.avatars.list()], "live_sessions": live.active(),
                "max_live_sessions": live.settings.live_max_sessions}

    @app.get("/avatars/{avatar_id}", summary="One prepared avatar", responses=_errors(404, 422))
    def get_avatar(avatar_id: str = PathParam(..., pattern=AVATAR_ID_PATTERN)) -> dict[str, Any]:
        """Frames, faces, fps, size and settings of an avatar."""
        return live.avatars.get(avatar_id).describe()

    @app.delete("/avatars/{avatar_id}", summary="Delete a prepared avatar", responses=_errors(404, 409, 422))
    def delete_avatar(avatar_id: str = PathParam(..., pattern=AVATAR_ID_PATTERN)) -> dict[str, Any]:
        """Removes its folder; 409 while a live session runs on it."""
        return {**live.avatars.delete(avatar_id).describe(), "deleted": True}

    @app.websocket("/avatars/{avatar_id}/live")
    async def live_socket(ws: WebSocket, avatar_id: str) -> None:
        await ws.accept()
        await live.run(ws, avatar_id)

    return live


async def _receive(ws: WebSocket, timeout_s: float, timed_out: LiveError) -> MutableMapping[str, Any]:
    """The client's next WebSocket message; ``timed_out`` when none comes within ``timeout_s``, and
    WebSocketDisconnect when the client went away."""
    try:
        message = await asyncio.wait_for(ws.receive(), timeout_s)
    except asyncio.TimeoutError:
        raise timed_out from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message
