"""Notebook 00 in a real browser: JupyterLab 4 in the system's Chromium, driven by Playwright.

What papermill cannot check: the widgets. JupyterLab runs every cell (Run > Run All Cells, smoke mode), then the slice
viewer's "slice" slider is moved with the keyboard and the kernel must send a new picture, and the NiiVue 3D viewer's
WebGL canvas must draw something. A small notebook of notebooks 03 and 05's widgets (the prompt explorer, the frame
slider) checks that their pictures are drawn at their own size beside a wide text box and slider. Screenshots go to the test's tmp dir and, when DIFFUGTS_SCREENSHOTS names a
directory, there too (docs/screenshots/ keeps a committed set).

Needs Chromium (Debian: `apt-get install chromium`; never `playwright install`) and the playwright package: without
them the test is skipped, except under CI=true, where it fails.
"""

import importlib.util
import os
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from tests.browser_support import CHROMIUM_ARGS, find_chromium, jupyter_lab, picture_stats

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "00_quickstart.ipynb"
RUN_TIMEOUT_MS = 600_000  # Run All in smoke mode: 60-120 s on two busy CPU cores; generous for a loaded CI worker
KERNEL_TIMEOUT_S = 120  # a kernel starts in seconds; a busy CI worker takes longer
CANVAS_TIMEOUT_S = 60  # NiiVue loads its volumes asynchronously, then draws
SHOTS = {"page": "00_quickstart_lab.png", "before": "00_quickstart_slice_viewer_before.png",
         "after": "00_quickstart_slice_viewer_after.png", "3d": "00_quickstart_niivue_3d.png"}

pytestmark = pytest.mark.notebook

# The state of the open notebook, for the wait after Run All: the kernel's status (the toolbar's execution indicator),
# the code cells' prompts ("[ ]:", "[*]:", "[3]:") and the text of stderr outputs (tracebacks land there).
NOTEBOOK_STATE_JS = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!panel) return null;
  const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  const kernel = panel.querySelector('.jp-Toolbar-kernelName');
  const tab = document.querySelector('.lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel');
  return {
    name: tab ? tab.textContent.trim() : null,
    // the indicator says "idle" before any kernel is there ("No Kernel | Initializing"): a kernel name is needed too
    status: indicator && kernel && !/No Kernel/.test(kernel.textContent) ? indicator.dataset.status : null,
    dialog: [...document.querySelectorAll('.jp-Dialog')].map(e => e.textContent).join(' | '),
    prompts: [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim()),
    stderr: [...panel.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
      .map(e => e.textContent),
  };
}"""
RUN_FINISHED_JS = f"""() => {{
  const state = ({NOTEBOOK_STATE_JS})();
  return !!state && (!!state.dialog || state.status === 'idle' && !state.prompts.some(p => p.includes('*'))
    && state.prompts.some(p => /\\[\\d+\\]/.test(p)));
}}"""
KERNEL_IDLE_JS = f"() => {{ const state = ({NOTEBOOK_STATE_JS})(); return !!state && state.status === 'idle'; }}"
ERROR_LINE = re.compile(r"Traceback|^\s*\w*(Error|Exception)\b", re.MULTILINE)


def _browser_or_skip() -> str:
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install playwright; its own browser download is not needed)")
    chromium = find_chromium()
    if chromium is None:
        missing.append("Chromium at /usr/bin/chromium or on PATH (apt-get install chromium)")
    if importlib.util.find_spec("papermill") is None:
        missing.append("papermill (the notebooks extra)")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}: CI must install it", pytrace=False)
        pytest.skip(message)
    return chromium


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A private JupyterLab server holding notebook 00, parameters injected for smoke mode (nothing run yet)."""
    _browser_or_skip()
    import papermill

    base = tmp_path_factory.mktemp("jupyterlab")
    with jupyter_lab(base) as server:
        papermill.execute_notebook(str(NOTEBOOK), str(server.root / "quickstart.ipynb"), prepare_only=True,
                                   parameters={"SMOKE": True, "OUTPUT_DIR": str(base / "out")}, progress_bar=False)
        nbformat.write(_layout_notebook(), server.root / "layouts.ipynb")
        yield server


def _layout_notebook():
    """Notebooks 03 and 05's picture widgets on small stand-in pictures (no model): a frame slider and a prompt
    explorer, whose 420 px text box once stretched a 360 px picture to the box's width."""
    code = ["import numpy as np\nfrom diffugts_core import viz\n"
            "frames = [np.full((64, 64), hu, np.float32) for hu in (-100.0, 0.0, 100.0)]\n"
            "viz.frame_slider(frames, ['-100 HU', '0 HU', '100 HU'], description='step')",
            "import matplotlib.pyplot as plt\n"
            "def render(text):\n    fig, ax = plt.subplots(figsize=(3.6, 3.6))\n    ax.set_title(text, fontsize=8)\n"
            "    return viz.figure_png(fig)\n"
            "viz.prompt_explorer(render, 'a CT scan of a liver with a tumor')"]
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in code],
                                    metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                             "language": "python"}})


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_browser_or_skip(), args=list(CHROMIUM_ARGS))
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1000}, device_scale_factor=1)
            tab = context.new_page()
            tab.set_default_timeout(60_000)
            tab.console_errors = []
            tab.on("console", lambda message: message.type == "error" and tab.console_errors.append(message.text))
            tab.on("pageerror", lambda error: tab.console_errors.append(str(error)))
            yield tab
        finally:
            browser.close()


