"""Local mode: every job in this process with one pipeline."""

from __future__ import annotations

import os
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from musetalk.frontends.batch.jobs import BatchJob, order_by_group
from musetalk.frontends.batch.outputs import JobStarted, _cancel, _Outputs
from musetalk.frontends.batch.runner import JobRunner
from musetalk.config import GenerationConfig
from musetalk.errors import InputError

if TYPE_CHECKING:  # torch-heavy: imported when a batch runs, not when the CLI is built
    from musetalk.hooks import RunHooks
    from musetalk.stream.pipeline import MuseTalkPipeline


# -- 4a. local mode ---------------------------------------------------------------------------------------------
def _run_local(jobs: list[BatchJob], outputs: _Outputs, config: GenerationConfig, models: str | os.PathLike | None,
               pipeline: MuseTalkPipeline | None, on_job_start: Callable[[JobStarted], None] | None,
               hooks: RunHooks | None = None) -> float:
    """Every job in this process with one pipeline; returns when the models were ready (time.perf_counter)."""
    from musetalk.stream.pipeline import MuseTalkPipeline

    todo = deque(order_by_group(jobs))
    try:
        if pipeline is None:
            pipeline = MuseTalkPipeline.from_pretrained(models, version=config.version,
                                                        device=config.runtime.device, dtype=config.runtime.dtype,
                                                        backend=config.runtime.backend,
                                                        keep_landmarkers=True)  # row after row
        elif pipeline.version != config.version:
            raise InputError(f"the pipeline runs {pipeline.version} but the batch asks for {config.version}",
                             "load the pipeline for the batch's version, or set the version to match")
        ready_at = time.perf_counter()
        runner = JobRunner(pipeline, hooks=hooks)
        while todo:
            job = todo[0]
            staged = outputs.staged(job)
            if on_job_start is not None:
                on_job_start(JobStarted(job.row, 1, runner.worker, None, staged))
            result = runner.run(job, staged)
            result.attempts = 1
            outputs.finish(job, result)
            todo.popleft()
    except BaseException:  # Ctrl-C, a cancel, or models that cannot load: the rows not done are recorded as cancelled
        _cancel(outputs, todo, {})
        raise
    return ready_at
