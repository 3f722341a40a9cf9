"""Generation benchmarks: memory scaling, full-size throughput (model-only vs end to end), stage breakdown.

    python -m benchmarks.bench_generate [memory] [throughput] [--frames 16] [--dtypes fp32,bf16]

Writes benchmarks/results/{memory,throughput}.json and the tables between the BENCH markers in
docs/benchmarks.md.

a. memory: peak RSS (ru_maxrss of a fresh child process) of one `generate` run with 3 s and with 30 s of audio,
   the same 720p 2 s video source, tiny weights. Target: ratio <= 1.10.
b. throughput: the full-size architecture (UNet from the real musetalk.json, sd-vae-ft-mse VAE, whisper-tiny
   encoder, full BiSeNet; random weights built in memory, nothing saved). model-only fps = UNet + VAE decode on
   batches of the same frames; end-to-end fps = `pipeline.stream` (audio windows, UNet, decode, blend) over the
   same number of frames from a prepared avatar, encoded to H.264 + AAC. Target: end-to-end / model-only >= 0.85.
c. stages: the per-stage breakdown of the bf16 end-to-end run (musetalk.profiling).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "benchmarks.md"


def cpu_bf16() -> str:
    """How the CPU runs bf16 (what oneDNN uses): "AMX", "AVX-512 BF16" or "none" ("?" off Linux)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return "?"
    words = set(flags.split())
    return "AMX" if "amx_bf16" in words else "AVX-512 BF16" if "avx512_bf16" in words else "none"


def machine() -> dict:
    import torch

    from musetalk.profiling.report import cpu_name

    return {"cpu": platform.processor() or platform.machine(), "cpu_name": cpu_name(), "cpu_bf16": cpu_bf16(),
            "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_average_1_5_15": list(os.getloadavg())}


def write_section(name: str, markdown: str) -> None:
    """Replace the text between <!-- BENCH:name --> markers in docs/benchmarks.md (append if absent)."""
    DOC.parent.mkdir(exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start, end = f"<!-- BENCH:{name} -->", f"<!-- /BENCH:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


# -- a. memory -----------------------------------------------------------------------------------------------
_CHILD = """
import resource, sys
from musetalk.stream.pipeline import MuseTalkPipeline
pipe = MuseTalkPipeline.from_pretrained(sys.argv[1], device="cpu", dtype="fp32")
result = pipe.generate(sys.argv[2], sys.argv[3], sys.argv[4], pipe.default_config(), progress=False)
print("RESULT", result.num_frames, result.seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_inputs(folder: Path, seconds: list[int]) -> tuple[Path, dict[int, Path]]:
    """A 720p 2 s source (the sample clip scaled) and speech of each length (the sample speech repeated)."""
    import cv2

    from musetalk.stages.audio import load_audio
    from musetalk.stream.video import VideoWriter, open_frames

    source = folder / "source720p.mp4"
    with VideoWriter(source, fps=25) as writer:
        for frame in open_frames(REPO / "samples" / "face.mp4"):
            canvas = np.full((720, 1280, 3), 128, np.uint8)
            canvas[:, 280:1000] = cv2.resize(frame, (720, 720), interpolation=cv2.INTER_CUBIC)
            writer.write(canvas)
    speech = load_audio(REPO / "samples" / "speech.wav")
    audios = {}
    for s in seconds:
        wav = np.resize(speech, s * 16000)
        path = folder / f"speech{s}s.wav"
        import wave

        with wave.open(str(path), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes((np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes())
        audios[s] = path
    return source, audios


def bench_memory(models: Path, seconds: tuple[int, int] = (3, 30)) -> dict:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        source, audios = make_inputs(Path(tmp), list(seconds))
        for s in seconds:
            out = Path(tmp) / f"out{s}.mp4"
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(models), str(source), str(audios[s]), str(out)],
                                  capture_output=True, text=True, env={**os.environ, "MUSETALK_CACHE": tmp})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
            if proc.returncode or not line:
                raise RuntimeError(proc.stderr[-2000:])
            _, frames, secs, maxrss_kb = line[0].split()
            runs.append({"audio_s": s, "frames": int(frames), "seconds": float(secs),
                         "peak_rss_mb": int(maxrss_kb) / 1024})
    ratio = runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    result = {"what": "peak RSS of one generate run, 720p 2 s video source, tiny weights, CPU fp32",
              "runs": runs, "ratio": ratio, "target": "<= 1.10", "machine": machine()}
    rows = "\n".join(f"| {r['audio_s']} s | {r['frames']} | {r['peak_rss_mb']:.0f} MB | {r['seconds']:.0f} s |"
                     for r in runs)
    write_section("memory", f"""## a. Memory scaling (tiny weights, CPU fp32)

`python -m benchmarks.bench_generate memory` — peak RSS of a fresh process running one `generate` with a
720p 2 s video source (the sample clip scaled) and 3 s vs 30 s of speech.

| audio | output frames | peak RSS | wall time (incl. preparing the 50 source frames) |
|---|---|---|---|
{rows}

**Ratio 30 s / 3 s = {ratio:.3f}** (target ≤ 1.10).""")
    return result


# -- b/c. throughput and stages --------------------------------------------------------------------------------
def full_size_pipeline(dtype: str):
    """Full-size architecture with random weights, built in memory (nothing saved)."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from musetalk.stages.audio import AudioEncoder
    from musetalk.devices import resolve_dtype
    from musetalk.stages.parsing import BiSeNet, FaceParser
    from musetalk.stream.pipeline import MuseTalkPipeline
    from musetalk.stages.tiny import FULL_UNET, FULL_VAE, WHISPER_PREPROCESSOR, build_unet, build_vae
    from musetalk.stages.unet import UNet
    from musetalk.stages.vae import VAE

    dev, dt = torch.device("cpu"), resolve_dtype(dtype)
    torch.manual_seed(0)
    whisper = WhisperEncoder(WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                                           encoder_ffn_dim=1536, num_mel_bins=80)).eval()
    extractor = WhisperFeatureExtractor(**{k: v for k, v in WHISPER_PREPROCESSOR.items()
                                           if k not in ("feature_extractor_type", "padding_side")})
    unet = torch.nn.Module.to(build_unet(FULL_UNET).eval().requires_grad_(False), dtype=dt)
    vae = torch.nn.Module.to(build_vae(FULL_VAE).eval().requires_grad_(False), dtype=dt)
    parser = FaceParser(BiSeNet().eval().requires_grad_(False), dev, torch.float32)
    return MuseTalkPipeline(AudioEncoder(extractor, whisper, dev, torch.float32), VAE(vae, dev, dt),
                            UNet(unet, dev, dt), parser, version="v15")