def _save(shots: dict, key: str, png: bytes, tmp_path: Path) -> None:
    path = tmp_path / SHOTS[key]
    path.write_bytes(png)
    shots[key] = path
    if os.environ.get("DIFFUGTS_SCREENSHOTS"):
        target = Path(os.environ["DIFFUGTS_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)


def _run_all(page, lab, name: str = "quickstart.ipynb") -> None:
    """Open the notebook, wait for its kernel, Run > Run All Cells, wait until every cell ran; fail on an error."""
    # reset: the workspace would reopen the previous test's notebook, whose idle kernel could pass for this one's
    page.goto(lab.lab_url(name) + "&reset")
    page.locator(".jp-NotebookPanel .jp-Notebook").first.wait_for()
    # JupyterLab may ask for a kernel (also for a notebook with a kernelspec, when other kernels run): take the one
    # proposed (python3), whenever the dialog comes, until this notebook's own kernel is idle
    select_kernel = page.locator(".jp-Dialog").filter(has_text=re.compile("Select Kernel", re.IGNORECASE))
    deadline = time.monotonic() + KERNEL_TIMEOUT_S
    while True:
        if select_kernel.is_visible():
            select_kernel.get_by_role("button", name=re.compile("^Select$")).click()
        state = page.evaluate(NOTEBOOK_STATE_JS)
        if state and state["name"] == name and state["status"] == "idle" and not state["dialog"]:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{name}'s kernel was not idle within {KERNEL_TIMEOUT_S} s; notebook state: {state}\n"
                        f"server log:\n{lab.log_tail()}", pytrace=False)
        page.wait_for_timeout(500)

    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
    started = time.monotonic()
    try:
        page.wait_for_function(RUN_FINISHED_JS, timeout=RUN_TIMEOUT_MS, polling=1000)
    except Exception as error:  # playwright's TimeoutError: say where the notebook stood
        state = page.evaluate(NOTEBOOK_STATE_JS)
        pytest.fail(f"Run All did not finish within {RUN_TIMEOUT_MS / 1000:.0f} s ({error}); notebook state: {state}\n"
                    f"server log:\n{lab.log_tail()}", pytrace=False)
    state = page.evaluate(NOTEBOOK_STATE_JS)
    assert not state["dialog"], f"a dialog stopped Run All: {state['dialog']}"
    errors = [text for text in state["stderr"] if ERROR_LINE.search(text)]
    assert not errors, "a cell failed in JupyterLab:\n" + "\n\n".join(errors)
    unrun = [i for i, prompt in enumerate(state["prompts"]) if not re.search(r"\[\d+\]", prompt)]
    assert not unrun, f"code cells {unrun} did not run (prompts {state['prompts']})"
    print(f"\nbrowser: Run All took {time.monotonic() - started:.0f} s")


def _slice_viewer(page, tmp_path, shots) -> dict:
    """Move the slice slider with the keyboard; the kernel must re-render the picture and the readout."""
    slider = page.locator(".widget-hslider").filter(has=page.locator("label", has_text=re.compile(r"^\s*slice\s*$")))
    output = page.locator(".jp-OutputArea-output").filter(has=slider)
    picture = output.locator("img.widget-image").first
    readout = output.get_by_text(re.compile(r"^voxel \(")).first
    handle = slider.locator(".noUi-handle").first
    picture.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=picture.element_handle())
    before = {"src": picture.get_attribute("src"), "readout": readout.inner_text(),
              "value": int(float(handle.get_attribute("aria-valuenow")))}
    size = picture.evaluate("img => ({natural: [img.naturalWidth, img.naturalHeight],"
                            " shown: [img.getBoundingClientRect().width, img.getBoundingClientRect().height]})")
    _save(shots, "before", output.screenshot(), tmp_path)

    key = "ArrowLeft" if before["value"] >= 3 else "ArrowRight"  # three slices towards the middle
    handle.focus()
    for _ in range(3):
        handle.press(key)
    target = before["value"] + (3 if key == "ArrowRight" else -3)
    assert int(float(handle.get_attribute("aria-valuenow"))) == target, "the slider did not move with the keyboard"
    # continuous_update=False: the value reaches the kernel on the key's change event; the kernel writes the readout
    # (voxel (x, y, slice)) and then the picture, inside one busy period, so the readout then idle means both arrived
    readout_now = re.compile(rf"^voxel \(\d+, \d+, {target}\)")
    page.wait_for_function("([el, pattern]) => new RegExp(pattern).test(el.textContent.trim())",
                           arg=[readout.element_handle(), readout_now.pattern], timeout=60_000)
    page.wait_for_function(KERNEL_IDLE_JS)
    page.wait_for_function("([img, old]) => img.src !== old && img.complete && img.naturalWidth > 0",
                           arg=[picture.element_handle(), before["src"]], timeout=30_000)
    after = {"src": picture.get_attribute("src"), "readout": readout.inner_text()}
    _save(shots, "after", output.screenshot(), tmp_path)
    assert after["src"] != before["src"], "the slice picture did not change after moving the slider"
    assert after["readout"] != before["readout"] and readout_now.match(after["readout"])
    print(f"browser: slice {before['value']} -> {target}; readout {before['readout']!r} -> {after['readout']!r}; "
          f"picture natural {size['natural']} px, shown {size['shown']} px")
    return size


