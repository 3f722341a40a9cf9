"""Live sessions: audio in as it is spoken, frames out as they are made, on a prepared avatar.

    session = pipe.live(avatar, config, LiveConfig(lookahead_s=0.2))
    # one thread                           # another thread
    session.feed(pcm_chunk) ...            for frame in session:          # LiveFrame, in order
    session.close()                            show(frame.image)          # (H, W, 3) uint8 BGR
    print(session.summary())

    for frame in pipe.live(avatar, config).stream(chunks): ...   # the same from one thread

Threads and buffers, all bounded:
  feed() -> audio queue (``max_backlog_s`` of audio; feed blocks beyond it; one chunk of any size is always taken)
         -> model worker thread: ``IncrementalWindows`` (musetalk.stages.audio_live), then UNet + VAE of each ready
            batch (``MuseTalkPipeline._predict_batch``, the code ``stream`` runs)
         -> batch queue (``frame_buffer`` batches; the worker blocks beyond it)
         -> the iterating thread pastes the faces back (``MuseTalkPipeline._compose_frames``) and yields.
A consumer slower than the model stalls the worker, which stalls ``feed``: memory stays flat and the audio source
feels the back-pressure. A model slower than real time makes latency grow: frames whose latency passes
``late_after_s`` are flagged ``late`` and counted in the summary; no frame is dropped.

Batches are the offline ones (frames [0, B), [B, 2B), ...; the last one shorter at ``close``), and a batch is cut
once all its frames are ready, so feeding the whole audio at once and closing gives exactly ``stream``'s frames.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Generator, Iterable, Iterator

import numpy as np

from musetalk.config import GenerationConfig
from musetalk.errors import InputError, MuseTalkError
from musetalk.hooks import check_cancelled, combine
from musetalk.stages.audio import SAMPLE_RATE, AudioConfig
from musetalk.stages.audio_live import IncrementalWindows
from musetalk.stream.latency import LatencyMeter

if TYPE_CHECKING:
    from musetalk.stream.avatar import Avatar
    from musetalk.stream.pipeline import MuseTalkPipeline

log = logging.getLogger(__name__)
_END = object()  # the worker's last item: every frame has been handed over
POLL_S = 0.1  # how often blocked threads look at the stop flag


@dataclass(frozen=True)
class LiveConfig:
    """How a live session trades latency for fidelity and bounds its buffers."""

    lookahead_s: float | None = 0.2  # audio past a frame's own window to wait for; None: exact (segment complete)
    late_after_s: float = 0.5  # a frame whose latency passes this is flagged late (and counted)
    max_backlog_s: float = 5.0  # audio queued for the model before feed() blocks
    frame_buffer: int = 2  # predicted batches waiting for the consumer before the model thread blocks
    coalesce: bool = False  # take every queued chunk before cutting frames: fewer Whisper passes when behind,
    #                         but the frames then depend on timing (off: they depend only on the chunks)

    def validate(self) -> "LiveConfig":
        """Raise InputError for values that cannot work; returns self."""
        if self.lookahead_s is not None and not (math.isfinite(self.lookahead_s) and 0 <= self.lookahead_s <= 30):
            raise InputError(f"lookahead_s must be between 0 and 30 s (or None for exact), got {self.lookahead_s}",
                             "0.2 s is a good start; more is closer to the offline result")
        if not self.late_after_s > 0:
            raise InputError(f"late_after_s must be positive, got {self.late_after_s}", "e.g. 0.5")
        if not self.max_backlog_s > 0:
            raise InputError(f"max_backlog_s must be positive, got {self.max_backlog_s}", "e.g. 5")
        if self.frame_buffer < 1:
            raise InputError(f"frame_buffer must be >= 1, got {self.frame_buffer}", "e.g. 2")
        return self


@dataclass(frozen=True)
class LiveFrame:
    """One output frame of a live session."""

    index: int  # 0, 1, 2, ... (no gaps)
    timestamp_s: float  # where it sits on the audio's timeline: index / fps
    image: np.ndarray  # (H, W, 3) uint8 BGR
    latency_s: float  # arrival of the audio that made it ready -> it left the pipeline
    late: bool  # latency_s > late_after_s


@dataclass(frozen=True)
class LiveSummary:
    """What a live session did; latencies in seconds (None before the first frame)."""

    frames: int
    late_frames: int
    audio_s: float  # audio received
    wall_s: float  # session start -> now (or its end)
    first_frame_latency_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_max_s: float | None
    lookahead_s: float | None
    batch_size: int
    fps: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_pcm(chunk: np.ndarray) -> np.ndarray:
    """A chunk as (n,) float32 in [-1, 1]: float arrays as they are, int16 scaled by 1/32768. InputError else."""
    array = np.asarray(chunk)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise InputError(f"an audio chunk must be mono, 1-D; got shape {array.shape}", "mix down to one channel")
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if array.dtype.kind != "f":
        raise InputError(f"audio chunks must be float or int16 samples, got {array.dtype}",
                         "pass float32 in [-1, 1] or int16 PCM")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise InputError("an audio chunk holds NaN or infinite samples", "send finite samples in [-1, 1]")
    return array


class LiveSession:
    """A running live session (see the module docstring). Made by ``MuseTalkPipeline.live``.

    ``feed(pcm)`` from one thread, iterate from another (or use ``stream(chunks)``); ``close()`` ends the audio
    and lets the remaining frames out; ``abort()`` stops at once. Always end a session with ``close`` and a full
    iteration, ``abort``, or a ``with`` block: its model thread runs until then.
    """

    def __init__(self, pipe: "MuseTalkPipeline", avatar: "Avatar", config: GenerationConfig,
                 options: LiveConfig | None = None, hooks: Any = None, profiler: Any = None) -> None:
        self.pipe = pipe
        self.avatar = avatar
        self.config = config
        self.options = (options or LiveConfig()).validate()
        self.fps = float(avatar.meta.fps)
        self.batch_size = max(1, config.runtime.batch_size)
        self._run = combine(hooks, profiler)  # musetalk.hooks: stage, frame_done, progress, cancelled
        self._stage = self._run.stage
        # hooks that also take per-frame latency (the Profiler, the notebook's LiveDashboard)
        self._latency_sinks = [h for h in (hooks, profiler) if h is not None and hasattr(h, "frame_latency")]
        self._windows = IncrementalWindows(pipe.audio_encoder, AudioConfig(fps=self.fps), self.options.lookahead_s)
        self._cond = threading.Condition()
        self._audio: collections.deque[tuple[np.ndarray, float]] = collections.deque()  # (pcm, arrival)
        self._queued = 0  # samples in self._audio
        self._received = 0  # samples fed
        self._input_closed_at: float | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._batches: queue.Queue = queue.Queue(maxsize=self.options.frame_buffer)
        self._latency = LatencyMeter()
        self._started = time.perf_counter()
        self._ended: float | None = None
        self._iterated = False
        self._worker = threading.Thread(target=self._work, name="musetalk-live", daemon=True)
        self._worker.start()

    # -- input ----------------------------------------------------------------------------------------------
    def feed(self, pcm: np.ndarray, timeout: float | None = None) -> None:
        """Queue audio: (n,) float32 in [-1, 1] (or int16), 16 kHz mono.

        Blocks while more than ``max_backlog_s`` of audio waits for the model (a chunk is always taken when
        nothing waits); TimeoutError after ``timeout`` s. Raises the worker's error if it failed.
        """
        samples = as_pcm(pcm)
        arrival = time.perf_counter()
        cap = int(self.options.max_backlog_s * SAMPLE_RATE)
        deadline = None if timeout is None else arrival + timeout
        with self._cond:
            if self._input_closed_at is not None:
                raise InputError("feed() after close()", "start a new session for more audio")
            while self._queued > 0 and self._queued + len(samples) > cap and not self._stopped():
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    raise TimeoutError(f"the live session's audio backlog stayed full for {timeout} s")
                self._cond.wait(POLL_S if left is None else min(POLL_S, left))
            self._raise_if_stopped()
            if len(samples):
                self._audio.append((samples, arrival))
                self._queued += len(samples)
                self._received += len(samples)
                self._cond.notify_all()

    def close(self) -> None:
        """End of the audio: the frames still missing are cut (with the final encodings) and come out."""
        with self._cond:
            if self._input_closed_at is None:
                self._input_closed_at = time.perf_counter()
                self._cond.notify_all()

    def abort(self, wait: bool = True) -> None:
        """Stop now: queued audio and frames are dropped, the model thread ends after its current batch (joined
        unless ``wait=False``, e.g. from an event loop). Idempotent."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if wait and self._worker is not threading.current_thread():
            self._worker.join(timeout=60)
        self._drain()
        if self._ended is None:
            self._ended = time.perf_counter()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._stop.set()
            self._cond.notify_all()

    def _stopped(self) -> bool:
        return self._stop.is_set() or self._error is not None

    def _raise_if_stopped(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise MuseTalkError("the live session was aborted", "start a new session")

    # -- the model thread -----------------------------------------------------------------------------------
    def _take(self) -> tuple[list[tuple[np.ndarray, float]], bool]:
        """Wait for audio (or the end); returns (chunks, input over). One chunk, or every queued one with coalesce."""
        with self._cond:
            while not self._audio and self._input_closed_at is None and not self._stopped():
                self._cond.wait(POLL_S)
            chunks: list[tuple[np.ndarray, float]] = []
            while self._audio and (not chunks or self.options.coalesce):
                chunk = self._audio.popleft()
                self._queued -= len(chunk[0])
                chunks.append(chunk)
            self._cond.notify_all()  # room for feed()
            return chunks, self._input_closed_at is not None and not self._audio

    def _work(self) -> None:
        """Model worker: append audio, note when frames become ready, predict each complete batch, hand it over."""
        from musetalk.stream.pipeline import _put_unless_stopped

        windows, size = self._windows, self.batch_size
        next_frame = 0
        ready_at: collections.deque[float] = collections.deque()  # arrival time of frames next_frame.. (ready ones)
        try:
            while not self._stopped():
                chunks, ending = self._take()
                if self._stopped():
                    return
                for pcm, arrival in chunks:
                    windows.append(pcm)
                    self._note_ready(ready_at, next_frame, arrival)
                if ending:
                    windows.close()
                    self._note_ready(ready_at, next_frame, self._input_closed_at or time.perf_counter())
                while not self._stopped():
                    count = min(size, windows.ready_count() - next_frame)
                    if count <= 0 or (count < size and not ending):  # offline batch boundaries (see docstring)
                        break
                    with self._stage("audio"):
                        batch_windows = windows.windows(next_frame, count)
                    batch = self.pipe._predict_batch(self.avatar, next_frame, batch_windows, self._stage)
                    times = [ready_at.popleft() for _ in range(count)]
                    _put_unless_stopped(self._batches, (next_frame, batch, times), self._stop)
                    next_frame += count
                    windows.release(next_frame)
                if ending:
                    _put_unless_stopped(self._batches, _END, self._stop)
                    return
        except BaseException as exc:  # handed to the consumer (and to feed), which re-raise it
            log.debug("live session worker failed", exc_info=True)
            self._fail(exc)

    def _note_ready(self, ready_at: collections.deque[float], next_frame: int, arrival: float) -> None:
        ready = self._windows.ready_count()
        while next_frame + len(ready_at) < ready:
            ready_at.append(arrival)

    # -- output ---------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[LiveFrame]:
        return self.frames()

    def frames(self) -> Generator[LiveFrame, None, None]:
        """Yield frames as they are made, in order, until the audio is closed and every frame is out.

        Ends quietly after ``abort``; raises the session's error (bad audio, a model failure) when there is one,
        and :class:`~musetalk.errors.Cancelled` when the hooks cancel (the session is aborted).
        """
        if self._iterated:
            raise RuntimeError("a live session's frames can be iterated once")
        self._iterated = True
        frame_of = lru_cache(maxsize=4)(self.avatar.frame)  # an image avatar is read once
        mask_of = lru_cache(maxsize=4)(self.avatar.mask)
        finished = False
        try:
            while True:
                item = self._next_batch()
                if item is _END or item is None:
                    finished = item is _END
                    return
                start, batch, times = item
                faces = self.pipe._compose_frames(self.avatar, batch, frame_of, mask_of, self._stage)
                for k, image in enumerate(faces):
                    check_cancelled(self._run)
                    now = time.perf_counter()
                    latency = now - times[k]
                    late = latency > self.options.late_after_s
                    self._latency.add(latency, late)
                    self._run.frame_done()
                    for sink in self._latency_sinks:
                        sink.frame_latency(latency, late)
                    index = start + k
                    yield LiveFrame(index, index / self.fps, image, latency, late)
        finally:
            self._ended = time.perf_counter()
            if finished:
                self._worker.join(timeout=60)
            else:
                self.abort()

    def _next_batch(self) -> Any:
        """The next predicted batch, _END, or None once aborted; raises the session's error."""
        while True:
            if self._error is not None:
                raise self._error
            try:
                return self._batches.get(timeout=POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    if self._error is not None:
                        raise self._error from None
                    return None

    def _drain(self) -> None:
        while True:
            try:
                self._batches.get_nowait()
            except queue.Empty:
                return

    def stream(self, chunks: Iterable[np.ndarray]) -> Iterator[LiveFrame]:
        """Feed ``chunks`` from a helper thread (then close) and yield the frames here: live from one thread."""

        def feed_all() -> None:
            try:
                for chunk in chunks:
                    self.feed(chunk)
                self.close()
            except BaseException as exc:
                if not self._stop.is_set():
                    self._fail(exc)

        feeder = threading.Thread(target=feed_all, name="musetalk-live-feed", daemon=True)
        feeder.start()
        try:
            yield from self.frames()
        finally:
            self.abort()
            feeder.join(timeout=60)

    # -- read-outs ------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while the model thread lives."""
        return self._worker.is_alive()

    def summary(self) -> LiveSummary:
        """Frames, late frames and latency so far (final once the iteration ended)."""
        lat = self._latency.summary()
        end = self._ended if self._ended is not None else time.perf_counter()
        return LiveSummary(frames=int(lat["frames"] or 0), late_frames=int(lat["late"] or 0),
                           audio_s=self._received / SAMPLE_RATE, wall_s=end - self._started,
                           first_frame_latency_s=lat["first_s"], latency_p50_s=lat["p50_s"],
                           latency_p95_s=lat["p95_s"], latency_max_s=lat["max_s"],
                           lookahead_s=self.options.lookahead_s, batch_size=self.batch_size, fps=self.fps)

    def __enter__(self) -> "LiveSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
