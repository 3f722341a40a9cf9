"""The FastAPI app: :func:`create_app`, its error handlers and routes, and shutdown authorization."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import re
import signal
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from musetalk import __version__
from musetalk.errors import MuseTalkError
from musetalk.frontends.server.errors import ApiError, http_error
from musetalk.frontends.server.jobs import GenerationService, ServerJob, memory_figures
from musetalk.frontends.server.live import add_live_routes
from musetalk.frontends.server.schemas import MP4, ErrorBody, FieldError, Health, JobStatus, ServiceInfo, ShutdownStatus, \
    _errors
from musetalk.frontends.options import overrides_from, with_form_settings
from musetalk.frontends.server.settings import JOB_ID_PATTERN, POLL_S, Loader, ServerSettings
from musetalk.frontends.server.uploads import BodyLimit

if TYPE_CHECKING:
    from musetalk.stream.pipeline import MuseTalkPipeline

log = logging.getLogger("musetalk.frontends.server")  # the logger name the single module had


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
            await run_in_threadpool(_app.state.live.close)  # live sessions and prepared avatars
            await run_in_threadpool(service.close)

    app = FastAPI(title="MuseTalk Studio", version=__version__, lifespan=lifespan,
                  description="Lip-sync a face image or video to speech. See docs/api.md.")
    app.state.service = service
    app.state.request_shutdown = None
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    _add_error_handlers(app)
    _add_info_routes(app, service)
    _add_job_routes(app, service)
    app.state.live = add_live_routes(app, service)  # /avatars and the /avatars/{id}/live WebSocket
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MuseTalkError)
    async def _musetalk_error(_request: Request, exc: MuseTalkError) -> JSONResponse:
        return http_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [FieldError(field=".".join(str(p) for p in e.get("loc", ())[1:]) or "body", problem=e.get("msg", ""))
                  for e in exc.errors()]
        message = "; ".join(f"{e.field}: {e.problem}" for e in errors[:5])
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
                           "result_ttl_s": settings.result_ttl_s, "max_source_frames": settings.max_source_frames,
                           "max_source_pixels": settings.max_source_pixels,
                           "max_source_seconds": settings.max_source_seconds}}

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
                         **_errors(413, 415, 422, 429, 503, 507)})
    @with_form_settings  # + one form field per generation setting (bbox_shift, parsing_mode, ...): see options.py
    async def generate(
        request: Request,
        source: UploadFile = File(..., description="face image (png/jpg/bmp/webp/tiff) or video (mp4/mov/mkv/avi)"),
        audio: UploadFile = File(..., description="speech: wav/mp3/m4a/flac/ogg, or a video with sound"),
        avatar: str | None = Form(None, description="name of a cached avatar to reuse or create (shared with the CLI)"),
        run_async: bool = Form(False, alias="async", description="return 202 and a job id instead of waiting"),
        **settings: Any,
    ) -> Any:
        """Waits and answers the mp4 (X-Job-Id, X-Frames headers), or with async=true answers 202 at once."""
        fields = overrides_from(settings)
        config = service.make_config(fields.pop("version", None), **fields)
        job = await run_in_threadpool(service.submit, config, avatar, source.file, audio.file, not run_async)
        if run_async:
            return JSONResponse(service.status(job), status_code=202, headers={"Location": f"/jobs/{job.id}"})
        return await _wait_for(request, service, job)

    # Job ids are not validated as request parameters (that answered 422): any id that is not one of ours, well-formed
    # or not, is simply unknown -> 404 with the usual error body.
    @app.get("/jobs/{job_id}", response_model=JobStatus, responses=_errors(404), summary="State of a job")
    def job_status(job_id: str) -> dict[str, Any]:
        """State, stage, queue position, progress, speed and error of a job."""
        return service.status(find_job(service, job_id))

    @app.get("/jobs/{job_id}/result", response_class=FileResponse, summary="The mp4 of a finished job",
             responses={200: {"description": "the lip-synced video", **MP4}, **_errors(404, 409)})
    def job_result(job_id: str) -> FileResponse:
        """The mp4 of a done job; 409 while it is queued or running, or when it failed or was cancelled."""
        job = find_job(service, job_id)
        if job.state != "done":
            reason = f": {job.error.message}" if job.error else ""
            raise ApiError(409, "not_ready" if not job.done.is_set() else f"job_{job.state}",
                           f"job {job_id} is {job.state}{reason}", "poll GET /jobs/{id} until state is done")
        return FileResponse(job.result, media_type="video/mp4", filename=f"musetalk-{job_id[:8]}.mp4")

    @app.delete("/jobs/{job_id}", response_model=JobStatus, responses=_errors(404),
                summary="Cancel a job (queued or running), or delete a finished one and its result")
    def cancel_job(job_id: str) -> dict[str, Any]:
        """A queued job is cancelled at once, a running one at its next frame; a finished one is deleted."""
        return service.status(service.cancel(find_job(service, job_id).id))


def find_job(service: GenerationService, job_id: str) -> ServerJob:
    """The job ``job_id`` names, or ApiError 404 for any other id: unknown, expired, deleted or malformed (a
    malformed one is not echoed back: it may be huge or hold control characters)."""
    if re.fullmatch(JOB_ID_PATTERN, job_id) is None:
        raise ApiError(404, "unknown_job", "no such job (job ids are 32 lowercase hex digits)",
                       "use the id that POST /generate answered")
    return service.get(job_id)


async def _wait_for(request: Request, service: GenerationService, job: ServerJob) -> Any:
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