def _niivue_canvas(page, tmp_path, shots) -> dict:
    """The 3D viewer's WebGL canvas draws: its planes (the canvas less the colour bars NiiVue puts along the bottom)
    have many colours, contrast and a foreground."""
    output = page.locator(".jp-OutputArea-output").filter(has_text="NiiVue, 3D")
    canvas = output.locator("canvas").first
    canvas.scroll_into_view_if_needed()
    page.wait_for_function("c => c.width > 0 && c.height > 0", arg=canvas.element_handle())
    deadline = time.monotonic() + CANVAS_TIMEOUT_S
    while True:  # NiiVue draws once its volumes are parsed: poll its picture rather than sleep a fixed time
        png = canvas.screenshot()
        planes = picture_stats(png, top=0.75)
        drawn = planes["colours"] > 64 and planes["std"] > 10 and planes["foreground"] > 0.05
        if drawn or time.monotonic() > deadline:
            break
        page.wait_for_timeout(1000)
    _save(shots, "3d", png, tmp_path)
    assert drawn, (f"the NiiVue canvas looks blank after {CANVAS_TIMEOUT_S} s: planes {planes}, whole "
                   f"{picture_stats(png)}; browser console errors: {page.console_errors}")
    print(f"browser: NiiVue canvas planes {planes}")
    return planes


def test_quickstart_widgets_in_jupyterlab(lab, page, tmp_path):
    """Run notebook 00 in JupyterLab; the slice viewer answers its slider and the NiiVue canvas draws."""
    shots = {}
    try:
        _run_all(page, lab)
        size = _slice_viewer(page, tmp_path, shots)
        _niivue_canvas(page, tmp_path, shots)
    finally:  # the whole page, also when something failed: it shows where the notebook stood
        try:
            _save(shots, "page", page.screenshot(full_page=True), tmp_path)
        except Exception as error:  # noqa: BLE001 (keep the test's own failure)
            print(f"browser: no page screenshot: {error}")
        print("browser: screenshots", {key: str(path) for key, path in shots.items()})
    # the picture is drawn at its own pixel size: neither stretched to the box nor squeezed
    natural, shown = size["natural"], size["shown"]
    assert abs(shown[0] - natural[0]) <= 1 and abs(shown[1] - natural[1]) <= 1, f"picture {natural} drawn at {shown}"


def _shown_at_own_size(picture) -> tuple[list, list]:
    size = picture.evaluate("img => ({natural: [img.naturalWidth, img.naturalHeight],"
                            " shown: [img.getBoundingClientRect().width, img.getBoundingClientRect().height]})")
    return size["natural"], size["shown"]


def test_frame_slider_and_prompt_explorer_draw_pictures_at_their_own_size(lab, page):
    """Notebooks 03 and 05's widgets: neither the slider nor the wide text box stretches the picture under it."""
    _run_all(page, lab, "layouts.ipynb")
    outputs = page.locator(".jp-OutputArea-output")
    slider_picture = outputs.filter(has=page.locator(".widget-hslider")).locator("img.widget-image").first
    explorer = outputs.filter(has=page.locator(".widget-text"))
    explorer.get_by_role("button", name="show map").click()
    explorer_picture = explorer.locator("img.widget-image").first
    for picture in (slider_picture, explorer_picture):
        picture.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=picture.element_handle(),
                               timeout=60_000)
    box_width = explorer.locator(".widget-text").first.evaluate("el => el.getBoundingClientRect().width")
    for name, picture in (("frame slider", slider_picture), ("prompt explorer", explorer_picture)):
        natural, shown = _shown_at_own_size(picture)
        print(f"browser: {name} picture natural {natural} px, shown {shown} px (text box {box_width:.0f} px)")
        assert abs(shown[0] - natural[0]) <= 1 and abs(shown[1] - natural[1]) <= 1, \
            f"{name}: picture {natural} drawn at {shown}"
