"""Server settings (:class:`ServerSettings`) and the constants the server modules share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

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
