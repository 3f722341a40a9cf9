"""A client for live sessions (``/avatars/{id}/live``, see docs/api.md): audio out in chunks, frames back as made.

    client = LiveClient("http://127.0.0.1:8765", avatar_id, lookahead_ms=200)
    for frame in client.frames(wav, chunk_ms=100, realtime=True):   # ReceivedFrame: index, image (BGR), ...
        show(frame.image)
    print(client.result.summary)                                    # the server's summary; client latencies too

``musetalk live --server URL --avatar ID --audio speech.wav --output out.mp4`` is this class plus a VideoWriter.
Uses the ``websockets`` package (server extra), imported when a session starts.
"""

from __future__ import annotations

import bisect
import itertools
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from musetalk.errors import InputError, MuseTalkError

SAMPLE_RATE = 16_000
AHEAD_S = 4.0  # audio sent beyond the frames received (plus the look-ahead): under the server's 5 s backlog
SEGMENT_S = 30.0  # "exact" frames come once their 30 s Whisper segment is complete
WINDOW_S = 0.2  # a frame's audio window reaches this far past the frame (10 Whisper steps; less at 25 fps)


class LiveClientError(MuseTalkError):
    """The server refused or ended the session with an error message (``code``: busy, unknown_avatar, ...)."""

    def __init__(self, code: str, message: str, fix: str | None = None, close_code: int | None = None) -> None:
        super().__init__(message, fix)
        self.code = code
        self.close_code = close_code


@dataclass(frozen=True)
class ReceivedFrame:
    """One frame as the client got it."""

    index: int
    timestamp_s: float  # index / fps on the audio's timeline
    image: np.ndarray | None  # (H, W, 3) uint8 BGR (None with decode=False)
    data: bytes  # the JPEG / PNG as sent
    server_latency_ms: float  # audio that completed it arrived at the server -> it left the pipeline
    late: bool  # the server counted it late
    latency_s: float | None  # client side: its audio (up to the frame's end) sent -> the frame received


@dataclass
class LiveResult:
    """The session as the client saw it (filled while ``frames`` runs)."""

    ready: dict[str, Any] = field(default_factory=dict)  # the server's ready message (fps, size, ...)
    summary: dict[str, Any] = field(default_factory=dict)  # the server's summary message
    frames: int = 0
    first_frame_s: float | None = None  # first audio sent -> first frame received
    latencies: list[float] = field(default_factory=list)  # client-side latency per frame (s)

    def latency_percentiles(self) -> dict[str, float | None]:
        """p50 / p95 / max of the client-side latencies (s)."""
        if not self.latencies:
            return {"p50": None, "p95": None, "max": None}
        p50, p95 = np.percentile(np.asarray(self.latencies), [50, 95])
        return {"p50": float(p50), "p95": float(p95), "max": float(max(self.latencies))}


def live_url(server: str, avatar: str) -> str:
    """http(s)://host:port -> ws(s)://host:port/avatars/{avatar}/live."""
    base = server.rstrip("/")
    if base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    elif base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif not base.startswith(("ws://", "wss://")):
        base = "ws://" + base
    return f"{base}/avatars/{avatar}/live"


def parse_frame(message: bytes) -> tuple[dict[str, Any], bytes]:
    """A binary frame message -> (JSON header, image bytes)."""
    if len(message) < 4:
        raise MuseTalkError("the server sent a truncated frame message", "check that client and server versions match")
    (size,) = struct.unpack(">I", message[:4])
    return json.loads(message[4:4 + size]), message[4 + size:]


