"""The one table of weight files: where each comes from, where it goes under ``models/``, how big it is, its hash.

`musetalk download`, `musetalk doctor`, the layout checks (:data:`musetalk.weights.LAYOUTS`), `musetalk evaluate`'s
default paths and the tiny-weights writer all read this table; no other module types these paths.

Sizes and SHA-256 are the published files' where we know them (None = unknown, never guessed). ``format`` is what the
published file is expected to be; the reader recognises the format from the bytes, not from this column.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

HF_ENDPOINT = "https://huggingface.co"
TINY_MARKER = "TINY_WEIGHTS"  # written by musetalk.testing.tiny: random weights, sizes and hashes do not apply
FORMATS = {
    "zip": "PyTorch >= 1.6 zip checkpoint, read by torch.load(weights_only=True, mmap=True)",
    "legacy": "PyTorch < 1.6 pickle stream, read by MuseTalk's restricted unpickler",
    "tar": "PyTorch 0.1-era tar archive, read by MuseTalk's restricted unpickler (torch's weights_only refuses it)",
    "mmengine": "mmengine/mmpose training checkpoint ({'state_dict', 'meta' with numpy arrays, ...}); "
                "torch's allow-list refuses its metadata, MuseTalk's restricted unpickler reads it",
    "json": "JSON configuration",
}


@dataclass(frozen=True)
class WeightFile:
    """One published file and its place in ``models/``."""

    key: str  # stable identifier: "unet-v15", "vae", "face-parse", ...
    part: str  # what it is, for people
    group: str  # download set: "v15", "v1", "common" (every version), "dwpose", "syncnet"
    dest: str  # path under models/
    repo: str | None = None  # Hugging Face repository holding it ...
    filename: str | None = None  # ... and its path in that repository
    url: str | None = None  # or a direct URL
    size: int | None = None  # bytes; None = unknown
    sha256: str | None = None  # full hex digest; None = unknown
    sha256_prefix: str | None = None  # leading hex digits when only those are known (torchvision names carry them)
    required: bool = True  # needed to generate with its group's version (optional files are extras)
    format: str = "zip"  # a key of FORMATS
    note: str = ""
    # the name the loading library also accepts in the same folder (diffusers / transformers safetensors naming)
    alternative: str | None = None

    @property
    def is_weights(self) -> bool:
        return self.format != "json"

    def source_url(self, endpoint: str | None = None) -> str:
        """Where to fetch it: the direct URL, else ``<endpoint>/<repo>/resolve/main/<filename>`` (HF_ENDPOINT)."""
        if self.url:
            return self.url
        base = (endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
        return f"{base}/{self.repo}/resolve/main/{self.filename}"

    def source(self) -> str:
        return self.url or f"hf://{self.repo}/{self.filename}"


_MUSETALK = "TMElyralab/MuseTalk"
_VAE = "stabilityai/sd-vae-ft-mse"
_WHISPER = "openai/whisper-tiny"
# the reference fetches 79999_iter.pth from Google Drive; this public hub mirror holds the same files
_FACE_PARSE = "ManyOtherFunctions/face-parse-bisent"
_SYNCNET_URL = "https://www.robots.ox.ac.uk/~vgg/software/lipsync/data/"  # syncnet_python's download_model.sh

WEIGHTS: dict[str, WeightFile] = {w.key: w for w in (
    WeightFile("unet-v15-config", "MuseTalk v1.5 UNet config", "v15", "musetalkV15/musetalk.json", _MUSETALK,
               "musetalkV15/musetalk.json", format="json"),
    WeightFile("unet-v15", "MuseTalk v1.5 UNet", "v15", "musetalkV15/unet.pth", _MUSETALK, "musetalkV15/unet.pth",
               size=3_400_074_924, sha256="7ebf6c98c181e20838e4c0054e96e944ac60d5d692cc01db42839fe11b787007"),
    WeightFile("unet-v1-config", "MuseTalk v1 UNet config", "v1", "musetalk/musetalk.json", _MUSETALK,
               "musetalk/musetalk.json", format="json"),
    WeightFile("unet-v1", "MuseTalk v1 UNet", "v1", "musetalk/pytorch_model.bin", _MUSETALK,
               "musetalk/pytorch_model.bin"),
    WeightFile("vae-config", "VAE config (sd-vae-ft-mse)", "common", "sd-vae/config.json", _VAE, "config.json",
               format="json"),
    WeightFile("vae", "VAE (sd-vae-ft-mse)", "common", "sd-vae/diffusion_pytorch_model.bin", _VAE,
               "diffusion_pytorch_model.bin", size=334_707_217,
               alternative="sd-vae/diffusion_pytorch_model.safetensors"),
    WeightFile("whisper-config", "Whisper tiny config", "common", "whisper/config.json", _WHISPER, "config.json",
               format="json"),
    WeightFile("whisper", "Whisper tiny (audio encoder)", "common", "whisper/pytorch_model.bin", _WHISPER,
               "pytorch_model.bin", size=151_095_027,
               alternative="whisper/model.safetensors"),
    WeightFile("whisper-preprocessor", "Whisper feature extractor config", "common",
               "whisper/preprocessor_config.json", _WHISPER, "preprocessor_config.json", format="json"),
    WeightFile("face-parse", "BiSeNet face parsing", "common", "face-parse-bisent/79999_iter.pth", _FACE_PARSE,
               "79999_iter.pth", size=53_289_463, format="legacy"),
    WeightFile("face-parse-backbone", "ResNet-18 backbone (torchvision zoo, 2017)", "common",
               "face-parse-bisent/resnet18-5c106cde.pth", _FACE_PARSE, "resnet18-5c106cde.pth", size=46_827_520,
               sha256_prefix="5c106cde", required=False, format="tar",
               note="not needed: 79999_iter.pth holds every BiSeNet weight, backbone included"),
    WeightFile("dwpose", "DWPose whole-body (landmarks backend 'dwpose')", "dwpose", "dwpose/dw-ll_ucoco_384.pth",
               "yzd-v/DWPose", "dw-ll_ucoco_384.pth", size=406_878_486, required=False, format="mmengine"),
    WeightFile("syncnet", "SyncNet (musetalk evaluate)", "syncnet", "syncnet/syncnet_v2.model",
               url=_SYNCNET_URL + "syncnet_v2.model", required=False, format="legacy"),
    WeightFile("s3fd", "S3FD face detector (musetalk evaluate)", "syncnet", "syncnet/sfd_face.pth",
               url=_SYNCNET_URL + "sfd_face.pth", required=False, format="legacy"),
)}
GROUPS = ("v15", "v1", "common", "dwpose", "syncnet")
VERSIONS = ("v15", "v1")


def weight_file(key: str) -> WeightFile:
    """The entry ``key`` (a KeyError names the known keys)."""
    try:
        return WEIGHTS[key]
    except KeyError:
        raise KeyError(f"no weight file {key!r}; known: {sorted(WEIGHTS)}") from None


def files_in(groups: Iterable[str]) -> list[WeightFile]:
    """Entries of the given download groups, in table order."""
    wanted = set(groups)
    return [w for w in WEIGHTS.values() if w.group in wanted]


def version_files(version: str) -> list[WeightFile]:
    """What generation with ``version`` reads or may read: its own files and the common ones."""
    return files_in((version, "common"))


def by_dest(dest: str) -> WeightFile | None:
    """The entry installed at ``dest`` (a path under models/), if any."""
    return next((w for w in WEIGHTS.values() if w.dest == dest), None)
