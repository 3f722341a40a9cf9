"""Batch generation: one video per row of a CSV / JSONL jobs file, in one process or on a Ray cluster.

    musetalk batch jobs.csv --output-dir out/                 # local: models loaded once, avatars reused
    musetalk batch jobs.csv --output-dir out/ --ray           # a local Ray runtime, one actor per GPU / CPU slot
    musetalk batch jobs.csv --output-dir out/ --ray auto      # join a running cluster (or ray://HOST:10001)

    from musetalk import batch
    report = batch.run("jobs.csv", "out/", config=preset("v15", batch_size=16), ray="auto")

A row names ``source`` and ``audio`` (paths relative to the jobs file), optionally ``output`` (a file name
inside the output folder) and any per-row ``generate`` setting (``bbox_shift``, ``parsing_mode``, ...). Every
row is checked before any model is loaded: all bad rows are reported at once, and nothing runs unless
``skip_invalid``. Settings go through :func:`musetalk.config.with_overrides` (what ``preset`` uses for the
CLI's flags and the server's fields), so the three front ends accept and refuse the same values.

Steps of a run:
1. read and validate the rows -> :class:`Job` list + :class:`RowError` list;
2. order the jobs by avatar group (same source, same crop/blend settings) so each source is prepared once;
3. run them: locally with one pipeline, or on Ray actors (each loads the models once and keeps its avatar
   cache; a group sticks to one actor while it has jobs; a dead actor is replaced and its job retried);
4. move each finished file from the hidden staging folder ``DIR/.musetalk-batch-<id>/`` onto its final
   name (atomic rename), append a line to the summary JSONL, and remove the staging folder at the end,
   also on Ctrl-C: DIR never holds a partial video.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Mapping, Sequence

from musetalk.config import BlendConfig, CropConfig, GenerationConfig, preset, with_overrides
from musetalk.errors import InputError, MuseTalkError

if TYPE_CHECKING:  # torch-heavy: imported when a batch runs, not when the CLI is built
    from musetalk.pipeline import MuseTalkPipeline

log = logging.getLogger(__name__)

JOB_FILE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SUMMARY_NAME = "summary.jsonl"  # default summary file, inside the output folder
STAGING_PREFIX = ".musetalk-batch-"  # hidden staging folder inside the output folder, removed at the end
# Row settings: every GenerationConfig field a row may change. Runtime fields (device, dtype, batch size) and
# the version are set once for the batch because the models are loaded once.
ROW_SETTINGS: dict[str, type] = {
    **{f.name: {"int": int, "float": float, "str": str}[str(f.type)] for f in fields(CropConfig)},
    **{f.name: {"int": int, "float": float, "str": str}[str(f.type)] for f in fields(BlendConfig)},
    "fps": float,
}
_ONCE = "it is set once for the whole batch: {} (or batch.run(config=...))"
BATCH_WIDE = {"version": _ONCE.format("--version"), "device": _ONCE.format("--device"),
              "dtype": _ONCE.format("--dtype"), "batch_size": _ONCE.format("--batch-size"),
              "avatar": "remove the column: the batch names, prepares and reuses avatars itself"}
START_TIMEOUT_S = 600.0  # Ray: how long to wait for the first worker (model loading on a cold node included)
STATES = ("done", "failed", "invalid", "cancelled")
_KIND_NAMES = {int: "a whole number", float: "a number", str: "text"}


# -- data ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One validated row: absolute input paths, the output name inside the output folder, its settings."""

    row: int  # line of the jobs file (CSV: the spreadsheet row, header = 1; JSONL: the line); list index + 1
    source: Path
    audio: Path
    output: str  # relative POSIX path inside the output folder, ends in .mp4
    config: GenerationConfig

    @property
    def group(self) -> Hashable:
        """Jobs with the same group share one prepared avatar (same source, same crop / blend / fps)."""
        return str(self.source), self.config.crop, self.config.blend, self.config.fps


@dataclass(frozen=True)
class RowError:
    """Why a row cannot run: which row, which column, what is wrong and how to fix it."""

    row: int
    column: str
    message: str
    fix: str | None = None

    def __str__(self) -> str:
        return f"row {self.row}, {self.column}: {self.message}" + (f" (fix: {self.fix})" if self.fix else "")


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


class BatchError(InputError):
    """Some rows of the jobs file are invalid; ``errors`` lists every one of them."""

    def __init__(self, errors: Sequence[RowError], total: int) -> None:
        self.errors = list(errors)
        rows = sorted({e.row for e in errors})
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"{len(rows)} of {total} rows are invalid, nothing was run:\n{lines}",
                         "correct those rows, or pass --skip-invalid (skip_invalid=True) to run the valid ones")


