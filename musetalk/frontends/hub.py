"""The command side of the weights: `musetalk download` (see musetalk.weights.download) and `musetalk doctor`."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from musetalk.errors import WeightsError
from musetalk.weights.download import download, plan, sha256_of, check_hash, size_problem
from musetalk.weights.registry import FORMATS, TINY_MARKER, WEIGHTS, WeightFile

__all__ = ["Check", "doctor", "download", "plan"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _unet_shapes_ok(models_dir: Path, version: str) -> Check:
    """Build the UNet on the meta device (no memory) and compare every shape with the file's."""
    import torch

    from musetalk.stages.unet import UNet  # noqa: F401  (import check)
    from musetalk.weights import layout, load_state_dict

    parts = layout(version)
    config_path = models_dir / parts.unet_config
    weights = models_dir / parts.unet_dir / parts.unet_weights
    try:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(json.loads(config_path.read_text()))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = load_state_dict(weights)
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            bad = sorted(set(got) ^ set(expected)) or [k for k in got if got[k] != expected.get(k)]
            return Check(f"{version} UNet shapes", False, f"{len(bad)} keys differ, e.g. {bad[:3]}",
                         "download the weights again: `musetalk download --version " + version + "`")
        n = sum(int(torch.Size(s).numel()) for s in got.values())
        return Check(f"{version} UNet shapes", True, f"{len(got)} tensors, {n / 1e6:.1f} M parameters")
    except WeightsError as exc:
        return Check(f"{version} UNet shapes", False, exc.message, exc.fix or "")
    except Exception as exc:  # noqa: BLE001 - doctor reports, never crashes
        return Check(f"{version} UNet shapes", False, f"{type(exc).__name__}: {exc}",
                     "download the weights again: `musetalk download --version " + version + "`")


def doctor(models_dir: Path, verify: bool = False) -> list[Check]:
    """Everything generation needs, each with its fix. Generation can run when every required check is ok.

    Every registered weight file present is checked against its registered size (a truncated download is named
    with its fix); ``verify`` also hashes them (SHA-256, seconds per GB).
    """
    import torch

    from musetalk.devices import mps_available
    from musetalk.weights import LAYOUTS

    checks = [Check("python", sys.version_info >= (3, 10), platform.python_version(), "use Python 3.10 or newer"),
              Check("torch", True, torch.__version__)]
    devices = ["cpu"] + (["cuda: " + torch.cuda.get_device_name(0)] if torch.cuda.is_available() else []) \
        + (["mps"] if mps_available() else [])
    checks.append(Check("devices", True, ", ".join(devices)))
    checks.append(_mlx_check())
    if platform.system() == "Darwin":
        checks.append(Check("PYTORCH_ENABLE_MPS_FALLBACK", os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") == "1",
                            os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK", "unset"),
                            "the musetalk command sets it; in Python set it before `import torch`", required=False))
    try:
        import av

        codecs = {name: name in av.codecs_available for name in ("libx264", "aac")}
        checks.append(Check("video codecs (PyAV)", all(codecs.values()), f"PyAV {av.__version__}: {codecs}",
                            "pip install --force-reinstall av"))
    except ImportError:
        checks.append(Check("video codecs (PyAV)", False, "PyAV missing", "pip install av"))
    try:
        import imageio_ffmpeg

        checks.append(Check("ffmpeg binary", True, imageio_ffmpeg.get_ffmpeg_exe(), required=False))
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("ffmpeg binary", False, str(exc), "pip install imageio-ffmpeg", required=False))
    checks += _face_backend_checks(models_dir)
    for version, parts in LAYOUTS.items():
        missing = [f for f in parts.required_files() + [f"{parts.unet_dir}/{parts.unet_weights}"]
                   if not (models_dir / f).is_file()]
        if missing:
            checks.append(Check(f"{version} weights", False, "missing: " + ", ".join(missing),
                                f"musetalk download --version {version} --dir {models_dir}", required=version == "v15"))
        else:
            check = _unet_shapes_ok(models_dir, version)
            check.required = version == "v15"
            checks.append(check)
    checks += _file_checks(models_dir, verify)
    checks.append(_backbone_check(models_dir))
    for entry in (WEIGHTS["syncnet"], WEIGHTS["s3fd"]):
        present = (models_dir / entry.dest).is_file()
        checks.append(Check(entry.part, present, "present" if present else "absent",
                            f"musetalk download --syncnet --dir {models_dir}", required=False))
    return checks


