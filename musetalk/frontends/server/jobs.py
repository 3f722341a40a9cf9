"""Jobs: :class:`ServerJob`, the :class:`GenerationService` (queue + worker thread), :class:`PipelineLoader`."""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from musetalk.config import GenerationConfig, preset
from musetalk.errors import Cancelled, InputError, MuseTalkError, WeightsError
from musetalk.hooks import Hooks
from musetalk.stream.leftovers import Hold, held_temp_dir
from musetalk.frontends.server.errors import ApiError, JobCancelled, http_error, redact
from musetalk.frontends.server.settings import RESULT_NAME, JobState, Loader, ServerSettings
from musetalk.frontends.server.uploads import check_media_limits, store_upload

if TYPE_CHECKING:
    from musetalk.stream.pipeline import MuseTalkPipeline

log = logging.getLogger("musetalk.frontends.server")  # the logger name the single module had


# -- jobs ---------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ServerJob:
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


class JobHooks(Hooks):
    """The run hooks of one job: progress goes into the job's state, its cancel flag cancels the run.

    The pipeline polls ``cancelled()`` before every source frame (preparation) and every output frame
    (generation), so a cancel lands within about one frame's work.
    """

    def __init__(self, job: ServerJob) -> None:
        self.job = job

    def progress(self, phase: str, done: int, total: int | None) -> None:
        job = self.job
        if phase == "prepare":
            job.stage = "preparing"
        elif phase == "generate":
            if done == 0:
                job.stage, job.frames_total, job.generating_since = "generating", total, time.perf_counter()
            job.frames_done = done
            if total is not None and done >= total:
                job.generating_until = time.perf_counter()

    def cancelled(self) -> bool:
        return self.job.cancel.is_set()


class GenerationService:
    """The job queue and the one worker thread that owns the device. Thread-safe; used by the HTTP handlers."""

    def __init__(self, pipeline_or_loader: "MuseTalkPipeline | Loader", settings: ServerSettings) -> None:
        self.settings = settings
        self._loader: Loader | None = None
        self._pipelines: dict[str, MuseTalkPipeline] = {}
        if callable(pipeline_or_loader) and not hasattr(pipeline_or_loader, "stream"):
            self._loader = pipeline_or_loader
        else:  # a pipeline (a test double of one may be callable too; it has `stream`)
            pipeline = cast("MuseTalkPipeline", pipeline_or_loader)
            self._pipelines[pipeline.version] = pipeline
        self._cond = threading.Condition()
        self._pending: collections.deque[ServerJob] = collections.deque()
        self._reserved = 0  # queue slots promised to requests still storing their uploads
        self._jobs: dict[str, ServerJob] = {}
        self._running: ServerJob | None = None
        self._closing = False
        self._durations: collections.deque[float] = collections.deque(maxlen=8)
        self._worker: threading.Thread | None = None
        self.root: Path | None = None
        self._root_hold: Hold | None = None
        self.started_at = time.time()

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the default version (if not given), make the temporary folder and start the worker."""
        if self._worker is not None:
            return
        self.default_pipeline()
        if self.settings.work_dir is not None:
            Path(self.settings.work_dir).mkdir(parents=True, exist_ok=True)
        # a server that was killed (SIGKILL, OOM) left its folder of uploads and results: removed once unheld
        self.root, self._root_hold = held_temp_dir("musetalk-server-", self.settings.work_dir)
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
        if self._root_hold is not None:
            self._root_hold.release()
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
               synchronous: bool) -> ServerJob:
        """Store, check and queue one job; raises ApiError 415/422/429/503 without queueing anything."""
        from musetalk.stream.avatar import check_avatar_name

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
                check_media_limits(source_path, audio_path, self.settings)  # headers only, before any decoding
                self._check_media(source_path, audio_path, config)
            except MuseTalkError as exc:
                raise redact(exc, folder) from None
            job = ServerJob(job_id, folder, config, avatar, source_path, audio_path, synchronous)
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
        from musetalk.stages.audio import SAMPLE_RATE, check_speech, load_audio
        from musetalk.stream.video import open_frames

        frames = open_frames(source)  # InputError for unreadable / truncated files
        wav = load_audio(audio)
        check_speech(wav, frames.fps or config.fps, source="the audio upload")
        seconds = len(wav) / SAMPLE_RATE
        if seconds > self.settings.max_audio_seconds:
            raise InputError(f"the audio is {seconds:.0f} s long; this server takes at most "
                             f"{self.settings.max_audio_seconds:g} s", "split the audio into shorter parts")

    def get(self, job_id: str) -> ServerJob:
        """The job, or ApiError 404 (unknown, expired or deleted)."""
        self.purge_expired()
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"no job {job_id} (unknown, expired or deleted)",
                           f"results are kept for {self.settings.result_ttl_s:g} s after a job ends")
        return job

    def cancel(self, job_id: str) -> ServerJob:
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

    def queue_position(self, job: ServerJob) -> int | None:
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

    def _run(self, job: ServerJob) -> None:
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

    def _generate(self, pipe: "MuseTalkPipeline", job: ServerJob) -> None:
        """The one generation path (``pipeline.generate``), with the job's hooks; a cancel -> JobCancelled."""
        try:
            result = pipe.generate(job.source, job.audio, job.result, job.config, avatar=job.avatar, progress=False,
                                   hooks=JobHooks(job))
        except Cancelled:
            raise JobCancelled(job.id) from None
        job.frames_done, job.video_fps = result.num_frames, result.fps
        if job.generating_until is None:
            job.generating_until = time.perf_counter()

    def _finish(self, job: ServerJob, state: JobState, error: ApiError | None) -> None:
        if state != "done":  # removed before the state changes: a client that sees "failed" sees no files
            shutil.rmtree(job.folder, ignore_errors=True)
        job.state, job.error, job.stage, job.finished_at = state, error, "finished", time.time()
        job.done.set()
        log.info("job %s %s%s", job.id, state, f": {error.message}" if error else "")

    # -- read-outs --------------------------------------------------------------------------------------------
    def status(self, job: ServerJob) -> dict[str, Any]:
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

    def __init__(self, models_dir: str | os.PathLike | None, device: str = "auto", dtype: str = "auto",
                 backend: str = "auto") -> None:
        from musetalk.weights import default_models_dir

        self.models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
        self.device = device
        self.dtype = dtype
        self.backend = backend
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
        from musetalk.stream.pipeline import MuseTalkPipeline

        with self._lock:
            if version not in self._loaded:
                self.check(version)
                self._loaded[version] = MuseTalkPipeline.from_pretrained(self.models_dir, version=version,
                                                                         device=self.device, dtype=self.dtype,
                                                                         backend=self.backend,
                                                                         keep_landmarkers=True)  # many avatars
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
