"""Fetching the official weights (``musetalk download``) and checking an installation (``musetalk doctor``)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from musetalk.errors import WeightsError

# (hub repo, file in repo, destination under models/). The official download_weights.sh of MuseTalk.
HF_FILES: dict[str, list[tuple[str, str, str]]] = {
    "v15": [("TMElyralab/MuseTalk", "musetalkV15/musetalk.json", "musetalkV15/musetalk.json"),
            ("TMElyralab/MuseTalk", "musetalkV15/unet.pth", "musetalkV15/unet.pth")],
    "v1": [("TMElyralab/MuseTalk", "musetalk/musetalk.json", "musetalk/musetalk.json"),
           ("TMElyralab/MuseTalk", "musetalk/pytorch_model.bin", "musetalk/pytorch_model.bin")],
    "common": [("stabilityai/sd-vae-ft-mse", "config.json", "sd-vae/config.json"),
               ("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.bin", "sd-vae/diffusion_pytorch_model.bin"),
               ("openai/whisper-tiny", "config.json", "whisper/config.json"),
               ("openai/whisper-tiny", "pytorch_model.bin", "whisper/pytorch_model.bin"),
               ("openai/whisper-tiny", "preprocessor_config.json", "whisper/preprocessor_config.json"),
               # the reference fetches 79999_iter.pth from Google Drive; this public hub mirror holds the same files
               ("ManyOtherFunctions/face-parse-bisent", "79999_iter.pth", "face-parse-bisent/79999_iter.pth"),
               ("ManyOtherFunctions/face-parse-bisent", "resnet18-5c106cde.pth",
                "face-parse-bisent/resnet18-5c106cde.pth")],
    "dwpose": [("yzd-v/DWPose", "dw-ll_ucoco_384.pth", "dwpose/dw-ll_ucoco_384.pth")],
}
# syncnet_python's download_model.sh
URL_FILES: dict[str, list[tuple[str, str]]] = {
    "syncnet": [("https://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model", "syncnet/syncnet_v2.model"),
                ("https://www.robots.ox.ac.uk/~vgg/software/lipsync/data/sfd_face.pth", "syncnet/sfd_face.pth")],
}


def _reachable(url: str, timeout: float = 5.0) -> bool:
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def plan_download(versions: list[str], dwpose: bool = False, syncnet: bool = False) -> tuple[list, list]:
    hf = [f for v in versions for f in HF_FILES[v]] + HF_FILES["common"] + (HF_FILES["dwpose"] if dwpose else [])
    urls = URL_FILES["syncnet"] if syncnet else []
    return hf, urls


def download(models_dir: Path, versions: list[str], dwpose: bool = False, syncnet: bool = False,
             log=print) -> list[Path]:
    """Fetch the official files into ``models_dir`` (idempotent: present files are kept; resumable).

    Honours HF_HOME, HF_HUB_OFFLINE and HF_ENDPOINT (huggingface_hub reads them). Offline, fails at once.
    """
    hf_files, url_files = plan_download(versions, dwpose, syncnet)
    todo_hf = [f for f in hf_files if not (models_dir / f[2]).is_file()]
    todo_url = [f for f in url_files if not (models_dir / f[1]).is_file()]
    for _, _, dest in hf_files:
        if (models_dir / dest).is_file():
            log(f"present  {dest}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if todo_hf:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise WeightsError(f"HF_HUB_OFFLINE is set and {len(todo_hf)} files are missing from {models_dir}",
                               "unset HF_HUB_OFFLINE on a machine with internet access, or copy the files in")
        if not _reachable(endpoint):
            raise WeightsError(f"cannot reach {endpoint} (no network?); {len(todo_hf)} files are missing",
                               "run `musetalk download` where the hub is reachable (or set HF_ENDPOINT to a mirror) "
                               "and copy models/ here; for a pipeline test without real weights use "
                               "`musetalk tiny-weights --dir models-tiny`")
    fetched = []
    if todo_hf:
        from huggingface_hub import hf_hub_download

        for repo, filename, dest in todo_hf:
            log(f"fetch    {repo}/{filename} -> {dest}")
            cached = Path(hf_hub_download(repo_id=repo, filename=filename))  # resumable, cached under HF_HOME
            target = models_dir / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            shutil.copyfile(cached, tmp)
            os.replace(tmp, target)
            fetched.append(target)
    for url, dest in todo_url:
        if not _reachable(url):
            raise WeightsError(f"cannot reach {url}", "download it by hand into " + str(models_dir / dest))
        log(f"fetch    {url} -> {dest}")
        fetched.append(_fetch_url(url, models_dir / dest))
    verify_downloaded(models_dir, [d for _, _, d in hf_files] + [d for _, d in url_files])
    return fetched


def _fetch_url(url: str, target: Path) -> Path:
    """HTTP download with resume (Range) into ``target.part``, renamed when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    with urllib.request.urlopen(request, timeout=60) as response, open(part, "ab" if start else "wb") as f:
        if start and response.status != 206:  # server ignored the range: start over
            f.truncate(0)
        shutil.copyfileobj(response, f, 1 << 20)
    os.replace(part, target)
    return target


def verify_downloaded(models_dir: Path, files: list[str]) -> None:
    """Every weight file loads as a safe state dict; JSON files parse."""
    from musetalk.weights import load_state_dict

    for rel in files:
        path = models_dir / rel
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            load_state_dict(path)


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


def doctor(models_dir: Path) -> list[Check]:
    """Everything generation needs, each with its fix. Generation can run when every required check is ok."""
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
    for rel, what in (("syncnet/syncnet_v2.model", "SyncNet (evaluate)"), ("syncnet/sfd_face.pth", "S3FD (evaluate)")):
        present = (models_dir / rel).is_file()
        checks.append(Check(what, present, "present" if present else "absent",
                            f"musetalk download --syncnet --dir {models_dir}", required=False))
    return checks


def _mlx_check() -> Check:
    """Whether the MLX backend (--backend mlx; auto's choice on Apple Silicon) can run, and how to add it."""
    from musetalk.stages.mlx import INSTALL_HINT, is_apple_silicon, mlx_available

    where = "Apple Silicon: --backend auto picks it" if is_apple_silicon() else "not Apple Silicon: auto keeps torch"
    if not mlx_available():
        return Check("MLX backend", False, f"not installed ({where})", INSTALL_HINT, required=False)
    import mlx.core as mx

    return Check("MLX backend", True, f"mlx {mx.__version__} on {mx.default_device()} ({where})", required=False)


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
    dw = models_dir / "dwpose" / "dw-ll_ucoco_384.pth"
    out.append(Check("landmarks: dwpose", dw.is_file(), str(dw) if dw.is_file() else "weights absent",
                     f"musetalk download --dwpose --dir {models_dir}", required=False))
    return out