# -- 1. reading and validating rows ----------------------------------------------------------------------------
def read_rows(jobs: str | os.PathLike) -> tuple[list[tuple[int, dict[str, Any]]], list[RowError]]:
    """The rows of a .csv (with a header) or .jsonl file as (row number, {column: value}), plus syntax errors.

    Empty CSV cells and JSON nulls are dropped (the setting keeps its default); blank lines are skipped.
    """
    path = Path(jobs)
    kind = JOB_FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"cannot read jobs from {path.name}: unknown suffix",
                         f"use a CSV file with a header row or a JSONL file ({', '.join(JOB_FILE_SUFFIXES)})")
    if not path.is_file():
        raise InputError(f"jobs file not found: {path}", "check the path of the jobs file")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
        return _read_csv(f) if kind == "csv" else _read_jsonl(f)


def _read_csv(f: Iterable[str]) -> tuple[list[tuple[int, dict[str, Any]]], list[RowError]]:
    reader = csv.DictReader(f)
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[RowError] = []
    for data in reader:
        extra = data.pop(None, None)  # type: ignore[call-overload]  # cells beyond the header
        if extra and any(str(v).strip() for v in extra):
            errors.append(RowError(reader.line_num, "-", f"{len(extra)} more cells than the header has columns",
                                   "quote values that contain commas, or add the missing column names"))
        cells = {k: v.strip() for k, v in data.items() if k is not None and v is not None and v.strip()}
        if cells:
            rows.append((reader.line_num, cells))
    return rows, errors


def _read_jsonl(f: Iterable[str]) -> tuple[list[tuple[int, dict[str, Any]]], list[RowError]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[RowError] = []
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(RowError(number, "-", f"not valid JSON ({err.msg} at column {err.colno})",
                                   'write one object per line, e.g. {"source": "a.mp4", "audio": "a.wav"}'))
            continue
        if not isinstance(data, dict):
            errors.append(RowError(number, "-", f"a line must be a JSON object, got {type(data).__name__}",
                                   'write one object per line, e.g. {"source": "a.mp4", "audio": "a.wav"}'))
            continue
        rows.append((number, {k: v for k, v in data.items() if v is not None}))
    return rows, errors


def _convert(value: Any, kind: type) -> Any:
    """A CSV string or JSON value as ``kind``; raises ValueError with what was expected."""
    what = _KIND_NAMES[kind]
    if isinstance(value, bool):  # JSON true/false would otherwise pass as 1/0
        raise ValueError(f"expected {what}, got {value!r}")
    if kind is str:
        return str(value)
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"expected {what}, got {value!r}") from None
    if not isinstance(number, (int, float)) or (kind is int and not float(number).is_integer()):
        raise ValueError(f"expected {what}, got {value!r}")
    return kind(number)


def _check_settings(number: int, cells: Mapping[str, Any], base: GenerationConfig
                    ) -> tuple[dict[str, Any], list[RowError]]:
    """Per-row settings, typed and validated one column at a time so each error names its column."""
    from musetalk.faces.registry import LANDMARK_BACKENDS

    settings: dict[str, Any] = {}
    errors: list[RowError] = []
    for column, value in cells.items():
        kind = ROW_SETTINGS[column]
        try:
            typed = _convert(value, kind)
        except ValueError as err:
            errors.append(RowError(number, column, str(err), f"{column} takes {_KIND_NAMES[kind]}"))
            continue
        if column == "landmarks" and typed not in LANDMARK_BACKENDS:
            errors.append(RowError(number, column, f"unknown landmark backend {typed!r}",
                                   f"use one of {', '.join(LANDMARK_BACKENDS)}"))
            continue
        try:
            with_overrides(base, **{column: typed})
        except InputError as exc:
            errors.append(RowError(number, column, exc.message, exc.fix))
            continue
        settings[column] = typed
    return settings, errors


def _check_output_name(value: Any) -> str:
    """A relative .mp4 path inside the output folder (a missing suffix is added); raises ValueError."""
    name = Path(str(value).strip())
    if name.suffix == "":
        name = name.with_suffix(".mp4")
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise ValueError(f"output {str(value)!r} must be a file name inside the output folder")
    if name.suffix.lower() != ".mp4":
        raise ValueError(f"output {name.name!r} must end in .mp4")
    return name.as_posix()


