"""Type checking: mypy over the package reports nothing (settings in pyproject.toml [tool.mypy]), and the check does
fail on a violation.

mypy's cache lives in pytest's cache folder (.pytest_cache/d/mypy), not in the repository: the first run analyses
torch, numpy, transformers and diffusers (a minute or two on a small machine); later runs take seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

MYPY_TIMEOUT_S = 900  # a cold cache on a loaded 2-core machine


@pytest.fixture(scope="session")
def mypy_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    return cache.mkdir("mypy") if cache is not None else tmp_path_factory.mktemp("mypy-cache")


def mypy(cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    """``mypy musetalk`` in ``cwd`` with the repository's configuration."""
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                           "--cache-dir", str(cache_dir), "musetalk"],
                          cwd=cwd, capture_output=True, text=True, timeout=MYPY_TIMEOUT_S)


def test_the_package_type_checks(mypy_cache: Path) -> None:
    proc = mypy(REPO, mypy_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout, proc.stdout


def test_an_ill_typed_stage_fails_the_check(tmp_path: Path, mypy_cache: Path) -> None:
    shutil.copytree(REPO / "musetalk", tmp_path / "musetalk", ignore=shutil.ignore_patterns("__pycache__"))
    blending = tmp_path / "musetalk" / "stages" / "blending.py"
    source = blending.read_text()
    first_new_line = source.count("\n") + 3
    # a wrong return type, and (stages are held to the strict settings) a function without annotations
    blending.write_text(source + '\n\ndef _bad() -> int:\n    return "x"\n\n\ndef _untyped(x):\n    return x\n')
    proc = mypy(tmp_path, mypy_cache)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    where = "musetalk/stages/blending.py"
    assert (f'{where}:{first_new_line + 1}: error: Incompatible return value type (got "str", expected "int")'
            in proc.stdout), proc.stdout
    assert (f"{where}:{first_new_line + 4}: error: Function is missing a type annotation  [no-untyped-def]"
            in proc.stdout), proc.stdout
