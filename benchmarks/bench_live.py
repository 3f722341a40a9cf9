"""Live-mode benchmarks: drift vs look-ahead, latency over a real WebSocket, memory over a long session.

    python -m benchmarks.bench_live [drift] [latency] [full] [memory] [--memory-minutes 10]

Writes benchmarks/results/live.json and the tables between the BENCH:live markers in docs/benchmarks.md.

a. drift: the same audio through a live session (100 ms chunks) and offline (``stream``), per look-ahead: max |Δ|
   of the (50, 384) feature windows, min / mean PSNR of the frames and how many frames are equal. Tiny weights
   (frames, features) and the full-size whisper-tiny encoder architecture (features; random weights).
b. latency: ``musetalk serve``'s app under uvicorn on 127.0.0.1 (a thread of this process), an avatar made with
   POST /avatars, and ``LiveClient`` sending the audio at speaking pace over a real WebSocket; the server's
   first-frame and p50 / p95 per-frame latency (audio that completes a frame -> frame out) and the client's
   (audio sent -> frame received), per look-ahead and chunk size. Tiny weights.
c. full: one such session on the full-size architecture (850 M-parameter UNet, sd-vae-ft-mse; random weights, bf16).
d. memory: a long session (audio fed as fast as possible, frames not decoded) with the server's RSS sampled
   every second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from benchmarks.bench_generate import RESULTS, full_size_pipeline, machine, write_section

REPO = Path(__file__).resolve().parents[1]
FACE = REPO / "samples" / "face.png"
LOOKAHEADS: list[float | None] = [0.0, 0.2, 1.0, None]  # None: exact
LATENCY_LOOKAHEADS_MS: list[float | str] = [0, 200, "exact"]
CHUNKS_MS = [20, 200]


def speech(seconds: float) -> np.ndarray:
    from musetalk.stages.audio import load_audio

    return np.resize(load_audio(REPO / "samples" / "speech.wav"), int(seconds * 16000)).astype(np.float32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 999.0 if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def live_windows(encoder: Any, wav: np.ndarray, fps: float, chunk: int, lookahead: float | None, batch: int
                 ) -> np.ndarray:
    """The windows a live session cuts (same batch rule as LiveSession._work), for feature drift."""
    from musetalk.stages.audio import AudioConfig
    from musetalk.stages.audio_live import IncrementalWindows

    windows = IncrementalWindows(encoder, AudioConfig(fps=fps), lookahead)
    out: list[np.ndarray] = []
    for start in range(0, len(wav) + chunk, chunk):
        piece = wav[start:start + chunk]
        if len(piece):
            windows.append(piece)
        else:
            windows.close()
        while True:
            count = min(batch, windows.ready_count() - len(out))
            if count <= 0 or (count < batch and not windows.closed):
                break
            out.extend(windows.windows(len(out), count))
            windows.release(len(out))
        if windows.closed:
            break
    return np.stack(out)


# -- a. drift -------------------------------------------------------------------------------------------------
def bench_drift(pipe: Any, seconds: float = 3.0, fps: float = 10.0, batch: int = 4) -> dict:
    from musetalk.stages.audio import AudioConfig, iter_frame_windows
    from musetalk.stream.live import LiveConfig

    wav = speech(seconds)
    chunk = 1600  # 100 ms
    config = pipe.default_config(fps=fps, batch_size=batch)
    offline_windows = np.stack(list(iter_frame_windows(pipe.audio_encoder, wav, AudioConfig(fps=fps))))
    rows = []
    with pipe.prepare_avatar(FACE, config) as avatar:
        offline = list(pipe.stream(avatar, wav, config))
        for lookahead in LOOKAHEADS:
            windows = live_windows(pipe.audio_encoder, wav, fps, chunk, lookahead, batch)
            session = pipe.live(avatar, config, LiveConfig(lookahead_s=lookahead))
            scores = [psnr(f.image, o) for f, o in zip(session.stream(
                [wav[i:i + chunk] for i in range(0, len(wav), chunk)]), offline)]
            rows.append({"lookahead_ms": None if lookahead is None else 1e3 * lookahead,
                         "feature_max_abs_diff": float(np.abs(windows - offline_windows).max()),
                         "feature_mean_abs_diff": float(np.abs(windows - offline_windows).mean()),
                         "frames": len(scores), "frames_equal": sum(s >= 999 for s in scores),
                         "psnr_min_db": min(scores), "psnr_mean_db": float(np.mean(scores))})
            print("drift", rows[-1], flush=True)
    return {"audio_s": seconds, "fps": fps, "batch_size": batch, "chunk_ms": 100, "rows": rows,
            "feature_scale": float(np.abs(offline_windows).mean())}


def bench_feature_drift_full(seconds: float = 3.0, fps: float = 25.0, batch: int = 8) -> dict:
    """Feature drift with the real whisper-tiny encoder architecture (random weights)."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from musetalk.stages.audio import AudioConfig, AudioEncoder, iter_frame_windows
    from musetalk.testing.tiny import WHISPER_PREPROCESSOR

    torch.manual_seed(0)
    encoder = WhisperEncoder(WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                                           encoder_ffn_dim=1536, num_mel_bins=80)).eval()
    extractor = WhisperFeatureExtractor(**{k: v for k, v in WHISPER_PREPROCESSOR.items()
                                           if k not in ("feature_extractor_type", "padding_side")})
    audio_encoder = AudioEncoder(extractor, encoder, torch.device("cpu"), torch.float32)
    wav = speech(seconds)
    offline = np.stack(list(iter_frame_windows(audio_encoder, wav, AudioConfig(fps=fps))))
    rows = []
    for lookahead in LOOKAHEADS:
        windows = live_windows(audio_encoder, wav, fps, 1600, lookahead, batch)
        rows.append({"lookahead_ms": None if lookahead is None else 1e3 * lookahead,
                     "feature_max_abs_diff": float(np.abs(windows - offline).max()),
                     "feature_mean_abs_diff": float(np.abs(windows - offline).mean())})
        print("feature drift (full-size whisper)", rows[-1], flush=True)
    return {"audio_s": seconds, "rows": rows, "feature_scale": float(np.abs(offline).mean())}


