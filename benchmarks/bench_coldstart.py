"""Cold start: load, peak memory, preparation overhead and end to end on the full-size architecture (issue #16).

    python -m benchmarks.bench_coldstart [--dtypes fp32,bf16] [--code DIR --label before] [--no-warm]

``BENCH_PROFILE_DIR=<folder>`` also saves each cold run's whole profile there (``musetalk.profiling`` report JSON:
memory samples over time, the stage timeline), e.g. for ``musetalk.profiling.plots.plot_memory``.

The models are the full-size architecture with random weights, written once in the official layout
(``musetalk.testing.tiny.write_tiny_models(full_size=True)``: UNet 3.4 GB, sd-vae, whisper-tiny, BiSeNet) to
``--models`` (default: a folder under the temp dir, reused). Inputs: a 720p 2 s source (the sample clip scaled)
and 3 s of speech, as in the issue. Every measurement runs in a fresh process with ``--code`` (default: this
checkout) first on ``PYTHONPATH``, so ``--code`` pointing at an older checkout measures "before".

Per dtype:
  load, warm / cold: ``MuseTalkPipeline.from_pretrained`` with the libraries already imported (import time
      reported apart); cold = the model files dropped from the page cache first (posix_fadvise DONTNEED).
      peak = VmHWM of the process (``ru_maxrss`` would include the parent's RSS at fork), after = VmRSS.
  run, cold: load + prepare (named avatar, empty cache) + generate, page cache dropped first; whole-run peak;
      preparation per source frame vs its model stages timed alone (landmarks, parsing, VAE encode, same batch
      sizes, after the run); end to end vs the sum of all model work timed alone (+ Whisper, UNet, VAE decode).
  warm: ``generate`` again on the cached avatar in the same process.
Writes benchmarks/results/coldstart-<label>.json and, from every label's JSON present, the table between the
BENCH:coldstart markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from benchmarks.bench_generate import DOC, REPO, RESULTS, machine, make_inputs, write_section

SOURCE_SECONDS = 2  # the 720p sample source is 2 s (50 frames at 25 fps)
AUDIO_SECONDS = 3
ALONE_FRAMES = 16  # source frames the per-frame model cost alone is measured on
ALONE_BATCHES = 2  # UNet + decode batches timed alone

_CHILD = r'''
import json, os, sys, time
mode, models, dtype = sys.argv[1], sys.argv[2], sys.argv[3]

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

t0 = time.perf_counter()
import numpy as np, torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from musetalk.stream.pipeline import MuseTalkPipeline
import_s = time.perf_counter() - t0
out = {"import_s": import_s, "torch_threads": torch.get_num_threads()}

def load(profiler=None):
    t = time.perf_counter()
    try:
        pipe = MuseTalkPipeline.from_pretrained(models, device="cpu", dtype=dtype, profiler=profiler)
    except TypeError:  # before: from_pretrained took no profiler
        with (profiler.stage("load") if profiler is not None else _Null()):
            pipe = MuseTalkPipeline.from_pretrained(models, device="cpu", dtype=dtype)
    return pipe, time.perf_counter() - t

class _Null:
    def __enter__(self): return None
    def __exit__(self, *a): return False

if mode == "load":
    out["rss_before_gb"] = status_kb("VmRSS") / 2**20
    pipe, out["load_s"] = load()
    out["peak_rss_gb"] = status_kb("VmHWM") / 2**20
    out["rss_after_gb"] = status_kb("VmRSS") / 2**20
    print("RESULT " + json.dumps(out)); sys.exit()

from musetalk.profiling import Profiler
source, audio, workdir = sys.argv[4], sys.argv[5], sys.argv[6]
prof = Profiler(device="cpu")
prof.start()
t_all = time.perf_counter()
pipe, out["load_s"] = load(prof)
out["rss_after_load_gb"] = status_kb("VmRSS") / 2**20
config = pipe.default_config(dtype=dtype)
t = time.perf_counter()
avatar = pipe.prepare_avatar(source, config, name="bench", profiler=prof)
out["prepare_s"] = time.perf_counter() - t
out["source_frames"] = n_src = len(avatar)
t = time.perf_counter()
result = pipe.generate(source, audio, os.path.join(workdir, "cold.mp4"), config, avatar="bench", progress=False,
                       profiler=prof)
out["generate_s"] = time.perf_counter() - t
out["cold_total_s"] = time.perf_counter() - t_all
prof.stop()
out["output_frames"] = n_out = result.num_frames
out["cold_peak_rss_gb"] = status_kb("VmHWM") / 2**20
report = prof.report(meta={"dtype": dtype, "batch_size": config.runtime.batch_size})
out["profile_markdown"] = report.markdown()
if os.environ.get("BENCH_PROFILE_DIR"):  # the whole profile (memory samples, stage timeline) for plots
    report.save(os.path.join(os.environ["BENCH_PROFILE_DIR"], f"coldstart-{dtype}.json"))
out["stages_s"] = {name: s.total_s for name, s in report.stages.items()}

# -- model stages alone, same process, warm, same batch sizes -------------------------------------------------
from musetalk.stages.blending import parser_input
from musetalk.stages.faces.crop import crop_face
frames = [avatar.frame(i) for i in range(min(n_src, ALONE_FRAMES))]
boxes = [avatar.face_box(i) for i in range(len(frames))]
landmarker = pipe.landmarker(config.crop.landmarks)
landmarker.detect(frames[0])
t = time.perf_counter()
for f in frames:
    landmarker.detect(f)
landmarks_pf = (time.perf_counter() - t) / len(frames)
# preparation runs its models with freed blocks kept in the C heap (devices.freed_blocks_kept_in_heap): so here
from musetalk import devices as _devices
_heap = getattr(_devices, "freed_blocks_kept_in_heap", None)
_heap_kept = _heap() if _heap is not None else None
if _heap_kept is not None:
    _heap_kept.__enter__()
inputs = [parser_input(f, b, config.blend.expand) for f, b in zip(frames, boxes)]
batch = config.runtime.batch_size
parse_many = getattr(pipe.parser, "parse_batch", None)
if parse_many is None:
    parse_many = lambda items: [pipe.parser.parse(x) for x in items]
parse_many(inputs[:1])
t = time.perf_counter()
for i in range(0, len(inputs), batch):
    parse_many(inputs[i:i + batch])
parsing_pf = (time.perf_counter() - t) / len(inputs)
crops = np.stack([crop_face(f, b) for f, b in zip(frames, boxes)])
pipe.vae.unet_input(crops[:1])
t = time.perf_counter()
for i in range(0, len(crops), batch):
    pipe.vae.unet_input(crops[i:i + batch])
vae_encode_pf = (time.perf_counter() - t) / len(crops)
if _heap_kept is not None:
    _heap_kept.__exit__(None, None, None)
    _devices.release_free_memory()  # as preparation does when it ends
from musetalk.stages import audio as audio_stage
wav = audio_stage.load_audio(audio)
mels = pipe.audio_encoder.mel_segments(wav)
t = time.perf_counter()
for mel in mels:
    pipe.audio_encoder.encode(mel)
whisper_s = time.perf_counter() - t
latents = torch.from_numpy(np.repeat(np.asarray(avatar.latents[:1]), batch, axis=0))
windows = torch.zeros(batch, 50, 384)
pipe.vae.decode(pipe.unet(latents[:1], windows[:1]))
unet_s = decode_s = 0.0
for _ in range(ALONE_BATCHES):
    t = time.perf_counter()
    pred = pipe.unet(latents, windows)
    unet_s += time.perf_counter() - t
    t = time.perf_counter()
    pipe.vae.decode(pred)
    decode_s += time.perf_counter() - t
generate_model_pf = (unet_s + decode_s) / (ALONE_BATCHES * batch)
prep_model_pf = landmarks_pf + parsing_pf + vae_encode_pf
out["alone"] = {"landmarks_s_per_frame": landmarks_pf, "parsing_s_per_frame": parsing_pf,
                "vae_encode_s_per_frame": vae_encode_pf, "whisper_s": whisper_s,
                "unet_s_per_frame": unet_s / (ALONE_BATCHES * batch),
                "vae_decode_s_per_frame": decode_s / (ALONE_BATCHES * batch)}
out["prepare_s_per_frame"] = out["prepare_s"] / n_src
out["prepare_model_s_per_frame"] = prep_model_pf
out["prepare_ratio"] = out["prepare_s_per_frame"] / prep_model_pf
out["model_work_s"] = prep_model_pf * n_src + whisper_s + generate_model_pf * n_out
out["cold_ratio"] = out["cold_total_s"] / out["model_work_s"]
if os.environ.get("BENCH_WARM", "1") == "1":
    t = time.perf_counter()
    pipe.generate(source, audio, os.path.join(workdir, "warm.mp4"), config, avatar="bench", progress=False)
    out["warm_s"] = time.perf_counter() - t
    out["warm_model_work_s"] = whisper_s + generate_model_pf * n_out
print("RESULT " + json.dumps(out))
'''


def drop_page_cache(folder: Path) -> None:
    """Evict every file under ``folder`` from the page cache (clean pages: the files were written long ago)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass


