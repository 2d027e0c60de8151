"""The frozen models give the CPU's answers on any device: detection and inpainting on the device ``device="auto"``
picks (or ``DIFFUGTS_TEST_DEVICE``) against CPU reference arrays committed in ``tests/data/device_reference.npz``.

On a CPU this checks the pipeline against its recorded self (any change of the maps or the pseudo-healthy image
fails); on a GPU it checks the accelerator against the CPU. Re-record the references on a CPU, after an intended
change, with ``python -m tests.test_devices`` and say why in the commit.
"""

import os
from pathlib import Path

import numpy as np
import pytest

import diffugts_core as dg
from diffugts_core.data import phantoms
from diffugts_core.inpaint import InpaintConfig, enlarge_mask, healthy_conditioning, pseudo_healthy
from diffugts_core.runtime import resolve_device

REFERENCE = Path(__file__).parent / "data" / "device_reference.npz"
DEVICE = os.environ.get("DIFFUGTS_TEST_DEVICE", "auto")


def liver_case():
    return phantoms.generate_case("liver", 0, 3000)  # test seed; the liver is seen by the shipped heads


def tumor_box(case, margin: int = 4) -> tuple[slice, ...]:
    """The tumor's bounding box and a margin: where the references are kept (small enough to commit)."""
    found = np.argwhere(case.tumor > 0)
    return tuple(slice(max(int(lo) - margin, 0), int(hi) + margin + 1) for lo, hi in zip(found.min(0), found.max(0)))


def compute(device) -> dict[str, np.ndarray]:
    """The anomaly map and the kept regions in the tumor's box, and the pseudo-healthy image inside the inpainted
    region, on ``device``."""
    case = liver_case()
    backbone, text_encoder = dg.load_backbone(device=device), dg.TextEncoder.from_pretrained(device=device)
    detection = dg.detect_case(dg.load_heads(), backbone, text_encoder, case.image, "CT", "liver")
    region = enlarge_mask(case.tumor > 0, case.spacing, 5.0)
    cond, uncond = healthy_conditioning(text_encoder, "CT", "abdomen", "liver")
    healthy = pseudo_healthy(backbone, case.image, "CT", region, cond, uncond, InpaintConfig(seed=0))[0]
    box = tumor_box(case)
    return {"anomaly": detection.anomaly[box].astype(np.float32), "kept": detection.kept[box],
            "healthy_in_region": healthy[region].astype(np.float32), "outside_unchanged":
            np.array(np.array_equal(healthy[~region], case.image[~region]))}


@pytest.fixture(scope="module")
def results():
    if not REFERENCE.is_file():
        pytest.fail(f"{REFERENCE} is missing; record it on a CPU with: python -m tests.test_devices")
    return compute(DEVICE), dict(np.load(REFERENCE))


def test_auto_picks_the_accelerator_when_there_is_one():
    import torch

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                           "mps" if torch.backends.mps.is_available() else "cpu")


def test_detection_matches_the_cpu_reference(results):
    now, reference = results
    assert np.abs(now["anomaly"] - reference["anomaly"]).max() < 0.01
    assert dg.dice(now["kept"], reference["kept"]) > 0.95
    assert reference["kept"].any()  # the reference marks the tumor: a stub's empty answer cannot match it


def test_inpainting_matches_the_cpu_reference(results):
    now, reference = results
    assert now["healthy_in_region"].shape == reference["healthy_in_region"].shape
    assert np.abs(now["healthy_in_region"] - reference["healthy_in_region"]).mean() < 1.0  # HU; same seed, same noise
    assert bool(now["outside_unchanged"])


if __name__ == "__main__":
    REFERENCE.parent.mkdir(exist_ok=True)
    arrays = compute("cpu")
    np.savez_compressed(REFERENCE, **arrays)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size / 1024:.0f} KiB): "
          + ", ".join(f"{name} {array.shape}" for name, array in arrays.items()))