class LiveClient:
    """Stream audio to a live session and receive its frames. One ``frames``/``run`` call = one session."""

    def __init__(self, server: str, avatar: str, *, lookahead_ms: float | str | None = None,
                 batch_size: int | None = None, image_format: str = "jpeg", jpeg_quality: int | None = None,
                 late_after_ms: float | None = None, open_timeout: float = 10.0, receive_timeout: float = 300.0
                 ) -> None:
        self.url = live_url(server, avatar)
        options: dict[str, Any] = {"image_format": image_format}
        for key, value in (("lookahead_ms", lookahead_ms), ("batch_size", batch_size),
                           ("jpeg_quality", jpeg_quality), ("late_after_ms", late_after_ms)):
            if value is not None:
                options[key] = value
        self.options = options
        self.open_timeout = open_timeout
        self.receive_timeout = receive_timeout
        self.result = LiveResult()

    def run(self, audio: np.ndarray, chunk_ms: float = 100, realtime: bool = False,
            on_frame: Callable[[ReceivedFrame], None] | None = None) -> LiveResult:
        """Send ``audio`` and collect every frame through ``on_frame``; returns the result."""
        for frame in self.frames(audio, chunk_ms, realtime):
            if on_frame is not None:
                on_frame(frame)
        return self.result

    def frames(self, audio: np.ndarray, chunk_ms: float = 100, realtime: bool = False, decode: bool = True
               ) -> Iterator[ReceivedFrame]:
        """Send (n,) float 16 kHz mono ``audio`` in ``chunk_ms`` pieces (at speaking pace with ``realtime``) from a
        helper thread, and yield the frames as they arrive. Raises LiveClientError when the server says no."""
        from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException
        from websockets.sync.client import connect

        wav = np.asarray(audio, dtype=np.float32).reshape(-1)
        if not chunk_ms > 0:
            raise InputError(f"chunk_ms must be positive, got {chunk_ms}", "e.g. 100")
        pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()
        step = 2 * max(1, int(round(chunk_ms * SAMPLE_RATE / 1000)))  # bytes per chunk
        self.result = result = LiveResult()
        try:
            # no client keep-alive pings: while the server applies back-pressure it reads nothing (pongs included);
            # a dead server shows up as the receive timeout instead
            ws = connect(self.url, open_timeout=self.open_timeout, max_size=64 * 2**20, compression=None,
                         ping_interval=None)
        except (OSError, InvalidURI, WebSocketException, TimeoutError) as exc:
            raise MuseTalkError(f"cannot open a live session at {self.url} ({type(exc).__name__}: {exc})",
                                "check --server (is `musetalk serve` running there?) and --avatar") from None
        sent: list[tuple[int, float]] = []  # (samples sent so far, when), appended by the sender thread
        stop = threading.Event()
        received = [0]  # frames received so far (written here, read by the sender)
        sender = threading.Thread(target=self._send_audio, args=(ws, pcm, step, realtime, sent, stop, received),
                                  name="musetalk-live-client", daemon=True)
        with ws:  # the context closes the connection (and is how websockets >= 17.1 wants it used)
            try:
                try:
                    ws.send(json.dumps({"type": "start", "sample_rate": SAMPLE_RATE, "format": "pcm_s16le",
                                        "channels": 1, "options": self.options}))
                except ConnectionClosed:  # refused at once (busy, unknown avatar): the reason is the next message
                    pass
                result.ready = self._expect(ws, "ready")
                fps = float(result.ready["fps"])
                sender.start()
                while True:
                    message = ws.recv(timeout=self.receive_timeout)
                    if isinstance(message, str):
                        body = json.loads(message)
                        if body.get("type") == "summary":
                            result.summary = body
                            return
                        raise _error_of(body, ws)
                    header, data = parse_frame(message)
                    now = time.perf_counter()
                    if result.first_frame_s is None and sent:
                        result.first_frame_s = now - sent[0][1]
                    latency = _latency(sent, header["index"], fps, now)
                    if latency is not None:
                        result.latencies.append(latency)
                    result.frames += 1
                    received[0] = header["index"] + 1
                    image = _decode(data) if decode else None
                    yield ReceivedFrame(header["index"], header["timestamp"], image, data, header["latency_ms"],
                                        header["late"], latency)
            except ConnectionClosed as exc:
                raise MuseTalkError(f"the server closed the live session ({exc})", "see the server log") from None
            except TimeoutError:
                raise MuseTalkError(f"no message from the server for {self.receive_timeout:g} s",
                                    "the server may be overloaded; see its log") from None
            finally:
                stop.set()
                ws.close()  # first: a send blocked on a full socket then fails at once and the sender ends
                if sender.is_alive():
                    sender.join(timeout=10)

    def _expect(self, ws: Any, kind: str) -> dict[str, Any]:
        message = ws.recv(timeout=self.receive_timeout)
        body = json.loads(message) if isinstance(message, str) else {}
        if body.get("type") != kind:
            raise _error_of(body, ws)
        return body

    def _ahead_limit_s(self) -> float:
        """Audio the sender keeps at most ahead of the frames received (flow control, see ``_send_audio``): the
        server cuts a batch once its last frame's audio window (0.2 s) and look-ahead are in, so that much and a
        batch of frames come on top of ``AHEAD_S``."""
        ready = self.result.ready
        batch_s = float(ready.get("batch_size") or 8) / float(ready.get("fps") or 25)
        lookahead = self.options.get("lookahead_ms", 200)
        return AHEAD_S + batch_s + WINDOW_S + (SEGMENT_S if lookahead == "exact" else float(lookahead) / 1e3)

    def _send_audio(self, ws: Any, pcm: bytes, step: int, realtime: bool, sent: list[tuple[int, float]],
                    stop: threading.Event, received: list[int]) -> None:
        """Sender thread: the chunks (paced at 1 s of audio per s with ``realtime``), then the end message.

        Flow control: it never runs more than ``_ahead_limit_s`` of audio ahead of the frames received, so the
        server's audio backlog (5 s) does not fill and the server keeps reading (its keep-alive pongs too) even
        when the model is slower than the audio comes.
        """
        from websockets.exceptions import ConnectionClosed

        start = time.perf_counter()
        fps = float(self.result.ready.get("fps") or 25)
        ahead = int(self._ahead_limit_s() * SAMPLE_RATE)
        try:
            for offset in range(0, len(pcm), step):
                if stop.is_set():
                    return
                if realtime:  # a chunk is sent once it has been "spoken"
                    due = start + (offset + step) / 2 / SAMPLE_RATE
                    time.sleep(max(0.0, due - time.perf_counter()))
                while (offset + step) // 2 > received[0] * SAMPLE_RATE / fps + ahead and not stop.is_set():
                    time.sleep(0.01)
                ws.send(pcm[offset:offset + step])
                sent.append((min(len(pcm), offset + step) // 2, time.perf_counter()))
            ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:  # the receiving side reports why
            return


def _latency(sent: list[tuple[int, float]], index: int, fps: float, now: float) -> float | None:
    """Now minus when the audio up to frame ``index``'s end had been sent (None if not sent: the tail at close)."""
    needed = int(np.ceil((index + 1) * SAMPLE_RATE / fps))
    known = len(sent)  # the sender thread only appends: the first `known` items stay as they are
    at = bisect.bisect_left(sent, needed, hi=known, key=lambda item: item[0])
    return now - sent[at][1] if at < known else None


def _decode(data: bytes) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise MuseTalkError("the server sent an image that does not decode", "see the server log")
    return image


def _error_of(body: dict[str, Any], ws: Any) -> LiveClientError:
    if body.get("type") == "error":
        return LiveClientError(body.get("error", "error"), body.get("message", ""), body.get("fix"),
                               getattr(ws, "close_code", None))
    return LiveClientError("protocol", f"unexpected message from the server: {str(body)[:200]}",
                           "check that client and server versions match")


# -- musetalk live ------------------------------------------------------------------------------------------------
def add_live_arguments(parser: Any) -> None:
    """The flags of ``musetalk live``."""
    p = parser
    p.add_argument("--server", required=True, help="the server's URL, e.g. http://127.0.0.1:8765")
    p.add_argument("--avatar", required=True, help="avatar id from POST /avatars (GET /avatars lists them)")
    p.add_argument("--audio", required=True, help="audio file to stream (any format ffmpeg reads)")
    p.add_argument("--output", default=None, help="write the returned frames with the audio to this .mp4")
    p.add_argument("--realtime", action="store_true", help="send at speaking pace (default: as fast as possible)")
    p.add_argument("--chunk-ms", type=float, default=100, help="audio per message (default 100 ms)")
    p.add_argument("--lookahead-ms", default=None, help="audio to wait for past each frame's window (server "
                   "default 200); 'exact' waits for the 30 s segment and matches offline generation")
    p.add_argument("--batch-size", type=int, default=None, help="frames per model call (smaller: lower latency)")


def run_live(args: Any) -> int:
    """``musetalk live``: stream a file, write the frames (atomically) and print latency statistics."""
    from pathlib import Path

    from musetalk.stages.audio import load_audio
    from musetalk.stream.video import VideoWriter

    lookahead: float | str | None = args.lookahead_ms
    if lookahead not in (None, "exact"):
        try:
            lookahead = float(lookahead)
        except ValueError:
            raise InputError(f"--lookahead-ms {lookahead!r} is not a number", "e.g. --lookahead-ms 200") from None
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() != ".mp4":
        raise InputError(f"--output must be an .mp4 file, got {output.name!r}", "e.g. --output out.mp4")
    wav = load_audio(args.audio)
    client = LiveClient(args.server, args.avatar, lookahead_ms=lookahead, batch_size=args.batch_size)
    frames = client.frames(wav, chunk_ms=args.chunk_ms, realtime=args.realtime)
    first = next(frames, None)  # the fps comes with the server's ready message, before the first frame
    if output is None or first is None:
        for _ in frames:
            pass
    else:
        # VideoWriter writes a hidden temporary file, renamed only when every frame is in (removed on error)
        with VideoWriter(output, fps=client.result.ready["fps"], audio=args.audio) as writer:
            for frame in itertools.chain([first], frames):  # the server sends every index in order, without gaps
                assert frame.image is not None  # frames() decodes by default
                writer.write(frame.image)
    print(format_stats(client.result, output))
    return 0


def format_stats(result: LiveResult, output: Any = None) -> str:
    """The lines ``musetalk live`` prints: frames, late frames, server and client latencies."""
    summary = result.summary
    server = summary.get("latency_ms", {})
    client = result.latency_percentiles()

    def ms(value: float | None, scale: float = 1.0) -> str:
        return "-" if value is None else f"{value * scale:.0f} ms"

    lines = [f"frames: {result.frames} ({summary.get('late_frames', '?')} late) for {summary.get('audio_s', 0):.2f} s "
             f"of audio at {summary.get('fps', '?')} fps; look-ahead {summary.get('lookahead_ms')} ms, "
             f"batch {summary.get('batch_size')}",
             f"server latency (audio in -> frame out): first {ms(server.get('first'))}, p50 {ms(server.get('p50'))}, "
             f"p95 {ms(server.get('p95'))}, max {ms(server.get('max'))}",
             f"client latency (audio sent -> frame received): first frame {ms(result.first_frame_s, 1e3)}, "
             f"p50 {ms(client['p50'], 1e3)}, p95 {ms(client['p95'], 1e3)}"]
    if output is not None:
        lines.append(f"wrote {output}")
    return "\n".join(lines)
