"""Lip-sync quality: SyncNet LSE-D / LSE-C as published (joonson/syncnet_python), face tracks and crops.

Modules: ``evaluate`` (``evaluate_video`` and the ``musetalk evaluate`` command), ``syncnet`` (network and
scores), ``mfcc``, ``media`` (PyAV input and the reference's JPEG step), ``track`` (track + crop rule),
``s3fd`` (face detector), ``mouth`` (mouth motion on silence), ``golden_*`` (golden verifiers).
Importing this package imports none of them (torch and PyAV load when a video is evaluated).
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvaluateConfig", "LSEResult", "evaluate_video"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from musetalk.quality import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
