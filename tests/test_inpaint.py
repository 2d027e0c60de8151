"""Latent inpainting: the known region is untouched, and the shipped model restores healthy tissue."""

import numpy as np
import pytest
import torch

from diffugts_core.data import phantoms
from diffugts_core.backbone import Conditioning, load_backbone
from diffugts_core.inpaint import InpaintConfig, enlarge_mask, inpaint_slices, latent_mask
from diffugts_core.io import InputError

from .test_backbone import text_cond, tiny_backbone


def test_enlarge_mask_is_isotropic_in_millimetres():
    mask = np.zeros((11, 11, 11), bool)
    mask[5, 5, 5] = True
    grown = enlarge_mask(mask, spacing=(1.0, 1.0, 2.0), margin_mm=2.0)
    assert grown[3, 5, 5] and grown[7, 5, 5] and not grown[2, 5, 5]  # 2 voxels of 1 mm
    assert grown[5, 5, 4] and grown[5, 5, 6] and not grown[5, 5, 3]  # 1 voxel of 2 mm
    assert enlarge_mask(mask, (1, 1, 1), 0).sum() == 1


def test_latent_mask_marks_any_covered_cell():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 5, 2] = 1
    cells = latent_mask(mask, 4)
    assert cells.shape == (1, 1, 2, 2) and cells[0, 0, 1, 0] == 1 and cells.sum() == 1


def test_inpainting_changes_only_masked_pixels_of_masked_slices():
    backbone = tiny_backbone()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    mask = torch.zeros(3, 1, 32, 32, dtype=torch.bool)
    mask[1, 0, 8:20, 10:22] = True
    cond = text_cond()
    out = inpaint_slices(backbone, x, mask, cond, Conditioning(cond.tokens * 0, cond.attention_mask),
                         InpaintConfig(steps=3, samples=2, resample=2, guidance_scale=2.0))
    assert out.shape == (2, 3, 1, 32, 32)
    for sample in out:
        assert torch.equal(sample[~mask], x[~mask])  # outside the mask, and slices without mask: the input
    assert not torch.equal(out[0, 1][mask[1]], x[1][mask[1]])
    assert not torch.equal(out[0], out[1])  # two seeds, two samples


@pytest.mark.slow
def test_shipped_model_moves_a_liver_tumor_toward_healthy_liver():
    from diffugts_core.experiments.foundation_check import pseudo_healthy_test
    from diffugts_core.text import TextEncoder

    backbone = load_backbone(device="cpu")
    case = phantoms.generate_case("healthy", 1, 11, region="abdomen")  # a seed training never used
    result = pseudo_healthy_test(backbone, TextEncoder.from_pretrained(device="cpu"), case, "liver",
                                 InpaintConfig(steps=15, samples=1))
    means = result["mean_hu"]
    assert means["input"] == pytest.approx(means["healthy"] - 40, abs=0.01)
    assert result["ratio"] <= 0.25, means


def test_check_foundation_report_has_every_section():
    from diffugts_core.experiments.foundation_check import check_foundation, format_report
    from diffugts_core.text import TextEncoder

    backbone = tiny_backbone()
    text_encoder = TextEncoder.from_pretrained(device="cpu")
    report = check_foundation(backbone, text_encoder, shape=(32, 32, 16), config=InpaintConfig(steps=2, samples=1))
    assert [r["case"] for r in report["reconstruction"]] == ["healthy_abdomen_000", "healthy_thorax_000",
                                                              "healthy_brain_000"]
    assert all(np.isfinite(r["mae_body"]) and r["mae_body"] > 0 for r in report["reconstruction"])
    liver = report["pseudo_healthy"][0]
    assert liver["organ"] == "liver" and liver["mean_hu"]["input"] == pytest.approx(liver["mean_hu"]["healthy"] - 40)
    assert report["pass"] == all(r["ratio"] <= 0.25 for r in report["pseudo_healthy"])
    assert all(np.isfinite(r["organ_mean_fill_ratio"]) for r in report["pseudo_healthy"])
    assert report["timings"]["slices"] == 16
    text = format_report(report)
    for heading in ("VAE reconstruction", "healthy inpainting", "pseudo-healthy", "per-stage times", "organ-mean fill",
                    "mean ratio per organ over 2 seeds"):
        assert heading in text
    assert report["pseudo_healthy_mean"]["liver"] == pytest.approx(
        np.mean([r["ratio"] for r in report["pseudo_healthy"] if r["organ"] == "liver"]))
    # more seeds, fewer organs: every ratio of the seeds asked, each case the healthy abdomen of its seed
    more = check_foundation(backbone, text_encoder, shape=(32, 32, 16), config=InpaintConfig(steps=2, samples=1),
                            pseudo_healthy_seeds=(20, 21, 22), organs=("kidney_right",))
    assert [(r["seed"], r["organ"]) for r in more["pseudo_healthy"]] == [(20, "kidney_right"), (21, "kidney_right"),
                                                                      (22, "kidney_right")]
    assert [r["case"] for r in more["pseudo_healthy"]] == ["healthy_abdomen_000"] * 3
    assert more["pseudo_healthy"][0]["mean_hu"]["healthy"] != more["pseudo_healthy"][1]["mean_hu"]["healthy"]
    assert list(more["pseudo_healthy_mean"]) == ["kidney_right"]
    with pytest.raises(InputError, match="kidney_left"):
        check_foundation(backbone, text_encoder, organs=("kidney_left",))


