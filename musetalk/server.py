"""HTTP API over the streaming pipeline: ``create_app(pipeline_or_loader, settings) -> FastAPI``.

    POST /generate       multipart ``source`` + ``audio`` (+ settings) -> mp4, or 202 + job id with async=true
    GET  /jobs/{id}      state, progress, speed, error;   GET /jobs/{id}/result -> mp4;   DELETE /jobs/{id} cancels
    GET  /  ·  GET /health  ·  POST /shutdown (bearer token, or loopback when no token is set)

One worker thread owns the accelerator and runs one job at a time; a bounded queue feeds it (429 when full).
Handlers are thin: they parse the form, build the settings with ``config.preset`` (the CLI does the same), and
hand the job to :class:`GenerationService`, which stores uploads under server-chosen names after sniffing their
content, checks them cheaply, queues them, and removes every input file once the job is over. Results are kept
for ``result_ttl_s`` seconds. Errors are JSON ``{"error": code, "message": ..., "fix": ...}`` with a 4xx status
for anything the client can fix (:func:`http_error` maps the package's errors).

No model is loaded at import; the models load once, when the app starts (the default version) or on the first
job that asks for another version (in the worker, which owns the device).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, Literal, Union

from fastapi import FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from musetalk import __version__
from musetalk.config import GenerationConfig, preset
from musetalk.errors import InputError, MuseTalkError, NoFaceError, WeightsError

if TYPE_CHECKING:
    from musetalk.pipeline import MuseTalkPipeline

log = logging.getLogger(__name__)

MiB = 1 << 20
RESULT_NAME = "result.mp4"
SNIFF_BYTES = 64  # every signature below sits in the first 12 bytes; 64 leaves room
COPY_CHUNK = 1 * MiB
POLL_S = 0.1  # how often a synchronous request looks at its job (and, every 10th time, at its client)
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
# Transport-level bounds on the integer form fields: far outside any useful value, they only stop numbers that
# would overflow the int32 arithmetic of the crop code. The useful ranges are checked by GenerationConfig.
FORM_INT_BOUND = 4096

Loader = Callable[[str], "MuseTalkPipeline"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs; the CLI (``musetalk serve``) builds this from its flags."""

    token: str | None = None  # bearer token for POST /shutdown; None: shutdown only from loopback clients
    default_version: str = "v15"  # model version loaded at start and used when a request names none
    queue_size: int = 4  # jobs that may wait behind the running one; more get 429
    max_upload_bytes: int = 256 * MiB  # whole request body (source + audio + fields); more gets 413
    max_audio_seconds: float = 900.0  # longer audio gets 422 (a 15-min clip is ~22 500 frames at 25 fps)
    max_batch_size: int = 64  # larger batch_size values get 422 (they would only exhaust device memory)
    result_ttl_s: float = 3600.0  # finished jobs (and their mp4) are deleted this long after they end
    work_dir: Path | None = None  # parent of the server's temporary folder; None: the system temp folder
    shutdown_grace_s: float = 60.0  # on shutdown a running job may finish for this long, then it is cancelled


# -- errors -------------------------------------------------------------------------------------------------------
class ApiError(MuseTalkError):
    """A MuseTalkError with its HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, fix: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, fix)
        self.status = status
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": code, "message": ..., "fix": ...}``."""
        return {"error": self.code, "message": self.message, "fix": self.fix}

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status and headers (e.g. Retry-After)."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class JobCancelled(Exception):
    """Raised inside the worker when a job's cancel flag is seen."""


