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


def test_maisi_gives_the_cpus_answers_on_the_device(tmp_path):
    """MAISI's code path (a tiny random-weight bundle, written the same from its seed on any machine) on the device
    against the same bundle on the CPU: encoder stages, and ROI inpainting with the same seed. On CUDA MAISI runs
    under float16 autocast, as NVIDIA runs it, hence a tolerance rather than equality (not yet run on a GPU)."""
    from diffugts_core.aova import volume_features
    from diffugts_core.backbone.maisi import MaisiBackbone, write_tiny_bundle
    from diffugts_core.experiments.maisi_roi import lesion_case
    from diffugts_core.inpaint3d import VolumeInpaintConfig, inpaint_volume

    bundle = write_tiny_bundle(tmp_path / "bundle")
    image, roi = lesion_case((32, 32, 32), 0.05)
    answers = []
    for device in ("cpu", DEVICE):
        backbone = MaisiBackbone.from_bundle(bundle, device=device)
        features = volume_features(backbone, image, "CT")
        healthy = inpaint_volume(backbone, image, "CT", roi, VolumeInpaintConfig(steps=3, seed=0))
        answers.append((features, healthy))
    (cpu_features, cpu_healthy), (features, healthy) = answers
    for reference, now in zip(cpu_features, features):
        assert np.abs(now.float().numpy() - reference.float().numpy()).max() < 0.05 * reference.abs().max().item()
    assert np.array_equal(healthy[~roi], image[~roi])  # outside the ROI the input, bit for bit, on every device
    assert np.abs(healthy[roi] - cpu_healthy[roi]).mean() < 20.0  # HU, of the 2,000 HU window


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="MAISI's real size needs a GPU")
def test_maisi_real_size_runs_on_the_gpu_within_its_memory():
    """MAISI's real-size networks (random weights) at 256 x 256 x 128: ROI sub-volume inpainting of a 5 % lesion, with
    its time and peak GPU memory printed (the figures the MAISI section of docs/maisi.md waits for)."""
    from diffugts_core.experiments.maisi_roi import measure, real_size_backbone

    backbone = real_size_backbone("cuda")
    for row in measure(backbone, "MAISI real size", (256, 256, 128), 0.05):
        print(f"MAISI {row.path}: {row.latent_cells} latent cells, {row.seconds:.1f} s, {row.peak_mb:.0f} MB")
        assert row.seconds > 0 and row.peak_mb > 0


if __name__ == "__main__":
    REFERENCE.parent.mkdir(exist_ok=True)
    arrays = compute("cpu")
    np.savez_compressed(REFERENCE, **arrays)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size / 1024:.0f} KiB): "
          + ", ".join(f"{name} {array.shape}" for name, array in arrays.items()))
