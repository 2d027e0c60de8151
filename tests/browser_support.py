"""Helpers for tests/test_browser.py: a private JupyterLab server, the system's Chromium, picture statistics.

Nothing here downloads anything: the browser is the system's Chromium (Debian's `chromium` package, never
`playwright install`), and the server is started with its news feed and update check turned off.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHROMIUM_CANDIDATES = ("/usr/bin/chromium",)

# Chromium flags: headless, no sandbox (CI containers run as root), no GPU, nothing fetched in the background.
# WebGL2 (the NiiVue canvas) then runs on SwiftShader, ANGLE's CPU renderer; Chromium 150 only allows it for WebGL
# with --enable-unsafe-swiftshader (Playwright adds that one too, but say so here).
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader")

# JupyterLab user settings for a quiet, predictable session: no news or update prompts (no network), no extension
# manager (it would ask PyPI), and every cell kept in the DOM (windowing would detach cells out of view).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                          "checkForUpdates": False},
    "@jupyterlab/extensionmanager-extension/plugin.jupyterlab-settings": {"enabled": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def find_chromium() -> str | None:
    """The system Chromium's path, or None."""
    for candidate in CHROMIUM_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LabServer:
    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path  # the server's root_dir: notebooks go here
    log: Path  # its stdout and stderr

    def lab_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@contextlib.contextmanager
def jupyter_lab(base: Path, *, start_timeout: float = 120.0):
    """A JupyterLab server of its own (free port, random token, private runtime/config/settings/workspace dirs),
    answering on 127.0.0.1; its whole process group (kernels included) is ended on exit."""
    root, settings = base / "root", base / "settings"
    for path in (root, settings, base / "runtime", base / "config", base / "workspaces", base / "ipython"):
        path.mkdir(parents=True, exist_ok=True)
    for name, values in LAB_SETTINGS.items():
        target = settings / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_RUNTIME_DIR=str(base / "runtime"),
               JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"), IPYTHONDIR=str(base / "ipython"))
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
               f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.token={token}",
               f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
               f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={base / 'workspaces'}",
               "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
               "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate"]
    log = base / "jupyter.log"
    server = LabServer(f"http://127.0.0.1:{port}", token, root, log)
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {process.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/api/status?token={token}", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not answer within {start_timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server shuts its kernels down), then SIGKILL to whatever of the
    group or of the server's descendants is left. Kernels run in sessions of their own (jupyter_client starts them
    with start_new_session), so they are found by parentage, before the server goes, and ended by pid."""
    descendants = _descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid, started in descendants:
        if _start_time(pid) == started:  # still the same process, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat), None when it is gone or /proc is missing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every descendant of ``root``, from /proc (empty where there is no /proc)."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry.name)] = (int(fields[1]), fields[19])
    found, frontier = [], {root}
    while frontier:
        children = {pid for pid, (ppid, _) in parents.items() if ppid in frontier}
        found += [(pid, parents[pid][1]) for pid in children]
        frontier = children
    return found


def picture_stats(png: bytes, *, top: float = 1.0) -> dict:
    """Distinct colours, grey-level standard deviation and the share of pixels that differ from the most common colour
    (the background) in a PNG screenshot, or in its upper ``top`` fraction of rows."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    rgb = rgb[: max(1, round(rgb.shape[0] * top))]
    flat = rgb.reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    background = colours[np.argmax(counts)]
    return {"shape": rgb.shape, "colours": len(colours), "std": round(float(rgb.mean(axis=2).std()), 1),
            "foreground": round(float(np.mean(np.any(flat != background, axis=1))), 3),
            "background": tuple(int(c) for c in background)}