def parse_row(number: int, cells: Mapping[str, Any], base_dir: Path, base: GenerationConfig
              ) -> tuple[Job | None, list[RowError]]:
    """One row -> a Job (``output`` still empty when the row names none), or None and every error of the row."""
    cells = {str(k).strip().lower().replace("-", "_"): v for k, v in cells.items()
             if not str(k).strip().startswith("#")}  # '#notes' columns are comments
    errors: list[RowError] = []
    paths: dict[str, Path] = {}
    for column, check, what in (("source", Path.exists, "an image, a video or a folder of frames"),
                                ("audio", Path.is_file, "an audio file (wav, mp3, m4a, ...)")):
        value = str(cells.pop(column, "")).strip()
        if not value:
            errors.append(RowError(number, column, f"no {column} given", f"every row needs a {column}: {what}"))
            continue
        path = (base_dir / Path(value).expanduser()).resolve()
        if not check(path):
            errors.append(RowError(number, column, f"{column} not found: {path}",
                                   f"paths are relative to the jobs file's folder ({base_dir})"))
        paths[column] = path
    output = ""
    if "output" in cells:
        try:
            output = _check_output_name(cells.pop("output"))
        except ValueError as err:
            errors.append(RowError(number, "output", str(err), "e.g. output=alice-hello.mp4"))
    for column in [c for c in cells if c not in ROW_SETTINGS]:
        cells.pop(column)
        fix = (BATCH_WIDE[column] if column in BATCH_WIDE else
               f"use source, audio, output or a setting: {', '.join(ROW_SETTINGS)} ('#' columns are comments)")
        errors.append(RowError(number, column, f"unknown column {column!r}" if column not in BATCH_WIDE
                               else f"{column} cannot change per row", fix))
    settings, setting_errors = _check_settings(number, cells, base)
    errors += setting_errors
    if errors:
        return None, errors
    return Job(number, paths["source"], paths["audio"], output, with_overrides(base, **settings)), []


def _assign_outputs(jobs: list[Job]) -> tuple[list[Job], list[RowError]]:
    """Give every job a distinct output name: named ones first (duplicates are errors), then defaults."""
    taken: dict[str, int] = {}
    errors: list[RowError] = []
    named = []
    for job in jobs:
        if job.output:
            key = job.output.lower()
            if key in taken:
                errors.append(RowError(job.row, "output", f"{job.output} is also the output of row {taken[key]}",
                                       "give each row its own output name"))
                continue
            taken[key] = job.row
        named.append(job)
    out = []
    for job in named:
        if not job.output:
            name = f"{job.source.stem}-{job.audio.stem}.mp4"
            if name.lower() in taken:
                name = f"{job.source.stem}-{job.audio.stem}-row{job.row}.mp4"
            taken[name.lower()] = job.row
            job = replace(job, output=name)
        out.append(job)
    return out, errors


def load_jobs(jobs: str | os.PathLike | Iterable[Mapping[str, Any]], config: GenerationConfig | None = None,
              base_dir: str | os.PathLike | None = None) -> tuple[list[Job], list[RowError], int]:
    """Read and validate every row; returns (valid jobs, errors of all invalid rows, number of rows).

    jobs: a .csv / .jsonl path (paths in it are relative to its folder) or rows as mappings (relative to
    ``base_dir``, default the working directory; row numbers are then 1-based list positions).
    config: the settings every row starts from (default: the v1.5 preset); rows override per-row settings.
    """
    base = (config or preset("v15")).validate()
    if isinstance(jobs, (str, os.PathLike)):
        rows, errors = read_rows(jobs)
        folder = Path(jobs).resolve().parent
    else:
        rows, errors = [(i, dict(row)) for i, row in enumerate(jobs, start=1)], []
        folder = Path(base_dir or Path.cwd()).resolve()
    parsed = []
    for number, cells in rows:
        job, row_errors = parse_row(number, cells, folder, base)
        errors += row_errors
        if job is not None:
            parsed.append(job)
    bad = {e.row for e in errors}  # includes rows with a syntax error (e.g. too many CSV cells) that parsed
    parsed, output_errors = _assign_outputs([job for job in parsed if job.row not in bad])
    errors += output_errors
    total = len({number for number, _ in rows} | bad)
    if total == 0:
        raise InputError("the jobs file has no rows", "add one row per video: source, audio[, output, settings]")
    return parsed, sorted(errors, key=lambda e: e.row), total


def order_by_group(jobs: Sequence[Job]) -> list[Job]:
    """Jobs of one avatar group next to each other (groups in first-appearance order, rows in file order)."""
    groups: OrderedDict[Hashable, list[Job]] = OrderedDict()
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return [job for group in groups.values() for job in group]


