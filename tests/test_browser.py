"""A real browser runs notebook 04 in JupyterLab, moves sliders and presses Train.

What only a browser shows: the widgets render from the kernel's messages (the JupyterLab widget
extension is installed and speaks the kernel's protocol version), a keyboard move of a slider
reaches the kernel and the parameter count comes back, and a press of Train trains and draws new
figures into the page; a keyboard move of the toy panel's conflict slider retrains the toy and
redraws its figure and run table, and so does its Retrain button. Debian's ``chromium`` is driven by ``playwright`` (its own browser download,
``playwright install``, is never used); ``make browser-deps`` installs both. Without them the test
skips, except under CI (``CI`` set), where it fails.

The notebook runs in fast mode (``CGCLORA_FAST=1``) from a temporary copy, against a JupyterLab
with its own settings (all cells attached to the page, no news) and a random token. A screenshot
of the panel after training is saved to ``test-artifacts/browser_04.png`` (one of the gate
explorer to ``browser_04_explorer.png``, one of the toy panel to ``browser_04_toy.png``; on
failure, the page to ``browser_04_failure.png``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import IN_CI

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_gate_explorer.ipynb"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
LAB_SETTINGS = {  # JupyterLab user settings for the test server
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}
RUN_ALL_SECONDS = 600  # the whole notebook in fast mode, model load included; 40 s to 4.5 min measured
TRAIN_SECONDS = 300  # one press of Train in fast mode; about 10 s when quiet
TOY_SECONDS = 60  # one retraining of the toy panel: 1-2 s measured on a busy machine


def _require_browser() -> None:
    """Skip (locally) or fail (under CI) when chromium or playwright is missing."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Debian chromium ({CHROMIUM})")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the Python package playwright (requirements-test.txt)")
    if missing:
        message = f"real-browser test needs {' and '.join(missing)}: run `make browser-deps`"
        if IN_CI:
            pytest.fail(message + " (CI is set, so this is a failure, not a skip)")
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, server: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer {url} in {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free port, serving a copy of notebook 04; yields its URL."""
    _require_browser()
    work = tmp_path / "notebooks"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    settings = tmp_path / "lab-settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "CGCLORA_FAST": "1", "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces")}
    log = tmp_path / "jupyter.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
             f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.token={token}",
             f"--ServerApp.root_dir={work}"],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", server, log)
        yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}", log
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the kernel it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# JavaScript run in the page: the state of the notebook's cells.
PROMPTS_DONE = """() => {
    const errors = [...document.querySelectorAll('[data-mime-type="application/vnd.jupyter.error"]')];
    if (errors.length) return 'error: ' + errors[0].innerText.slice(-1500);
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
        .map(e => e.textContent.trim());
    return prompts.length > 0 && prompts.every(t => /^\\[\\d+\\]:$/.test(t));
}"""
IMAGES = "(selector) => [...document.querySelectorAll(selector + ' img')].map(i => i.src)"
IMAGES_PAINTED = """() => [...document.querySelectorAll(
    '.cgclora-gate-plot img, .cgclora-panel-plot img, .cgclora-toy-plot img')]
    .every(i => i.complete && i.naturalHeight > 0)"""
TOY_RUN = """(n) => new RegExp(`run #${n}, `).test(document.querySelector('.cgclora-toy-status').innerText)"""


def _counts(text: str) -> tuple[int, int]:
    """(trainable, gate) parameters from the panel's count: "<trainable> trainable ... gates <n>"."""
    trainable = re.match(r"\s*([\d,]+) trainable parameters", text)
    gate = re.search(r"gates ([\d,]+)", text)
    assert trainable and gate, f"unexpected parameter-count text {text!r}"
    return int(trainable.group(1).replace(",", "")), int(gate.group(1).replace(",", ""))


def _screenshot(page, selector: str, path: Path) -> None:
    """Scroll the notebook so that ``selector`` starts at the top, let it paint, and shoot it."""
    element = page.locator(selector)
    element.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    box = element.bounding_box()
    page.screenshot(path=str(path), clip={"x": box["x"], "y": box["y"], "width": box["width"],
                                          "height": min(box["height"], 2200 - box["y"])})


def _check_toy_panel(page) -> None:
    """The toy panel, after the notebook's own cells drove it: a keyboard move of its conflict
    slider reaches the kernel, which retrains the toy; the status, the figure and the run table
    follow. Then its Retrain button does the same."""
    status = page.locator(".cgclora-toy-status")
    runs = int(re.search(r"run #(\d+), ", status.inner_text()).group(1))
    figure = page.evaluate(IMAGES, ".cgclora-toy-plot")
    assert len(figure) == 1, figure
    conflict = page.locator(".cgclora-toy-conflict")
    old = float(conflict.locator(".widget-readout").inner_text())
    conflict.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowLeft")  # one step of 0.05
    page.wait_for_function(TOY_RUN, arg=runs + 1, timeout=TOY_SECONDS * 1000)
    assert float(conflict.locator(".widget-readout").inner_text()) == pytest.approx(old - 0.05)
    assert re.search(rf"run #{runs + 1}, cgc-lora: held-out loss A [\d.e-]+, B [\d.e-]+; [\d,]+ parameters",
                    status.inner_text()), status.inner_text()
    page.wait_for_function(f"(old) => JSON.stringify(({IMAGES})('.cgclora-toy-plot')) !== JSON.stringify(old)",
                           arg=figure, timeout=20_000)
    rows = page.locator(".cgclora-toy-plot table tbody tr")
    rows.first.wait_for(timeout=20_000)
    assert rows.count() == min(runs + 1, 8)  # the latest runs, up to ToyPanel.SHOWN_RUNS
    page.locator("button.cgclora-toy-train").click()  # Retrain: the same configuration once more
    page.wait_for_function(TOY_RUN, arg=runs + 2, timeout=TOY_SECONDS * 1000)


def test_notebook_04_in_a_real_browser(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    url, log = lab
    ARTIFACTS.mkdir(exist_ok=True)
    start = time.monotonic()
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
            headless=True, viewport={"width": 1400, "height": 2200})
        page = context.pages[0] if context.pages else context.new_page()
        try:
            page.goto(url)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
            page.get_by_text(re.compile(r"\| Idle$")).first.wait_for(timeout=60_000)  # kernel ready
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            state = page.wait_for_function(PROMPTS_DONE, timeout=RUN_ALL_SECONDS * 1000).json_value()
            assert state is True, f"a notebook cell failed in the browser:\n{state}"
            ran_all = time.monotonic() - start

            _check_toy_panel(page)  # the toy panel, near the top of the notebook

            # A keyboard move of the rank slider: the count comes back from the kernel.
            count = page.locator(".cgclora-param-count")
            before = count.inner_text()
            rank = page.locator(".cgclora-rank")
            old_rank = int(rank.locator(".widget-readout").inner_text())
            rank.locator(".noUi-handle").focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("(old) => document.querySelector('.cgclora-param-count')"
                                   ".innerText !== old", arg=before, timeout=20_000)
            after = count.inner_text()
            assert int(rank.locator(".widget-readout").inner_text()) == old_rank + 1
            # experts' parameters grow linearly with the rank; the gates do not depend on it
            (trainable, gate), (trainable_after, gate_after) = _counts(before), _counts(after)
            assert gate_after == gate
            assert trainable_after - gate == (trainable - gate) * (old_rank + 1) // old_rank, (before, after)
            assert f"active rank {4 * (old_rank + 1)}," in after  # 2 common + 2 specific experts

            # Train: new figures in the panel, and the run's gates shown in the explorer.
            explorer_before = page.evaluate(IMAGES, ".cgclora-gate-plot")
            assert len(explorer_before) == 2 and not page.evaluate(IMAGES, ".cgclora-panel-plot")
            page.locator("button.cgclora-train").click()
            page.wait_for_function(
                "() => /seed\\(s\\) in|failed/.test(document.querySelector('.cgclora-train-status').innerText)",
                timeout=TRAIN_SECONDS * 1000)
            status = page.locator(".cgclora-train-status").inner_text()
            assert f"#1 2c+2s r{old_rank + 1}: 2 steps x 1 seed(s) in" in status, status
            page.wait_for_function(f"() => ({IMAGES})('.cgclora-panel-plot').length === 2",
                                   timeout=20_000)
            page.locator(".cgclora-panel-plot table").wait_for(timeout=20_000)  # the score table
            page.wait_for_function(
                f"(old) => JSON.stringify(({IMAGES})('.cgclora-gate-plot')) !== JSON.stringify(old)",
                arg=explorer_before, timeout=20_000)
            assert page.locator(".cgclora-cluster select").input_value() == f"panel #1 2c+2s r{old_rank + 1}"
            # The explorer's other view: the run's expert contribution shares, new figures.
            gates_shown = page.evaluate(IMAGES, ".cgclora-gate-plot")
            changed = f"(old) => JSON.stringify(({IMAGES})('.cgclora-gate-plot')) !== JSON.stringify(old)"
            page.locator(".cgclora-view button", has_text="contribution shares").click()
            try:
                page.wait_for_function(changed, arg=gates_shown, timeout=20_000)
            except Exception:  # seen once in CI (1 run in 4): the toggle showed selected, no redraw
                print("the contribution view did not redraw after one click: toggling again")
                page.locator(".cgclora-view button", has_text="gate weights").click()
                page.locator(".cgclora-view button", has_text="contribution shares").click()
                page.wait_for_function(changed, arg=gates_shown, timeout=20_000)
            page.wait_for_function(IMAGES_PAINTED, timeout=20_000)
            _screenshot(page, ".cgclora-expert-panel", ARTIFACTS / "browser_04.png")
            _screenshot(page, ".cgclora-gate-explorer", ARTIFACTS / "browser_04_explorer.png")
            _screenshot(page, ".cgclora-toy-panel", ARTIFACTS / "browser_04_toy.png")
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "browser_04_failure.png"))
            print(f"jupyter log (end):\n{log.read_text()[-4000:]}")
            raise
        finally:
            context.close()
    print(f"browser test: ran all cells in {ran_all:.0f} s, {time.monotonic() - start:.0f} s in all")
