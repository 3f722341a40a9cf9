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

Modules: ``settings`` (ServerSettings, constants), ``errors`` (ApiError, http_error), ``uploads`` (sniffing,
store_upload, BodyLimit), ``jobs`` (ServerJob, GenerationService, PipelineLoader), ``schemas`` (response models) and
``app`` (create_app, routes, shutdown authorization). Every public name is re-exported here.
"""

from musetalk.frontends.server.app import authorize_shutdown, create_app, is_loopback
from musetalk.frontends.server.errors import ApiError, JobCancelled, http_error, redact
from musetalk.frontends.server.jobs import GenerationService, ServerJob, PipelineLoader, memory_figures
from musetalk.frontends.server.schemas import MP4, ErrorBody, FieldError, Health, JobStatus, ServiceInfo, ShutdownStatus
from musetalk.frontends.server.settings import (
    COPY_CHUNK,
    FORM_INT_BOUND,
    JOB_ID_PATTERN,
    POLL_S,
    RESULT_NAME,
    SNIFF_BYTES,
    JobState,
    Loader,
    MiB,
    ServerSettings,
)
from musetalk.frontends.server.uploads import AUDIO_KINDS, SOURCE_KINDS, UNSUPPORTED, BodyLimit, Sniffed, sniff, store_upload

Job = ServerJob  # the name before 0.2 (the server and the batch runner each had a `Job`)
__all__ = [
    "AUDIO_KINDS", "COPY_CHUNK", "FORM_INT_BOUND", "JOB_ID_PATTERN", "MP4", "POLL_S", "RESULT_NAME", "SNIFF_BYTES",
    "SOURCE_KINDS", "UNSUPPORTED", "ApiError", "BodyLimit", "ErrorBody", "FieldError", "GenerationService", "Health",
    "ServerJob", "Job", "JobCancelled", "JobState", "JobStatus", "Loader", "MiB", "PipelineLoader", "ServerSettings",
    "ServiceInfo", "ShutdownStatus", "Sniffed", "authorize_shutdown", "create_app", "http_error", "is_loopback",
    "memory_figures", "redact", "sniff", "store_upload",
]