# -- 2. running one job (shared by local mode and the Ray actors) ---------------------------------------------------
class JobRunner:
    """Runs jobs on one loaded pipeline. Prepared avatars live in the shared cache under ``batch-<key>`` names,
    so a source is prepared once per settings and reused by later jobs, later batches and other workers of the
    same machine (the cache checks the source's content hash and every setting before reusing)."""

    def __init__(self, pipe: MuseTalkPipeline, worker: str = "local") -> None:
        self.pipe = pipe
        self.worker = worker
        self._hashes: dict[tuple[str, int, int], str] = {}

    def avatar_name(self, job: Job) -> str:
        """``batch-<16 hex>``: the same for the same source content, version and crop / blend / fps settings."""
        from musetalk.avatar import hash_source

        stat = job.source.stat()
        key = (str(job.source), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:  # a long video is hashed once per worker, not once per job
            self._hashes[key] = hash_source(job.source)
        blob = json.dumps({"source": self._hashes[key], "version": job.config.version, "fps": job.config.fps,
                           "crop": asdict(job.config.crop), "blend": asdict(job.config.blend)}, sort_keys=True)
        return "batch-" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run(self, job: Job, out: Path) -> JobResult:
        """Generate ``job`` into ``out`` (its folder must exist). Never raises for a failed job (KeyboardInterrupt
        and SystemExit do propagate): the error, with its fix, is in the result."""
        started = time.perf_counter()
        try:
            result = self.pipe.generate(job.source, job.audio, out, job.config, avatar=self.avatar_name(job),
                                        progress=False)
        except MuseTalkError as exc:
            error = exc.message + (f" (fix: {exc.fix})" if exc.fix else "")
        except Exception as exc:  # a bug or an out-of-memory must not stop the other jobs; logged with traceback
            log.exception("row %d failed", job.row)
            error = f"{type(exc).__name__}: {exc}"
        else:
            return JobResult(job.row, str(out), "done", time.perf_counter() - started, result.num_frames,
                             worker=self.worker)
        return JobResult(job.row, None, "failed", time.perf_counter() - started, 0, error, worker=self.worker)


# -- 3. bookkeeping on the driver -------------------------------------------------------------------------------
class _Outputs:
    """The output folder: staging paths, atomic final renames, the summary JSONL (one line per finished row)."""

    def __init__(self, output_dir: Path, summary: Path | None, progress: bool, total: int) -> None:
        self.dir = output_dir
        self.staging = output_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        self.staging.mkdir()
        self.summary_path = summary or output_dir / SUMMARY_NAME
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        self._summary = open(self.summary_path, "w", encoding="utf-8")
        self.results: list[JobResult] = []
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="batch", unit="job")

    def staged(self, job: Job) -> Path:
        """Where ``job`` writes its video; the folder exists."""
        folder = self.staging / f"row{job.row}"
        folder.mkdir(exist_ok=True)
        return folder / Path(job.output).name

    def discard(self, job: Job) -> None:
        """Drop what a dead worker left of ``job`` (a partial encoder file)."""
        shutil.rmtree(self.staging / f"row{job.row}", ignore_errors=True)

    def finish(self, job: Job | None, result: JobResult, data: bytes | None = None) -> None:
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
                return
            time.sleep(0.5)
        log.warning("could not remove the staging folder %s", self.staging)


def _cancel(outputs: _Outputs, jobs: Iterable[Job], attempts: Mapping[int, int]) -> None:
    for job in jobs:
        outputs.finish(None, JobResult(job.row, None, "cancelled", attempts=attempts.get(job.row, 0)))


# -- 4a. local mode ---------------------------------------------------------------------------------------------
def _run_local(jobs: list[Job], outputs: _Outputs, config: GenerationConfig, models: str | os.PathLike | None,
               pipeline: MuseTalkPipeline | None, on_job_start: Callable[[JobStarted], None] | None) -> float:
    """Every job in this process with one pipeline; returns when the models were ready (time.perf_counter)."""
    from musetalk.pipeline import MuseTalkPipeline

    todo = deque(order_by_group(jobs))
    try:
        if pipeline is None:
            pipeline = MuseTalkPipeline.from_pretrained(models, version=config.version,
                                                        device=config.runtime.device, dtype=config.runtime.dtype)
        elif pipeline.version != config.version:
            raise InputError(f"the pipeline runs {pipeline.version} but the batch asks for {config.version}",
                             "load the pipeline for the batch's version, or set the version to match")
        ready_at = time.perf_counter()
        runner = JobRunner(pipeline)
        while todo:
            job = todo[0]
            staged = outputs.staged(job)
            if on_job_start is not None:
                on_job_start(JobStarted(job.row, 1, runner.worker, None, staged))
            result = runner.run(job, staged)
            result.attempts = 1
            outputs.finish(job, result)
            todo.popleft()
    except BaseException:  # Ctrl-C, or models that cannot load: the rows not done are recorded as cancelled
        _cancel(outputs, todo, {})
        raise
    return ready_at


