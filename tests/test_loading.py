"""Building models without allocating and filling them from mapped checkpoints (musetalk.weights.loading)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from musetalk.errors import WeightsError
from musetalk.weights import empty_init, inference_ready, load_model

REPO = Path(__file__).resolve().parents[1]


class Small(nn.Module):
    """Parameters, a BatchNorm (float buffers + an integer ``num_batches_tracked``) and a nested module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))


def _random_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Small()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def test_empty_init_allocates_nothing() -> None:
    with empty_init():
        model = nn.Linear(4096, 4096)
    assert model.weight.is_meta and model.bias.is_meta


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_model_fills_every_tensor_in_the_run_dtype(tmp_path: Path, suffix: str, dtype: torch.dtype) -> None:
    state = _random_state()
    model = load_model(Small, _save(state, tmp_path / f"small{suffix}"), dtype=dtype)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        got = loaded[key]
        assert not got.is_meta, key
        if value.is_floating_point():
            assert got.dtype == dtype, key
            assert torch.equal(got, value.to(dtype)), key
        else:  # num_batches_tracked keeps its integer dtype and value
            assert got.dtype == value.dtype and torch.equal(got, value), key
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(1, 3, 8, 8, dtype=dtype)
    reference = Small()
    reference.load_state_dict(state)
    expected = inference_ready(reference, dtype=dtype).conv(x)
    torch.testing.assert_close(model.conv(x), expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the file mappings from /proc/self/maps")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_memory_format_is_applied_in_the_one_copy_and_never_beside_a_shared_mapping(tmp_path: Path,
                                                                                        suffix: str) -> None:
    """channels_last (what the CPU's convolutions want in bf16) lays out the 4-d weights as they are materialized.

    An fp32 file in the default layout is shared with its mapping (zero copy); asked for another layout, every
    tensor is copied instead, as for a cast: a copy beside a live mapping would count the same weights twice.
    """
    state = _random_state()
    path = _save(state, tmp_path / f"small{suffix}")

    def in_the_mapped_file(t: torch.Tensor) -> bool:
        address = t.data_ptr()
        for line in Path("/proc/self/maps").read_text().splitlines():
            span, *rest = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return len(rest) == 5 and rest[4] == str(path)
        return False

    shared = load_model(Small, path)
    assert shared.conv.weight.is_contiguous()
    assert all(in_the_mapped_file(t) for t in shared.parameters())  # zero copy
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(Small, path, dtype=dtype, memory_format=torch.channels_last)
        weight = model.conv.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        assert torch.equal(weight, state["conv.weight"].to(dtype))
        assert not any(in_the_mapped_file(t) for t in model.parameters())
        assert model.head[0].weight.is_contiguous()  # only 4-d tensors change layout


class TwoLayers(nn.Module):
    """Two 4 MB fp32 weights: whole pages each, so the one released can be told from the one kept."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(1024, 1024)
        self.second = nn.Linear(1024, 1024)


def _resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path``."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if not fields[0].endswith(":"):
            inside = len(fields) == 6 and fields[5] == str(path)
        elif fields[0] == "Rss:" and inside:
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_released_pages_of_mapped_weights_leave_the_resident_memory_and_read_back_the_same(tmp_path: Path) -> None:
    """The VAE encoder's pages after preparing: only views of a mapped file go, and their values come back."""
    from musetalk.weights.loading import release_mapped_pages

    torch.manual_seed(0)
    path = tmp_path / "two.pth"
    torch.save(TwoLayers().state_dict(), path)
    model = load_model(TwoLayers, path)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    float(sum(p.sum() for p in model.parameters()))  # every page read: resident
    before = _resident_kb(path)
    released = release_mapped_pages(model.first.parameters())
    assert released >= 4 * 2**20 - 4096  # the whole weight, less a partial page at an end
    assert before - _resident_kb(path) >= released // 1024 - 4  # gone from the resident memory
    assert _resident_kb(path) >= 4 * 1024  # the other layer's pages stay
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key])  # read back from the file
    copy = load_model(TwoLayers, path, dtype=torch.bfloat16)  # a cast: the model's own memory, never released
    assert release_mapped_pages(copy.parameters()) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_a_mapping_with_a_written_page_is_never_released(tmp_path: Path) -> None:
    """Dropping a page that was written would bring the file's value back: such a mapping is left whole."""
    from musetalk.weights.loading import release_mapped_pages

    path = tmp_path / "two.pth"
    torch.save(TwoLayers().state_dict(), path)
    model = load_model(TwoLayers, path)
    with torch.no_grad():
        model.second.bias.fill_(3.0)  # a copy-on-write page in the mapping
    assert release_mapped_pages(model.parameters()) == 0
    assert torch.equal(model.second.bias, torch.full((1024,), 3.0))


