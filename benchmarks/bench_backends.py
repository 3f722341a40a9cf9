"""Backends benchmark: torch vs MLX for the UNet + VAE, same machine, same inputs, one run.

    python -m benchmarks.bench_backends [--size tiny|full] [--batches 1,4,8] [--dtypes fp32,fp16] [--frames 8]

On a Mac (Apple Silicon, ``pip install "musetalk[mlx]"``): ``python -m benchmarks.bench_backends --size full``.

Every (backend, dtype, batch) runs in a fresh child process, so peak memory belongs to that configuration alone:
  model-only fps  UNet + VAE decode on batches of one avatar's latents (after one warm-up batch)
  end-to-end fps  ``pipeline.stream`` from a prepared avatar (audio windows, UNet, decode, blend) into an mp4
  peak RSS        psutil, sampled by musetalk.profiling.MemoryMonitor over both measurements
  peak backend    MLX: ``mlx.core.get_peak_memory``; torch: the device allocator's peak (CUDA / MPS), when any
Both backends load the same weight files (tiny: ``musetalk tiny-weights``; full: the real architectures with
random weights, written once into a temporary folder), and the torch stages (Whisper, the parser) run on
``--device`` for both. Writes benchmarks/results/backends[-full].json and the BENCH:backends[-full] section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_generate import write_section  # the one writer of docs/benchmarks.md sections

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SAMPLES = REPO / "samples"


def machine() -> dict:
    import torch

    info = {"system": platform.system(), "machine": platform.machine(), "cpu": platform.processor() or "",
            "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1_5_15": list(os.getloadavg())}
    try:
        import mlx.core as mx

        info["mlx"] = mx.__version__
        info["mlx_device"] = str(mx.default_device())
    except ImportError:
        info["mlx"] = None
    return info


def child(models: Path, backend: str, dtype: str, batch: int, frames: int, device: str) -> dict:
    """One configuration, measured in this fresh process; returns the JSON record."""
    import numpy as np
    import torch

    from musetalk.profiling.memory import MemoryMonitor
    from musetalk.stages.audio import AudioConfig, load_audio
    from musetalk.stream.pipeline import MuseTalkPipeline
    from musetalk.stream.video import VideoWriter

    frames = max(frames, batch)  # at least one full batch, or batch 8 would never be measured
    t0 = time.perf_counter()
    pipe = MuseTalkPipeline.from_pretrained(models, device=device, dtype=dtype, backend=backend)
    load_s = time.perf_counter() - t0
    config = pipe.default_config(batch_size=batch)
    avatar = pipe.prepare_avatar(SAMPLES / "face.png", config)
    latents = torch.from_numpy(np.repeat(np.asarray(avatar.latents[:1]), batch, axis=0))
    speech = np.resize(load_audio(SAMPLES / "speech.wav"), int(frames / 25 * 16000) + 100)
    windows = torch.from_numpy(pipe.audio_encoder.windows(speech, AudioConfig(fps=25))[:batch])  # real speech
    with tempfile.TemporaryDirectory() as tmp, MemoryMonitor(device=pipe.device, uss=False) as memory:
        pipe.vae.decode(pipe.unet(latents, windows))  # warm-up: allocations, kernel selection, shader compilation
        t0 = time.perf_counter()
        done = 0
        while done < frames:
            n = min(batch, frames - done)
            pipe.vae.decode(pipe.unet(latents[:n], windows[:n]))  # returns host arrays: the work is finished
            done += n
        model_only = frames / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_out = 0
        with VideoWriter(Path(tmp) / "out.mp4", fps=25) as writer:
            for frame in pipe.stream(avatar, speech, config):
                writer.write(frame)
                n_out += 1
        end_to_end = n_out / (time.perf_counter() - t0)
    avatar.close()
    peak = memory.peak()
    device_keys = ("mlx_peak_memory",) if backend == "mlx" else ("cuda_max_memory_allocated",
                                                                  "mps_driver_allocated_memory")
    device_peak = next(((k, peak[k]) for k in device_keys if k in peak), (None, None))
    return {"backend": backend, "dtype": dtype, "batch": batch, "frames": n_out, "device": str(pipe.device),
            "load_s": load_s, "model_only_fps": model_only, "end_to_end_fps": end_to_end,
            "peak_rss_mb": peak["rss"] / 2**20, "device_peak_counter": device_peak[0],
            "device_peak_mb": None if device_peak[1] is None else device_peak[1] / 2**20}


def run_child(models: Path, backend: str, dtype: str, batch: int, frames: int, device: str, work: Path) -> dict:
    env = {**os.environ, "MUSETALK_CACHE": tempfile.mkdtemp(dir=work, prefix="cache-"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "benchmarks.bench_backends", "--child", str(models), backend, dtype, str(batch),
            "--frames", str(frames), "--device", device]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} {dtype} batch {batch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_models(folder: Path, size: str) -> Path:
    """The weight files both backends load (the MLX backend converts and caches them on its first load)."""
    from musetalk.testing.tiny import write_tiny_models

    return write_tiny_models(folder, parsing=True, full_size=size == "full")


def table(records: list[dict], size: str, frames: int, info: dict, command: str) -> str:
    def mb(value: float | None) -> str:
        return "–" if value is None else f"{value:,.0f} MB"

    rows = "\n".join(
        f"| {r['backend']} | {r['dtype']} | {r['batch']} | {r['model_only_fps']:.2f} | {r['end_to_end_fps']:.2f} | "
        f"{mb(r['peak_rss_mb'])} | {mb(r['device_peak_mb'])}{' (`' + r['device_peak_counter'] + '`)' if r['device_peak_counter'] else ''} |"
        for r in records)
    where = f"{info['system']} {info['machine']} {info['cpu']}".strip() + f", {info['cores']} cores"
    loads = [r["load_1min_before"] for r in records]
    load = f" (1-min load {min(loads):.0f}-{max(loads):.0f} before the runs)" if loads else ""
    mac = info["system"] == "Darwin" and info["machine"] == "arm64"
    caveat = "" if mac else (
        "\n**This machine is not a Mac: MLX runs on its CPU build here (`mlx[cpu]`, reference BLAS), so these MLX "
        "numbers say nothing about MLX on Apple Silicon, and little about torch either (the CPU is shared with other "
        "jobs).** They show that the comparison runs and what it measures; the Mac rows come from "
        "`python -m benchmarks.bench_backends --size full` on a Mac.\n")
    what = "tiny architecture (`musetalk tiny-weights`)" if size == "tiny" else \
        "full-size architecture (850 M-parameter UNet, sd-vae-ft-mse; random weights)"
    return f"""## Backends: torch vs MLX ({size})

