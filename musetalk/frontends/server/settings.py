"""Server settings (:class:`ServerSettings`) and the constants the server modules share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from musetalk.frontends.options import FORM_INT_BOUND  # noqa: F401  (re-exported by musetalk.frontends.server)

if TYPE_CHECKING:
    from musetalk.stream.pipeline import MuseTalkPipeline

MiB = 1 << 20
RESULT_NAME = "result.mp4"
SNIFF_BYTES = 64  # every signature below sits in the first 12 bytes; 64 leaves room
COPY_CHUNK = 1 * MiB
POLL_S = 0.1  # how often a synchronous request looks at its job (and, every 10th time, at its client)
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"

Loader = Callable[[str], "MuseTalkPipeline"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]


def server_option(default: Any, help: str, *, flag: str | None = None, unit: int = 1, minimum: float | None = None,
                  choices: tuple[str, ...] | None = None, env: str | None = None) -> Any:
    """A ServerSettings field and its ``musetalk serve`` flag, declared once: the flag is ``--name-with-dashes``
    (or ``flag``), takes the value in ``unit``s (``--max-upload-mb``: MiB), and must be >= ``minimum``; ``env`` names
    an environment variable that supplies the default (kept out of ``ps`` listings)."""
    return field(default=default, metadata={"help": help, "flag": flag, "unit": unit, "minimum": minimum,
                                            "choices": choices, "env": env})


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs; ``musetalk serve`` derives its flags from these fields (see :func:`server_option`)."""

    token: str | None = server_option(
        None, "bearer token required by POST /shutdown; without one, only loopback clients may shut the server down",
        env="MUSETALK_SERVER_TOKEN")
    default_version: str = server_option(
        "v15", "model version loaded at start and used when a request names none (the other one loads on its first "
        "request, if its weights exist)", flag="--version", choices=("v15", "v1"))
    queue_size: int = server_option(4, "jobs that may wait behind the running one (then 429)", minimum=1)
    max_upload_bytes: int = server_option(256 * MiB, "largest request body: source + audio + fields (then 413)",
                                          flag="--max-upload-mb", unit=MiB, minimum=0)
    max_audio_seconds: float = server_option(900.0, "longest audio accepted (a 15-min clip is ~22 500 frames at "
                                             "25 fps; then 422)", minimum=0)
    max_batch_size: int = server_option(64, "largest batch_size a request may ask for (larger would only exhaust "
                                        "device memory; then 422)", minimum=1)
    # Source limits, checked from the upload's headers before anything decodes it (a 2 MB upload can hold 10 000
    # tiny frames, or a 16000x16000 PNG that decodes to 768 MB); over a limit the answer is 413 naming it.
    max_source_frames: int = server_option(9000, "most frames in a source video (6 min at 25 fps; then 413)",
                                           minimum=1)
    max_source_pixels: int = server_option(3840 * 2160, "most pixels (width x height) of a source frame (then 413)",
                                           minimum=1)
    max_source_seconds: float = server_option(900.0, "longest source video (then 413)", minimum=0)
    result_ttl_s: float = server_option(3600.0, "seconds a finished job's result is kept", flag="--result-ttl",
                                        minimum=0)
    work_dir: Path | None = server_option(None, "where the temporary folder goes (default: the system temp folder)")
    shutdown_grace_s: float = server_option(60.0, "seconds a running job may finish on shutdown, then it is "
                                            "cancelled", flag="--shutdown-grace", minimum=0)
    # Live mode (/avatars and the /avatars/{id}/live WebSocket)
    live_max_sessions: int = server_option(1, "live sessions at once; one more gets a busy answer (429). A session "
                                           "keeps a model thread busy: more than one only where the device has room",
                                           minimum=1)
    max_avatars: int = server_option(16, "prepared avatars the server holds for live sessions (then 429)", minimum=1)
    live_start_timeout_s: float = server_option(10.0, "seconds from a live connection to its start message (then the "
                                                "socket closes with 4408)", flag="--live-start-timeout", minimum=0)
    live_idle_timeout_s: float = server_option(30.0, "longest wait for the next message of a started live session "
                                               "(then 4408)", flag="--live-idle-timeout", minimum=0)
    live_max_chunk_bytes: int = server_option(4 * MiB, "largest audio message of a live session (4 MiB: ~131 s of "
                                              "16-bit PCM; then 4413)", flag="--live-max-chunk-mb", unit=MiB,
                                              minimum=0)
    live_lookahead_ms: float = server_option(200.0, "audio look-ahead of a live session whose start message names "
                                             "none (more: closer to the offline frames, later)", minimum=0)
    live_jpeg_quality: int = server_option(85, "JPEG quality of live frames when the start message names none",
                                           minimum=1)
