"""Batch benchmark: the same 4 jobs locally and on a local Ray runtime with 1 and 2 workers (tiny weights).

    python -m benchmarks.bench_batch [--modes local,ray1,ray2] [--repeats 1] [--no-doc]

Jobs: two sources (samples/face.png, and the first 5 frames of samples/face.mp4), two rows each, with 0.8 / 0.9 /
1.0 / 1.1 s cuts of samples/speech.wav (20 + 22 + 25 + 27 = 94 output frames at 25 fps, 512x512). Each mode runs
in a fresh child process with an empty avatar cache, so start-up is measured as a user meets it:

* local: ``batch.run(..., ray=None)``: start-up = model loading;
* rayN:  ``ray.init(num_cpus=<cores>, include_dashboard=False)`` (what ``--ray`` does), then
  ``batch.run(..., ray=True, workers=N)``: start-up = Ray start + actors spawned + models loaded in them.

Ray's overhead is the difference of the wall times against local mode, split into start-up and job phase.
Prints a markdown table and writes it between the BENCH:batch markers of docs/batch.md (unless --no-doc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "batch.md"
SAMPLES = REPO / "samples"
AUDIO_SECONDS = (0.8, 0.9, 1.0, 1.1)
CLIP_FRAMES = 5
MODES = {"local": None, "ray1": 1, "ray2": 2}  # mode -> Ray workers


FULL = os.environ.get("MUSETALK_BENCH_FULL") == "1"  # --full-size: the real architectures, random weights, bf16
FULL_AUDIO_SECONDS = (0.4, 0.4, 0.44, 0.44)  # 40 frames: the full-size UNet + VAE cost ~1.4 s/frame here


def make_inputs(folder: Path) -> Path:
    """Tiny weights, the two sources, four audio cuts and jobs.csv in ``folder``; returns the jobs file."""
    import av
    import numpy as np

    from musetalk.stages.audio import load_audio
    from musetalk.stages.tiny import write_tiny_models
    from musetalk.stream.video import VideoWriter, open_frames

    write_tiny_models(folder / "models", full_size=FULL)
    with VideoWriter(folder / "clip.mp4", fps=25) as writer:
        for i, frame in enumerate(open_frames(SAMPLES / "face.mp4")):
            if i == CLIP_FRAMES:
                break
            writer.write(frame)
    speech = load_audio(SAMPLES / "speech.wav")
    rows = ["source,audio"]
    for i, seconds in enumerate(FULL_AUDIO_SECONDS if FULL else AUDIO_SECONDS):
        wav = speech[8000:8000 + int(seconds * 16000)]
        with av.open(str(folder / f"a{i}.wav"), "w") as out:
            stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
            frame = av.AudioFrame.from_ndarray((wav * 32767).astype(np.int16).reshape(1, -1), format="s16",
                                               layout="mono")
            frame.sample_rate = 16000
            for packet in list(stream.encode(frame)) + list(stream.encode(None)):
                out.mux(packet)
        rows.append(f"{SAMPLES / 'face.png' if i % 2 == 0 else 'clip.mp4'},a{i}.wav")
    (folder / "jobs.csv").write_text("\n".join(rows) + "\n")
    return folder / "jobs.csv"


def child(mode: str, jobs: Path, out: Path) -> dict:
    """One measured run in this (fresh) process; prints nothing but the JSON result."""
    t0 = time.perf_counter()
    from musetalk.frontends import batch
    from musetalk.config import preset

    ray_start = 0.0
    if MODES[mode]:
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t
    report = batch.run(jobs, out, config=preset("v15", device="cpu", dtype="bf16" if FULL else "fp32"), models=jobs.parent / "models",
                       ray=bool(MODES[mode]), workers=MODES[mode], progress=False)
    if MODES[mode]:
        import ray

        ray.shutdown()
    assert report.ok, [r.error for r in report.results if r.state != "done"]
    return {"mode": mode, "wall_s": report.seconds + ray_start, "ray_start_s": ray_start,
            "startup_s": report.startup_seconds + ray_start, "jobs_s": report.seconds - report.startup_seconds,
            "frames": sum(r.frames for r in report.results), "job_s": [r.seconds for r in report.results],
            "process_s": time.perf_counter() - t0}


def run_mode(mode: str, jobs: Path, work: Path) -> dict:
    """``child`` in a fresh interpreter with an empty avatar cache."""
    env = {**os.environ, "MUSETALK_CACHE": tempfile.mkdtemp(dir=work, prefix=f"cache-{mode}-"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"out-{mode}-"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_batch", "--child", mode, str(jobs), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict]], machine: str) -> str:
    """Medians per mode (min-max when repeated), with the overhead against local mode."""
    keys = ("wall_s", "startup_s", "jobs_s", "ray_start_s")
    med = {m: {k: statistics.median(r[k] for r in runs) for k in keys} for m, runs in results.items()}

    def cell(mode: str, key: str) -> str:
        values = [r[key] for r in results[mode]]
        spread = f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else ""
        return f"{med[mode][key]:.1f}{spread}"

    base = med.get("local")
    frames_total = results[next(iter(results))][0]["frames"]
    what = "full-size architecture (random weights), CPU bf16" if FULL else "tiny weights, CPU fp32"
    lines = [f"4 jobs ({frames_total} frames), {what}; {machine}. Median (min-max) of "
             f"{len(next(iter(results.values())))} run(s) per mode, modes interleaved, each run in a fresh process "
             "with an empty avatar cache.", "",
             "| mode | workers | wall s | start-up s | of which Ray start s | jobs s | frames/s (jobs) "
             "| overhead vs local (wall) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, m in med.items():
        frames = results[mode][0]["frames"]
        overhead = "-" if base is None or mode == "local" else \
            f"{m['wall_s'] - base['wall_s']:+.1f} s ({m['wall_s'] / base['wall_s'] - 1:+.0%})"
        lines.append(f"| {'local' if mode == 'local' else 'Ray'} | {MODES[mode] or 1} | {cell(mode, 'wall_s')} | "
                     f"{cell(mode, 'startup_s')} | {cell(mode, 'ray_start_s') if MODES[mode] else '-'} | "
                     f"{cell(mode, 'jobs_s')} | {frames / m['jobs_s']:.2f} | {overhead} |")
    return "\n".join(lines)


def write_doc(markdown: str) -> None:
    """Put the table between the BENCH:batch (or BENCH:batch-full) markers of docs/batch.md and docs/benchmarks.md."""
    name = "batch-full" if FULL else "batch"
    start, end = f"<!-- BENCH:{name} -->", f"<!-- /BENCH:{name} -->"
    command = "python -m benchmarks.bench_batch" + (" --full-size" if FULL else "")
    heading = (f"## Batch: local vs Ray{', full-size architecture' if FULL else ''}\n\n`{command}` "
               "(details: [batch.md](batch.md)).\n\n")
    for doc in (DOC, REPO / "docs" / "benchmarks.md"):
        text = doc.read_text()
        body = markdown.strip() if doc == DOC else heading + markdown.strip()
        block = f"{start}\n{body}\n{end}"
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m, block=block: block, text, flags=re.S) \
            if start in text else text.rstrip() + "\n\n" + block + "\n"
        doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="local,ray1,ray2", help="comma-separated: local, ray1, ray2")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/batch.md alone")
    parser.add_argument("--from-log", type=Path, default=None,
                        help="re-render the table from the JSON lines a previous run printed on stderr")
    parser.add_argument("--full-size", action="store_true",
                        help="the real architectures (850 M-parameter UNet, sd-vae-ft-mse) with random weights, bf16")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "JOBS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.full_size and not FULL:  # children inherit the switch through the environment
        os.environ["MUSETALK_BENCH_FULL"] = "1"
        return subprocess.call([sys.executable, "-m", "benchmarks.bench_batch", *(argv if argv is not None
                                                                                   else sys.argv[1:])])
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return 0
    if args.from_log:
        results = {}
        for line in args.from_log.read_text().splitlines():
            if line.startswith('{"mode"'):
                record = json.loads(line)
                results.setdefault(record["mode"], []).append(record)
        return _report(results, args.no_doc)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        jobs = make_inputs(work / "inputs")
        results: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for mode in args.modes.split(","):  # modes interleaved, so drifting machine load hits all of them
                load = os.getloadavg()[0]
                result = run_mode(mode, jobs, work)
                result["load_1min_before"] = load
                results.setdefault(mode, []).append(result)
                print(json.dumps(result), file=sys.stderr)
    return _report(results, args.no_doc)


def _report(results: dict[str, list[dict]], no_doc: bool) -> int:
    loads = [r["load_1min_before"] for runs in results.values() for r in runs]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs "
               f"(1-min load {min(loads):.1f}-{max(loads):.1f} before the runs)")
    markdown = table(results, machine)
    print(markdown)
    if not no_doc:
        write_doc(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