def test_the_organ_mean_fill_shows_the_structure_hidden_under_a_kidney_tumor():
    """The test tumor sits at the organ's deepest point: in the liver that is liver, in the kidney the medulla and
    sinus fat, darker than the cortex around them, so the organ's mean is far from what lies there."""
    from diffugts_core.experiments.foundation_check import insert_test_tumor, organ_mean_fill_ratio
    from diffugts_core.inpaint import enlarge_mask

    case = phantoms.generate_case("healthy", 0, 25, (128, 128, 64), region="abdomen")
    fills = {}
    for organ in ("liver", "kidney_right"):
        image, tumor = insert_test_tumor(case, organ)
        fills[organ] = organ_mean_fill_ratio(case, image, tumor, enlarge_mask(tumor, case.spacing, 5.0), organ)
    assert fills["liver"] < 0.25 < 1.0 < fills["kidney_right"], fills


def test_pseudo_healthy_returns_the_input_outside_the_mask_bit_for_bit():
    from diffugts_core.inpaint import prompt_conditioning, pseudo_healthy
    from diffugts_core.text import TextEncoder

    case = phantoms.generate_case("healthy", 0, 3, (32, 32, 16), region="abdomen")
    mask = np.zeros(case.image.shape, bool)
    mask[10:16, 10:16, 6:9] = True
    cond, uncond = prompt_conditioning(TextEncoder.from_pretrained(device="cpu"), "a CT scan of the abdomen")
    mean, spread = pseudo_healthy(tiny_backbone(), case.image, "CT", mask, cond, uncond,
                                  InpaintConfig(steps=2, samples=2))
    assert np.array_equal(mean[~mask], case.image[~mask])  # air below -1000 HU and bone above the knots included
    assert (spread[~mask] == 0).all() and spread[mask].max() > 0


def test_ring_fill_puts_the_mean_of_the_known_ring_in_each_component():
    from diffugts_core.inpaint import ring_fill

    image = np.zeros((20, 20, 3), np.float32)
    image[:, :10] = 100.0  # left half 100, right half 0
    image[4:7, 4:7, 1] = 500.0  # a "lesion" inside the left half
    mask = np.zeros(image.shape, bool)
    mask[3:8, 3:8, 1] = True  # its enlarged mask, all inside the left half with its ring
    mask[12:15, 14:17, 1] = True  # a second component in the right half
    filled = ring_fill(image, mask, ring_voxels=2)
    assert np.allclose(filled[3:8, 3:8, 1], 100.0)  # the ring around it is all 100: the lesion is gone
    assert np.allclose(filled[12:15, 14:17, 1], 0.0)  # each component gets its own ring's mean
    assert np.array_equal(filled[~mask], image[~mask]) and image[5, 5, 1] == 500.0  # input untouched


def test_reconstruction_changes_only_the_chosen_slices():
    from diffugts_core.inpaint import prompt_conditioning, reconstruct
    from diffugts_core.text import TextEncoder

    case = phantoms.generate_case("healthy", 0, 3, (32, 32, 16), region="abdomen")
    cond, uncond = prompt_conditioning(TextEncoder.from_pretrained(device="cpu"), "a CT scan of the abdomen")
    slices = np.zeros(16, bool)
    slices[6:8] = True
    out = reconstruct(tiny_backbone(), case.image, "CT", slices, cond, uncond, strength=0.5,
                      config=InpaintConfig(steps=4))
    assert np.array_equal(out[..., ~slices], case.image[..., ~slices])
    assert not np.allclose(out[..., slices], case.image[..., slices])
    with pytest.raises(ValueError, match="strength"):
        reconstruct(tiny_backbone(), case.image, "CT", slices, cond, uncond, strength=0.0)


def test_inpainting_shows_an_organ_aware_denoiser_each_slices_organ_map():
    from diffugts_core.backbone.base import organ_cover
    from diffugts_core.inpaint import pseudo_healthy

    from .test_backbone import organ_aware_backbone

    backbone = organ_aware_backbone()
    seen = []
    denoise = backbone.denoise
    backbone.denoise = lambda z, t, cond: seen.append(cond.organs.clone()) or denoise(z, t, cond)
    image = np.full((32, 32, 4), 40.0, np.float32)
    organs = np.zeros(image.shape, np.uint8)
    organs[4:20, 4:20, :] = 1  # the first organ channel, a different square on the last slice
    organs[20:28, 20:28, 3] = 3
    mask = np.zeros(image.shape, bool)
    mask[8:12, 8:12, 1] = mask[8:12, 8:12, 3] = True
    cond = text_cond()
    pseudo_healthy(backbone, image, "CT", mask, cond, None, InpaintConfig(steps=2), organs=organs)
    expected = organ_cover(torch.from_numpy(organs.transpose(2, 0, 1)[[1, 3]].copy()), 7, 4)
    assert len(seen) == 2 and all(torch.equal(maps, expected) for maps in seen)  # the masked slices' maps, each step
    backbone.denoise = denoise
    seen.clear()
    plain = tiny_backbone()  # a denoiser without organ channels is never handed a map
    plain.denoise = lambda z, t, cond: seen.append(cond.organs) or tiny_backbone().denoise(z, t, cond)
    pseudo_healthy(plain, image, "CT", mask, cond, None, InpaintConfig(steps=1), organs=organs)
    assert seen == [None]
