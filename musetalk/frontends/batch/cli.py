"""The ``musetalk batch`` command: :func:`add_batch_arguments` and :func:`run_batch`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from musetalk.frontends.batch.api import run
from musetalk.frontends.batch.outputs import STATES


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``musetalk batch JOBS --output-dir DIR [--ray [ADDRESS]] [--workers N] [--retries K] ...``."""
    from musetalk.frontends.options import add_models_flag, add_setting_flags

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
    add_models_flag(parser)
    add_setting_flags(parser)  # batch-wide defaults; a row's own columns override them


def run_batch(args: argparse.Namespace) -> int:
    """``musetalk batch``: 0 when every row made its video, 1 when some did not, 128 + signal when interrupted
    (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""
    from musetalk.frontends.options import config_from_args
    from musetalk.frontends.signals import StopSignalHooks, exit_status, interrupt_signal, signal_name

    try:
        report = run(args.jobs, args.output_dir, config=config_from_args(args), models=args.models, ray=args.ray,
                     workers=args.workers, cpus_per_worker=args.cpus_per_worker, retries=args.retries,
                     collect=args.collect, skip_invalid=args.skip_invalid, summary=args.summary,
                     progress=not args.quiet, hooks=StopSignalHooks())
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (musetalk.frontends.signals)
        print(f"interrupted ({signal_name(interrupt_signal(exc))}): finished videos are kept, no partial file was "
              "left; see the summary", file=sys.stderr)
        return exit_status(exc)
    counts = ", ".join(f"{report.count(s)} {s}" for s in STATES if report.count(s))
    print(f"{counts} in {report.seconds:.1f} s ({report.mode}, {report.workers} worker(s)) -> {report.output_dir}")
    print(f"summary: {report.summary}")
    for result in report.results:
        if result.state in ("failed", "invalid"):
            print(f"  row {result.row} {result.state}: {result.error}", file=sys.stderr)
    return 0 if report.ok else 1