# -- 4b. Ray mode -----------------------------------------------------------------------------------------------
class BatchWorker:
    """A Ray actor: loads the models once, keeps its avatar cache, runs one job at a time.

    Load errors are kept and reported by :meth:`ready` (a constructor that raises would only surface as an
    opaque "actor died" on the first call).
    """

    def __init__(self, models: str | None, config: GenerationConfig) -> None:
        import socket
        import tempfile

        from musetalk.pipeline import MuseTalkPipeline

        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.error: str | None = None
        self.runner: JobRunner | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="musetalk-batch-worker-"))
        self._inputs: dict[str, Path] = {}
        try:
            pipe = MuseTalkPipeline.from_pretrained(models, version=config.version, device=config.runtime.device,
                                                    dtype=config.runtime.dtype)
            self.runner = JobRunner(pipe, self.name)
        except MuseTalkError as exc:
            self.error = exc.message + (f" (fix: {exc.fix})" if exc.fix else "")
        except Exception as exc:  # reported to the driver, which stops the batch with it
            self.error = f"{type(exc).__name__}: {exc}"

    def ready(self, probe: str | None = None, token: str | None = None) -> dict[str, Any]:
        """Name, device and load error of this worker; whether it sees the driver's ``probe`` file holding ``token``."""
        sees = None
        if probe is not None:
            try:
                sees = Path(probe).read_text() == token
            except OSError:
                sees = False
        device = str(self.runner.pipe.device) if self.runner is not None else None
        return {"name": self.name, "device": device, "error": self.error, "sees_output": sees}

    def _materialize(self, blob: Mapping[str, Any]) -> Path:
        """Write an input shipped by the driver (``--collect``) into this worker's temp folder, once per content."""
        if blob["hash"] not in self._inputs:
            folder = self.tmp / "inputs" / blob["hash"]
            folder.mkdir(parents=True, exist_ok=True)
            for relative, data in blob["files"].items():
                (folder / relative).write_bytes(data)
            self._inputs[blob["hash"]] = folder / blob["name"] if blob["single"] else folder
        return self._inputs[blob["hash"]]

    def run(self, job: Job, staged: str | None, source: Mapping[str, Any] | None = None,
            audio: Mapping[str, Any] | None = None) -> tuple[JobResult, bytes | None]:
        """Run ``job`` into ``staged`` (shared file system), or into a temp file whose bytes are returned."""
        assert self.runner is not None, "run() on a worker whose models failed to load"
        if source is not None and audio is not None:
            job = replace(job, source=self._materialize(source), audio=self._materialize(audio))
        out = Path(staged) if staged else self.tmp / f"row{job.row}" / Path(job.output).name
        out.parent.mkdir(parents=True, exist_ok=True)
        result = self.runner.run(job, out)
        data = None
        if staged is None and result.state == "done":
            data = out.read_bytes()
            out.unlink()
        return result, data

    def close(self) -> None:
        """Remove this worker's temp folder (called by the driver at the end of a batch)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def _pack_input(path: Path) -> dict[str, Any]:
    """A source / audio file or frame folder as bytes, for workers that cannot read the driver's files."""
    from musetalk.avatar import hash_source

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"hash": hash_source(path), "name": path.name, "single": path.is_file(),
            "files": {p.name: p.read_bytes() for p in files}}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MuseTalkError("Ray is not installed", 'pip install "musetalk[ray]" (or run without --ray)') from None
    return ray


def _connect(ray: Any, address: bool | str) -> bool:
    """Start or join a Ray runtime unless this process already has one; True when we must shut it down."""
    if ray.is_initialized():
        return False
    if address in (True, "local"):
        # no dashboard: ~2 s faster start and two processes fewer; start a cluster with `ray start --head` to get one
        ray.init(include_dashboard=False)
    else:
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError) as err:
            raise MuseTalkError(f"cannot join the Ray cluster at {address}: {err}",
                                "start it with `ray start --head` (then use --ray auto), or check the ray:// "
                                "address and port (10001 by default)") from None
    return True


def _source_checkout_env() -> dict[str, Any] | None:
    """PYTHONPATH for workers when musetalk runs from a source checkout rather than an installed package."""
    from importlib import metadata

    try:
        metadata.distribution("musetalk")
        return None
    except metadata.PackageNotFoundError:
        return {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}}


