"""Drawing helpers for the notebooks and widgets: annotated frames, crops, masks, audio and latent plots.

Two kinds of helpers:
  * image helpers take and return (H, W, 3) uint8 **BGR** arrays (OpenCV's order, what every stage uses), so they
    compose with each other and with ``to_png`` for an ``ipywidgets.Image``;
  * plot helpers return a ``matplotlib.figure.Figure`` (no pyplot: no global figure list, no GUI backend; Jupyter
    shows a returned Figure inline). matplotlib is imported inside them (optional dependency, G8).
Profiling plots live in ``musetalk.profiling.plots``; this module adds the live-dashboard and length-sweep views.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from musetalk.stages.blending import BlendMaterial
    from musetalk.profiling import ProfileReport

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), x2/y2 exclusive

# BGR colours, one meaning each across every picture
LANDMARK_COLOR = (0, 255, 0)
CROP_COLOR = (0, 0, 255)  # the crop box the VAE sees
MASK_LINE_COLOR = (0, 255, 255)  # where the masked (generated) lower half starts
BLEND_COLOR = (255, 128, 0)  # light blue: the expanded square the blend mask covers
MASK_TINT = (255, 0, 255)
MIB = 2**20


# -- image helpers (BGR in, BGR out) -----------------------------------------------------------------------
def to_rgb(image_bgr: np.ndarray) -> np.ndarray:
    """(H, W, 3) BGR -> RGB (a view); 2-D images are returned as they are."""
    return image_bgr[..., ::-1] if image_bgr.ndim == 3 else image_bgr


def to_png(image_bgr: np.ndarray) -> bytes:
    """Encode a (H, W, 3) uint8 BGR (or (H, W) grey) image as PNG bytes, e.g. for ``ipywidgets.Image``."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image_bgr), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image_bgr.shape} as PNG")
    return buf.tobytes()


def as_bgr(image: np.ndarray) -> np.ndarray:
    """A grey (H, W) uint8 image as (H, W, 3) BGR; colour images unchanged."""
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


def fit(image: np.ndarray, width: int | None = None, height: int | None = None) -> np.ndarray:
    """Resize keeping the aspect ratio to the given width or height (area filter when shrinking)."""
    h, w = image.shape[:2]
    scale = (width / w) if width is not None else (height / h if height is not None else 1.0)
    if abs(scale - 1.0) < 1e-6:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def hstack(images: Sequence[np.ndarray], height: int = 256, gap: int = 4) -> np.ndarray:
    """Images side by side at one height, separated by ``gap`` white pixels (grey images become BGR)."""
    parts: list[np.ndarray] = []
    for i, image in enumerate(images):
        if i:
            parts.append(np.full((height, gap, 3), 255, np.uint8))
        parts.append(fit(as_bgr(image), height=height))
    return np.hstack(parts)


