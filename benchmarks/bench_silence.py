"""Quiet mouths and steady faces, measured: silence handling and crop-box smoothing.

    python -m benchmarks.bench_silence [silence] [jitter]

silence  the sample clip (face.mp4) lip-synced to the sample speech with 1 s of silence inserted, with --silence
         off / source / closed (tiny weights, CPU): mouth motion inside the silent stretches (the metric of
         musetalk/quality/mouth.py, dlib landmarks of every output frame) and the time the stream takes.
jitter   a video whose face really moves (the sample photo panned and zoomed along a known path, re-encoded at
         a low bit rate): crop-box corner movement per frame (median, p95) raw vs One-Euro smoothed, the error
         against the true box and the lag behind the true motion.

Writes benchmarks/results/silence.json, the tables and two pictures into docs/quality.md (docs/quality_*.png) and
a summary section into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_generate import REPO, RESULTS, machine, write_section

SAMPLES = REPO / "samples"
QUALITY_DOC = REPO / "docs" / "quality.md"
DEFAULT_SMOOTHING = (0.5, 0.2)  # the config's smoothing_min_cutoff, smoothing_beta
DEFAULT_NAME = f"one_euro {DEFAULT_SMOOTHING[0]:g} Hz, beta {DEFAULT_SMOOTHING[1]:g} (default)"
FPS = 25.0
SR = 16_000


# -- inputs ---------------------------------------------------------------------------------------------------------
def paused_speech() -> tuple[np.ndarray, tuple[float, float]]:
    """The sample speech with 1 s of silence inserted at its natural pause (2.04 s): speech, 1 s silence, speech.

    Returns the waveform and the inserted stretch (start, end) in seconds.
    """
    from musetalk.stages.audio import load_audio

    wav = load_audio(SAMPLES / "speech.wav")
    cut = int(2.04 * SR)
    return np.concatenate([wav[:cut], np.zeros(SR, np.float32), wav[cut:]]), (cut / SR, cut / SR + 1.0)


def true_path(n: int) -> np.ndarray:
    """(n, 3) per frame: x shift, y shift (px) and zoom of the moving-face video, like a speaker's head: a sway of
    +-10 px at 0.25 Hz, a nod of +-5 px at 0.13 Hz, a zoom from 1.0 to 1.08 and back, and one quick 20 px move
    there and back within 0.4 s."""
    t = np.arange(n) / FPS
    quick = np.clip(1 - np.abs(t - 2.2) / 0.2, 0, 1)  # a 0.4 s triangle
    dx = 10 * np.sin(2 * np.pi * 0.25 * t) + 20 * quick
    dy = 5 * np.sin(2 * np.pi * 0.13 * t)
    zoom = 1.0 + 0.04 * (1 - np.cos(2 * np.pi * t / (n / FPS)))
    return np.stack([dx, dy, zoom], axis=1)


def affine(shift_zoom: np.ndarray, size: int) -> np.ndarray:
    dx, dy, zoom = shift_zoom
    c = size / 2
    return np.array([[zoom, 0, c - zoom * c + dx], [0, zoom, c - zoom * c + dy]], np.float64)


def moving_face_video(path: Path, n: int, bit_rate: str = "60k") -> np.ndarray:
    """Write the moving-face video (H.264 at a low bit rate, like a phone clip sent through a messenger)."""
    import cv2
    import imageio_ffmpeg

    face = cv2.imread(str(SAMPLES / "face.png"))
    size = face.shape[0]
    path_params = true_path(n)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            frame = cv2.warpAffine(face, affine(path_params[i], size), (size, size), flags=cv2.INTER_CUBIC,
                                   borderMode=cv2.BORDER_REFLECT)
            cv2.imwrite(f"{tmp}/{i:04d}.png", frame)
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-framerate", str(FPS),
                        "-i", f"{tmp}/%04d.png", "-c:v", "libx264", "-b:v", bit_rate, "-pix_fmt", "yuv420p",
                        str(path)], check=True)
    return path_params


# -- silence ----------------------------------------------------------------------------------------------------------
def bench_silence(models: Path) -> dict:
    from musetalk.config import with_overrides
    from musetalk.quality.mouth import mouth_motion, mouth_opening, silent_frames
    from musetalk.stages import silence
    from musetalk.stages.faces import get_landmark_backend
    from musetalk.stream.pipeline import MuseTalkPipeline, pingpong

    wav, inserted = paused_speech()
    pipe = MuseTalkPipeline.from_pretrained(models, device="cpu", dtype="fp32")
    config = pipe.default_config()
    avatar = pipe.prepare_avatar(SAMPLES / "face.mp4", config)
    dlib = get_landmark_backend("dlib")
    missing = np.full((68, 2), np.nan)

    def landmarks(frame: np.ndarray) -> np.ndarray:
        found = dlib.detect(frame)
        return found.landmarks if found.has_face else missing

    n = None
    runs: dict[str, dict] = {}
    openings: dict[str, np.ndarray] = {}
    for mode in ("off", "source", "closed"):
        t0 = time.perf_counter()
        frames = list(pipe.stream(avatar, wav, with_overrides(config, silence=mode)))  # ~0.8 MB each: fine here
        runs[mode] = {"stream_s": time.perf_counter() - t0}
        n = len(frames)
        openings[mode] = mouth_opening(np.stack([landmarks(frame) for frame in frames]))
        print(f"silence {mode}: {n} frames, stream {runs[mode]['stream_s']:.1f} s", flush=True)
    assert n is not None
    # the source's own mouth in the same output frames (the avatar's frames in ping-pong order)
    source_open = mouth_opening(np.stack([landmarks(avatar.frame(pingpong(i, len(avatar)))) for i in range(n)]))
    silent_energy = silent_frames((wav * 32767).astype(np.int16), n, FPS, SR)  # the metric's own silence rule
    plan = silence.plan_silence(silence.speech_probabilities(pipe.vad(), wav), n, FPS, config.pauses)
    inserted_frames = np.zeros(n, bool)
    inserted_frames[int(inserted[0] * FPS) + 4:int(inserted[1] * FPS) - 4] = True  # well inside the inserted second
    table = {}
    for mode, o in {**openings, "source frames": source_open}.items():
        m_all = mouth_motion(o, silent_energy)
        m_inside = mouth_motion(o, inserted_frames)
        table[mode] = {"metric": m_all.to_dict(), "inside_inserted_second": m_inside.to_dict()}
    timing = time_saved(pipe, avatar, config)
    avatar.close()
    return {"frames": n, "audio_s": len(wav) / SR, "inserted_silence_s": list(inserted),
            "vad_silent_fraction": float(plan.silent.mean()), "energy_silent_fraction": float(silent_energy.mean()),
            "timing": timing, "runs": runs, "mouth": table,
            "openings": {k: [None if not np.isfinite(v) else float(v) for v in o]
                         for k, o in {**openings, "source frames": source_open}.items()},
            "plan_weights": plan.weights.tolist(), "frame_probs": plan.frame_probs.tolist()}


def time_saved(pipe, avatar, config, repeats: int = 2) -> dict:
    """Stream time with silence off vs source on speech with about 30 % pauses (the sample speech with 0.6 s and
    1.0 s of silence inserted at its two natural pauses); frames are consumed and dropped, best of ``repeats``."""
    from musetalk.config import with_overrides
    from musetalk.stages import silence
    from musetalk.stages.audio import load_audio

    speech = load_audio(SAMPLES / "speech.wav")
    a, b = int(0.44 * SR), int(2.04 * SR)
    wav = np.concatenate([speech[:a], np.zeros(int(0.6 * SR), np.float32), speech[a:b], np.zeros(SR, np.float32),
                          speech[b:]])
    times: dict[str, float] = {}
    for _ in range(repeats):
        for mode in ("off", "source"):
            t0 = time.perf_counter()
            count = sum(1 for _frame in pipe.stream(avatar, wav, with_overrides(config, silence=mode)))
            times[mode] = min(times.get(mode, np.inf), time.perf_counter() - t0)
            print(f"timing {mode}: {count} frames, {times[mode]:.1f} s", flush=True)
    plan = silence.plan_silence(silence.speech_probabilities(pipe.vad(), wav), count, FPS, config.pauses)
    return {"frames": count, "audio_s": len(wav) / SR, "vad_silent_fraction": float(plan.silent.mean()),
            "skipped_fraction": plan.skipped / count, "off_s": times["off"], "source_s": times["source"],
            "time_saved_fraction": 1 - times["source"] / times["off"], "repeats": repeats}


# -- jitter -----------------------------------------------------------------------------------------------------------
def corner_error(boxes: list, truth: np.ndarray) -> np.ndarray:
    b = np.array([[np.nan] * 4 if x is None else x for x in boxes], np.float64)
    return 0.5 * (np.hypot(*(b[:, :2] - truth[:, :2]).T) + np.hypot(*(b[:, 2:] - truth[:, 2:]).T))


def lag_frames(boxes: list, truth: np.ndarray, max_lag: float = 4.0) -> float:
    """The delay d (frames, 0.1 steps) that best aligns the box centres with the true centres: argmin over d of
    the RMS of box(t) - truth(t - d), truth interpolated."""
    b = np.array([[np.nan] * 4 if x is None else x for x in boxes], np.float64)
    centre = 0.5 * (b[:, :2] + b[:, 2:])
    true_centre = 0.5 * (truth[:, :2] + truth[:, 2:])
    t = np.arange(len(b))
    best, best_rms = 0.0, np.inf
    for d in np.arange(0, max_lag + 1e-9, 0.1):
        shifted = np.stack([np.interp(t - d, t, true_centre[:, k]) for k in range(2)], axis=1)
        rms = np.sqrt(np.nanmean((centre[8:] - shifted[8:]) ** 2))
        if rms < best_rms:
            best, best_rms = float(d), rms
    return best


def bench_jitter(n: int = 100) -> dict:
    import cv2

    from musetalk.stages.faces import get_landmark_backend
    from musetalk.stages.faces.crop import crop_box
    from musetalk.stages.faces.smoothing import box_jitter, smooth_boxes
    from musetalk.stream.video import open_frames

    dlib = get_landmark_backend("dlib")
    face = cv2.imread(str(SAMPLES / "face.png"))
    reference = dlib.detect(face).landmarks.astype(np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "moving.mp4"
        params = moving_face_video(video, n)
        raw = []
        for frame in open_frames(video):
            found = dlib.detect(frame)
            raw.append(crop_box(found.landmarks, 0, found.detector_box) if found.has_face else None)
    # the true box, in float px: the crop rule is min / max of the landmarks plus a mirrored upper edge, all of which
    # move with a shift-and-zoom, so the clean photo's box moved along the path is exact (no rounding noise)
    ref_box = np.array(crop_box(reference.astype(np.int64), 0), np.float64).reshape(2, 2)
    truth = np.array([(ref_box @ affine(p, face.shape[0])[:, :2].T + affine(p, face.shape[0])[:, 2]).ravel()
                      for p in params])
    variants = {"raw (off)": raw}
    grid = [DEFAULT_SMOOTHING, (1.0, 0.2), (1.0, 0.05), (2.0, 0.05), (1.0, 0.0)]
    for min_cutoff, beta in grid:
        name = DEFAULT_NAME if (min_cutoff, beta) == DEFAULT_SMOOTHING else f"one_euro {min_cutoff:g} Hz, beta {beta:g}"
        variants[name] = smooth_boxes(raw, FPS, min_cutoff, beta)
    true_jitter = box_jitter([tuple(b) for b in truth])
    rows = {}
    for name, boxes in variants.items():
        j = box_jitter(boxes)
        err = corner_error(boxes, truth)
        # jitter beyond the true motion: the frame-to-frame change of the error
        excess = np.abs(np.diff(err))
        rows[name] = {"jitter_median_px": float(np.median(j)), "jitter_p95_px": float(np.percentile(j, 95)),
                      "excess_median_px": float(np.nanmedian(excess)), "excess_p95_px": float(np.nanpercentile(excess, 95)),
                      "error_median_px": float(np.nanmedian(err)), "error_p95_px": float(np.nanpercentile(err, 95)),
                      "lag_frames": lag_frames(boxes, truth), "faces": int(sum(b is not None for b in boxes))}
        print(f"jitter {name}: {rows[name]}", flush=True)
    return {"frames": n, "bit_rate": "60k", "true_jitter_median_px": float(np.median(true_jitter)),
            "true_jitter_p95_px": float(np.percentile(true_jitter, 95)), "variants": rows,
            "tracks": {"truth": truth.tolist(), "raw": [list(b) if b else None for b in raw],
                       "smoothed": [list(b) if b else None for b in variants[DEFAULT_NAME]]}}


# -- pictures and tables --------------------------------------------------------------------------------------------
def silence_picture(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.add_subplot()
    t = np.arange(result["frames"]) / FPS
    weights = np.array(result["plan_weights"])
    ax.fill_between(t, 0, 0.5, where=weights < 1, step="post", color="tab:orange", alpha=0.15,
                    label="not fully generated (VAD pause + fades)")
    for name, style in (("off", "tab:red"), ("source", "tab:blue"), ("closed", "tab:green"),
                        ("source frames", "0.4")):
        o = np.array([np.nan if v is None else v for v in result["openings"][name]])
        ax.plot(t, o, lw=1.2 if name != "source frames" else 0.8, color=style, label=name,
                ls="--" if name == "source frames" else "-")
    start, end = result["inserted_silence_s"]
    ax.axvspan(start, end, color="0.5", alpha=0.1, lw=0)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mouth opening (inner-lip gap / eye distance)")
    ax.set_title("mouth opening per output frame, tiny weights; grey: the inserted second of silence")
    ax.legend(fontsize=7, ncols=3)
    fig.savefig(path, dpi=90)


def jitter_picture(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    tracks = result["tracks"]
    truth = np.array(tracks["truth"])
    t = np.arange(len(truth)) / FPS

    def col(boxes: list, k: int) -> np.ndarray:
        return np.array([np.nan if b is None else b[k] for b in boxes], np.float64)

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, k, name in ((axes[0], 0, "x1 (left edge)"), (axes[1], 1, "y1 (top edge)")):
        ax.plot(t, truth[:, k], color="0.3", lw=2, alpha=0.5, label="true motion")
        ax.plot(t, col(tracks["raw"], k), color="tab:red", lw=0.8, label="raw (off)")
        ax.plot(t, col(tracks["smoothed"], k), color="tab:blue", lw=1.2, label=DEFAULT_NAME)
        ax.set_title(f"crop box {name}, px", fontsize=9)
        ax.set_xlabel("time (s)")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


def silence_tables(r: dict) -> str:
    lines = ["| silence | mouth motion in silence | in speech | ratio | motion inside the inserted second | "
             "mean opening there | stream time |", "|---|---|---|---|---|---|---|"]
    for mode in ("off", "source", "closed", "source frames"):
        m, inside = r["mouth"][mode]["metric"], r["mouth"][mode]["inside_inserted_second"]
        time_s = f"{r['runs'][mode]['stream_s']:.1f} s" if mode in r["runs"] else "(the avatar's own frames)"
        lines.append(f"| {mode} | {m['motion_silence']:.4f} | {m['motion_speech']:.4f} | {m['motion_ratio']:.2f} | "
                     f"{inside['motion_silence']:.4f} | {inside['opening_silence']:.3f} | {time_s} |")
    return "\n".join(lines)


def jitter_table(r: dict) -> str:
    lines = ["| crop box | corner movement median / p95 (px) | beyond the true motion median / p95 (px) | "
             "error vs true box median / p95 (px) | lag (frames) |", "|---|---|---|---|---|"]
    lines.append(f"| true motion | {r['true_jitter_median_px']:.2f} / {r['true_jitter_p95_px']:.2f} | 0 / 0 | 0 / 0 "
                 f"| 0 |")
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['jitter_median_px']:.2f} / {v['jitter_p95_px']:.2f} | "
                     f"{v['excess_median_px']:.2f} / {v['excess_p95_px']:.2f} | "
                     f"{v['error_median_px']:.2f} / {v['error_p95_px']:.2f} | {v['lag_frames']:.1f} |")
    return "\n".join(lines)


def write_quality_section(name: str, markdown: str) -> None:
    """Replace the text between <!-- QUALITY:name --> markers in docs/quality.md."""
    text = QUALITY_DOC.read_text()
    block = f"<!-- QUALITY:{name} -->\n{markdown.strip()}\n<!-- /QUALITY:{name} -->"
    pattern = re.compile(rf"<!-- QUALITY:{name} -->.*?<!-- /QUALITY:{name} -->", re.S)
    QUALITY_DOC.write_text(pattern.sub(lambda _m: block, text) if pattern.search(text) else text + "\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", default=["silence", "jitter"])
    parser.add_argument("--models", type=Path, default=None, help="models folder (default: tiny weights, made here)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file = RESULTS / "silence.json"
    result = json.loads(out_file.read_text()) if out_file.exists() else {}
    result["machine"] = machine()
    if "silence" in args.which:
        with tempfile.TemporaryDirectory() as tmp:
            models = args.models
            if models is None:
                from musetalk.testing.tiny import write_tiny_models

                models = write_tiny_models(Path(tmp) / "models")
            r = result["silence"] = bench_silence(models)
        silence_picture(r, REPO / "docs" / "quality_silence.png")
        write_quality_section("silence", silence_tables(r))
    if "jitter" in args.which:
        r = result["jitter"] = bench_jitter()
        jitter_picture(r, REPO / "docs" / "quality_jitter.png")
        write_quality_section("jitter", jitter_table(r))
    out_file.write_text(json.dumps(result, indent=1))
    s, j = result.get("silence"), result.get("jitter")
    rows = ["| measure | value |", "|---|---|"]
    if s:
        t = s["timing"]
        rows += [f"| silence: frames that skip the UNet + decoder ({t['audio_s']:.1f} s of speech, "
                 f"{100 * t['vad_silent_fraction']:.0f} % of it pauses by the VAD) | {100 * t['skipped_fraction']:.0f} % |",
                 f"| silence: stream time saved there, `source` vs `off` (tiny weights, CPU, best of "
                 f"{t['repeats']}) | {100 * t['time_saved_fraction']:.0f} % ({t['off_s']:.1f} s -> {t['source_s']:.1f} s)"
                 " |"]
    if j:
        raw, smooth = j["variants"]["raw (off)"], j["variants"][DEFAULT_NAME]
        rows += [f"| smoothing: box movement beyond the true motion, p95 raw -> one_euro | "
                 f"{raw['excess_p95_px']:.2f} -> {smooth['excess_p95_px']:.2f} px (lag {smooth['lag_frames']:.1f} "
                 f"frames) |"]
    write_section("silence", "## Quiet mouths and steady faces\n\n`python -m benchmarks.bench_silence` — details, "
                             "pictures and the mouth-motion table in [quality.md](quality.md).\n\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
