"""MuseTalk Studio: run the MuseTalk lip-sync model locally (MPS, CUDA, CPU), stage by stage or streaming.

    from musetalk import MuseTalkPipeline
    pipe = MuseTalkPipeline.from_pretrained("models", device="auto", dtype="auto")
    pipe.generate("face.mp4", "speech.wav", "out.mp4")

Importing this package has no side effects: no weights are loaded, no torch flags are set, and torch itself
is imported only when one of the names below is first used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access, PEP 562)
_LAZY = {
    "MuseTalkPipeline": "musetalk.stream.pipeline",
    "GenerationResult": "musetalk.stream.pipeline",
    "Avatar": "musetalk.stream.avatar",
    "GenerationConfig": "musetalk.config",
    "CropConfig": "musetalk.config",
    "BlendConfig": "musetalk.config",
    "RuntimeConfig": "musetalk.config",
    "preset": "musetalk.config",
    "resolve_device": "musetalk.devices",
    "resolve_dtype": "musetalk.devices",
    "MuseTalkError": "musetalk.errors",
    "InputError": "musetalk.errors",
    "NoFaceError": "musetalk.errors",
    "WeightsError": "musetalk.errors",
    "Profiler": "musetalk.profiling",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'musetalk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
