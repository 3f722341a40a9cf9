"""What a killed run left behind is removed by the next run, and only that (musetalk.stream.leftovers).

SIGKILL runs no exit path, so the sweep relies on the kernel dropping a dead process's locks. These tests kill real
processes; the end-to-end version through the CLI is in test_faults.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from musetalk.stream.leftovers import Hold, sweep

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock: nothing is held or swept on Windows")

REPO = Path(__file__).resolve().parents[1]
PATTERN = re.compile(r"\.clip\.[0-9a-f]{4}\.partial\.mp4")
_HOLDER = """
import sys, time
from musetalk.stream.leftovers import Hold
holds = [Hold(p) for p in sys.argv[1:]]
print("held", flush=True)
sys.stdin.readline()
"""


def _age(path: Path, seconds: float = 600) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _holder(*paths: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, *map(str, paths)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_runs_entries_stay_and_a_killed_runs_go(tmp_path: Path) -> None:
    partial, folder = tmp_path / ".clip.beef.partial.mp4", tmp_path / ".clip.cafe.partial.mp4"
    partial.write_bytes(b"half a video")
    folder.mkdir()
    (folder / "inside").write_bytes(b"x")
    holder = _holder(partial, folder)
    try:
        for path in (partial, folder):
            _age(path)
        assert sweep(tmp_path, PATTERN) == []  # held by a live process, however old
        assert partial.exists() and folder.exists()
        holder.kill()  # SIGKILL: the process's exit code never runs; the kernel drops its locks
        holder.wait(timeout=30)
        assert sorted(sweep(tmp_path, PATTERN)) == sorted([partial, folder])
        assert not partial.exists() and not folder.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_only_old_unheld_entries_of_the_pattern_are_removed(tmp_path: Path) -> None:
    fresh = tmp_path / ".clip.0001.partial.mp4"  # just created by a run that does not hold it yet
    fresh.write_bytes(b"")
    user_files = [tmp_path / ".clip.mp4.partial", tmp_path / "clip.mp4", tmp_path / ".clip.0002.partial.mp4.bak"]
    for path in user_files:
        path.write_bytes(b"the user's")
        _age(path)
    assert sweep(tmp_path, PATTERN) == []
    assert all(p.exists() for p in [fresh, *user_files])
    _age(fresh)
    assert sweep(tmp_path, PATTERN) == [fresh]


def test_this_process_holds_what_it_holds(tmp_path: Path) -> None:
    """A lock is per open file: the sweep, in the same process as the writer, still sees the entry as held."""
    partial = tmp_path / ".clip.abcd.partial.mp4"
    partial.write_bytes(b"")
    _age(partial)
    hold = Hold(partial)
    assert sweep(tmp_path, PATTERN) == [] and partial.exists()
    hold.release()
    hold.release()  # twice is fine
    assert sweep(tmp_path, PATTERN) == [partial]


def test_a_missing_folder_is_nothing_to_sweep(tmp_path: Path) -> None:
    assert sweep(tmp_path / "absent", PATTERN) == []
