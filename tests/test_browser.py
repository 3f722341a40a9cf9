"""One end-to-end test as a person would do it: JupyterLab in headless Chromium runs 02_faces on tiny weights, then
the bbox_shift slider is moved with the keyboard and the crop on screen must change.

Everything stays on this machine: JupyterLab listens on a free loopback port with a token and opens no browser,
Chromium (Debian's, headless, no sandbox) resolves every host but 127.0.0.1 to nothing and has its background
services off, and Playwright aborts any request that is not for the local server. The notebook runs from a copy in a
temporary folder, so JupyterLab's autosave cannot write outputs into the committed file.

Needs Debian's chromium (``apt-get install chromium``) and the ``playwright`` Python package (no ``playwright
install``: the system browser is used); skips, saying which is missing, without them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
KERNEL = "musetalk-browser"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# Chromium flags: headless in a container, and no traffic beyond the loopback server
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-default-apps", "--disable-sync",
    "--disable-extensions", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--metrics-recording-only", "--safebrowsing-disable-auto-update", "--password-store=basic",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
# the first error output of the open notebook ("Name: value"), or null
FIRST_ERROR_JS = """() => {
    const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
    for (let i = 0; i < cells.length; i++) {
        const outputs = cells.get(i).outputs;
        for (let j = 0; outputs && j < outputs.length; j++) {
            const out = outputs.get(j).toJSON();
            if (out.output_type === 'error') return out.ename + ': ' + out.evalue;
        }
    }
    return null;
}"""
SERVER_START_S = 90
NOTEBOOK_RUN_S = 150


def chromium_path() -> str | None:
    found = [p for p in CHROMIUM_CANDIDATES if os.access(p, os.X_OK)] or [shutil.which("chromium") or ""]
    return found[0] or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """A JupyterLab server on a free loopback port serving a copy of 02_faces; yields (base url, token, root)."""
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install -e '.[notebooks]')")
    root = tmp_path_factory.mktemp("lab")
    nb = json.loads((REPO / "notebooks" / "02_faces.ipynb").read_text())
    nb["metadata"]["kernelspec"] = {"name": KERNEL, "display_name": "musetalk browser test", "language": "python"}
    (root / "02_faces.ipynb").write_text(json.dumps(nb))
    jupyter = root / ".jupyter"
    spec = jupyter / "path" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "musetalk browser test", "language": "python"}))
    env = {**os.environ,
           "JUPYTER_PATH": str(jupyter / "path"), "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
           "JUPYTER_DATA_DIR": str(jupyter / "data"), "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "MUSETALK_MODELS": str(tiny_models), "MUSETALK_CACHE": str(root / "cache"),
           "MUSETALK_OUTPUTS": str(root / "outputs")}
    port, token = free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    with open(root / "jupyterlab.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly"]
            + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_server(server, base, token, root / "jupyterlab.log")
            yield base, token, root
        finally:
            stop_server(server, base, token)


def wait_for_server(server: subprocess.Popen, base: str, token: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while True:
        assert server.poll() is None, "JupyterLab exited: " + log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "JupyterLab did not start: " + log.read_text()[-2000:]
        time.sleep(0.5)


def stop_server(server: subprocess.Popen, base: str, token: str) -> None:
    """Ask the server to shut down (which stops its kernel too); terminate its process group if it does not."""
    try:
        request = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
        urllib.request.urlopen(request, timeout=5).close()
        server.wait(timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        pass
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # the group of the server started above (and its kernels)
        server.wait(timeout=15)


def pixels(png: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)


def test_bbox_shift_slider_changes_the_crop_on_screen(lab: tuple[str, str, Path]) -> None:
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    base, token, root = lab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # belt and braces: only the local server is ever asked for anything
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                       else route.abort())
            page.goto(f"{base}/lab/tree/02_faces.ipynb?reset&token={token}", timeout=60_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=60_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            # every code cell done (numbered prompts, no [*]), or an error that stopped the run
            page.wait_for_function(f"""() => {{
                const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
                return ({FIRST_ERROR_JS})() !== null
                    || (prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent)));
            }}""", timeout=NOTEBOOK_RUN_S * 1000)
            error = page.evaluate(FIRST_ERROR_JS)
            assert error is None, f"02_faces failed in JupyterLab: {error}"
            crop = page.locator("img.musetalk-crop")
            status = page.locator(".musetalk-bbox-tuner .widget-html-content").first
            crop.scroll_into_view_if_needed()
            page.wait_for_function("() => document.querySelector('img.musetalk-crop')?.naturalWidth > 0")
            before_text = status.inner_text()
            assert "bbox_shift 5 " in before_text, before_text  # the notebook's last cell set it from Python
            before = crop.screenshot(path=str(root / "crop-before.png"))
            before_src = crop.get_attribute("src")
            # move the slider one step with the keyboard, as a person would
            handle = page.locator(".musetalk-bbox-shift .noUi-handle")
            handle.focus()
            handle.press("ArrowRight")
            page.wait_for_function("src => document.querySelector('img.musetalk-crop').src !== src", arg=before_src,
                                   timeout=60_000)
            page.wait_for_function("() => document.querySelector('img.musetalk-crop').complete")
            assert "bbox_shift 6 " in status.inner_text()
            after = crop.screenshot(path=str(root / "crop-after.png"))
            page.screenshot(path=str(root / "lab.png"), full_page=True)  # for a person looking into a failure
        finally:
            browser.close()
    a, b = pixels(before), pixels(after)
    assert a.shape == b.shape
    changed = np.abs(a - b).max(axis=2) > 16
    assert changed.mean() > 0.05, f"only {changed.mean():.1%} of the crop's pixels changed on screen"