def http_error(exc: BaseException) -> ApiError:
    """The HTTP form of any error: client-fixable MuseTalkErrors are 4xx, the rest 500 (details in the log)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NoFaceError):
        return ApiError(422, "no_face", exc.message, exc.fix)
    if isinstance(exc, WeightsError):  # a version this server cannot load; the server itself is fine
        return ApiError(422, "weights_unavailable", exc.message, exc.fix)
    if isinstance(exc, InputError):
        return ApiError(422, "invalid_input", exc.message, exc.fix)
    if isinstance(exc, MuseTalkError):  # e.g. the result could not be written: the server's problem
        return ApiError(500, "server_error", exc.message, exc.fix)
    return ApiError(500, "internal_error", "generation failed unexpectedly", "see the server log; please report it")


def redact(exc: MuseTalkError, folder: Path) -> ApiError:
    """``exc`` as an ApiError whose text names uploads by role ("the source upload"), never by server path."""
    error = http_error(exc)

    def clean(text: str | None) -> str | None:
        """Longest paths first, so source.png is not half-replaced by a shorter prefix."""
        if text is None:
            return None
        for path in sorted(folder.glob("*"), key=lambda p: -len(str(p))):
            role = path.name.split(".")[0]
            text = text.replace(f"'{path}'", f"the {role} upload").replace(str(path), f"the {role} upload")
        return text.replace(str(folder), "<job folder>")

    return ApiError(error.status, error.code, clean(error.message) or "", clean(error.fix), error.headers)


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
    with open(path, "wb") as out:
        out.write(head)
        shutil.copyfileobj(stream, out, COPY_CHUNK)
    return path, found


# -- jobs ---------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One generation request. Written by the worker thread, read by the handlers (single fields: GIL-atomic)."""

    id: str
    folder: Path  # holds the inputs while the job runs, then only the result
    config: GenerationConfig
    avatar: str | None
    source: Path
    audio: Path
    synchronous: bool
    state: JobState = "queued"
    stage: str = "queued"  # queued | preparing | generating | finished
    frames_done: int = 0
    frames_total: int | None = None
    video_fps: float | None = None
    error: ApiError | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    generating_since: float | None = None  # perf_counter when the first output frame was asked for
    generating_until: float | None = None  # perf_counter when the last one was written
    finished_at: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def result(self) -> Path:
        """Where the finished mp4 is (or will be)."""
        return self.folder / RESULT_NAME

    def speed(self) -> float | None:
        """Output frames per second of wall time while generating (final once the job is over)."""
        if self.generating_since is None or self.frames_done == 0:
            return None
        end = self.generating_until if self.generating_until is not None else time.perf_counter()
        return round(self.frames_done / max(end - self.generating_since, 1e-6), 3)


class _JobProbe:
    """Passed to ``prepare_avatar`` as its ``profiler``: each stage entry is a point where a cancelled job stops.

    prepare_avatar calls ``profiler.stage(name)`` around every landmark, crop, parsing and VAE call, so a cancel
    lands within one stage (~0.1-1 s) even while preparing a long video. It is *not* given to ``stream``: there
    an exception in the model thread would be handed over through a full queue; the frame loop checks instead.
    """

    def __init__(self, job: Job) -> None:
        self.job = job

    def check(self) -> None:
        """Raise JobCancelled when the job's cancel flag is set."""
        if self.job.cancel.is_set():
            raise JobCancelled(self.job.id)

    @contextmanager
    def stage(self, _name: str) -> Iterator[None]:
        """The profiler hook: a cancellation point before every stage call."""
        self.check()
        yield