def test_legacy_pickles_and_float16_files_load(tmp_path: Path) -> None:
    """Pre-zip pickles cannot be mapped (read whole); float16 values are cast up to a float32 model."""
    state = _random_state()
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    model = load_model(Small, legacy)
    assert torch.equal(model.conv.weight, state["conv.weight"])
    half = _save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "half.pth")
    model = load_model(Small, half)
    assert model.conv.weight.dtype == torch.float32
    assert torch.equal(model.conv.weight, state["conv.weight"].half().float())


def test_casting_in_small_chunks_reopens_the_mapping_and_stays_exact(tmp_path: Path) -> None:
    state = _random_state()
    opened = []

    def convert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        opened.append(1)
        return sd

    model = load_model(Small, _save(state, tmp_path / "small.pth"), dtype=torch.bfloat16, convert=convert,
                       chunk_bytes=1)
    assert len(opened) == len(state)  # one opening per tensor: each chunk of one byte is one tensor
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key].to(value.dtype)), key


def test_a_file_replaced_mid_load_is_refused(tmp_path: Path) -> None:
    path = _save(_random_state(), tmp_path / "small.pth")

    def convert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))  # "someone rewrote it" after the first opening
        return sd

    with pytest.raises(WeightsError, match="changed while it was being loaded"):
        load_model(Small, path, dtype=torch.bfloat16, convert=convert, chunk_bytes=1)


def test_key_and_shape_mismatches_are_named(tmp_path: Path) -> None:
    state = _random_state()
    broken = dict(state)
    del broken["head.1.bias"]
    broken["head.9.weight"] = torch.zeros(1)
    broken["conv.weight"] = torch.zeros(8, 3, 5, 5)
    path = _save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError) as exc:
        load_model(Small, path)
    message = str(exc.value)
    assert str(path) in message and "Small" in message
    assert "1 missing keys: head.1.bias" in message
    assert "1 unexpected keys: head.9.weight" in message
    assert "conv.weight: file (8, 3, 5, 5) vs model (8, 3, 3, 3)" in message
    assert exc.value.fix


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/musetalk-pwned-loading",))


def test_unsafe_and_missing_files_are_refused(tmp_path: Path) -> None:
    marker = Path("/tmp/musetalk-pwned-loading")
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.pth"
    torch.save({"conv.weight": _RunsCode()}, evil)
    with pytest.raises(WeightsError, match="refused"):
        load_model(Small, evil)
    assert not marker.exists(), "the payload ran"
    with pytest.raises(WeightsError, match="not found"):
        load_model(Small, tmp_path / "absent.pth", fix="download it")


def test_a_view_of_the_file_is_copied_not_shared(tmp_path: Path) -> None:
    """``convert`` may slice (the VAE's 1x1-conv attention weights): a non-contiguous view becomes its own tensor."""
    state = _random_state()
    stored = dict(state, **{"head.0.weight": state["head.0.weight"][:, :, None, None]})
    path = _save(stored, tmp_path / "legacy_shape.pth")

    def squeeze(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v[:, :, 0, 0] if v.ndim == 4 and k.startswith("head") else v for k, v in sd.items()}

    model = load_model(Small, path, convert=squeeze)
    assert model.head[0].weight.is_contiguous()
    assert torch.equal(model.head[0].weight, state["head.0.weight"])


