"""Reading and validating the rows of a jobs file: :class:`BatchJob`, :class:`RowError`, :class:`BatchError`,
:func:`load_jobs`, and :func:`order_by_group` (same avatar group next to each other)."""

from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Sequence

from musetalk.config import GenerationConfig, preset, with_overrides
from musetalk.frontends.options import batch_wide_settings, row_settings
from musetalk.errors import InputError

JOB_FILE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# Row settings: every per-run setting of the config dataclasses (musetalk.frontends.options). Runtime fields
# (device, dtype, batch size) and the version are set once for the batch because the models are loaded once.
ROW_SETTINGS: dict[str, type] = row_settings()
_ONCE = "it is set once for the whole batch: {} (or batch.run(config=...))"
BATCH_WIDE = {**{s.name: _ONCE.format(s.flag) for s in batch_wide_settings()},
              "avatar": "remove the column: the batch names, prepares and reuses avatars itself"}
_KIND_NAMES = {int: "a whole number", float: "a number", str: "text"}


# -- data ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchJob:
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
        extra = data.pop(None, None)  # cells beyond the header
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
    from musetalk.stages.faces.registry import LANDMARK_BACKENDS

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
              ) -> tuple[BatchJob | None, list[RowError]]:
    """One row -> a BatchJob (``output`` still empty when the row names none), or None and every error of the row."""
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
    return BatchJob(number, paths["source"], paths["audio"], output, with_overrides(base, **settings)), []


def _assign_outputs(jobs: list[BatchJob]) -> tuple[list[BatchJob], list[RowError]]:
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


def _row_inputs(cells: Mapping[str, Any], folder: Path) -> list[Path]:
    """The source and audio paths a row names (valid or not: an invalid row's files are the user's files too)."""
    named = {str(k).strip().lower().replace("-", "_"): v for k, v in cells.items()}
    values = [str(named.get(column) or "").strip() for column in ("source", "audio")]
    return [(folder / Path(value).expanduser()).resolve() for value in values if value]


def _output_errors(jobs: list[BatchJob], output_dir: Path, inputs: Mapping[int, list[Path]]) -> list[RowError]:
    """Rows whose output would overwrite an input of any row, or the output of an earlier row (the same file under
    another spelling: a symlinked subfolder, another case)."""
    from musetalk.stream.paths import file_key, find_input_clash

    roles = {f"{'source' if i == 0 else 'audio'} of row {row}": path
             for row, paths in inputs.items() for i, path in enumerate(paths)}
    errors: list[RowError] = []
    written: dict[str, int] = {}
    for job in jobs:
        final = output_dir / job.output
        clash = find_input_clash(final, roles)
        if clash is not None:
            errors.append(RowError(job.row, "output", f"{final} is the same file as the {clash[0]} ({clash[1]}): "
                                   "writing it would destroy that input",
                                   "give the row another output name, or choose another --output-dir"))
            continue
        key = file_key(final)
        if key in written:
            errors.append(RowError(job.row, "output", f"{final} is the same file as the output of row {written[key]}",
                                   "give each row its own output name"))
            continue
        written[key] = job.row
    return errors


def load_jobs(jobs: str | os.PathLike | Iterable[Mapping[str, Any]], config: GenerationConfig | None = None,
              base_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None
              ) -> tuple[list[BatchJob], list[RowError], int]:
    """Read and validate every row; returns (valid jobs, errors of all invalid rows, number of rows).

    jobs: a .csv / .jsonl path (paths in it are relative to its folder) or rows as mappings (relative to
    ``base_dir``, default the working directory; row numbers are then 1-based list positions).
    config: the settings every row starts from (default: the v1.5 preset); rows override per-row settings.
    output_dir: where the videos will go; when given, a row whose output is the same file as any row's input, or
    as another row's output, is invalid (checked here, before any row runs).
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
    if output_dir is not None:
        clashes = _output_errors(parsed, Path(output_dir).expanduser().resolve(),
                                 {number: _row_inputs(cells, folder) for number, cells in rows})
        output_errors += clashes
        parsed = [job for job in parsed if job.row not in {e.row for e in clashes}]
    errors += output_errors
    total = len({number for number, _ in rows} | bad)
    if total == 0:
        raise InputError("the jobs file has no rows", "add one row per video: source, audio[, output, settings]")
    return parsed, sorted(errors, key=lambda e: e.row), total


def order_by_group(jobs: Sequence[BatchJob]) -> list[BatchJob]:
    """Jobs of one avatar group next to each other (groups in first-appearance order, rows in file order)."""
    groups: OrderedDict[Hashable, list[BatchJob]] = OrderedDict()
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return [job for group in groups.values() for job in group]