`{command}` — {what}, {frames} frames (at least one batch) per measurement, the same
weight files and inputs for both backends, each configuration in a fresh process. Model-only = UNet + VAE decode;
end to end = `pipeline.stream` from a prepared avatar into an mp4. Machine: {where}{load}; torch {info['torch']},
mlx {info.get('mlx')} on {info.get('mlx_device')}; torch stages on `{records[0]['device'] if records else '?'}`.
{caveat}
| backend | dtype | batch | model-only fps | end-to-end fps | peak RSS | peak backend memory |
|---|---|---:|---:|---:|---:|---:|
{rows}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--backends", default="torch,mlx")
    parser.add_argument("--dtypes", default="fp32,fp16")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--frames", type=int, default=8,
                        help="frames per measurement (model-only and end to end); at least the batch size")
    parser.add_argument("--device", default="auto", help="torch device of the torch stages (and of --backend torch)")
    parser.add_argument("--models", type=Path, default=None, help="use these weights instead of writing random ones")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--child", nargs=4, metavar=("MODELS", "BACKEND", "DTYPE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        models, backend, dtype, batch = args.child
        print(json.dumps(child(Path(models), backend, dtype, int(batch), args.frames, args.device)))
        return 0
    from musetalk.stages.mlx import mlx_available

    backends = [b for b in args.backends.split(",") if b != "mlx" or mlx_available()]
    if "mlx" in args.backends and "mlx" not in backends:
        print('mlx is not installed: pip install "musetalk[mlx]" (running torch only)', file=sys.stderr)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        models = args.models or make_models(Path(tmp) / "models", args.size)
        for dtype in args.dtypes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for backend in backends:  # interleaved, so drifting machine load hits both backends alike
                    record = run_child(models, backend, dtype, batch, args.frames, args.device, Path(tmp))
                    record["load_1min_before"] = os.getloadavg()[0]
                    records.append(record)
                    print(json.dumps(record), file=sys.stderr, flush=True)
    info = machine()
    name = "backends" if args.size == "tiny" else "backends-full"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"what": f"torch vs MLX, {args.size} architecture",
                                                      "frames": args.frames, "machine": info,
                                                      "results": records}, indent=2))
    command = "python -m benchmarks.bench_backends " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = table(records, args.size, args.frames, info, command.strip())
    print(markdown)
    if not args.no_doc:
        write_section(name, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
