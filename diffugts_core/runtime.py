"""Where models run (``device="auto"``), where their weights come from (a folder, or a hub id), and the memory a run
took."""

from __future__ import annotations

import os
import re
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .io import InputError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA, then Apple MPS, then the CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def locate_pretrained(name_or_path: str | os.PathLike, *, what: str) -> str:
    """A local folder as a string, or a Hugging Face Hub id; fails fast and clearly when neither can work.

    ``what`` words the error ("diffusion model", "text encoder").
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise InputError(f"{path}: is a file; the {what} must be a folder written by save_pretrained (or a hub id).")
    text = str(name_or_path)
    if not _HUB_ID.match(text):
        raise InputError(f"{text}: no such {what} folder; pass a folder written by save_pretrained or a hub id "
                         "like 'organisation/model'.")
    if hub_offline():
        raise InputError(hub_unreachable_message(text, what, "the Hugging Face Hub is offline here (HF_HUB_OFFLINE=1)"))
    return text


def hub_unreachable_message(hub_id: str, what: str, reason: str) -> str:
    return (f"{hub_id}: not a local folder, and {reason}. On a machine with internet run "
            f"`hf download {hub_id} --local-dir DIR`, copy DIR here and pass DIR as the {what}.")


def peak_memory_mb() -> float:
    """The process's peak resident memory so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def measured(device: torch.device):
    """(seconds, peak MB above the level on entry) of the block, in a two-element list filled on leaving."""
    result = [0.0, 0.0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base, start = torch.cuda.memory_allocated(device), time.perf_counter()
        yield result
        torch.cuda.synchronize(device)
        result[:] = time.perf_counter() - start, (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        return
    base, peak, done = resident_mb(), [0.0], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], resident_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        result[:] = seconds, max(peak[0], resident_mb()) - base


def resident_mb() -> float:
    """The process's resident set now (Linux: /proc/self/statm counts 4 kB pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2 ** 20