def plan_workers(resources: Mapping[str, float], jobs: int, workers: int | None = None,
                 cpus_per_worker: float | None = None) -> tuple[int, dict[str, float]]:
    """How many actors, and the resources of each: one per GPU when the cluster has GPUs, else one per
    ``cpus_per_worker`` CPUs (default: the CPUs split evenly over ``workers``, or 4 CPUs each). Never more actors
    than jobs."""
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if gpus:
        count = min(workers or gpus, gpus)
        if workers and workers > gpus:
            log.warning("%d workers asked, but the cluster has %d GPUs: using %d", workers, gpus, gpus)
        options = {"num_gpus": 1.0, "num_cpus": float(cpus_per_worker or 1)}
    else:
        per = cpus_per_worker or (max(1.0, cpus // workers) if workers else max(1.0, min(4.0, cpus)))
        fits = max(1, int(cpus // per)) if cpus else (workers or 1)
        count = min(workers or fits, fits)
        if workers and workers > fits:
            log.warning("%d workers of %g CPUs asked, but the cluster has %g CPUs: using %d", workers, per, cpus, fits)
        options = {"num_cpus": float(per)}
    return max(1, min(count, jobs)), options


def pick_group(current: Hashable | None, pending: Mapping[Hashable, int], owned: set[Hashable]) -> Hashable | None:
    """The avatar group an idle actor works on next: the one it prepared last (its avatar is ready); else the
    first group no other actor is on; else the group with the most pending jobs (an idle actor helps rather than
    waits; on one node it even reuses the avatar from the shared cache). None when nothing is pending.

    pending: jobs left per group, in order. owned: the groups other actors are on.
    """
    groups = [g for g, n in pending.items() if n > 0]
    if not groups:
        return None
    if current in groups:
        return current
    free = [g for g in groups if g not in owned]
    return free[0] if free else max(groups, key=lambda g: pending[g])


@dataclass
class _Slot:
    """One actor position of the pool; its actor is replaced when it dies."""

    index: int
    actor: Any = None
    name: str = ""
    state: str = "starting"  # starting | idle | busy
    group: Hashable | None = None  # avatar group this actor prepared last: it gets that group's next jobs
    job: Job | None = None
    ref: Any = None  # ObjectRef of ready() or run()
    started_at: float = field(default_factory=time.monotonic)


class _RayScheduler:
    """Driver side of Ray mode: a pool of actors, group affinity, replacement of dead actors, retries."""

    def __init__(self, ray: Any, jobs: list[Job], outputs: _Outputs, config: GenerationConfig, models: str | None,
                 count: int, options: dict[str, float], retries: int, collect: bool,
                 on_job_start: Callable[[JobStarted], None] | None) -> None:
        self.ray, self.outputs, self.config, self.models = ray, outputs, config, models
        self.options, self.retries, self.collect, self.on_job_start = options, retries, collect, on_job_start
        self.pending: OrderedDict[Hashable, deque[Job]] = OrderedDict()
        for job in order_by_group(jobs):
            self.pending.setdefault(job.group, deque()).append(job)
        self.attempts: dict[int, int] = {}
        self.slots = [_Slot(i) for i in range(count)]
        self.start_failures = 0
        self.first_ready: float | None = None
        self._blobs: dict[Path, Any] = {}
        self._probe = None if collect else outputs.staging / ".probe"
        self._token = uuid.uuid4().hex
        if self._probe is not None:
            self._probe.write_text(self._token)

    # -- actors
    def _start(self, slot: _Slot) -> None:
        cls = self.ray.remote(BatchWorker).options(**self.options, max_restarts=0, max_concurrency=1,
                                                   runtime_env=_source_checkout_env())
        slot.actor = cls.remote(str(self.models) if self.models else None, self.config)
        slot.state, slot.job, slot.started_at = "starting", None, time.monotonic()
        slot.ref = slot.actor.ready.remote(str(self._probe) if self._probe else None, self._token)

    def _on_ready(self, slot: _Slot, info: dict[str, Any]) -> None:
        if info["error"]:
            raise MuseTalkError(f"worker {info['name']} could not load the models: {info['error']}",
                                "every node needs the weights at the --models path (or $MUSETALK_MODELS)")
        if info["sees_output"] is False:
            raise InputError(f"worker {info['name']} cannot see the output folder {self.outputs.dir}",
                             "put the output folder on a file system every node mounts at the same path, "
                             "or pass --collect to stream the videos back to this machine")
        log.info("worker %s ready on %s", info["name"], info["device"])
        slot.name, slot.state = info["name"], "idle"
        if self.first_ready is None:
            self.first_ready = time.perf_counter()

    def _replace(self, slot: _Slot, err: BaseException) -> None:
        """The actor of ``slot`` died: retry its job (or fail it after ``retries``) and start a new actor."""
        job = slot.job
        log.warning("worker %s died (%s)", slot.name or f"#{slot.index}", type(err).__name__)
        if job is None:
            self.start_failures += 1
            if self.start_failures > max(3, len(self.slots) * (self.retries + 1)):
                raise MuseTalkError(f"Ray workers keep dying before they are ready: {err}",
                                    "check the workers' logs (ray logs / the dashboard): memory, GPU, install")
        else:
            self.outputs.discard(job)
            if self.attempts[job.row] <= self.retries:
                self.pending.setdefault(job.group, deque()).appendleft(job)
                self.pending.move_to_end(job.group, last=False)
            else:
                self.outputs.finish(None, JobResult(job.row, None, "failed", error=f"its worker died "
                                                    f"{self.attempts[job.row]} times ({type(err).__name__})",
                                                    attempts=self.attempts[job.row], worker=slot.name))
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception as exc:  # it is dead already; nothing else to do
            log.debug("kill after death: %s", exc)
        self._start(slot)  # keeps the affinity; an actor that is idle earlier may take the retried job first

    # -- jobs
    def _next_job(self, slot: _Slot) -> Job | None:
        owned = {s.group for s in self.slots if s is not slot and s.state != "starting"}
        slot.group = pick_group(slot.group, {g: len(q) for g, q in self.pending.items()}, owned)
        return None if slot.group is None else self.pending[slot.group].popleft()

    def _dispatch(self, slot: _Slot) -> None:
        job = self._next_job(slot)
        if job is None:
            return
        self.attempts[job.row] = self.attempts.get(job.row, 0) + 1
        staged = self.outputs.staged(job)
        if self.on_job_start is not None:
            self.on_job_start(JobStarted(job.row, self.attempts[job.row], slot.name, slot.actor,
                                         None if self.collect else staged))
        blobs = []
        if self.collect:
            for path in (job.source, job.audio):
                if path not in self._blobs:  # each input crosses the network once, then lives in the object store
                    self._blobs[path] = self.ray.put(_pack_input(path))
                blobs.append(self._blobs[path])
        slot.job, slot.state = job, "busy"
        slot.ref = slot.actor.run.remote(job, None if self.collect else str(staged), *blobs)

    def _on_result(self, slot: _Slot, value: tuple[JobResult, bytes | None]) -> None:
        result, data = value
        job = slot.job
        assert job is not None
        result.attempts = self.attempts[job.row]
        self.outputs.finish(job, result, data)
        slot.job, slot.state = None, "idle"

    # -- the main loop
    def run(self, start_timeout: float = START_TIMEOUT_S) -> None:
        """Start the actors, hand out jobs until none is left, stop the actors (also on errors and Ctrl-C)."""
        RayActorError = self.ray.exceptions.RayActorError
        try:
            for slot in self.slots:
                self._start(slot)
            while any(self.pending.values()) or any(s.state == "busy" for s in self.slots):
                # 1. hand a job to every idle actor
                for slot in self.slots:
                    if slot.state == "idle":
                        self._dispatch(slot)
                # 2. wait for one answer (a worker ready, a job done, or a death)
                by_ref = {s.ref: s for s in self.slots if s.state in ("starting", "busy")}
                done, _ = self.ray.wait(list(by_ref), num_returns=1, timeout=1.0)
                for ref in done:
                    slot = by_ref[ref]
                    try:
                        value = self.ray.get(ref)
                    except RayActorError as err:
                        self._replace(slot, err)
                        continue
                    except self.ray.exceptions.RayTaskError as err:  # a bug in the worker code itself
                        self._fail_slot_job(slot, err)
                        continue
                    except self.ray.exceptions.RayError as err:  # object lost, memory monitor, worker crash
                        self._replace(slot, err)
                        continue
                    if slot.state == "starting":
                        self._on_ready(slot, value)
                    else:
                        self._on_result(slot, value)
                # 3. no worker at all after the start timeout: the cluster cannot place them
                waited = time.monotonic() - min(s.started_at for s in self.slots)
                if self.first_ready is None and waited > start_timeout:
                    raise MuseTalkError(f"no Ray worker started within {start_timeout:.0f} s (each needs "
                                        f"{self.options})", "lower --cpus-per-worker, or add nodes to the cluster")
        except BaseException:
            busy = [s.job for s in self.slots if s.job is not None]
            _cancel(self.outputs, busy + [j for q in self.pending.values() for j in q], self.attempts)
            raise
        finally:
            self._stop()

    def _fail_slot_job(self, slot: _Slot, err: BaseException) -> None:
        if slot.job is None:
            raise MuseTalkError(f"a Ray worker failed while starting: {err}", "see the traceback above")
        self.outputs.finish(None, JobResult(slot.job.row, None, "failed", error=str(err),
                                            attempts=self.attempts[slot.job.row], worker=slot.name))
        slot.job, slot.state = None, "idle"

    def _stop(self) -> None:
        live = [s.actor for s in self.slots if s.state == "idle"]
        try:
            self.ray.wait([a.close.remote() for a in live], num_returns=len(live), timeout=10)
        except Exception as exc:  # cleanup only: the actors are killed next anyway
            log.debug("worker close: %s", exc)
        for slot in self.slots:
            if slot.actor is not None:
                self.ray.kill(slot.actor, no_restart=True)


def _run_ray(jobs: list[Job], outputs: _Outputs, config: GenerationConfig, models: str | os.PathLike | None,
             address: bool | str, workers: int | None, cpus_per_worker: float | None, retries: int, collect: bool,
             on_job_start: Callable[[JobStarted], None] | None) -> tuple[float, int]:
    """Every job on Ray actors; returns (when the first worker was ready (time.perf_counter), number of actors)."""
    ray = _import_ray()
    started_here = _connect(ray, address)
    try:
        count, options = plan_workers(ray.cluster_resources(), len(jobs), workers, cpus_per_worker)
        log.info("Ray: %d workers, each %s", count, options)
        # the workers read the weights themselves: an absolute path (every node needs it), or their own default
        models_path = str(Path(models).expanduser().resolve()) if models is not None else None
        scheduler = _RayScheduler(ray, jobs, outputs, config, models_path, count, options, retries, collect,
                                  on_job_start)
        scheduler.run()
        return scheduler.first_ready or time.perf_counter(), count
    finally:
        if started_here:
            ray.shutdown()


# -- 5. the entry points --------------------------------------------------------------------------------------------
def run(jobs: str | os.PathLike | Iterable[Mapping[str, Any]], output_dir: str | os.PathLike, *,
        config: GenerationConfig | None = None, models: str | os.PathLike | None = None,
        ray: bool | str | None = None, workers: int | None = None, cpus_per_worker: float | None = None,
        retries: int = 1, collect: bool = False, skip_invalid: bool = False, summary: str | os.PathLike | None = None,
        progress: bool = True, base_dir: str | os.PathLike | None = None, pipeline: MuseTalkPipeline | None = None,
        on_job_start: Callable[[JobStarted], None] | None = None) -> BatchReport:
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
    Ctrl-C (KeyboardInterrupt) stops the batch: running and pending rows are recorded as cancelled, no partial
    video is left in ``output_dir``, and the KeyboardInterrupt propagates.
    """
    t0 = time.perf_counter()
    config = (config or preset("v15")).validate()
    if retries < 0:
        raise InputError(f"retries must be >= 0, got {retries}", "use --retries 0 (never) or more")
    valid, errors, total = load_jobs(jobs, config, base_dir)
    if errors and not skip_invalid:
        raise BatchError(errors, total)
    out = Path(output_dir).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the output folder {out}: {err}", "choose a writable output folder") from None
    if not os.access(out, os.W_OK):
        raise InputError(f"cannot write to {out}", "choose a writable output folder")
    outputs = _Outputs(out, Path(summary).resolve() if summary else None, progress, len(valid))
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
            ready_at, count = _run_local(valid, outputs, config, models, pipeline, on_job_start), 1
    finally:
        outputs.close()
    return BatchReport(outputs.results, out, outputs.summary_path, time.perf_counter() - t0, ready_at - t0,
                       "ray" if ray else "local", count)


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``musetalk batch JOBS --output-dir DIR [--ray [ADDRESS]] [--workers N] [--retries K] ...``."""
    from musetalk.cli import _add_generation_args, _add_model_args

    parser.add_argument("jobs", type=Path, help="CSV (with a header) or JSONL: source, audio[, output, settings]")
    parser.add_argument("--output-dir", type=Path, required=True, help="where the videos and summary.jsonl go")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run on Ray: alone, a local runtime; 'auto' or ray://HOST:PORT joins a cluster")
    parser.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU / CPU slot)")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs per Ray actor on CPU-only clusters (default: CPUs / workers, at most 4)")
    parser.add_argument("--retries", type=int, default=1, help="retries of a job whose Ray worker died (default 1)")
    parser.add_argument("--collect", action="store_true",
                        help="Ray workers do not share this file system: send inputs, stream the videos back")
    parser.add_argument("--skip-invalid", action="store_true", help="run the valid rows even if some are invalid")
    parser.add_argument("--summary", type=Path, default=None, help="summary JSONL (default DIR/summary.jsonl)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(parser)
    _add_generation_args(parser)  # batch-wide defaults; a row's own columns override them


def run_batch(args: argparse.Namespace) -> int:
    """``musetalk batch``: 0 when every row made its video, 1 when some did not, 130 on Ctrl-C."""
    from musetalk.cli import _config

    try:
        report = run(args.jobs, args.output_dir, config=_config(args), models=args.models, ray=args.ray,
                     workers=args.workers, cpus_per_worker=args.cpus_per_worker, retries=args.retries,
                     collect=args.collect, skip_invalid=args.skip_invalid, summary=args.summary,
                     progress=not args.quiet)
    except KeyboardInterrupt:
        print("interrupted: finished videos are kept, no partial file was left; see the summary", file=sys.stderr)
        return 130
    counts = ", ".join(f"{report.count(s)} {s}" for s in STATES if report.count(s))
    print(f"{counts} in {report.seconds:.1f} s ({report.mode}, {report.workers} worker(s)) -> {report.output_dir}")
    print(f"summary: {report.summary}")
    for result in report.results:
        if result.state in ("failed", "invalid"):
            print(f"  row {result.row} {result.state}: {result.error}", file=sys.stderr)
    return 0 if report.ok else 1