class GenerationService:
    """The job queue and the one worker thread that owns the device. Thread-safe; used by the HTTP handlers."""

    def __init__(self, pipeline_or_loader: "MuseTalkPipeline | Loader", settings: ServerSettings) -> None:
        self.settings = settings
        self._loader: Loader | None = None
        self._pipelines: dict[str, MuseTalkPipeline] = {}
        if callable(pipeline_or_loader) and not hasattr(pipeline_or_loader, "stream"):
            self._loader = pipeline_or_loader
        else:
            self._pipelines[pipeline_or_loader.version] = pipeline_or_loader  # type: ignore[union-attr]
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._reserved = 0  # queue slots promised to requests still storing their uploads
        self._jobs: dict[str, Job] = {}
        self._running: Job | None = None
        self._closing = False
        self._durations: collections.deque[float] = collections.deque(maxlen=8)
        self._worker: threading.Thread | None = None
        self.root: Path | None = None
        self.started_at = time.time()

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the default version (if not given), make the temporary folder and start the worker."""
        if self._worker is not None:
            return
        self.default_pipeline()
        if self.settings.work_dir is not None:
            Path(self.settings.work_dir).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="musetalk-server-", dir=self.settings.work_dir))
        self._worker = threading.Thread(target=self._work, name="musetalk-worker", daemon=True)
        self._worker.start()
        log.info("worker started; temporary files in %s", self.root)

    def begin_shutdown(self, cancel_running: bool = False) -> dict[str, Any]:
        """Refuse new jobs, cancel the queued ones and (optionally) the running one. Idempotent."""
        with self._cond:
            self._closing = True
            dropped = list(self._pending)
            self._pending.clear()
            running = self._running
            if running is not None and cancel_running:
                running.cancel.set()
            self._cond.notify_all()
        for job in dropped:
            self._finish(job, "cancelled", ApiError(503, "shutting_down", "the server is shutting down",
                                                    "submit the job again when the server is back"))
        return {"running": running.id if running else None, "cancelled": [j.id for j in dropped]}

    def close(self) -> None:
        """Graceful stop: the running job gets ``shutdown_grace_s`` to finish, then is cancelled; files removed."""
        self.begin_shutdown()
        worker = self._worker
        if worker is not None:
            worker.join(timeout=self.settings.shutdown_grace_s)
            if worker.is_alive():
                running = self._running
                if running is not None:
                    log.warning("cancelling job %s: shutdown grace of %g s is over", running.id,
                                self.settings.shutdown_grace_s)
                    running.cancel.set()
                worker.join(timeout=60)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        log.info("server stopped; %s removed", self.root)

    @property
    def worker_alive(self) -> bool:
        """False once the worker thread has ended (after close(), or by a bug): /health then answers 503."""
        return self._worker is not None and self._worker.is_alive()

    # -- models ---------------------------------------------------------------------------------------------------
    def default_pipeline(self) -> "MuseTalkPipeline":
        """The pipeline of the default version (loaded now if it is not yet)."""
        return self.pipeline(self.settings.default_version)

    def pipeline(self, version: str) -> "MuseTalkPipeline":
        """The pipeline of ``version``, loaded on first use. Called at start and then only by the worker."""
        if version not in self._pipelines:
            if self._loader is None:
                raise self._unserved(version)
            self._pipelines[version] = self._loader(version)
        return self._pipelines[version]

    def loaded_versions(self) -> list[str]:
        """Versions whose pipeline is in memory."""
        return sorted(self._pipelines)

    def _unserved(self, version: str) -> ApiError:
        return ApiError(422, "version_unavailable", f"this server serves only {', '.join(self.loaded_versions())}",
                        "leave out `version`, or start the server with a loader for every version")

    def check_version(self, version: str) -> None:
        """Refuse, before queueing, a version whose weights are absent (when the loader can tell)."""
        if version in self._pipelines:
            return
        if self._loader is None:
            raise self._unserved(version)
        check = getattr(self._loader, "check", None)
        if check is not None:
            check(version)  # raises WeightsError -> 422

    # -- requests -----------------------------------------------------------------------------------------------
    def make_config(self, version: str | None, **fields: Any) -> GenerationConfig:
        """The request's settings: the version's preset with the form's overrides (same path as the CLI)."""
        config = preset(version or self.settings.default_version, **fields)
        if config.runtime.batch_size > self.settings.max_batch_size:
            raise InputError(f"batch_size {config.runtime.batch_size} is above this server's limit "
                             f"{self.settings.max_batch_size}", "use a smaller batch_size (the default is 8)")
        return config

    def submit(self, config: GenerationConfig, avatar: str | None, source: IO[bytes], audio: IO[bytes],
               synchronous: bool) -> Job:
        """Store, check and queue one job; raises ApiError 415/422/429/503 without queueing anything."""
        from musetalk.avatar import check_avatar_name

        if avatar is not None:
            check_avatar_name(avatar)
        self.check_version(config.version)
        self._reserve_slot()
        job_id = uuid.uuid4().hex
        assert self.root is not None, "start() the service first"
        folder = self.root / job_id
        folder.mkdir()
        try:
            source_path, _ = store_upload(source, folder, "source")
            audio_path, _ = store_upload(audio, folder, "audio")
            try:
                self._check_media(source_path, audio_path, config)
            except MuseTalkError as exc:
                raise redact(exc, folder) from None
            job = Job(job_id, folder, config, avatar, source_path, audio_path, synchronous)
        except BaseException:
            self._release_slot()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._cond:
            self._reserved -= 1
            if self._closing:
                shutil.rmtree(folder, ignore_errors=True)
                raise ApiError(503, "shutting_down", "the server is shutting down", "retry when it is back")
            self._jobs[job.id] = job
            self._pending.append(job)
            self._cond.notify_all()
        log.info("job %s queued (%s%s)", job.id, config.version, f", avatar {avatar}" if avatar else "")
        return job

    def _reserve_slot(self) -> None:
        with self._cond:
            if self._closing:
                raise ApiError(503, "shutting_down", "the server is shutting down", "retry when it is back")
            waiting = len(self._pending) + self._reserved
            if waiting >= self.settings.queue_size:
                retry = self._retry_after(waiting)
                raise ApiError(429, "queue_full", f"{waiting} jobs are already waiting (the limit is "
                               f"{self.settings.queue_size})", f"retry in about {retry} s",
                               headers={"Retry-After": str(retry)})
            self._reserved += 1

    def _release_slot(self) -> None:
        with self._cond:
            self._reserved -= 1

    def _retry_after(self, waiting: int) -> int:
        typical = sum(self._durations) / len(self._durations) if self._durations else 10.0
        return int(min(600, max(1, typical * (waiting + 1))))

    def _check_media(self, source: Path, audio: Path, config: GenerationConfig) -> None:
        """Cheap checks before queueing (first frame, audio decode) so bad media fail now, not in the queue."""
        from musetalk.audio import SAMPLE_RATE, check_speech, load_audio
        from musetalk.video import open_frames

        frames = open_frames(source)  # InputError for unreadable / truncated files
        wav = load_audio(audio)
        check_speech(wav, frames.fps or config.fps, source="the audio upload")
        seconds = len(wav) / SAMPLE_RATE
        if seconds > self.settings.max_audio_seconds:
            raise InputError(f"the audio is {seconds:.0f} s long; this server takes at most "
                             f"{self.settings.max_audio_seconds:g} s", "split the audio into shorter parts")

    def get(self, job_id: str) -> Job:
        """The job, or ApiError 404 (unknown, expired or deleted)."""
        self.purge_expired()
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"no job {job_id} (unknown, expired or deleted)",
                           f"results are kept for {self.settings.result_ttl_s:g} s after a job ends")
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, ask a running one to stop, or delete a finished one (and its result)."""
        job = self.get(job_id)
        with self._cond:
            if job.state == "queued" and job in self._pending:
                self._pending.remove(job)
                queued = True
            else:
                queued = False
            if job.state == "running":
                job.cancel.set()
        if queued:
            self._finish(job, "cancelled", ApiError(409, "cancelled", "the job was cancelled", None))
        elif job.done.is_set():
            self.delete(job_id)
        return job

    def delete(self, job_id: str) -> None:
        """Forget a finished job and remove its folder."""
        with self._cond:
            job = self._jobs.pop(job_id, None)
        if job is not None:
            shutil.rmtree(job.folder, ignore_errors=True)

    def purge_expired(self) -> None:
        """Delete finished jobs older than ``result_ttl_s`` (records and files)."""
        now = time.time()
        with self._cond:
            expired = [j for j in self._jobs.values()
                       if j.finished_at is not None and now - j.finished_at > self.settings.result_ttl_s]
        for job in expired:
            self.delete(job.id)

    def queue_position(self, job: Job) -> int | None:
        """0 for the next job to run; None when the job is not waiting."""
        with self._cond:
            return self._pending.index(job) if job in self._pending else None

    def snapshot(self) -> dict[str, Any]:
        """Queue figures for /health."""
        with self._cond:
            running = self._running
            return {"running": running.id if running else None, "queued": len(self._pending),
                    "queue_size": self.settings.queue_size, "kept": len(self._jobs), "closing": self._closing}

    # -- the worker -----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        """Worker thread: take the next job, run it, repeat; purges expired results while idle."""
        while True:
            with self._cond:
                if not self._pending and not self._closing:
                    self._cond.wait(timeout=min(30.0, max(1.0, self.settings.result_ttl_s / 2)))
                job = self._pending.popleft() if self._pending else None
                if job is None and self._closing:
                    return
                if job is not None:
                    job.state, job.stage, job.started_at = "running", "preparing", time.time()
                    self._running = job
            if job is None:  # idle: a good moment to drop expired results
                self.purge_expired()
                continue
            self._run(job)
            with self._cond:
                self._running = None

    def _run(self, job: Job) -> None:
        """Run one job to done / failed / cancelled; its input files are removed whatever happens."""
        started = time.perf_counter()
        state: JobState = "done"
        error: ApiError | None = None
        try:
            self._generate(self.pipeline(job.config.version), job)
        except JobCancelled:
            state = "cancelled"
            error = ApiError(503, "shutting_down", "the server shut down before the job finished", None) \
                if self._closing else ApiError(409, "cancelled", "the job was cancelled", None)
        except Exception as exc:  # every failure becomes the job's error; the worker lives on
            state, error = "failed", http_error(redact(exc, job.folder) if isinstance(exc, MuseTalkError) else exc)
            if error.status >= 500:
                log.exception("job %s failed", job.id)
        finally:
            for path in (job.source, job.audio):
                path.unlink(missing_ok=True)
        if state == "done":
            self._durations.append(time.perf_counter() - started)
        self._finish(job, state, error)

    def _generate(self, pipe: "MuseTalkPipeline", job: Job) -> None:
        """prepare_avatar -> stream -> VideoWriter, checking the cancel flag between frames."""
        from musetalk.audio import check_speech, load_audio, num_video_frames
        from musetalk.video import VideoWriter

        probe = _JobProbe(job)
        wav = load_audio(job.audio)
        job.stage = "preparing"
        avatar = pipe.prepare_avatar(job.source, job.config, name=job.avatar, profiler=probe)
        try:
            check_speech(wav, avatar.meta.fps, source="the audio upload")
            job.frames_total = num_video_frames(len(wav), avatar.meta.fps)
            job.video_fps = avatar.meta.fps
            job.stage, job.generating_since = "generating", time.perf_counter()
            frames = pipe.stream(avatar, wav, job.config)
            try:
                # VideoWriter writes a hidden temporary file and deletes it on any exception (cancel included)
                with VideoWriter(job.result, fps=avatar.meta.fps, audio=job.audio) as writer:
                    for frame in frames:
                        probe.check()
                        writer.write(frame)
                        job.frames_done += 1
            finally:
                frames.close()  # stops the pipeline's model thread
            job.generating_until = time.perf_counter()
        finally:
            avatar.close()  # removes a temporary avatar; a named one stays in the shared cache

    def _finish(self, job: Job, state: JobState, error: ApiError | None) -> None:
        if state != "done":  # removed before the state changes: a client that sees "failed" sees no files
            shutil.rmtree(job.folder, ignore_errors=True)
        job.state, job.error, job.stage, job.finished_at = state, error, "finished", time.time()
        job.done.set()
        log.info("job %s %s%s", job.id, state, f": {error.message}" if error else "")

    # -- read-outs --------------------------------------------------------------------------------------------
    def status(self, job: Job) -> dict[str, Any]:
        """The JSON body of GET /jobs/{id}."""
        total = job.frames_total
        return {
            "id": job.id, "state": job.state, "stage": job.stage, "position": self.queue_position(job),
            "progress": round(job.frames_done / total, 4) if total else None, "frames_done": job.frames_done,
            "frames_total": total, "fps": job.speed(), "video_fps": job.video_fps,
            "error": job.error.body() if job.error else None, "cancel_requested": job.cancel.is_set(),
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "expires_at": job.finished_at + self.settings.result_ttl_s if job.finished_at else None,
            "result_url": f"/jobs/{job.id}/result" if job.state == "done" else None,
        }


class PipelineLoader:
    """``loader(version) -> MuseTalkPipeline`` from one models folder, each version loaded once.

    Every version gets its own pipeline (its own modules and landmark backends), so versions share nothing
    mutable; a second version costs its full memory.
    """

    def __init__(self, models_dir: str | os.PathLike | None, device: str = "auto", dtype: str = "auto") -> None:
        from musetalk.weights import default_models_dir

        self.models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
        self.device = device
        self.dtype = dtype
        self._loaded: dict[str, MuseTalkPipeline] = {}
        self._lock = threading.Lock()

    def check(self, version: str) -> None:
        """Raise WeightsError (with its fix) when ``version``'s weight files are not all present."""
        from musetalk.weights import DOWNLOAD_HINT, layout

        missing = [f for f in layout(version).required_files() if not (self.models_dir / f).is_file()]
        if missing:
            raise WeightsError(f"the weights of version {version} are not on this server ({', '.join(missing)} "
                               "missing)", "use another version, or on the server: "
                               + DOWNLOAD_HINT.format(models=self.models_dir))

    def __call__(self, version: str) -> "MuseTalkPipeline":
        from musetalk.pipeline import MuseTalkPipeline

        with self._lock:
            if version not in self._loaded:
                self.check(version)
                self._loaded[version] = MuseTalkPipeline.from_pretrained(self.models_dir, version=version,
                                                                         device=self.device, dtype=self.dtype)
            return self._loaded[version]


