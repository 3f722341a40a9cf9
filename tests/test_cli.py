"""The `musetalk` command: clear errors with exit 2 (never a traceback), doctor, offline download, demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "musetalk", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO)


def test_generate_errors_are_one_clear_message(tmp_path: Path, tiny_models: Path) -> None:
    out = tmp_path / "out.mp4"
    cases = {
        "missing source": (["--source", str(tmp_path / "nope.png"), "--audio", str(SAMPLES / "speech.wav")],
                           "source not found"),
        "weights missing": (["--source", str(SAMPLES / "face.png"), "--audio", str(SAMPLES / "speech.wav"),
                             "--models", str(tmp_path / "empty")], "musetalk download"),
        "unknown version": (["--source", str(SAMPLES / "face.png"), "--audio", str(SAMPLES / "speech.wav"),
                             "--models", str(tiny_models), "--version", "v9"], "invalid choice: 'v9'"),
    }
    for name, (args, needle) in cases.items():
        proc = run("generate", *args, "--output", str(out), env={"MUSETALK_CACHE": str(tmp_path / "c")})
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (name, proc.stderr)
        # our own errors name their fix; argparse's name the valid choices
        assert "fix:" in proc.stderr or "choose from 'v15', 'v1'" in proc.stderr
        assert not out.exists()


def test_doctor_reports_problems_with_fixes(tmp_path: Path, tiny_models: Path) -> None:
    bad = run("doctor", "--models", str(tmp_path / "nothing"))
    assert bad.returncode == 1 and "fix: musetalk download" in bad.stdout and "generation cannot run" in bad.stdout
    good = run("doctor", "--models", str(tiny_models))
    assert good.returncode == 0, good.stdout
    assert "v15 UNet shapes" in good.stdout and "landmarks: dlib" in good.stdout


def test_download_fails_fast_offline(tmp_path: Path) -> None:
    proc = run("download", "--dir", str(tmp_path / "m"), env={"HF_HUB_OFFLINE": "1"}, timeout=60)
    assert proc.returncode == 2 and "HF_HUB_OFFLINE" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("download", "--dir", str(tmp_path / "m"), env={"HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=60)
    assert proc.returncode == 2 and "cannot reach" in proc.stderr


def test_demo_falls_back_to_tiny_weights_with_a_plain_message(tmp_path: Path) -> None:
    """The README's main job on a machine without real weights or network: says so, then still makes a video."""
    import numpy as np

    from musetalk.stages.audio import load_audio
    from musetalk.stream.video import probe

    out = tmp_path / "demo.mp4"
    proc = run("demo", "--models", str(tmp_path / "models"), "--tiny-dir", str(tmp_path / "tiny"), "--output",
               str(out), "--source", str(SAMPLES / "face.png"),
               env={"HF_ENDPOINT": "http://127.0.0.1:9", "MUSETALK_CACHE": str(tmp_path / "c")}, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cannot be downloaded" in proc.stdout and "TINY RANDOM WEIGHTS" in proc.stdout
    info = probe(out)
    assert info.has_audio and info.num_frames == int(np.floor(len(load_audio(SAMPLES / "speech.wav")) / 16000 * 25))


def test_avatar_prepare_list_rm(tmp_path: Path, tiny_models: Path) -> None:
    env = {"MUSETALK_CACHE": str(tmp_path / "cache")}
    proc = run("avatar", "prepare", "--source", str(SAMPLES / "face.png"), "--name", "anna", "--models",
               str(tiny_models), "--dtype", "fp32", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "suggested bbox_shift range" in proc.stdout
    assert (tmp_path / "cache" / "avatars" / "anna" / "meta.json").is_file()
    assert "face.png" in run("avatar", "list", env=env).stdout
    bad = run("avatar", "prepare", "--source", str(SAMPLES / "face.png"), "--name", "../escape", "--models",
              str(tiny_models), env=env)
    assert bad.returncode == 2 and "invalid avatar name" in bad.stderr
    assert run("avatar", "rm", "anna", env=env).returncode == 0
    assert not (tmp_path / "cache" / "avatars" / "anna").exists()


def test_import_has_no_side_effects() -> None:
    code = "import sys, musetalk, musetalk.frontends.cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", "importing musetalk or its CLI must not import torch"


def test_ctrl_c_mid_run_leaves_nothing_behind(tmp_path: Path, tiny_models: Path) -> None:
    """A real SIGINT while frames are being encoded: exit 130, no output, no partial file, no temp avatar."""
    import signal
    import time

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "MUSETALK_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "musetalk", "generate", "--source", str(SAMPLES / "face.png"),
                             "--audio", str(SAMPLES / "speech.wav"), "--output", str(out_dir / "out.mp4"),
                             "--models", str(tiny_models), "--dtype", "fp32", "--batch-size", "2", "--quiet"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list(out_dir.glob(".*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # wait until the video is being written
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(out_dir.iterdir()) == [], "no output and no partial file"
    assert list(tmp.iterdir()) == [], "the temporary avatar must be removed"


def test_public_api_is_importable_lazily() -> None:
    code = ("import sys, musetalk; assert 'torch' not in sys.modules; "
            "from musetalk import MuseTalkPipeline, Avatar, preset, Profiler, resolve_device, WeightsError; "
            "print(MuseTalkPipeline.__module__, sorted(set(musetalk.__all__) - set(dir(musetalk))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "musetalk.stream.pipeline []"
