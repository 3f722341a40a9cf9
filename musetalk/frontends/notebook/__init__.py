"""Helpers for the notebooks in ``notebooks/``: the one weights switch, where samples and outputs live, short clips.

    from musetalk.frontends import notebook
    MODELS = notebook.models_dir(use_tiny=None)  # real weights when present, else tiny random ones (and it says so)

Nothing here depends on the current working directory: a notebook copied elsewhere (or run by a test from a
temporary folder) finds the same samples, weights and output folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from musetalk.errors import WeightsError

# The repository this module was imported from (an editable install or a checkout on sys.path); None when the
# package was installed as a wheel, where samples/ and models/ are not shipped.
_REPO = Path(__file__).resolve().parents[3]
REPO: Path | None = _REPO if (_REPO / "pyproject.toml").is_file() else None


def _complete(folder: Path, version: str) -> bool:
    from musetalk.weights import layout

    return all((folder / f).is_file() for f in layout(version).required_files())


def _candidates() -> list[Path]:
    """Where real weights may be, in order: $MUSETALK_MODELS, then the checkout's ``models/`` folder.

    Only a package installed without its checkout falls back to ``./models`` and ``../models`` (a notebook's working
    directory is ``notebooks/``, one level below ``models/``).
    """
    found = []
    if os.environ.get("MUSETALK_MODELS"):
        found.append(Path(os.environ["MUSETALK_MODELS"]).expanduser())
    if REPO is not None:
        found.append(REPO / "models")
    else:
        found += [Path.cwd() / "models", Path.cwd().parent / "models"]
    return list(dict.fromkeys(p.resolve() for p in found))


def tiny_models_dir() -> Path:
    """Where the notebooks keep their tiny random weights: ``$MUSETALK_CACHE/tiny-models`` (see avatar.cache_root)."""
    from musetalk.stream.avatar import cache_root

    return cache_root() / "tiny-models"


def models_dir(use_tiny: bool | None = None, version: str = "v15", verbose: bool = True) -> Path:
    """The models folder the notebooks load from: THE switch at the top of every notebook.

    use_tiny=None: the first complete folder among $MUSETALK_MODELS and the checkout's ``models/`` (see
        ``_candidates``); when none is complete, tiny random weights (written once into :func:`tiny_models_dir`, ~10 s).
    use_tiny=True: always the tiny weights (fast; every picture of a generated face is noise).
    use_tiny=False: real weights or a WeightsError that says how to download them.
    Prints which one it chose and why (``verbose``).
    """
    from musetalk.stages.tiny import is_tiny, write_tiny_models
    from musetalk.weights import DOWNLOAD_HINT

    def say(text: str) -> None:
        if verbose:
            print(text)

    if not use_tiny:
        for folder in _candidates():
            if _complete(folder, version):
                kind = "TINY random weights (output is noise)" if is_tiny(folder) else "real weights"
                say(f"models: {folder} ({kind})")
                return folder
        if use_tiny is False:
            raise WeightsError(f"no complete {version} weights in any of: "
                               + ", ".join(str(p) for p in _candidates()),
                               DOWNLOAD_HINT.format(models=REPO / "models" if REPO else "models"))
    tiny = tiny_models_dir()
    if not (is_tiny(tiny) and _complete(tiny, version)):
        say(f"writing tiny random weights to {tiny} (once, ~10 s) ...")
        write_tiny_models(tiny)
    reason = "use_tiny=True" if use_tiny else "no real weights found (run `musetalk download` to get them)"
    say(f"models: {tiny} (TINY random weights, {reason}): every stage runs, generated faces are noise")
    return tiny


def samples_dir() -> Path:
    """The ``samples/`` folder of the checkout (face.png, face.mp4, speech.wav)."""
    for folder in ([REPO / "samples"] if REPO else []) + [Path.cwd() / "samples", Path.cwd().parent / "samples"]:
        if (folder / "speech.wav").is_file():
            return folder
    raise FileNotFoundError("samples/ not found: run the notebooks from a checkout of the repository")


def outputs_dir() -> Path:
    """Where notebooks write videos and reports: ``$MUSETALK_OUTPUTS``, else ``outputs/notebooks`` in the checkout
    (git-ignored), else a ``musetalk-outputs`` folder in the working directory. Created if missing."""
    if os.environ.get("MUSETALK_OUTPUTS"):
        folder = Path(os.environ["MUSETALK_OUTPUTS"]).expanduser()
    elif REPO is not None:
        folder = REPO / "outputs" / "notebooks"
    else:
        folder = Path.cwd() / "musetalk-outputs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def audio_clip(seconds: float | None, source: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """``seconds`` of ``source`` (default: samples/speech.wav) as a 16 kHz mono wav in :func:`outputs_dir`.

    A longer clip than the source repeats it (to profile long videos from a short sample); ``seconds=None`` returns
    the source itself.
    """
    import av

    from musetalk.stages.audio import SAMPLE_RATE, load_audio

    source = Path(source) if source is not None else samples_dir() / "speech.wav"
    if seconds is None:
        return source
    wav = load_audio(source)
    n = round(seconds * SAMPLE_RATE)
    wav = np.tile(wav, -(-n // len(wav)))[:n]
    path = outputs_dir() / (name or f"{source.stem}-{seconds:g}s.wav")
    pcm = (np.clip(wav, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return path


def source_clip(n_frames: int | None, source: str | os.PathLike | None = None) -> Path:
    """The first ``n_frames`` of a video (default: samples/face.mp4) as an mp4 in :func:`outputs_dir`.

    Preparing an avatar parses every source frame (~0.5 s each on a CPU), so the tiny-weights runs use a few
    frames; ``n_frames=None`` returns the source itself.
    """
    from musetalk.stream.video import VideoWriter, open_frames

    source = Path(source) if source is not None else samples_dir() / "face.mp4"
    if n_frames is None:
        return source
    frames = open_frames(source)
    path = outputs_dir() / f"{source.stem}-{n_frames}f.mp4"
    with VideoWriter(path, fps=frames.fps or 25) as writer:
        for i, frame in enumerate(frames):
            if i == n_frames:
                break
            writer.write(frame)
    return path


def download_target() -> Path:
    """Where ``hub.download`` should put real weights for the notebooks: $MUSETALK_MODELS, else the checkout's
    ``models/`` (the first place :func:`models_dir` looks)."""
    return _candidates()[0]


def is_tiny(models: str | os.PathLike) -> bool:
    """True for a folder of tiny random weights (generated faces are noise; runs are kept short)."""
    from musetalk.stages.tiny import is_tiny as _is_tiny

    return _is_tiny(models)


def checks_table(checks: list[Any]) -> str:
    """``hub.doctor`` results as a markdown table (show it with ``IPython.display.Markdown``)."""
    rows = ["| check | ok | detail | fix |", "|---|---|---|---|"]
    for c in checks:
        mark = "yes" if c.ok else ("**no**" if c.required else "no (optional)")
        cells = [c.name, mark, str(c.detail), c.fix or ""]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def profile_generate(pipe: Any, source: str | os.PathLike, audio: str | os.PathLike, config: Any = None,
                     avatar: str | None = None, label: str | None = None, profiler: Any = None,
                     output: str | os.PathLike | None = None, **meta: Any) -> Any:
    """Run ``pipe.generate`` under a Profiler (or the one given, e.g. a LiveDashboard) and return its ProfileReport.

    The video goes to ``output`` (default: a file in :func:`outputs_dir`); ``avatar`` reuses a prepared source so that only generation is timed
    after the first run. ``meta`` (and dtype, batch size, label, audio length) are stored in the report.
    """
    from musetalk.stages.audio import SAMPLE_RATE, load_audio
    from musetalk.profiling import Profiler

    config = config if config is not None else pipe.default_config()
    label = label or f"{dtype_name(pipe.dtype)} bs{config.runtime.batch_size}"
    prof = profiler if profiler is not None else Profiler(device=pipe.device)
    output = output or outputs_dir() / f"profile-{''.join(ch if ch.isalnum() else '-' for ch in label)}.mp4"
    with prof:
        result = pipe.generate(source, audio, output, config, avatar=avatar, progress=False, hooks=prof)
    seconds = len(load_audio(audio)) / SAMPLE_RATE
    return prof.report(meta={"label": label, "dtype": dtype_name(pipe.dtype), "batch_size": config.runtime.batch_size,
                             "audio_s": round(seconds, 3), "source": str(source), "output": str(result.path), **meta})


def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 -> "bf16" (the names the CLI and the reports use); anything else as str."""
    return {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(dtype), str(dtype))
