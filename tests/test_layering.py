"""The layering contract (pyproject.toml [tool.importlinter]) holds, and it does fail on a violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([*LINT, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers() -> None:
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout


def test_a_stage_importing_the_stream_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(REPO / "musetalk", tmp_path / "musetalk", ignore=shutil.ignore_patterns("__pycache__"))
    vae = tmp_path / "musetalk" / "stages" / "vae.py"
    vae.write_text(vae.read_text() + "\n\ndef _bad():\n    from musetalk.stream.pipeline import pingpong\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0
    assert "musetalk.stages is not allowed to import musetalk.stream" in proc.stdout, proc.stdout
    assert "musetalk.stages.vae -> musetalk.stream.pipeline" in proc.stdout


def test_product_code_never_imports_testing(tmp_path: Path) -> None:
    shutil.copytree(REPO / "musetalk", tmp_path / "musetalk", ignore=shutil.ignore_patterns("__pycache__"))
    cli = tmp_path / "musetalk" / "frontends" / "cli.py"
    cli.write_text(cli.read_text() + "\n\ndef _bad():\n    from musetalk.testing import golden_common\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0 and "musetalk.frontends is not allowed to import musetalk.testing" in proc.stdout