def _mlx_check() -> Check:
    """Whether the MLX backend (--backend mlx; auto's choice on Apple Silicon) can run, and how to add it."""
    from musetalk.stages.mlx import INSTALL_HINT, is_apple_silicon, mlx_available

    where = "Apple Silicon: --backend auto picks it" if is_apple_silicon() else "not Apple Silicon: auto keeps torch"
    if not mlx_available():
        return Check("MLX backend", False, f"not installed ({where})", INSTALL_HINT, required=False)
    from importlib.metadata import version

    import mlx.core as mx

    return Check("MLX backend", True, f"mlx {version('mlx')} on {mx.default_device()} ({where})", required=False)


def _blocking(entry: WeightFile) -> bool:
    """A problem with this file stops v1.5 generation (the default)."""
    return entry.required and entry.group in ("v15", "common")


def _file_checks(models_dir: Path, verify: bool) -> list[Check]:
    """Size (always) and SHA-256 (``verify``) of each registered weight file present, against the registry."""
    from musetalk.weights import sniff_format

    tiny = (models_dir / TINY_MARKER).is_file()
    checks = []
    for entry in WEIGHTS.values():
        path = models_dir / entry.dest
        if not entry.is_weights or not path.is_file():
            continue
        fix = f"musetalk download --dir {models_dir}{_download_flags(entry)} (it fetches {entry.dest} again)"
        name = entry.dest
        if tiny:
            checks.append(Check(name, True, f"{sniff_format(path)} format; random test weights: size and hash not "
                                            "checked", required=False))
            continue
        problem = size_problem(entry, path)
        if problem:
            checks.append(Check(name, False, problem, fix, required=_blocking(entry)))
            continue
        detail = f"{path.stat().st_size:,} bytes, {sniff_format(path)} format"
        if verify:
            digest = sha256_of(path)
            if not check_hash(entry, digest):
                checks.append(Check(name, False, f"SHA-256 {digest} does not match the published file", fix,
                                    required=_blocking(entry)))
                continue
            detail += ", SHA-256 ok" if entry.sha256 or entry.sha256_prefix else ", SHA-256 not published here"
        elif entry.size is None:
            detail += " (size not published here)"
        checks.append(Check(name, True, detail, required=_blocking(entry)))
    return checks


def _download_flags(entry: WeightFile) -> str:
    return {"v1": " --version v1", "dwpose": " --dwpose", "syncnet": " --syncnet"}.get(entry.group, "")


def _backbone_check(models_dir: Path) -> Check:
    """The torchvision ResNet-18 file: optional, and the one official file in the 0.1-era tar format."""
    entry = WEIGHTS["face-parse-backbone"]
    present = (models_dir / entry.dest).is_file()
    how = f"{entry.note}; {FORMATS[entry.format]}"
    return Check("face-parse backbone (optional)", present, ("present: " if present else "absent: ") + how,
                 f"musetalk download --dir {models_dir}", required=False)


def _face_backend_checks(models_dir: Path) -> list[Check]:
    out = []
    try:
        from musetalk.stages.faces.dlib_backend import predictor_path

        out.append(Check("landmarks: dlib", True, str(predictor_path())))
    except Exception as exc:  # noqa: BLE001
        out.append(Check("landmarks: dlib", False, str(exc), "pip install dlib-bin face-recognition-models"))
    try:
        import face_alignment  # noqa: F401

        out.append(Check("landmarks: face_alignment", True, "installed", required=False))
    except ImportError:
        out.append(Check("landmarks: face_alignment", False, "not installed", "pip install 'musetalk[face-alignment]'",
                         required=False))
    dw = models_dir / WEIGHTS["dwpose"].dest
    out.append(Check("landmarks: dwpose", dw.is_file(), str(dw) if dw.is_file() else "weights absent",
                     f"musetalk download --dwpose --dir {models_dir}", required=False))
    return out
