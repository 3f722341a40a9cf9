"""The Python entry point: :func:`run`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from musetalk.frontends.batch.jobs import BatchError, BatchJob, load_jobs
from musetalk.frontends.batch.local import _run_local
from musetalk.frontends.batch.outputs import SUMMARY_NAME, BatchReport, JobResult, JobStarted, _Outputs
from musetalk.frontends.batch.ray_mode import _run_ray
from musetalk.config import GenerationConfig, preset
from musetalk.errors import InputError

if TYPE_CHECKING:  # torch-heavy: imported when a batch runs, not when the CLI is built
    from musetalk.hooks import RunHooks
    from musetalk.stream.pipeline import MuseTalkPipeline


def run(jobs: str | os.PathLike | Iterable[Mapping[str, Any]], output_dir: str | os.PathLike, *,
        config: GenerationConfig | None = None, models: str | os.PathLike | None = None,
        ray: bool | str | None = None, workers: int | None = None, cpus_per_worker: float | None = None,
        retries: int = 1, collect: bool = False, skip_invalid: bool = False, summary: str | os.PathLike | None = None,
        progress: bool = True, base_dir: str | os.PathLike | None = None, pipeline: MuseTalkPipeline | None = None,
        on_job_start: Callable[[JobStarted], None] | None = None, hooks: RunHooks | None = None) -> BatchReport:
    """Generate one video per row of ``jobs`` into ``output_dir``; see the module docstring for the row format.

    config: batch-wide settings (version, runtime device / dtype / batch size, default crop / blend); rows override
        the per-row ones. models: the weights folder (on Ray: a path every node has; default $MUSETALK_MODELS).
    ray: None / False: this process. True or "local": a local Ray runtime; "auto" or "ray://HOST:PORT": join a
        cluster. A runtime this process already started (``ray.init``) is used as it is and left running.
    workers, cpus_per_worker: Ray actors (default: one per GPU, else the CPUs split in ``cpus_per_worker`` slots).
    retries: times a job is retried after its Ray worker died (a job that fails with an error is not retried).
    collect: Ray workers do not share this machine's file system: inputs are sent to them and the videos come back.
    skip_invalid: run the valid rows when some are invalid (else BatchError lists them all and nothing runs).
    summary: the summary JSONL (default ``output_dir/summary.jsonl``), one line per row as it finishes.
    pipeline: an already loaded pipeline for local mode. on_job_start: called on the driver as each job starts.
    hooks: run hooks (:mod:`musetalk.hooks`) for every job in local mode; when they cancel, the running job stops
        cleanly, it and the pending rows are recorded as cancelled and :class:`~musetalk.errors.Cancelled`
        propagates.
    Ctrl-C (KeyboardInterrupt) stops the batch: running and pending rows are recorded as cancelled, no partial
    video is left in ``output_dir``, and the KeyboardInterrupt propagates.
    """
    t0 = time.perf_counter()
    config = (config or preset("v15")).validate()
    if retries < 0:
        raise InputError(f"retries must be >= 0, got {retries}", "use --retries 0 (never) or more")
    out = Path(output_dir).expanduser().resolve()
    valid, errors, total = load_jobs(jobs, config, base_dir, output_dir=out)
    if errors and not skip_invalid:
        raise BatchError(errors, total)
    summary_path = Path(summary).expanduser().resolve() if summary else out / SUMMARY_NAME
    _check_summary(summary_path, jobs, valid, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the output folder {out}: {err}", "choose a writable output folder") from None
    if not os.access(out, os.W_OK):
        raise InputError(f"cannot write to {out}", "choose a writable output folder")
    outputs = _Outputs(out, summary_path, progress, len(valid))
    try:
        for number in sorted({e.row for e in errors}):
            message = "; ".join(f"{e.column}: {e.message}" + (f" (fix: {e.fix})" if e.fix else "")
                                for e in errors if e.row == number)
            outputs.finish(None, JobResult(number, None, "invalid", error=message))
        ready_at, count = t0, 0
        if valid and ray:
            ready_at, count = _run_ray(valid, outputs, config, models, ray, workers, cpus_per_worker, retries,
                                       collect, on_job_start)
        elif valid:
            ready_at, count = _run_local(valid, outputs, config, models, pipeline, on_job_start, hooks), 1
    finally:
        outputs.close()
    return BatchReport(outputs.results, out, outputs.summary_path, time.perf_counter() - t0, ready_at - t0,
                       "ray" if ray else "local", count)



def _check_summary(summary: Path, jobs: Any, valid: list[BatchJob], out: Path) -> None:
    """The summary is rewritten from scratch: refuse one that is the jobs file, a row's input or a row's output."""
    from musetalk.stream.paths import check_output_not_input, file_key

    inputs: dict[str, Any] = {"jobs file": jobs if isinstance(jobs, (str, os.PathLike)) else None}
    for job in valid:
        inputs[f"source of row {job.row}"] = job.source
        inputs[f"audio of row {job.row}"] = job.audio
    check_output_not_input(summary, inputs, what="the summary")
    for job in valid:
        if file_key(summary) == file_key(out / job.output):
            raise InputError(f"the summary {summary} is also the output of row {job.row}",
                             "pass another --summary file (a .jsonl)")
