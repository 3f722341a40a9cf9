"""The driver's bookkeeping: staging paths, atomic final renames, the summary JSONL; :class:`JobResult`,
:class:`JobStarted`, :class:`BatchReport`."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from musetalk.frontends.batch.jobs import BatchJob
from musetalk.stream.leftovers import Hold, sweep

log = logging.getLogger("musetalk.frontends.batch")  # one logger name for the whole package, as before the split

SUMMARY_NAME = "summary.jsonl"  # default summary file, inside the output folder
STAGING_PREFIX = ".musetalk-batch-"  # hidden staging folder inside the output folder, removed at the end
STATES = ("done", "failed", "invalid", "cancelled")


@dataclass
class JobResult:
    """One line of the summary JSONL."""

    row: int
    output: str | None  # final path of the video (None when there is none)
    state: str  # done | failed | invalid | cancelled
    seconds: float = 0.0  # wall time of the job on its worker (model loading excluded)
    frames: int = 0
    error: str | None = None
    attempts: int = 0  # 2+ when a worker died during the job and it was retried
    worker: str | None = None  # "local", or the Ray actor (host:pid) that ran it


@dataclass(frozen=True)
class JobStarted:
    """Passed to ``on_job_start`` when a job is handed to a worker (for progress UIs and fault-injection tests)."""

    row: int
    attempt: int  # 1 for the first try
    worker: str
    actor: Any = None  # the Ray actor handle running it (None in local mode)
    staged: Path | None = None  # where the video is being written before its final rename (None: --collect)


@dataclass
class BatchReport:
    """What :func:`run` did: one result per row (invalid rows included), in the order they finished."""

    results: list[JobResult]
    output_dir: Path
    summary: Path
    seconds: float  # wall time of the whole run (validation, model loading / Ray start included)
    startup_seconds: float  # until the first worker could take a job (validation, model loading, Ray start, actors)
    mode: str  # "local" | "ray"
    workers: int

    def count(self, state: str) -> int:
        """Number of rows that ended in ``state``."""
        return sum(r.state == state for r in self.results)

    @property
    def ok(self) -> bool:
        """True when every row produced its video."""
        return all(r.state == "done" for r in self.results)


# -- 3. bookkeeping on the driver -------------------------------------------------------------------------------
class _Outputs:
    """The output folder: staging paths, atomic final renames, the summary JSONL (one line per finished row)."""

    def __init__(self, output_dir: Path, summary: Path | None, progress: bool, total: int) -> None:
        self.dir = output_dir
        # a batch that was killed (SIGKILL: no exit path runs) left its staging folder: removed once unheld
        sweep(output_dir, re.compile(re.escape(STAGING_PREFIX) + r"[0-9a-f]{12}"))
        self.staging = output_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        self.staging.mkdir()
        self._hold = Hold(self.staging)
        self.summary_path = summary or output_dir / SUMMARY_NAME
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        self._summary = open(self.summary_path, "w", encoding="utf-8")
        self.results: list[JobResult] = []
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="batch", unit="job")

    def staged(self, job: BatchJob) -> Path:
        """Where ``job`` writes its video; the folder exists."""
        folder = self.staging / f"row{job.row}"
        folder.mkdir(exist_ok=True)
        return folder / Path(job.output).name

    def discard(self, job: BatchJob) -> None:
        """Drop what a dead worker left of ``job`` (a partial encoder file)."""
        shutil.rmtree(self.staging / f"row{job.row}", ignore_errors=True)

    def finish(self, job: BatchJob | None, result: JobResult, data: bytes | None = None) -> None:
        """Record a final state; for a done job, move its staged file (or write the returned bytes) into place."""
        if job is not None and result.state == "done":
            final = self.dir / job.output
            final.parent.mkdir(parents=True, exist_ok=True)
            staged = self.staged(job)
            if data is not None:
                staged.write_bytes(data)
            os.replace(staged, final)  # atomic: readers see the old file or the complete new one
            self.discard(job)
            result.output = str(final)
        self.results.append(result)
        self._summary.write(json.dumps(asdict(result)) + "\n")
        self._summary.flush()
        if self.bar is not None and result.state != "invalid":
            fps = result.frames / result.seconds if result.seconds else 0.0
            self.bar.set_postfix_str(f"row {result.row}: {result.frames} frames, {fps:.1f} fps"
                                     if result.state == "done" else f"row {result.row}: {result.state}")
            self.bar.update(1)
            if result.state == "failed":
                self.bar.write(f"row {result.row} failed: {result.error}")

    def close(self) -> None:
        """Close the summary and the bar; remove the staging folder (retried: a killed worker may still be exiting)."""
        self._summary.close()
        if self.bar is not None:
            self.bar.close()
        for _ in range(20):
            shutil.rmtree(self.staging, ignore_errors=True)
            if not self.staging.exists():
                self._hold.release()
                return
            time.sleep(0.5)
        log.warning("could not remove the staging folder %s", self.staging)


def _cancel(outputs: _Outputs, jobs: Iterable[BatchJob], attempts: Mapping[int, int]) -> None:
    for job in jobs:
        outputs.finish(None, JobResult(job.row, None, "cancelled", attempts=attempts.get(job.row, 0)))