def bench_throughput(frames: int, dtypes: list[str], batch_size: int) -> dict:
    import torch

    from musetalk.stages.audio import load_audio
    from musetalk.profiling import Profiler
    from musetalk.stream.video import VideoWriter

    results = []
    stages_md = ""
    speech = np.resize(load_audio(REPO / "samples" / "speech.wav"), int(frames / 25 * 16000) + 100)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MUSETALK_CACHE"] = tmp
        wav_path = Path(tmp) / "speech.wav"
        import wave

        with wave.open(str(wav_path), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes((np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes())
        for dtype in dtypes:
            pipe = full_size_pipeline(dtype)
            config = pipe.default_config(batch_size=batch_size, dtype=dtype)
            avatar = pipe.prepare_avatar(REPO / "samples" / "face.png", config)
            latents = torch.from_numpy(np.repeat(np.asarray(avatar.latents[:1]), batch_size, axis=0))
            windows = torch.zeros(batch_size, 50, 384)
            pipe.vae.decode(pipe.unet(latents[:1], windows[:1]))  # warm-up
            t0 = time.perf_counter()
            done = 0
            while done < frames:
                n = min(batch_size, frames - done)
                pipe.vae.decode(pipe.unet(latents[:n], windows[:n]))
                done += n
            model_only = frames / (time.perf_counter() - t0)
            profiler = Profiler(device="cpu")
            with profiler:
                t0 = time.perf_counter()
                n_out = 0
                with VideoWriter(Path(tmp) / f"out-{dtype}.mp4", fps=25, audio=wav_path) as writer:
                    for frame in pipe.stream(avatar, speech, config, profiler=profiler):
                        with profiler.stage("encode"):
                            writer.write(frame)
                        n_out += 1
                e2e = n_out / (time.perf_counter() - t0)
            results.append({"dtype": dtype, "batch_size": batch_size, "frames": n_out,
                            "model_only_fps": model_only, "end_to_end_fps": e2e, "ratio": e2e / model_only})
            stages_md = profiler.report(meta={"dtype": dtype, "batch_size": batch_size}).markdown()
    result = {"what": "full-size architecture, random weights, CPU; model-only = UNet + VAE decode",
              "results": results, "target": "end_to_end / model_only >= 0.85", "machine": machine()}
    rows = "\n".join(f"| {r['dtype']} | {r['batch_size']} | {r['frames']} | {r['model_only_fps']:.3f} | "
                     f"{r['end_to_end_fps']:.3f} | {r['ratio']:.2f} |" for r in results)
    write_section("throughput", f"""## b. Throughput, full-size architecture (random weights, CPU)

`python -m benchmarks.bench_generate throughput --frames {frames} --dtypes {','.join(dtypes)}` — the real
`musetalk.json` UNet (850 M parameters) and sd-vae-ft-mse VAE built in memory. Model-only = UNet + VAE decode
on the same frames; end to end = `pipeline.stream` from a prepared avatar (audio windows, UNet, decode, blend)
written to an mp4 with its audio (H.264 crf 18 + AAC), as `generate` does after preparing the source.

| dtype | batch | frames | model-only fps | end-to-end fps | ratio |
|---|---|---|---|---|---|
{rows}

Target: ratio ≥ 0.85.""")
    write_section("stages", "## c. Per-stage breakdown (last run above)\n\n" + stages_md)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", default=["memory", "throughput"])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--models", type=Path, default=None, help="tiny weights folder (default: written to a tmp dir)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "memory" in args.which:
        from musetalk.stages.tiny import write_tiny_models

        models = args.models or write_tiny_models(Path(tempfile.mkdtemp()) / "models")
        result = bench_memory(models)
        (RESULTS / "memory.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["runs"]), "ratio", round(result["ratio"], 3))
    if "throughput" in args.which:
        result = bench_throughput(args.frames, args.dtypes.split(","), args.batch_size)
        (RESULTS / "throughput.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["results"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
