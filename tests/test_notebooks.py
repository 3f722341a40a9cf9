"""Every notebook runs headless, top to bottom, on tiny weights, in a kernel of this interpreter (nbclient).

The notebooks are also checked for hygiene: committed without outputs or execution counts, with clean metadata
and a per-notebook timeout (``metadata.execution.timeout``, which ``pytest --nbmake`` reads too).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
# the stage-by-stage walk-through, in reading order (each notebook stands alone)
NAMES = ["00_setup", "01_audio", "02_faces", "03_latents_and_unet", "04_blending", "05_generate", "06_profiling"]
KERNEL = "musetalk-tests"
ALLOWED_NOTEBOOK_METADATA = {"kernelspec", "language_info", "execution"}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra is not installed (pip install -e '.[notebooks]')")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed (pip install -e '.[notebooks]')")
pytest.importorskip("ipykernel", reason="the notebooks extra is not installed (pip install -e '.[notebooks]')")


def read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


@pytest.fixture(scope="module")
def kernel_env(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Environment of the notebook kernels: this interpreter, the checkout on sys.path, tiny weights, private
    cache and output folders. Returns the output folder."""
    root = tmp_path_factory.mktemp("notebooks")
    spec = root / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    # an explicit kernelspec: "python3" could resolve to another interpreter from a user-level kernelspec
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "musetalk tests", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root / "jupyter"))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        mp.setenv("MUSETALK_MODELS", str(tiny_models))
        mp.setenv("MUSETALK_CACHE", str(root / "cache"))
        mp.setenv("MUSETALK_OUTPUTS", str(root / "outputs"))
        yield root / "outputs"


def outputs_of(nb, mime: str) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if mime in out.get("data", {})]


@pytest.mark.parametrize("name", NAMES + ["07_evaluate"])
def test_notebook_is_committed_clean(name: str) -> None:
    nb = read(name)
    assert set(nb.metadata) <= ALLOWED_NOTEBOOK_METADATA, f"extra notebook metadata: {set(nb.metadata)}"
    assert nb.metadata["execution"]["timeout"] > 0
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"outputs committed in {name}: {cell.source[:60]}"
    for cell in nb.cells:
        assert cell.metadata == {}, f"cell metadata committed in {name}: {cell.metadata}"
    # thin notebooks (G9): the package does the work, a cell is a call or two and a picture
    longest = max(len(c.source.splitlines()) for c in code)
    assert longest <= 15, f"{name} has a {longest}-line cell: move that code into the package"
    assert "PYTORCH_ENABLE_MPS_FALLBACK" in code[0].source, "the first cell must set the MPS fallback before torch"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_tiny_weights(name: str, kernel_env: Path) -> None:
    nb = read(name)
    timeout = int(nb.metadata["execution"]["timeout"])
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, allow_errors=False,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    elapsed = time.perf_counter() - started
    assert elapsed < timeout, f"{name} took {elapsed:.0f} s, over its {timeout} s budget"
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "TINY random weights" in text, "the switch must say that the tiny weights are in use"
    assert outputs_of(nb, "image/png") or name == "00_setup", "a notebook that draws nothing"
    if name == "02_faces":
        assert outputs_of(nb, WIDGET_MIME), "the bbox_shift tuner was not displayed"
    if name == "05_generate":
        assert outputs_of(nb, WIDGET_MIME), "the live dashboard was not displayed"
        assert any("<video" in out["data"].get("text/html", "") for out in outputs_of(nb, "text/html"))
        assert (kernel_env / "05_generate.mp4").stat().st_size > 0
        assert sorted(p.name for p in (kernel_env / "batch").glob("*.mp4")) == ["batch-a.mp4", "batch-b.mp4"]
    if name == "06_profiling":
        assert len(list((kernel_env / "profiles").glob("*.json"))) == 4


# -- the helpers behind the notebooks' first cell -------------------------------------------------------------
def test_models_dir_switch(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    from musetalk.frontends import notebook
    from musetalk.errors import WeightsError

    monkeypatch.setattr(notebook, "REPO", None)  # ignore real weights a developer may have in models/
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny-models").symlink_to(tiny_models)  # as if written by an earlier notebook
    monkeypatch.setenv("MUSETALK_MODELS", str(tiny_models))
    assert notebook.models_dir() == tiny_models.resolve()
    assert "TINY random weights" in capsys.readouterr().out
    monkeypatch.setenv("MUSETALK_MODELS", str(tmp_path / "empty"))
    assert notebook.models_dir() == notebook.tiny_models_dir()
    assert "no real weights found" in capsys.readouterr().out
    assert notebook.models_dir(use_tiny=True) == notebook.tiny_models_dir()
    with pytest.raises(WeightsError, match="no complete v15 weights"):
        notebook.models_dir(use_tiny=False)


def test_clips_for_short_tiny_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from musetalk.frontends import notebook
    from musetalk.stages.audio import load_audio
    from musetalk.stream.video import probe

    monkeypatch.setenv("MUSETALK_OUTPUTS", str(tmp_path))
    assert len(load_audio(notebook.audio_clip(0.5))) == 8000
    assert len(load_audio(notebook.audio_clip(5.0))) == 80000  # longer than the 3.5 s sample: repeated
    assert notebook.audio_clip(None) == notebook.samples_dir() / "speech.wav"
    assert probe(notebook.source_clip(3)).num_frames == 3


@pytest.mark.slow
def test_evaluate_notebook_runs(kernel_env: Path) -> None:
    """07_evaluate scores the sample clip (random SyncNet when the real one is absent) and draws its charts."""
    nb = read("07_evaluate")
    client = nbclient.NotebookClient(nb, timeout=int(nb.metadata["execution"]["timeout"]), kernel_name=KERNEL,
                                     allow_errors=False, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "LSE-D" in text and outputs_of(nb, "image/png")