_PEAK_CHILD = """
import json, sys, torch
from torch import nn
from musetalk.weights import load_model

def build():
    return nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(int(sys.argv[2]))])

def status_kb(field):  # VmRSS: now; VmHWM: peak of this process image (ru_maxrss also counts the parent's before exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

dtype = getattr(torch, sys.argv[3])
# One-time costs first (lazy imports, the cast kernels' code pages: ~8 MB that CI's runners showed as +0.15x):
# a one-layer load of the same file in the same dtypes. What is measured after it is what scales with the model.
load_model(lambda: nn.Sequential(nn.Linear(1024, 1024, bias=False)), sys.argv[1], dtype=dtype,
           convert=lambda sd: {"0.weight": sd["0.weight"]})
before = status_kb("VmRSS")
model = load_model(build, sys.argv[1], dtype=dtype, chunk_bytes=int(sys.argv[4]))
peak = status_kb("VmHWM")
params = sum(p.numel() * p.element_size() for p in model.parameters())
checksum = float(sum(p.float().sum() for p in model.parameters()))  # touch every weight: all of them resident now
print(json.dumps({"before_kb": before, "peak_kb": peak, "used_kb": status_kb("VmRSS"), "param_bytes": params,
                  "checksum": checksum}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS / VmHWM from /proc/self/status")
@pytest.mark.parametrize(("file_dtype", "run_dtype"), [("float32", "bfloat16"), ("float16", "float32"),
                                                       ("float32", "float32")])
def test_loading_never_holds_two_copies_of_the_weights(tmp_path: Path, file_dtype: str, run_dtype: str) -> None:
    """Peak RSS during load_model of a 96-256 MB model stays under 1.3x its parameter bytes above the baseline.

    The old loader (build with random init, read the whole file, copy in) peaked at 2-3x.
    """
    layers = 48
    torch.manual_seed(0)
    state = {f"{i}.weight": torch.randn(1024, 1024).to(getattr(torch, file_dtype)) for i in range(layers)}
    path = tmp_path / "mid.pth"
    torch.save(state, path)
    expected_sum = float(sum(v.to(getattr(torch, run_dtype)).float().sum() for v in state.values()))
    del state
    chunk = 8 * 2**20  # bounds the checkpoint pages held to ~8 MB + one 4 MB tensor in a 96-192 MB model
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(path), str(layers), run_dtype, str(chunk)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["checksum"] == pytest.approx(expected_sum, rel=1e-5)
    param_bytes = result["param_bytes"]
    assert param_bytes == layers * 1024 * 1024 * torch.tensor([], dtype=getattr(torch, run_dtype)).element_size()
    peak_above = (result["peak_kb"] - result["before_kb"]) * 1024
    assert peak_above <= 1.3 * param_bytes, (peak_above / param_bytes, result)
    # once every weight was used (mapped pages now resident too), still one copy
    used_above = (result["used_kb"] - result["before_kb"]) * 1024
    assert 0.9 * param_bytes <= used_above <= 1.3 * param_bytes, (used_above / param_bytes, result)


def test_bf16_vae_encoder_latents_stay_close_to_fp32(v15_golden: Path) -> None:
    """The avatar's latents come from the VAE encoder in the pipeline's dtype: bf16 is within 5 % of fp32.

    Measured on the golden crops: max abs error 0.014 = 2.9 % of the largest latent, RMS 1.9 %; fp32 stays exact.
    """
    import numpy as np

    from musetalk.stages.vae import VAE

    golden = np.load(v15_golden / "golden.npz")
    crops = golden["crops256"]
    fp32 = VAE.from_pretrained(v15_golden / "models" / "sd-vae").unet_input(crops).numpy()
    bf16_vae = VAE.from_pretrained(v15_golden / "models" / "sd-vae", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16_vae.model.parameters())
    bf16 = bf16_vae.unet_input(crops).numpy()
    np.testing.assert_allclose(fp32, golden["unet_input_latents"], atol=1e-4, rtol=0)
    assert np.abs(bf16 - fp32).max() <= 0.05 * np.abs(fp32).max()
    assert np.sqrt(((bf16 - fp32) ** 2).mean() / (fp32 ** 2).mean()) <= 0.03
