"""Safe, strict weight loading: every bad checkpoint gives a WeightsError naming the file and the fix."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from musetalk.errors import WeightsError
from musetalk.weights import load_into, load_state_dict

REPO = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/musetalk-pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle below is protocol 4 on purpose
def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = Path("/tmp/musetalk-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    torch.save({"weight": _RunsCode()}, path)
    with pytest.raises(WeightsError, match="refused"):
        load_state_dict(path)
    assert not marker.exists(), "the payload ran"
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(WeightsError):
        load_state_dict(raw)
    assert not marker.exists()


def test_missing_truncated_empty_and_lfs(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found") as exc:
        load_state_dict(tmp_path / "nope.pth", fix="run musetalk download")
    assert exc.value.fix == "run musetalk download"
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:600])
    with pytest.raises(WeightsError, match="truncated|corrupt|cannot load"):
        load_state_dict(truncated)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_state_dict(tmp_path / "empty.bin")
    lfs = tmp_path / "lfs.bin"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(WeightsError, match="LFS"):
        load_state_dict(lfs)


def test_nested_state_dict_and_non_tensor_content(tmp_path: Path) -> None:
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": {"a": torch.zeros(2)}}, path)
    assert list(load_state_dict(path)) == ["a"]
    bad = tmp_path / "list.pth"
    torch.save([1, 2, 3], bad)
    with pytest.raises(WeightsError, match="state dict"):
        load_state_dict(bad)


def test_strict_load_reports_key_and_shape_mismatch() -> None:
    module = torch.nn.Linear(3, 2)
    with pytest.raises(WeightsError, match="missing keys: bias"):
        load_into(module, {"weight": torch.zeros(2, 3)}, source="x.pth")
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_into(module, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, source="x.pth")
    with pytest.raises(WeightsError, match="unexpected keys: extra"):
        load_into(module, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "extra": torch.zeros(1)},
                  source="x.pth")
    # float16 values load into a float32 module (the goldens store BiSeNet/Whisper that way)
    load_into(module, {"weight": torch.ones(2, 3, dtype=torch.float16), "bias": torch.zeros(2)}, source="x.pth")
    assert module.weight.dtype == torch.float32 and float(module.weight.detach().sum()) == 6.0


def test_no_unsafe_loading_anywhere_in_the_package() -> None:
    source = "\n".join(p.read_text() for p in (REPO / "musetalk").rglob("*.py"))
    assert "weights_only=False" not in source
    assert not re.search(r"torch\.load\s*=", source), "torch.load must never be patched"
    calls = re.findall(r"torch\.load\(([^)]*)\)", source)
    assert all("weights_only=True" in c for c in calls), calls


def test_safetensors_files_load_and_corrupt_ones_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(4.0)}, str(path))
    assert torch.equal(load_state_dict(path)["w"], torch.arange(4.0))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:20])
    with pytest.raises(WeightsError, match="cannot read"):
        load_state_dict(broken)
