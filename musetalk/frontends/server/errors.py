"""API errors: :class:`ApiError` (status + code), :func:`http_error` (package errors -> HTTP), :func:`redact`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from musetalk.errors import InputError, MuseTalkError, NoFaceError, StorageError, WeightsError


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
    if isinstance(exc, StorageError):  # the server's disk is full (or a file size limit): the client may retry
        return ApiError(507, "insufficient_storage", exc.message, exc.fix)
    if isinstance(exc, MuseTalkError):  # any other failure of the server's own
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
