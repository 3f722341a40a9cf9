"""Batch generation: one video per row of a CSV / JSONL jobs file, in one process or on a Ray cluster.

    musetalk batch jobs.csv --output-dir out/                 # local: models loaded once, avatars reused
    musetalk batch jobs.csv --output-dir out/ --ray           # a local Ray runtime, one actor per GPU / CPU slot
    musetalk batch jobs.csv --output-dir out/ --ray auto      # join a running cluster (or ray://HOST:10001)

    from musetalk.frontends import batch
    report = batch.run("jobs.csv", "out/", config=preset("v15", batch_size=16), ray="auto")

A row names ``source`` and ``audio`` (paths relative to the jobs file), optionally ``output`` (a file name
inside the output folder) and any per-row ``generate`` setting (``bbox_shift``, ``parsing_mode``, ...). Every
row is checked before any model is loaded: all bad rows are reported at once, and nothing runs unless
``skip_invalid``. Settings go through :func:`musetalk.config.with_overrides` (what ``preset`` uses for the
CLI's flags and the server's fields), so the three front ends accept and refuse the same values.

Steps of a run:
1. read and validate the rows -> :class:`BatchJob` list + :class:`RowError` list;
2. order the jobs by avatar group (same source, same crop/blend settings) so each source is prepared once;
3. run them: locally with one pipeline, or on Ray actors (each loads the models once and keeps its avatar
   cache; a group sticks to one actor while it has jobs; a dead actor is replaced and its job retried);
4. move each finished file from the hidden staging folder ``DIR/.musetalk-batch-<id>/`` onto its final
   name (atomic rename), append a line to the summary JSONL, and remove the staging folder at the end,
   also on Ctrl-C: DIR never holds a partial video.
"""

from __future__ import annotations

from musetalk.frontends.batch.api import run
from musetalk.frontends.batch.cli import add_batch_arguments, run_batch
from musetalk.frontends.batch.jobs import (BATCH_WIDE, JOB_FILE_SUFFIXES, ROW_SETTINGS, BatchError, BatchJob,
                                           RowError, load_jobs, order_by_group, parse_row, read_rows)
from musetalk.frontends.batch.local import _run_local
from musetalk.frontends.batch.outputs import (STAGING_PREFIX, STATES, SUMMARY_NAME, BatchReport, JobResult,
                                              JobStarted, _cancel, _Outputs)
from musetalk.frontends.batch.ray_mode import START_TIMEOUT_S, BatchWorker, _run_ray, pick_group, plan_workers
from musetalk.frontends.batch.runner import JobRunner

Job = BatchJob  # the name before 0.2 (the server and the batch runner each had a `Job`)
__all__ = ["BATCH_WIDE", "JOB_FILE_SUFFIXES", "ROW_SETTINGS", "STAGING_PREFIX", "START_TIMEOUT_S", "STATES",
           "SUMMARY_NAME", "BatchError", "BatchReport", "BatchWorker", "BatchJob", "Job", "JobResult", "JobRunner",
           "JobStarted",
           "RowError", "add_batch_arguments", "load_jobs", "order_by_group", "parse_row", "pick_group",
           "plan_workers", "read_rows", "run", "run_batch", "_Outputs", "_cancel", "_run_local", "_run_ray"]