# -- b/c/d. over a WebSocket ----------------------------------------------------------------------------------
@contextmanager
def serving(pipe: Any) -> Iterator[tuple[str, Any]]:
    """The server app (tiny or full pipeline) under uvicorn on a free loopback port, in a thread."""
    import uvicorn

    from musetalk.frontends.server import ServerSettings, create_app
    from musetalk.frontends.server.cli import bind_socket

    app = create_app(pipe, ServerSettings(max_audio_seconds=3600))
    app.state.live.settings.idle_timeout_s = 600
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=120)
        sock.close()


def make_avatar(url: str, fps: float, batch: int) -> str:
    import httpx

    r = httpx.post(url + "/avatars", files={"source": ("face.png", FACE.read_bytes())},
                   data={"fps": str(fps), "batch_size": str(batch)}, timeout=600)
    r.raise_for_status()
    return r.json()["id"]


def one_session(url: str, avatar: str, wav: np.ndarray, lookahead: float | str, chunk_ms: float, batch: int,
                realtime: bool = True) -> dict:
    from musetalk.frontends.live_client import LiveClient

    client = LiveClient(url, avatar, lookahead_ms=lookahead, batch_size=batch)
    result = client.run(wav, chunk_ms=chunk_ms, realtime=realtime)
    server = result.summary["latency_ms"]
    client_lat = result.latency_percentiles()
    return {"lookahead_ms": lookahead, "chunk_ms": chunk_ms, "batch_size": batch, "frames": result.frames,
            "late_frames": result.summary["late_frames"], "server_first_ms": server["first"],
            "server_p50_ms": server["p50"], "server_p95_ms": server["p95"],
            "client_first_frame_ms": None if result.first_frame_s is None else 1e3 * result.first_frame_s,
            "client_p50_ms": None if client_lat["p50"] is None else 1e3 * client_lat["p50"],
            "client_p95_ms": None if client_lat["p95"] is None else 1e3 * client_lat["p95"]}