def caption(image: np.ndarray, text: str, scale: float = 0.5) -> np.ndarray:
    """A copy with ``text`` in a dark band at the top-left."""
    out = as_bgr(image).copy()
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(out, (0, 0), (tw + 8, th + base + 8), (0, 0, 0), -1)
    cv2.putText(out, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def placeholder(text: str, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """A grey (h, w, 3) tile with ``text`` centred: what a panel shows for a frame without a face."""
    h, w = size
    tile = np.full((h, w, 3), 64, np.uint8)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1)
    cv2.putText(tile, text, ((w - tw) // 2, (h + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (230, 230, 230), 1,
                cv2.LINE_AA)
    return tile


def draw_face(frame_bgr: np.ndarray, landmarks: np.ndarray | None = None, crop_box: Box | None = None,
              blend_box: Box | None = None, width: int | None = None) -> np.ndarray:
    """The frame with its 68 landmarks (green), the crop box (red) with the masked half's top edge (yellow), and
    the square the blend mask covers (blue). ``width`` rescales the result (drawing is done at that scale, so
    lines stay one or two pixels thick). Returns a new (h, w, 3) uint8 BGR image.
    """
    scale = 1.0 if width is None else width / frame_bgr.shape[1]
    out = fit(frame_bgr, width=width).copy() if width is not None else frame_bgr.copy()

    def pt(x: float, y: float) -> tuple[int, int]:
        return round(x * scale), round(y * scale)

    thick = max(1, round(2 * min(scale, 1.0) + 0.5))
    if blend_box is not None:
        cv2.rectangle(out, pt(*blend_box[:2]), pt(blend_box[2] - 1, blend_box[3] - 1), BLEND_COLOR, 1, cv2.LINE_AA)
    if crop_box is not None:
        x1, y1, x2, y2 = crop_box
        cv2.rectangle(out, pt(x1, y1), pt(x2 - 1, y2 - 1), CROP_COLOR, thick, cv2.LINE_AA)
        # the UNet regenerates the lower half of the 256x256 crop: its top edge is the crop box's middle row
        mid = (y1 + y2) / 2
        cv2.line(out, pt(x1, mid), pt(x2 - 1, mid), MASK_LINE_COLOR, 1, cv2.LINE_AA)
    if landmarks is not None:
        for x, y in np.asarray(landmarks).reshape(-1, 2):
            cv2.circle(out, pt(x, y), max(1, thick), LANDMARK_COLOR, -1, cv2.LINE_AA)
    return out


def masked_half(crop_bgr: np.ndarray) -> np.ndarray:
    """The crop with its lower half black: exactly what the VAE encodes as the UNet's "masked" input
    (``musetalk.stages.vae.crops_to_tensor(mask_lower_half=True)`` zeroes the lower half in [0, 1], i.e. black)."""
    out = crop_bgr.copy()
    out[crop_bgr.shape[0] // 2:] = 0
    return out


def difference(a_bgr: np.ndarray, b_bgr: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """|a - b| per pixel, amplified by ``gain`` (clipped to 255): where two images of the same size differ."""
    diff = np.abs(a_bgr.astype(np.int16) - b_bgr.astype(np.int16)) * gain
    return np.clip(diff, 0, 255).astype(np.uint8)


def mask_overlay(frame_bgr: np.ndarray, material: BlendMaterial, face_box: Box | None = None,
                 alpha: float = 0.55) -> np.ndarray:
    """The blend square of the frame with the paste-back mask tinted magenta (opacity follows the mask's feathered
    alpha) and the face box outlined; the region outside the frame reads black, as in the blend itself."""
    from musetalk.stages.blending import crop_padded

    region = crop_padded(frame_bgr, material.crop_box).copy()
    weight = (material.mask.astype(np.float32) / 255.0 * alpha)[..., None]
    tint = np.array(MASK_TINT, np.float32)
    out = (region.astype(np.float32) * (1 - weight) + tint * weight).round().astype(np.uint8)
    if face_box is not None:
        xs, ys = material.crop_box[:2]
        x1, y1, x2, y2 = face_box
        cv2.rectangle(out, (x1 - xs, y1 - ys), (x2 - xs - 1, y2 - ys - 1), CROP_COLOR, 1, cv2.LINE_AA)
    return out


# -- matplotlib figures ---------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """Render a Figure to PNG bytes with Agg (works from any thread, no display needed)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show_images(images: Mapping[str, np.ndarray], cols: int = 4, size: float = 3.0, bgr: bool = True) -> Figure:
    """A grid of titled images: colour ones are BGR (set ``bgr=False`` for RGB), 2-D ones are drawn grey."""
    n = max(len(images), 1)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig = _figure(size * cols, size * rows + 0.3)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (title, image) in zip(axes, images.items()):
        if image.ndim == 2:
            ax.imshow(image, cmap="gray", vmin=0, vmax=255 if image.dtype == np.uint8 else None)
        else:
            ax.imshow(to_rgb(image) if bgr else image)
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    return fig


def plot_waveform(wav: np.ndarray, sample_rate: int = 16_000, fps: float | None = None,
                  max_frame_lines: int = 200) -> Figure:
    """The 16 kHz waveform over time; with ``fps``, a thin line at each video frame boundary (1/fps s apart)."""
    fig = _figure(9, 2.6)
    ax = fig.add_subplot()
    t = np.arange(len(wav)) / sample_rate
    ax.plot(t, wav, lw=0.5)
    if fps:
        n = int(len(wav) / sample_rate * fps)
        for i in range(0, n + 1, max(1, n // max_frame_lines)):
            ax.axvline(i / fps, color="gray", lw=0.3, alpha=0.5)
        ax.set_title(f"waveform: {len(wav) / sample_rate:.2f} s at {sample_rate} Hz; grey lines: {n} video frames "
                     f"at {fps:g} fps")
    else:
        ax.set_title(f"waveform: {len(wav) / sample_rate:.2f} s at {sample_rate} Hz")
    ax.set_xlabel("time (s)")
    ax.set_xlim(0, max(t[-1] if len(t) else 0, 1e-3))
    return fig


def plot_vad(wav: np.ndarray, frame_probs: np.ndarray, silent: np.ndarray, weights: np.ndarray, fps: float,
             threshold: float = 0.5, sample_rate: int = 16_000) -> Figure:
    """The silence plan over the waveform: speech probability per video frame, the threshold, the silent
    stretches (shaded) and the weight of the generated face (1 generated, 0 the reference frame)."""
    fig = _figure(9, 2.8)
    ax = fig.add_subplot()
    t = np.arange(len(wav)) / sample_rate
    peak = float(np.abs(wav).max()) or 1.0
    ax.plot(t, 0.5 + 0.5 * np.asarray(wav) / peak, lw=0.4, color="0.6", label="waveform")
    frames_t = np.arange(len(frame_probs)) / fps
    ax.step(frames_t, frame_probs, where="post", lw=1, label="speech probability")
    ax.step(frames_t, weights, where="post", lw=1.5, color="tab:green", label="generated face weight")
    ax.axhline(threshold, color="tab:red", lw=0.8, ls="--", label=f"threshold {threshold:g}")
    runs = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(silent, int), [0]])))
    for start, stop in zip(runs[::2], runs[1::2]):
        ax.axvspan(start / fps, stop / fps, color="tab:orange", alpha=0.2, lw=0)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(0, max(len(wav) / sample_rate, 1e-3))
    ax.set_xlabel("time (s)")
    ax.set_title(f"silence plan: {int(np.sum(silent))} of {len(silent)} frames silent (shaded), "
                 f"{int(np.sum(np.asarray(weights) <= 0))} skip the UNet")
    ax.legend(loc="lower right", fontsize=7, ncols=4)
    return fig


def plot_box_tracks(raw: Sequence[Box | None], smoothed: Sequence[Box | None], fps: float | None = None) -> Figure:
    """Crop-box corners per frame: raw (thin, dotted) and smoothed (solid), x1 / y1 / x2 / y2 in px."""
    fig = _figure(9, 2.8)
    axes = fig.subplots(1, 2)
    x = np.arange(len(raw)) / fps if fps else np.arange(len(raw))

    def column(boxes: Sequence[Box | None], k: int) -> np.ndarray:
        return np.array([np.nan if b is None else b[k] for b in boxes], np.float64)

    for ax, ks, title in ((axes[0], (0, 2), "x1, x2 (px)"), (axes[1], (1, 3), "y1, y2 (px)")):
        for k, color in zip(ks, ("tab:blue", "tab:orange")):
            name = "x1 y1 x2 y2".split()[k]
            ax.plot(x, column(raw, k), ls=":", lw=1, color=color, label=f"{name} raw")
            ax.plot(x, column(smoothed, k), lw=1.5, color=color, label=f"{name} smoothed")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("time (s)" if fps else "frame")
        ax.legend(fontsize=7)
    return fig


def plot_mel(mel: np.ndarray, seconds: float | None = None, frames_per_second: int = 100) -> Figure:
    """A Whisper log-mel segment ((1, 80, 3000) or (80, 3000); 100 mel frames per second), cut at ``seconds``
    (the rest of the 30 s segment is padding)."""
    mel = np.asarray(mel).reshape(-1, mel.shape[-1])
    shown = mel[:, : int(seconds * frames_per_second)] if seconds else mel
    fig = _figure(9, 3)
    ax = fig.add_subplot()
    extent = (0, shown.shape[1] / frames_per_second, 0, shown.shape[0])
    im = ax.imshow(shown, origin="lower", aspect="auto", extent=extent, cmap="magma")
    fig.colorbar(im, ax=ax, label="log-mel (Whisper scale)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")
    ax.set_title(f"log-mel spectrogram: {mel.shape[0]} bins x {mel.shape[1]} frames per 30 s segment")
    return fig


def plot_windows(windows: np.ndarray, frames: Sequence[int] = (0, 1, 2), steps: int = 10) -> Figure:
    """Per-frame audio windows ((N, 50, 384): ``steps`` Whisper steps x 5 hidden states, time-major) as images,
    one per chosen frame; each row is one (step, layer) token, each column one feature."""
    frames = [f for f in frames if 0 <= f < len(windows)] or [0]
    fig = _figure(3.2 * len(frames), 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(frames)))
    lim = float(np.percentile(np.abs(windows[frames]), 99)) or 1.0
    for ax, f in zip(axes, frames):
        ax.imshow(windows[f], aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
        for s in range(1, steps):
            ax.axhline(s * windows.shape[1] / steps - 0.5, color="k", lw=0.3)
        ax.set_title(f"frame {f}", fontsize=9)
        ax.set_xlabel("feature (384)")
    axes[0].set_ylabel(f"{steps} steps x {windows.shape[1] // steps} layers")
    return fig


def plot_latents(latents: np.ndarray, title: str = "") -> Figure:
    """The channels of one latent: (8, 32, 32) UNet input (masked 0-3, reference 4-7) or (4, 32, 32)."""
    latents = np.asarray(latents, dtype=np.float32)
    n = latents.shape[0]
    names = ([f"masked {i}" for i in range(4)] + [f"reference {i}" for i in range(4)]) if n == 8 else \
        [f"channel {i}" for i in range(n)]
    fig = _figure(1.6 * min(n, 8), 1.9 * (-(-n // 8)) + 0.3)
    axes = np.atleast_1d(fig.subplots(-(-n // 8), min(n, 8))).ravel()
    lim = float(np.abs(latents).max()) or 1.0
    for ax, channel, name in zip(axes, latents, names):
        ax.imshow(channel, cmap="coolwarm", vmin=-lim, vmax=lim)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_parsing(parsing: np.ndarray) -> Figure:
    """A BiSeNet (512, 512) class map in 19 colours, with the classes the masks use named in the legend."""
    from matplotlib.patches import Patch

    from musetalk.stages import parsing as p

    fig = _figure(5.5, 4.2)
    ax = fig.add_subplot()
    ax.imshow(parsing, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
    ax.axis("off")
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    named = {"skin": p.SKIN, "nose": p.NOSE, "mouth": p.MOUTH, "upper lip": p.UPPER_LIP, "lower lip": p.LOWER_LIP,
             "neck": p.NECK}
    present = set(np.unique(parsing).tolist())
    handles = [Patch(color=cmap(v / 19), label=f"{k} ({v})") for k, v in named.items() if v in present]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title("face parsing classes")
    return fig


def plot_live(report: ProfileReport, total: int | None = None) -> Figure:
    """The live dashboard's view of a (partial) report: windowed fps and memory (MiB) over time."""
    from musetalk.profiling.plots import MEMORY_SERIES

    fig = _figure(9, 2.8)
    ax_fps, ax_mem = fig.subplots(1, 2)
    if report.fps_series:
        t, fps = zip(*report.fps_series)
        ax_fps.plot(t, fps, lw=1.2)
    done = f"{report.frames}/{total}" if total else str(report.frames)
    ax_fps.set_title(f"frames / s ({done} frames)", fontsize=9)
    ax_fps.set_xlabel("s")
    ax_fps.set_ylim(bottom=0)
    for key, label in MEMORY_SERIES.items():
        points = [(s["t"], s[key] / MIB) for s in report.memory if key in s]
        if points:
            t, v = zip(*points)
            ax_mem.plot(t, v, lw=1.2, label=label, marker="o" if key == "uss" else None, ms=2)
    ax_mem.set_title("memory (MiB)", fontsize=9)
    ax_mem.set_xlabel("s")
    ax_mem.set_ylim(bottom=0)
    if ax_mem.lines:
        ax_mem.legend(fontsize=7, loc="lower right")
    for ax in (ax_fps, ax_mem):
        ax.set_xlim(0, max(report.wall_s, 1e-3))
    return fig


def plot_memory_vs_length(reports: Sequence[ProfileReport | str | os.PathLike],
                          counters: Sequence[str] = ("rss", "uss", "cuda_max_memory_allocated",
                                                     "mps_driver_allocated_memory")) -> Figure:
    """Peak memory (MiB) against the number of output frames, one line per counter: flat lines mean memory does
    not grow with the video's length (the streaming claim, G5)."""
    from musetalk.profiling import ProfileReport

    loaded = sorted((r if isinstance(r, ProfileReport) else ProfileReport.load(r) for r in reports),
                    key=lambda r: r.frames)
    fig = _figure(6.5, 3.5)
    ax = fig.add_subplot()
    frames = [r.frames for r in loaded]
    for key in counters:
        if all(key in r.peaks for r in loaded):
            ax.plot(frames, [r.peaks[key] / MIB for r in loaded], marker="o", label=key)
    ax.set_xlabel("output frames")
    ax.set_ylabel("peak MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("peak memory vs video length")
    ax.legend(fontsize=8)
    return fig


def show_video(path: str | os.PathLike, width: int = 384) -> Any:
    """An inline, embedded (base64) player for an mp4, for ``display``; fine for the short clips notebooks make."""
    from IPython.display import Video

    return Video(str(path), embed=True, width=width, mimetype="video/mp4")
