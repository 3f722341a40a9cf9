"""Shared fixtures. Tests that need ``../shared`` (the goldens) skip only when that folder is absent."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MUSETALK_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"


def golden_set(name: str) -> Path:
    """Path of a golden set; skips the test with a clear reason when ../shared is absent (a user's clone)."""
    path = GOLDEN / name
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}); golden tests run where it exists (CI always has it)")
    assert path.is_dir(), f"golden set {path} is missing although {SHARED} exists"
    return path


@pytest.fixture(scope="session")
def v15_golden() -> Path:
    return golden_set("musetalk-v15-tiny")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny models/ folder in the official layout (written once per test session)."""
    from musetalk.stages.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("models"))


def write_wav(path: Path, samples, rate: int = 16000) -> Path:
    """Write float samples in [-1, 1] as a mono PCM16 wav (stdlib only); returns the path."""
    import wave

    import numpy as np

    data = (np.clip(np.asarray(samples, dtype=np.float64), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler for the test, as in a terminal: a suite started in the background by a
    non-interactive shell (`cmd &`) inherits SIGINT ignored, and Python then installs no handler for it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
