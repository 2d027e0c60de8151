"""Killed at any moment, a run leaves no partial file at a final path; its temporaries go with SIGTERM at once, and
with the next run after a SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import matplotlib.image
import nibabel as nib
import numpy as np

COMMAND = [sys.executable, "-m", "diffugts_core.cli", "phantoms", "--categories", "liver,lung,brain",
           "--per-category", "2", "--shape", "48,48,24", "--no-progress"]


def start(out):
    return subprocess.Popen([*COMMAND, "--out", str(out), "--montage", str(out / "montage.png")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def check_final_files(folder):
    """Every file at a final (non-hidden) name is whole: NIfTI volumes load, the CSV has its rows, the PNG reads."""
    for path in folder.iterdir():
        if path.name.startswith("."):
            continue
        if path.name.endswith(".nii.gz"):
            np.asanyarray(nib.load(str(path)).dataobj)
        elif path.suffix == ".csv":
            assert path.read_text().startswith("id,modality") and path.read_text().endswith("\n")
        elif path.suffix == ".png":
            assert matplotlib.image.imread(str(path)).ndim == 3
        else:
            raise AssertionError(f"unexpected file {path.name}")


def temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def wait_for_first_file(out, process, limit=120.0):
    """Seconds until the run has put its first file (temporary or final) in ``out``."""
    begin = time.perf_counter()
    while not (out.exists() and any(out.iterdir())) and process.poll() is None:
        assert time.perf_counter() - begin < limit
        time.sleep(0.01)
    return time.perf_counter() - begin


def test_sigkill_at_random_moments_while_writing_leaves_only_whole_files(tmp_path):
    out, timing = tmp_path / "cohort", tmp_path / "timing"
    process = start(timing)  # how long a whole run writes, on this machine
    begin = time.perf_counter()
    first = wait_for_first_file(timing, process)
    process.wait()
    writing = time.perf_counter() - begin - first
    rng = np.random.default_rng(22)
    for delay in rng.uniform(0, writing, 6):
        process = start(out)
        wait_for_first_file(out, process)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        check_final_files(out)
    subprocess.run([*COMMAND, "--out", str(out), "--montage", str(out / "montage.png")], check=True,
                   capture_output=True)
    check_final_files(out)
    assert temporaries(out) == []  # what the killed runs left is removed by the next run
    assert len(list(out.glob("*.nii.gz"))) == 18


def test_sigterm_removes_the_temporary_at_once(tmp_path):
    out = tmp_path / "cohort"
    process = start(out)
    wait_for_first_file(out, process)
    process.send_signal(signal.SIGTERM)
    process.wait()
    assert process.returncode == 128 + signal.SIGTERM
    check_final_files(out)
    assert temporaries(out) == []


def test_a_stale_temporary_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    from diffugts_core.io import write_text_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".qc.png.{int(dead.stdout)}.abcd1234.tmp.png"
    live = tmp_path / f".qc.png.{os.getppid()}.abcd1234.tmp.png"
    mine = tmp_path / ".notes.txt"  # a user's hidden file is not a temporary
    for path in (stale, live, mine):
        path.write_bytes(b"")
    write_text_atomic(tmp_path / "report.json", json.dumps({"ok": True}))
    assert not stale.exists() and live.exists() and mine.exists()
