"""Running one job on a loaded pipeline (shared by local mode and the Ray actors)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from musetalk.frontends.batch.jobs import BatchJob
from musetalk.frontends.batch.outputs import JobResult
from musetalk.errors import Cancelled, MuseTalkError

if TYPE_CHECKING:  # torch-heavy: imported when a batch runs, not when the CLI is built
    from musetalk.hooks import RunHooks
    from musetalk.stream.pipeline import MuseTalkPipeline

log = logging.getLogger("musetalk.frontends.batch")  # one logger name for the whole package, as before the split


# -- 2. running one job (shared by local mode and the Ray actors) ---------------------------------------------------
class JobRunner:
    """Runs jobs on one loaded pipeline. Prepared avatars live in the shared cache under ``batch-<key>`` names,
    so a source is prepared once per settings and reused by later jobs, later batches and other workers of the
    same machine (the cache checks the source's content hash and every setting before reusing)."""

    def __init__(self, pipe: MuseTalkPipeline, worker: str = "local", hooks: RunHooks | None = None) -> None:
        self.pipe = pipe
        self.hooks = hooks
        self.worker = worker
        self._hashes: dict[tuple[str, int, int], str] = {}

    def avatar_name(self, job: BatchJob) -> str:
        """``batch-<16 hex>``: the same for the same source content, version and crop / blend / fps settings."""
        from musetalk.stream.avatar import hash_source

        stat = job.source.stat()
        key = (str(job.source), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:  # a long video is hashed once per worker, not once per job
            self._hashes[key] = hash_source(job.source)
        blob = json.dumps({"source": self._hashes[key], "version": job.config.version, "fps": job.config.fps,
                           "crop": asdict(job.config.crop), "blend": asdict(job.config.blend)}, sort_keys=True)
        return "batch-" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run(self, job: BatchJob, out: Path) -> JobResult:
        """Generate ``job`` into ``out`` (its folder must exist). Never raises for a failed job (KeyboardInterrupt
        and SystemExit do propagate, and so does Cancelled from the hooks): the error, with its fix, is in the
        result."""
        started = time.perf_counter()
        try:
            result = self.pipe.generate(job.source, job.audio, out, job.config, avatar=self.avatar_name(job),
                                        progress=False, hooks=self.hooks)
        except Cancelled:
            raise
        except MuseTalkError as exc:
            error = exc.message + (f" (fix: {exc.fix})" if exc.fix else "")
        except Exception as exc:  # a bug or an out-of-memory must not stop the other jobs; logged with traceback
            log.exception("row %d failed", job.row)
            error = f"{type(exc).__name__}: {exc}"
        else:
            return JobResult(job.row, str(out), "done", time.perf_counter() - started, result.num_frames,
                             worker=self.worker)
        return JobResult(job.row, None, "failed", time.perf_counter() - started, 0, error, worker=self.worker)