def run_child(code: Path, args: list[str], env: dict[str, str] | None = None, timeout: int = 3600) -> dict:
    child = _CHILD.replace("ALONE_FRAMES", str(ALONE_FRAMES)).replace("ALONE_BATCHES", str(ALONE_BATCHES))
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, env=full_env,
                          cwd=str(code), timeout=timeout)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"child {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def ensure_models(models: Path) -> Path:
    if not (models / "RANDOM_WEIGHTS").is_file():
        from musetalk.testing.tiny import write_tiny_models

        print(f"writing the full-size random weights to {models} (about 4 GB) ...", flush=True)
        write_tiny_models(models, full_size=True)
    return models


def bench(code: Path, models: Path, dtypes: list[str], warm: bool, save: Callable[[dict], None]) -> dict:
    """Measure each dtype; ``save`` gets the results so far after each one (a long run keeps what it measured)."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        source, audios = make_inputs(Path(tmp), [AUDIO_SECONDS])
        for dtype in dtypes:
            print(f"[{dtype}] load, warm page cache", flush=True)
            warm_page_cache(models)
            load_warm = run_child(code, ["load", str(models), dtype])
            print(f"[{dtype}] load, cold page cache", flush=True)
            drop_page_cache(models)
            load_cold = run_child(code, ["load", str(models), dtype])
            print(f"[{dtype}] cold run (load + prepare + generate), then stages alone and a warm run", flush=True)
            drop_page_cache(models)
            cache = Path(tmp) / f"cache-{dtype}"
            run = run_child(code, ["run", str(models), dtype, str(source), str(audios[AUDIO_SECONDS]), tmp],
                            env={"MUSETALK_CACHE": str(cache), "BENCH_WARM": "1" if warm else "0"})
            results[dtype] = {"load_warm": load_warm, "load_cold": load_cold, "run": run}
            save(results)
            print(json.dumps({k: v for k, v in run.items() if k != "profile_markdown"}, indent=1), flush=True)
    return results


def weights_gb(models: Path, dtype: str) -> float:
    """Parameter bytes of the four models in the run dtype (Whisper and the parser stay fp32)."""
    fp32 = sum(p.stat().st_size for p in [*(models / "musetalkV15").glob("*.pth"), *(models / "sd-vae").glob("*.bin")])
    fixed = (models / "face-parse-bisent" / "79999_iter.pth").stat().st_size + 33e6  # whisper-tiny encoder, fp32
    return (fp32 * (0.5 if dtype in ("bf16", "fp16") else 1.0) + fixed) / 2**30


def markdown(all_results: dict[str, dict], models: Path) -> str:
    rows = []
    for label, data in all_results.items():
        cpu = data["machine"].get("cpu_name", data["machine"]["cpu"]).replace("(R)", "").replace(" Processor", "")
        cpu += f" ({data['machine']['cpu_bf16']})" if "cpu_bf16" in data["machine"] else ""
        for dtype, r in data["results"].items():
            lw, lc, run = r["load_warm"], r["load_cold"], r["run"]
            warm = f"{run['warm_s']:.0f} s ({run['warm_s'] / run['warm_model_work_s']:.2f}×)" if "warm_s" in run else "–"
            rows.append(
                f"| {label} | {cpu} | {dtype} | {lw['load_s']:.1f} s / {lc['load_s']:.1f} s | {lw['import_s']:.1f} s "
                f"| {lw['peak_rss_gb']:.2f} / {lw['rss_after_gb']:.2f} GB "
                f"| {run['cold_peak_rss_gb']:.2f} GB (≤ {weights_gb(models, dtype) + 1.5:.2f}) "
                f"| {run['prepare_s_per_frame']:.2f} s vs {run['prepare_model_s_per_frame']:.2f} s "
                f"(**{run['prepare_ratio']:.2f}×**) "
                f"| {run['cold_total_s']:.0f} s vs {run['model_work_s']:.0f} s (**{run['cold_ratio']:.2f}×**) | {warm} |")
    last = next(reversed(all_results.values()))
    load = next(iter(last["machine"]["load_average_1_5_15"]), 0.0)
    # the previous measurement's own two busy cores still count in the 1-minute load average at the start
    busy = " (other jobs shared the machine: absolute times are pessimistic and noisy)" if load > 3.0 else \
        " (nothing else ran; the previous measurement's own load counts in that figure)"
    stages = "\n\n".join(f"**{label}, {dtype}** (cold run):\n\n{r['run']['profile_markdown']}"
                         for label, data in all_results.items() for dtype, r in data["results"].items())
    return f"""## d. Cold start (issue #16): load, peak memory, preparation overhead

