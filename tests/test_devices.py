"""Device and dtype resolution happens once, at the edge, with clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musetalk import devices
from musetalk.errors import InputError


def test_auto_device_falls_back_to_cpu_here() -> None:
    expected = "cuda" if torch.cuda.is_available() else ("mps" if devices.mps_available() else "cpu")
    assert devices.resolve_device("auto").type == expected


def test_absent_accelerators_give_clear_errors() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            devices.resolve_device("cuda")
    if not devices.mps_available():
        with pytest.raises(InputError, match="MPS"):
            devices.resolve_device("mps")
    with pytest.raises(InputError, match="unknown device"):
        devices.resolve_device("tpu")


def test_dtype_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert devices.resolve_dtype("fp32", cpu) is torch.float32
    assert devices.resolve_dtype(torch.float16, cpu) is torch.float16
    monkeypatch.delenv("MUSETALK_CPU_DTYPE", raising=False)
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert devices.resolve_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert devices.resolve_dtype("auto", cpu) is torch.float32  # emulated bf16 would be slower than fp32
    monkeypatch.setenv("MUSETALK_CPU_DTYPE", "bf16")
    assert devices.resolve_dtype("auto", cpu) is torch.bfloat16
    assert devices.resolve_dtype("auto", torch.device("cuda")) is torch.float16
    with pytest.raises(InputError, match="unknown dtype"):
        devices.resolve_dtype("int8", cpu)


_HEAP_CHILD = """
import ctypes, json, numpy as np
from musetalk.devices import release_free_memory

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

libc = ctypes.CDLL(None)
libc.mallopt(-3, 256 * 2**20)  # M_MMAP_THRESHOLD: 1 MB blocks come from the heap (as once glibc's threshold grew)
libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: free() alone gives nothing back
blocks = [np.ones(2**17) for _ in range(200)]  # 200 x 1 MB, resident
kept = blocks[1::2]  # every other block stays alive: the freed ones are holes, not the heap's top
del blocks
before = rss_kb()
ok = release_free_memory()
print(json.dumps({"ok": ok, "released_mb": (before - rss_kb()) / 1024, "kept": len(kept)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim; reads /proc/self/status")
def test_release_free_memory_hands_the_heaps_holes_back() -> None:
    done = subprocess.run([sys.executable, "-c", _HEAP_CHILD], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"]
    assert result["released_mb"] >= 80, result  # ~100 MB of 1 MB holes
