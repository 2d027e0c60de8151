"""With an accelerator present, ``device="auto"`` uses it and the results match the CPU's.

Skipped on machines without CUDA (CI). ``DIFFUGTS_TEST_DEVICE=cpu`` runs the same checks against the CPU itself, which
exercises the test's own code where no GPU is at hand.
"""

import os

import numpy as np
import pytest
import torch

import diffugts_core as dg
from diffugts_core import phantoms
from diffugts_core.inpaint import InpaintConfig, enlarge_mask, healthy_conditioning, pseudo_healthy
from diffugts_core.runtime import resolve_device

DEVICE = os.environ.get("DIFFUGTS_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def models():
    return {device: (dg.load_backbone(device=device), dg.TextEncoder.from_pretrained(device=device))
            for device in (DEVICE, "cpu")}


@pytest.fixture(scope="module")
def case():
    return phantoms.generate_case("liver", 0, 3000)  # test seed; the liver is seen by the shipped heads


def test_auto_picks_the_accelerator(models):
    if DEVICE == "cuda":
        assert resolve_device("auto").type == "cuda"
    backbone, text_encoder = models[DEVICE]
    assert backbone.device.type == text_encoder.device.type == DEVICE


def test_detection_on_the_accelerator_matches_the_cpu(models, case):
    heads = dg.load_heads()  # the small heads run on the CPU; the frozen models on the accelerator
    tumor = case.tumor > 0
    accelerated, cpu = (dg.detect_case(heads, *models[device], case.image, "CT", "liver") for device in (DEVICE, "cpu"))
    assert np.abs(accelerated.anomaly - cpu.anomaly).max() < 0.01
    assert dg.dice(accelerated.kept, cpu.kept) > 0.95
    assert accelerated.anomaly[tumor].mean() > 3 * accelerated.anomaly[case.organ_mask() & ~tumor].mean()


def test_inpainting_on_the_accelerator_matches_the_cpu(models, case):
    region = enlarge_mask(case.tumor > 0, case.spacing, 5.0)
    healthy = []
    for device in (DEVICE, "cpu"):
        backbone, text_encoder = models[device]
        cond, uncond = healthy_conditioning(text_encoder, "CT", "abdomen", "liver")
        healthy.append(pseudo_healthy(backbone, case.image, "CT", region, cond, uncond, InpaintConfig(seed=0))[0])
    assert np.abs(healthy[0] - healthy[1])[region].mean() < 1.0  # HU; the same seed draws the same noise
    assert np.array_equal(healthy[0][~region], case.image[~region])