# -- memory figures for /health -----------------------------------------------------------------------------------
def memory_figures(device: Any) -> dict[str, float]:
    """Process RSS, system memory and the device allocator's counters, in bytes, named after their counters."""
    try:
        from musetalk.profiling.memory import MemoryMonitor
    except ImportError:  # profiling not installed with this build: the process-level figures only
        import psutil

        vm = psutil.virtual_memory()
        return {"rss": psutil.Process().memory_info().rss, "system_available": vm.available, "system_total": vm.total}
    monitor = MemoryMonitor(device=device, uss=False)
    sample = monitor.sample()
    sample.pop("t", None)
    return {**sample, **monitor.limits}


# -- response models (they make the OpenAPI schema precise) --------------------------------------------------------
class FieldError(BaseModel):
    field: str  # the form field, query parameter or path part
    problem: str


class ErrorBody(BaseModel):
    """Every error response: a stable code, a message and (usually) how to fix it."""

    error: str  # invalid_request, invalid_input, no_face, queue_full, unsupported_media_type, too_large, ...
    message: str
    fix: str | None = None
    detail: list[FieldError] | None = None  # per-field problems of an invalid request (422 invalid_request)


class JobStatus(BaseModel):
    id: str
    state: JobState
    stage: str  # queued | preparing | generating | finished
    position: int | None  # place in the queue, 0 = next; null when not queued
    progress: float | None  # output frames written / total, 0..1; null until generation starts
    frames_done: int
    frames_total: int | None
    fps: float | None  # generation speed: output frames per second of wall time
    video_fps: float | None  # frame rate of the output video
    error: ErrorBody | None
    cancel_requested: bool
    created_at: float  # unix time
    started_at: float | None
    finished_at: float | None
    expires_at: float | None  # when a finished job and its result are deleted
    result_url: str | None


