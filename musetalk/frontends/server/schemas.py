"""Response models (they make the OpenAPI schema precise) and the route ``responses`` helpers."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel

from musetalk.frontends.server.settings import JobState


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
