"""Pick a landmark backend by name. Backends are imported only when asked for (dlib and torch are heavy)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from musetalk.errors import InputError, MuseTalkError
from musetalk.stages.faces.types import LandmarkBackend

if TYPE_CHECKING:
    import torch

# name -> what it needs; the first is the default (offline, no torch weights).
LANDMARK_BACKENDS: dict[str, str] = {
    "dlib": "dlib HOG detector + 68-point shape predictor (default, offline, CPU; model non-commercial)",
    "face_alignment": "S3FD + 2D-FAN-4 via the optional face_alignment package (downloads its weights)",
    "dwpose": "DWPose whole-body keypoints 23..90, what the reference uses (needs models/dwpose/dw-ll_ucoco_384.pth)",
}
DEFAULT_LANDMARK_BACKEND = "dlib"


def get_landmark_backend(name: str = DEFAULT_LANDMARK_BACKEND, device: str | torch.device = "auto",
                         **options: Any) -> LandmarkBackend:
    """Build the landmark backend ``name`` ("dlib", "face_alignment" or "dwpose") once; reuse it for every frame.

    device: for the torch backends (face_alignment, dwpose); dlib runs on the CPU and ignores it.
    options: passed to the backend's constructor (e.g. ``upsample=1`` for dlib, ``checkpoint_path`` for dwpose);
        for dwpose, ``models_dir`` is also accepted and means ``<models_dir>/dwpose/dw-ll_ucoco_384.pth``.
    Unknown names raise InputError listing the known ones; a backend that cannot run here raises MuseTalkError
    saying how to install or fetch what it needs.
    """
    key = name.strip().lower().replace("-", "_")
    if key == "dlib":
        from musetalk.stages.faces.dlib_backend import DlibBackend

        return DlibBackend(device=device, **options)
    if key == "face_alignment":
        from musetalk.stages.faces.face_alignment_backend import FaceAlignmentBackend

        return FaceAlignmentBackend(device=device, **options)
    if key == "dwpose":
        try:
            from musetalk.stages.faces.dwpose import DWPoseBackend
        except ModuleNotFoundError as err:
            if err.name != "musetalk.stages.faces.dwpose":  # dwpose.py exists; one of its dependencies does not
                missing = err.name
                raise MuseTalkError(f"the dwpose landmark backend needs the missing module {missing!r}",
                                    f"install the package that provides {missing!r}, or use --landmarks dlib") from None
            raise MuseTalkError("the dwpose landmark backend is not part of this build",
                                "use --landmarks dlib (or update musetalk)") from None
        models_dir = options.pop("models_dir", None)
        if models_dir is not None and options.get("checkpoint_path") is None:
            from musetalk.stages.faces.dwpose import default_checkpoint_path

            options["checkpoint_path"] = default_checkpoint_path(models_dir)
        return DWPoseBackend(device=device, **options)
    raise InputError(f"unknown landmark backend {name!r}", f"use one of: {', '.join(LANDMARK_BACKENDS)}")