def bench_latency(pipe: Any, seconds: float = 2.0, fps: float = 10.0, batch: int = 2) -> dict:
    wav = speech(seconds)
    rows = []
    with serving(pipe) as (url, _app):
        avatar = make_avatar(url, fps, batch)
        one_session(url, avatar, wav[:16000], 200, 100, batch, realtime=False)  # warm-up
        for lookahead in LATENCY_LOOKAHEADS_MS:
            for chunk in CHUNKS_MS:
                rows.append(one_session(url, avatar, wav, lookahead, chunk, batch))
                print("latency", rows[-1], flush=True)
    return {"audio_s": seconds, "fps": fps, "batch_size": batch, "pacing": "real time", "rows": rows}


def bench_full(seconds: float = 1.0, fps: float = 10.0, batch: int = 2, dtype: str = "bf16") -> dict:
    pipe = full_size_pipeline(dtype)
    wav = speech(seconds)
    with serving(pipe) as (url, _app):
        avatar = make_avatar(url, fps, batch)
        t0 = time.perf_counter()
        row = one_session(url, avatar, wav, 200, 100, batch)
        row["wall_s"] = time.perf_counter() - t0
    print("full", row, flush=True)
    return {"audio_s": seconds, "fps": fps, "dtype": dtype, "row": row}