`python -m benchmarks.bench_coldstart` (and `--code <old checkout> --label before`) — full-size architecture,
random weights in the official layout (UNet 3.4 GB fp32 `.pth`), 720p 2 s source (50 frames) + 3 s speech
(75 output frames), batch 8, CPU, dlib landmarks. Each cell is one run in a fresh process; the load average
was {load:.1f} on 2 cores at the start of the last run{busy}; the ratios compare work measured in the same process.

As reported in issue #16 for the code before this work (same inputs, on a CPU with AMX; `--code <old checkout>
--label before` measures the old code on another machine, rows "before" below):

| code | dtype | load | peak RSS | RSS after load | preparation (50 source frames) | generation (75 frames) | total |
|---|---|---|---|---|---|---|---|
| issue | fp32 | 12.7 s | 7.46 GB | 4.34 GB | 137 s (2.76 s/frame) | 203 s | 370 s |
| issue | bf16 | 18.3 s | 7.29 GB | 2.76 GB | 78 s (1.56 s/frame) | 57 s | 159 s |

| code | CPU (bf16 in) | dtype | load warm / cold cache | imports (apart) | load: peak / after RSS | cold run peak RSS (target) | prep per source frame vs its models alone | cold end to end vs model work | warm run, cached avatar |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Targets: load ≤ 5 s warm; peak RSS during load ≤ RSS after load + 0.5 GB; cold-run peak ≤ weights in the run dtype
+ 1.5 GB; preparation ≤ 1.15× its model stages (landmarks + parsing + VAE encode, timed alone after the run, same
batch sizes); cold end to end (load + prepare + generate + encode) ≤ 1.15× the model work in it (those stages
+ Whisper + UNet + VAE decode timed alone). Load: fp32 on the CPU maps the checkpoint and reads each weight from
the page cache when first used (counted in the run, not the load); bf16 casts while loading.

Rows by machine (2 cores each; times compare only within a machine, and even there they drift by 10-30 % between
hours on these shared instances, which is why the targets are ratios measured in one process):
- AMD EPYC with AVX-512 BF16 (no AMX): `before` = 9a455d3, the code the issue measured; `after` = 935d097 (image-by-image VAE and parser).
- Intel Xeon with AMX, the issue's kind of CPU: `amx-nchw` = ff54fc5 (weights and activations in the default NCHW
  layout); `amx-nchw-malloc-env` = the same with glibc told to keep freed memory (`MALLOC_MMAP_MAX_=0
  MALLOC_TRIM_THRESHOLD_=64 GiB`: no page faults after the first call, the same speed within the noise and
  +0.07-0.34 GB of peak, so not taken); `amx-channels-last` = 69a1609 (convolutions in channels_last on the CPU:
  bf16 VAE and UNet 1.45-2.6x faster alone, see `devices.conv_memory_format`); `amx-channels-last-trim` = this
  code (also hands the C heap's free pages back after every model batch: `devices.release_free_memory`).
- AMD EPYC with AVX2 only (bf16 emulated: `--dtype auto` runs fp32 there, so fp32 only): `epyc-avx2-release` =
  c56dcca (after preparing, the landmark models are dropped and the VAE encoder's mapped pages released);
  `epyc-avx2-release-2` = the same code measured again about 80 minutes later (the spread of one machine);
  `epyc-avx2-heap-global` = glibc keeps freed blocks of up to 256 MB in its heap for the whole process (not
  taken: +0.17 GB of peak); `epyc-avx2-heap-prep` = this code (kept only while preparation runs its models:
  `devices.freed_blocks_kept_in_heap`).

<details><summary>Profiler breakdowns of the cold runs</summary>

{stages}

</details>"""


def saved_results() -> dict[str, dict]:
    """Every label's saved JSON, in the order they were measured."""
    saved = [json.loads(path.read_text()) for path in RESULTS.glob("coldstart-*.json")]
    return {data["label"]: data for data in sorted(saved, key=lambda data: data.get("measured", ""))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose musetalk is measured")
    parser.add_argument("--label", default="after", help="name of this measurement (before / after)")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "musetalk-bench-full-models")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm run on the cached avatar")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the docs table from the saved JSON")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        write_section("coldstart", markdown(saved_results(), args.models))
        return 0
    models = ensure_models(args.models)

    def save(results: dict) -> None:
        payload = {"label": args.label, "code": str(args.code), "results": results, "machine": machine(),
                   "measured": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
                   "inputs": {"source": "720p 2 s (50 frames)", "audio_s": AUDIO_SECONDS}}
        (RESULTS / f"coldstart-{args.label}.json").write_text(json.dumps(payload, indent=1))
        write_section("coldstart", markdown(saved_results(), models))
        print(f"wrote {RESULTS / f'coldstart-{args.label}.json'} and {DOC}", flush=True)

    bench(args.code.resolve(), models, args.dtypes.split(","), warm=not args.no_warm, save=save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
