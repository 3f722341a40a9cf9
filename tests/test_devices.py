"""Device and dtype resolution happens once, at the edge, with clear errors."""

from __future__ import annotations

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