def bench_memory(pipe: Any, minutes: float, fps: float, batch: int = 16, chunk_ms: float = 1000) -> dict:
    import psutil

    from musetalk.frontends.live_client import LiveClient

    wav = speech(60 * minutes)
    proc = psutil.Process()
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), proc.memory_info().rss))
            stop.wait(1.0)

    with serving(pipe) as (url, _app):
        avatar = make_avatar(url, fps, batch)
        client = LiveClient(url, avatar, lookahead_ms=200, batch_size=batch)
        frames = client.frames(wav, chunk_ms=chunk_ms, realtime=False, decode=False)
        first = next(frames)  # start sampling once the session runs (models warm)
        watcher = threading.Thread(target=sample, daemon=True)
        t0 = time.perf_counter()
        watcher.start()
        count = 1 + sum(1 for _ in frames)
        wall = time.perf_counter() - t0
        stop.set()
        watcher.join()
    rss = np.array([r for _, r in samples], dtype=np.float64)
    n = len(rss)
    q = max(1, n // 10)
    result = {"audio_minutes": minutes, "fps": fps, "batch_size": batch, "chunk_ms": chunk_ms, "frames": count,
              "first_index": first.index, "wall_s": wall, "rss_samples": n,
              "rss_first_10pct_mib": float(rss[:q].mean() / 2**20), "rss_last_10pct_mib": float(rss[-q:].mean() / 2**20),
              "rss_max_mib": float(rss.max() / 2**20), "rss_min_mib": float(rss.min() / 2**20),
              "summary": client.result.summary}
    print("memory", result, flush=True)
    return result


# -- report ---------------------------------------------------------------------------------------------------
def _ms(value: Any) -> str:
    return "–" if value is None else f"{value:.0f}"


def markdown(result: dict) -> str:
    parts = ["## Live mode (`python -m benchmarks.bench_live`)", "",
             f"Machine: {result['machine']['cores']} CPU cores shared with other work (load average "
             f"{', '.join(f'{x:.1f}' for x in result['machine'].get('load_average_1_5_15', []))} at the end), "
             f"torch {result['machine']['torch']}. Latency on this CPU is dominated by the model being slower "
             "than real time; see the notes under each table."]
    drift = result.get("drift")
    if drift:
        full = {r["lookahead_ms"]: r for r in result.get("feature_drift_full", {}).get("rows", [])}
        parts += ["", f"### Drift vs offline (tiny weights; {drift['audio_s']:g} s of speech, 100 ms chunks, "
                  f"batch {drift['batch_size']}, {drift['fps']:g} fps)", "",
                  "| look-ahead ms | features max abs diff | features mean abs diff | frames equal | PSNR min dB | "
                  "PSNR mean dB | full-size whisper: features max / mean abs diff |",
                  "|---|---|---|---|---|---|---|"]
        for r in drift["rows"]:
            f = full.get(r["lookahead_ms"])
            fcell = f"{f['feature_max_abs_diff']:.3g} / {f['feature_mean_abs_diff']:.3g}" if f else "–"
            la = "exact" if r["lookahead_ms"] is None else f"{r['lookahead_ms']:.0f}"
            parts.append(f"| {la} | {r['feature_max_abs_diff']:.3g} | {r['feature_mean_abs_diff']:.3g} | "
                         f"{r['frames_equal']}/{r['frames']} | {r['psnr_min_db']:.1f} | {r['psnr_mean_db']:.1f} | "
                         f"{fcell} |")
        parts += ["", f"Feature scale: mean |window value| {drift['feature_scale']:.3g} (tiny), "
                  f"{result.get('feature_drift_full', {}).get('feature_scale', float('nan')):.3g} (full-size "
                  "architecture). PSNR 999 = identical."]
    latency = result.get("latency")
    if latency:
        parts += ["", f"### Latency over a WebSocket on loopback (tiny weights, {latency['audio_s']:g} s of speech sent "
                  f"at speaking pace, batch {latency['batch_size']}, {latency['fps']:g} fps)", "",
                  "| look-ahead ms | chunk ms | frames | late | server first ms | server p50 ms | server p95 ms | "
                  "client first frame ms | client p50 ms | client p95 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in latency["rows"]:
            parts.append(f"| {r['lookahead_ms']} | {r['chunk_ms']} | {r['frames']} | {r['late_frames']} | "
                         f"{_ms(r['server_first_ms'])} | {_ms(r['server_p50_ms'])} | {_ms(r['server_p95_ms'])} | "
                         f"{_ms(r['client_first_frame_ms'])} | {_ms(r['client_p50_ms'])} | {_ms(r['client_p95_ms'])} |")
    full = result.get("full")
    if full:
        r = full["row"]
        parts += ["", f"### Full-size architecture ({full['dtype']}, random weights, this CPU)", "",
                  f"{full['audio_s']:g} s of speech at speaking pace, 100 ms chunks, look-ahead 200 ms, batch "
                  f"{r['batch_size']}: {r['frames']} frames in {r['wall_s']:.0f} s, {r['late_frames']} late; server "
                  f"first {_ms(r['server_first_ms'])} ms, p50 {_ms(r['server_p50_ms'])} ms, p95 "
                  f"{_ms(r['server_p95_ms'])} ms."]
    memory = result.get("memory")
    if memory:
        parts += ["", f"### Memory over a long session (tiny weights, {memory['audio_minutes']:g} min of audio fed as "
                  f"fast as possible at {memory['fps']:g} fps, {memory['chunk_ms']:g} ms chunks)", "",
                  "| frames | wall s | RSS first 10 % MiB | RSS last 10 % MiB | RSS min MiB | RSS max MiB |",
                  "|---|---|---|---|---|---|",
                  f"| {memory['frames']} | {memory['wall_s']:.0f} | {memory['rss_first_10pct_mib']:.0f} | "
                  f"{memory['rss_last_10pct_mib']:.0f} | {memory['rss_min_mib']:.0f} | {memory['rss_max_mib']:.0f} |"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", default=["drift", "latency", "full", "memory"])
    parser.add_argument("--memory-minutes", type=float, default=10.0)
    parser.add_argument("--memory-fps", type=float, default=1.0, help="1 fps keeps 10 min of audio to 600 frames, "
                        "what the shared 2-core CPU runs in minutes with tiny weights")
    parser.add_argument("--models", type=Path, default=None, help="tiny weights folder (default: written to a tmp dir)")
    args = parser.parse_args(argv)
    from musetalk.stream.pipeline import MuseTalkPipeline
    from musetalk.testing.tiny import write_tiny_models

    os.environ["MUSETALK_CACHE"] = tempfile.mkdtemp(prefix="bench-live-cache-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "live.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    models = args.models or write_tiny_models(Path(tempfile.mkdtemp()) / "models")
    pipe = MuseTalkPipeline.from_pretrained(models, device="cpu", dtype="fp32")
    steps = {"drift": lambda: bench_drift(pipe), "feature_drift_full": bench_feature_drift_full,
             "latency": lambda: bench_latency(pipe),
             "memory": lambda: bench_memory(pipe, args.memory_minutes, args.memory_fps),
             "full": bench_full}  # last: the full-size models stay in memory after it
    for name, step in steps.items():
        wanted = name in args.which or (name == "feature_drift_full" and "drift" in args.which)
        if wanted:
            result[name] = step()
            result["machine"] = machine()
            path.write_text(json.dumps(result, indent=2))  # after each step: a later failure keeps the rest
    write_section("live", markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
