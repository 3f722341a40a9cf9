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


_REUSE_CHILD = """
import json, resource, sys, torch
from musetalk.devices import freed_blocks_kept_in_heap

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

def faults_of_a_pass():
    # like a model's activations: a few large blocks of different sizes alive at once, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(mb * 2**20 // 4) for mb in (40, 80, 60)]  # written through: every page touched
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {}
if sys.argv[1] == "keep":
    with freed_blocks_kept_in_heap() as out["applied"]:
        faults_of_a_pass()  # the first pass is new memory either way
        # lists made before the passes: a list growing between them would sit in the heap after their blocks
        rss, faults = [rss_mb()] * 21, [0] * 20
        for k in range(20):
            faults[k] = faults_of_a_pass()
            rss[k + 1] = rss_mb()
        out["rss_mb"], out["faults"] = rss, faults
elif sys.argv[1] == "after":  # the context entered and left, nothing allocated inside
    with freed_blocks_kept_in_heap() as out["applied"]:
        pass
    faults_of_a_pass()
    out["faults"] = [faults_of_a_pass() for _ in range(3)]
else:
    faults_of_a_pass()
    out["faults"] = [faults_of_a_pass() for _ in range(3)]
print(json.dumps(out))
"""
PASS_PAGES = 180 * 2**20 // 4096


def _reuse_child(mode: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _REUSE_CHILD, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; minor faults from getrusage")
def test_freed_large_blocks_are_reused_from_the_heap_not_faulted_in_again() -> None:
    """glibc maps each block over 32 MB on its own and unmaps it when freed: every pass faults all its pages in
    again. Kept in the heap, passes reuse them: the heap settles after a few passes (glibc before 2.38 cannot
    serve an aligned block of a size from a free one of exactly that size, so it grows a little first) and then
    neither grows nor faults. Once the context is left, glibc's own thresholds are back (what the heap holds is
    still reused first; ``release_free_memory`` hands its pages back)."""
    default = _reuse_child("default")
    assert min(default["faults"]) >= PASS_PAGES * 0.9, default
    kept = _reuse_child("keep")
    assert kept["applied"] is True
    assert sum(kept["faults"]) < 6 * PASS_PAGES, kept  # 20 passes: a few passes' worth, not 20 (measured 3-5)
    assert max(kept["faults"][-10:]) < PASS_PAGES * 0.05, kept  # settled
    assert kept["rss_mb"][-1] - kept["rss_mb"][0] < 3 * 180, kept  # bounded growth (measured 220-380 MB) ...
    assert kept["rss_mb"][-1] - kept["rss_mb"][-11] < 10, kept  # ... that stops
    after = _reuse_child("after")
    assert after["applied"] is True
    assert min(after["faults"]) >= PASS_PAGES * 0.9, after  # mapped and unmapped again, as by default


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("setting", [{"MALLOC_MMAP_THRESHOLD_": "131072"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_a_users_own_heap_settings_are_left_alone(setting: dict[str, str]) -> None:
    result = _reuse_child("keep", **setting)
    assert result["applied"] is False
    assert min(result["faults"]) >= PASS_PAGES * 0.9, result  # glibc's own behaviour, not ours