class ServiceInfo(BaseModel):
    service: str
    version: str
    device: str
    dtype: str
    models: dict[str, Union[list[str], str]]
    limits: dict[str, Union[int, float]]


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    uptime_s: float
    worker_alive: bool
    jobs: dict[str, Union[int, str, bool, None]]
    memory: dict[str, float]


class ShutdownStatus(BaseModel):
    status: str
    running: str | None
    cancelled: list[str]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


MP4 = {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}}


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(pipeline_or_loader: "MuseTalkPipeline | Loader", settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app over a pipeline (that version only) or a loader ``version -> pipeline`` (lazy versions).

    The default version loads when the app starts (before the port accepts requests); the temporary folder is
    removed when it stops. ``app.state.request_shutdown`` (set by ``musetalk serve``) is what POST /shutdown calls
    to stop the server; without it the process sends itself SIGINT, uvicorn's graceful stop.
    """
    settings = settings or ServerSettings()
    service = GenerationService(pipeline_or_loader, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    app = FastAPI(title="MuseTalk Studio", version=__version__, lifespan=lifespan,
                  description="Lip-sync a face image or video to speech. See docs/api.md.")
    app.state.service = service
    app.state.request_shutdown = None
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    _add_error_handlers(app)
    _add_info_routes(app, service)
    _add_job_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MuseTalkError)
    async def _musetalk_error(_request: Request, exc: MuseTalkError) -> JSONResponse:
        return http_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ())[1:]) or "body", "problem": e.get("msg", "")}
                  for e in exc.errors()]
        message = "; ".join(f"{e['field']}: {e['problem']}" for e in errors[:5])
        body = ErrorBody(error="invalid_request", message=message or "invalid request",
                         fix="see GET /docs for the fields and their types", detail=errors)
        return JSONResponse(body.model_dump(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "message": str(exc.detail), "fix": None}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


def _add_info_routes(app: FastAPI, service: GenerationService) -> None:
    settings = service.settings

    @app.get("/", response_model=ServiceInfo, summary="Service, version, device and loaded models")
    def info() -> dict[str, Any]:
        """Service name and version, the device and dtype the models run in, loaded versions and limits."""
        pipe = service.default_pipeline()
        return {"service": "musetalk-studio", "version": __version__, "device": str(pipe.device),
                "dtype": str(pipe.dtype).replace("torch.", ""),
                "models": {"loaded": service.loaded_versions(), "default": settings.default_version},
                "limits": {"queue_size": settings.queue_size, "max_upload_bytes": settings.max_upload_bytes,
                           "max_audio_seconds": settings.max_audio_seconds, "max_batch_size": settings.max_batch_size,
                           "result_ttl_s": settings.result_ttl_s}}

    @app.get("/health", response_model=Health, responses=_errors(503), summary="Liveness and memory")
    def health() -> JSONResponse:
        """200 while the worker thread lives (503 otherwise), with queue and memory figures (bytes)."""
        alive = service.worker_alive
        body = {"status": "ok" if alive else "unhealthy", "uptime_s": round(time.time() - service.started_at, 3),
                "worker_alive": alive, "jobs": service.snapshot(),
                "memory": memory_figures(service.default_pipeline().device)}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.post("/shutdown", status_code=202, response_model=ShutdownStatus, responses=_errors(401, 403, 422),
              summary="Stop the server gracefully (bearer token, or loopback when no token is set)")
    async def shutdown(request: Request, cancel: bool = Query(False, description="cancel the running job "
                       "instead of letting it finish")) -> dict[str, Any]:
        """Queued jobs are cancelled; the running one finishes (or is cancelled with cancel=true); temp files go."""
        authorize_shutdown(request, settings.token)
        outcome = service.begin_shutdown(cancel_running=cancel)
        stop = request.app.state.request_shutdown or _interrupt_self
        asyncio.get_running_loop().call_later(0.2, stop)  # after this response has gone out
        return {"status": "shutting down", **outcome}


def _add_job_routes(app: FastAPI, service: GenerationService) -> None:
    @app.post("/generate", summary="Lip-sync a source (image or video) to an audio file",
              responses={200: {"description": "the lip-synced video (H.264 + AAC)", **MP4},
                         202: {"model": JobStatus, "description": "queued (async=true)"},
                         **_errors(413, 415, 422, 429, 503)})
    async def generate(
        request: Request,
        source: UploadFile = File(..., description="face image (png/jpg/bmp/webp/tiff) or video (mp4/mov/mkv/avi)"),
        audio: UploadFile = File(..., description="speech: wav/mp3/m4a/flac/ogg, or a video with sound"),
        version: str | None = Form(None, description="v15 (default) or v1"),
        bbox_shift: int | None = Form(None, ge=-FORM_INT_BOUND, le=FORM_INT_BOUND, description="px, + moves the "
                                      "crop's upper edge down (more mouth opening)"),
        extra_margin: int | None = Form(None, ge=-FORM_INT_BOUND, le=FORM_INT_BOUND, description="px below the chin"),
        parsing_mode: str | None = Form(None, description="raw | jaw | neck"),
        fps: float | None = Form(None, description="output fps for image sources (videos keep theirs)"),
        batch_size: int | None = Form(None, ge=-FORM_INT_BOUND, le=FORM_INT_BOUND, description="frames per model call"),
        avatar: str | None = Form(None, description="name of a cached avatar to reuse or create (shared with the CLI)"),
        run_async: bool = Form(False, alias="async", description="return 202 and a job id instead of waiting"),
    ) -> Any:
        """Waits and answers the mp4 (X-Job-Id, X-Frames headers), or with async=true answers 202 at once."""
        config = service.make_config(version, bbox_shift=bbox_shift, extra_margin=extra_margin,
                                     parsing_mode=parsing_mode, fps=fps, batch_size=batch_size)
        job = await run_in_threadpool(service.submit, config, avatar, source.file, audio.file, not run_async)
        if run_async:
            return JSONResponse(service.status(job), status_code=202, headers={"Location": f"/jobs/{job.id}"})
        return await _wait_for(request, service, job)

    @app.get("/jobs/{job_id}", response_model=JobStatus, responses=_errors(404, 422), summary="State of a job")
    def job_status(job_id: str = PathParam(..., pattern=JOB_ID_PATTERN)) -> dict[str, Any]:
        """State, stage, queue position, progress, speed and error of a job."""
        return service.status(service.get(job_id))

    @app.get("/jobs/{job_id}/result", response_class=FileResponse, summary="The mp4 of a finished job",
             responses={200: {"description": "the lip-synced video", **MP4}, **_errors(404, 409, 422)})
    def job_result(job_id: str = PathParam(..., pattern=JOB_ID_PATTERN)) -> FileResponse:
        """The mp4 of a done job; 409 while it is queued or running, or when it failed or was cancelled."""
        job = service.get(job_id)
        if job.state != "done":
            reason = f": {job.error.message}" if job.error else ""
            raise ApiError(409, "not_ready" if not job.done.is_set() else f"job_{job.state}",
                           f"job {job_id} is {job.state}{reason}", "poll GET /jobs/{id} until state is done")
        return FileResponse(job.result, media_type="video/mp4", filename=f"musetalk-{job_id[:8]}.mp4")

    @app.delete("/jobs/{job_id}", response_model=JobStatus, responses=_errors(404, 422),
                summary="Cancel a job (queued or running), or delete a finished one and its result")
    def cancel_job(job_id: str = PathParam(..., pattern=JOB_ID_PATTERN)) -> dict[str, Any]:
        """A queued job is cancelled at once, a running one at its next frame; a finished one is deleted."""
        return service.status(service.cancel(job_id))


async def _wait_for(request: Request, service: GenerationService, job: Job) -> Any:
    """Wait for a synchronous job; send its mp4 (then delete it) or its error. A gone client cancels it."""
    ticks = 0
    while not job.done.is_set():
        await asyncio.sleep(POLL_S)
        ticks += 1
        if ticks % 10 == 0 and await request.is_disconnected():
            log.info("client of job %s went away: cancelling it", job.id)
            service.cancel(job.id)
            return JSONResponse({"error": "client_gone", "message": "cancelled", "fix": None}, status_code=499)
    if job.state != "done":
        service.delete(job.id)
        assert job.error is not None
        return job.error.response()
    return FileResponse(job.result, media_type="video/mp4", filename=f"musetalk-{job.id[:8]}.mp4",
                        headers={"X-Job-Id": job.id, "X-Frames": str(job.frames_done)},
                        background=BackgroundTask(service.delete, job.id))


def authorize_shutdown(request: Request, token: str | None) -> None:
    """Allow with ``Authorization: Bearer <token>``; with no token configured, only from a loopback address."""
    if token is None:
        if not is_loopback(request.client.host if request.client else None):
            raise ApiError(403, "forbidden", "shutdown is allowed only from this machine when no token is set",
                           "call it from 127.0.0.1, or start the server with --token")
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "unauthorized", "shutdown needs the server's token", "send Authorization: Bearer <token>",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(403, "forbidden", "wrong token", "send the token the server was started with")


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything else, names included."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _interrupt_self() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # uvicorn's graceful shutdown path


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
