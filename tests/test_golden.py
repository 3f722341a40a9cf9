"""The golden verifier on every set in ../shared/golden (CI always has it), plus the verifier's own contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GOLDEN, SHARED

SETS = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) if GOLDEN.is_dir() else []


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is absent (a user's clone); CI always has it")
@pytest.mark.parametrize("name", SETS)
def test_golden_set_passes(name: str) -> None:
    """`python -m musetalk.testing.golden SET` prints PASS for every stage and exits 0."""
    proc = subprocess.run([sys.executable, "-m", "musetalk.testing.golden", str(GOLDEN / name)],
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stage_lines = [line for line in proc.stdout.splitlines() if line.startswith("  ") and "->" not in line]
    assert stage_lines and all(line.strip().startswith("PASS") for line in stage_lines)


def test_there_are_golden_sets_when_shared_exists() -> None:
    if SHARED.is_dir():
        assert "musetalk-v15-tiny" in SETS


def test_verifier_fails_on_unknown_folder(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "musetalk.testing.golden", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "FAIL" in proc.stdout


def test_verifier_reports_a_wrong_result_as_fail(tmp_path: Path) -> None:
    """A set whose expected output was altered must FAIL: the verifier never reads expected arrays as inputs."""
    import json

    import numpy as np

    from musetalk.testing.golden_musetalk import verify

    src = GOLDEN / "musetalk-v15-tiny"
    if not src.is_dir():
        pytest.skip("../shared is absent (a user's clone); CI always has it")
    (tmp_path / "inputs").symlink_to(src / "inputs")
    (tmp_path / "models").symlink_to(src / "models")
    manifest = json.loads((src / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    golden = dict(np.load(src / "golden.npz"))
    golden["unet_output_latents"] = golden["unet_output_latents"] + 0.01
    golden["coords"] = golden["coords"] + 1
    np.savez(tmp_path / "golden.npz", **golden)
    rows = {r.stage: r for r in verify(tmp_path, groups=("audio", "faces", "models"))}
    assert rows["unet: one step at t=0"].passed is False
    assert rows["faces: crop boxes (bbox_shift 0)"].passed is False
    assert rows["audio: windows @ 25 fps"].passed is True


def test_verifier_runs_only_the_stage_groups_asked_for(capsys: pytest.CaptureFixture) -> None:
    """``--stages`` (a backend's check runs models,chained alone); an unknown group is a clear error, not a pass."""
    from musetalk.testing.golden import main

    src = GOLDEN / "musetalk-v15-tiny"
    if not src.is_dir():
        pytest.skip("../shared is absent (a user's clone); CI always has it")
    assert main(["--stages", "audio", str(src)]) == 0
    out = capsys.readouterr().out
    assert "audio: windows @ 25 fps" in out and "unet:" not in out and "faces:" not in out
    assert main(["--stages", "audio,lips", str(src)]) == 2
    assert "unknown stage groups ['lips']" in capsys.readouterr().err
