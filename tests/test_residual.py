"""Stage 5: ROI inpainting windows, residuals, the training-free fusion, the residual head and its training data."""

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from diffugts_core import phantoms
from diffugts_core import residual as residual_module
from diffugts_core.detect import Detection, Region
from diffugts_core.inpaint import InpaintConfig, inpaint_slices, lesion_windows
from diffugts_core.residual import (
    ResidualConfig,
    ResidualHead,
    Residuals,
    TrainedResidualHead,
    RefinementThresholds,
    _dice_bce,
    coarse_roi,
    feature_residual,
    final_mask,
    fusion_map,
    inpaint_region,
    pixel_residual,
)

from .test_backbone import text_cond, tiny_backbone


def test_lesion_windows_group_nearby_lesions_and_round_sides_to_the_quantum():
    cells = torch.zeros(32, 32)
    cells[10:13, 20] = 1  # two components close together: one window
    cells[11, 22] = 1
    cells[28, 2] = 1  # one far away: its own window, shifted inside the grid
    windows = sorted(lesion_windows(cells, context=2, quantum=8), key=lambda w: w[0].start)
    assert len(windows) == 2
    (rows, cols), (far_rows, far_cols) = windows
    assert rows.start <= 8 and rows.stop >= 15 and cols.start <= 18 and cols.stop >= 25  # both boxes, +2 cells
    assert (rows.stop - rows.start, cols.stop - cols.start) == (8, 8)  # 7 x 7 cells rounded up to 8
    assert (far_rows, far_cols) == (slice(24, 32), slice(0, 8))  # kept inside the 32 x 32 grid
    assert lesion_windows(torch.ones(32, 32), context=6, quantum=8) == [(slice(0, 32), slice(0, 32))]
    assert lesion_windows(torch.zeros(32, 32), context=6, quantum=8) == []


def _denoiser_inputs(backbone, config, x, mask):
    """The latent sizes the denoiser was called with, and the result, for one inpainting run."""
    shapes = []
    handle = backbone.unet.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    try:
        out = inpaint_slices(backbone, x, mask, text_cond(), None, config)
    finally:
        handle.remove()
    return shapes, out


def test_roi_inpainting_denoises_only_windows_around_the_lesions():
    backbone = tiny_backbone()  # 32x32 slices -> 8x8 latents
    mask = torch.zeros(3, 1, 32, 32, dtype=torch.bool)
    mask[0, 0, 2:5, 2:5] = True  # a small lesion in one corner
    mask[2, 0, 26:30, 26:30] = True  # and one in the other, on another slice
    config = InpaintConfig(steps=2, context=1, roi=True, window_multiple=4)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    roi_shapes, roi = _denoiser_inputs(backbone, config, x, mask)
    full_shapes, full = _denoiser_inputs(backbone, replace(config, roi=False), x, mask)
    assert {s[-2:] for s in full_shapes} == {(8, 8)} and all(s[0] == 2 for s in full_shapes)  # 2 masked slices
    assert all(s[-1] < 8 and s[-2] < 8 for s in roi_shapes)  # each window is smaller than the latent slice
    assert sum(s[0] for s in roi_shapes) == sum(s[0] for s in full_shapes)  # the same slices, step for step
    for out in (roi, full):
        assert torch.equal(out[0][~mask], x[~mask]) and not torch.equal(out[0][mask], x[mask])


def test_pixel_residual_is_the_difference_in_the_heads_window():
    backbone = tiny_backbone()
    image = np.full((32, 32, 4), 100.0, np.float32)
    healthy = image.copy()
    healthy[10:12, 10:12, 1] = 140.0
    residual = pixel_residual(backbone, image, healthy, "CT")
    assert residual[10, 10, 1] == pytest.approx(40 / 200)  # CT: (HU - 40) / 200
    assert residual.sum() == pytest.approx(4 * 40 / 200, rel=1e-5)
    mri = np.random.default_rng(0).uniform(0, 1000, (32, 32, 4)).astype(np.float32)
    brighter = mri + 10
    expected = 2 * 2 / (np.percentile(mri, 99.5) - mri.min())  # MRI: model space of the input, doubled
    inside = (mri > mri.min() + 10) & (brighter < np.percentile(mri, 99.5))
    assert np.allclose(pixel_residual(backbone, mri, brighter, "MRI")[inside], 10 * expected, rtol=1e-3)


def test_feature_residual_is_zero_where_the_images_agree_and_outside_the_roi_slices():
    backbone = tiny_backbone()
    rng = np.random.default_rng(0)
    image = rng.uniform(-200, 300, (32, 32, 4)).astype(np.float32)
    healthy = image.copy()
    healthy[8:20, 8:20, 2] += 300
    roi = np.zeros(image.shape, bool)
    roi[8:20, 8:20, 1:3] = True
    residual = feature_residual(backbone, image, healthy, "CT", roi)
    assert residual.shape == image.shape and residual.min() >= -1e-5
    assert np.abs(residual[..., 1]).max() < 1e-4  # an ROI slice where H = I
    assert np.all(residual[..., [0, 3]] == 0)  # slices without ROI are not computed
    assert residual[8:20, 8:20, 2].mean() > 10 * residual[..., 1].mean() + 1e-3


def test_fusion_map_is_scaled_inside_the_roi_and_zero_outside():
    roi = np.zeros((8, 8, 2), bool)
    roi[2:6, 2:6, 0] = True
    pixel = np.zeros(roi.shape, np.float32)
    pixel[3, 3, 0] = 2.0
    pixel[7, 7, 1] = 5.0  # outside the ROI
    fused = fusion_map(Residuals(roi, np.zeros(roi.shape), np.zeros(roi.shape), pixel, pixel.copy()))
    assert fused[7, 7, 1] == 0 and fused.max() == pytest.approx(1.0) and fused[3, 3, 0] == fused.max()
    assert fused.min() >= 0


def test_final_mask_thresholds_inside_the_roi_and_drops_small_components():
    probability = np.zeros((10, 10, 3), np.float32)
    probability[1:4, 1:4, 1] = 0.9  # 9 voxels
    probability[7, 7, 1] = 0.9  # 1 voxel
    probability[5:8, 0:3, 2] = 0.4  # below the threshold
    roi = np.ones(probability.shape, bool)
    roi[3, 1:4, 1] = False  # 3 of the 9 outside the ROI
    mask = final_mask(probability, 0.5, roi, min_voxels=4)
    assert mask.sum() == 6 and mask[1:3, 1:4, 1].all() and not mask[7, 7, 1]
    assert final_mask(np.zeros_like(probability), 0.5, roi, 1).sum() == 0


def test_coarse_roi_enlarges_every_candidate_kept_or_not():
    anomaly = np.zeros((20, 20, 5), np.float32)
    a, b = np.zeros(anomaly.shape, bool), np.zeros(anomaly.shape, bool)
    a[5, 5, 2], b[15, 15, 2] = True, True
    detection = Detection(anomaly, np.ones(anomaly.shape, bool), [Region(a, 1, 0.5, 0.9), Region(b, 1, 0.5, 0.1)])
    roi = coarse_roi(detection, (1.0, 1.0, 1.0), margin_mm=2.0)
    assert roi[5, 7, 2] and roi[15, 13, 2] and not roi[5, 8, 2] and roi.sum() == 2 * 33  # two balls of radius 2
    assert not coarse_roi(Detection(anomaly, anomaly > 0), (1, 1, 1), 2.0).any()


def test_dice_bce_counts_only_the_roi():
    target = torch.zeros(1, 8, 8)
    target[0, 2:4, 2:4] = 1
    roi = torch.zeros(1, 8, 8)
    roi[0, :5, :5] = 1
    good = (target * 2 - 1) * 20  # confident and right
    assert _dice_bce(good, target, roi).item() < 0.05
    wrong_outside = good.clone()
    wrong_outside[0, 7, 7] = 20  # a confident false positive outside the ROI costs nothing
    assert _dice_bce(wrong_outside, target, roi).item() == pytest.approx(_dice_bce(good, target, roi).item())
    assert _dice_bce(-good, target, roi).item() > 1.0


def test_residual_head_size_and_save_load_round_trip(tmp_path):
    head = ResidualHead(16).eval()
    assert head.parameter_count < 10_000  # small on purpose: a 0.13 M head overfitted (docs/refinement_findings.md)
    x = torch.randn(2, 5, 48, 40)
    assert head(x).shape == (2, 48, 40)
    trained = TrainedResidualHead(head, RefinementThresholds(0.3, 0.6, "test"), ResidualConfig(steps=1, channels=16),
                                  "seen-unseen")
    trained.save(tmp_path)
    loaded = TrainedResidualHead.load(tmp_path)
    assert torch.equal(loaded.head(x), head(x)) and loaded.thresholds == trained.thresholds
    assert loaded.config == trained.config


def test_pseudo_healthy_cache_returns_the_same_image_and_keys_on_the_region(tmp_path):
    from diffugts_core.text import TextEncoder

    backbone, text_encoder = tiny_backbone(), TextEncoder.from_pretrained(device="cpu")
    rng = np.random.default_rng(1)
    image = rng.uniform(-100, 200, (32, 32, 4)).astype(np.float32)
    roi = np.zeros(image.shape, bool)
    roi[10:16, 10:16, 1:3] = True
    config = InpaintConfig(steps=2)
    first, _ = inpaint_region(backbone, text_encoder, image, "CT", "abdomen", "liver", roi, config, cache=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again, _ = inpaint_region(backbone, text_encoder, image, "CT", "abdomen", "liver", roi, config, cache=tmp_path)
    assert np.array_equal(first, again) and len(list(tmp_path.glob("*.npz"))) == 1
    other = roi.copy()
    other[20, 20, 1] = True
    inpaint_region(backbone, text_encoder, image, "CT", "abdomen", "liver", other, config, cache=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2  # another region, another entry
    assert np.array_equal(first[~roi], image[~roi])


def test_a_leak_in_the_residual_training_data_is_caught(monkeypatch):
    from diffugts_core.heads import HeadsConfig

    def leaky(setting, split, config, shape):
        yield phantoms.generate_case("lung", 0, 1, (32, 32, 16))  # unseen in seen-unseen

    monkeypatch.setattr(residual_module, "split_cases", leaky)
    heads = type("Heads", (), {"setting": "seen-unseen", "seen": ("liver", "kidney", "pancreas"),
                               "config": HeadsConfig()})()
    with pytest.raises(RuntimeError, match="lung"):
        residual_module.train_residual_head(heads, None, None, progress=False)


def test_train_residual_head_on_a_small_refine_split_validates_its_thresholds(tmp_path):
    from diffugts_core.backbone import load_backbone
    from diffugts_core.heads import load_heads
    from diffugts_core.text import TextEncoder

    heads = load_heads()
    heads.config = replace(heads.config, train_per_category=1, healthy_per_region=1, validation_per_category=1)
    backbone, text_encoder = load_backbone(device="cpu"), TextEncoder.from_pretrained(device="cpu")
    config = ResidualConfig(steps=5, inpaint=InpaintConfig(steps=3))
    trained = residual_module.train_residual_head(heads, backbone, text_encoder, config, cache=tmp_path / "cache",
                                                  progress=False, shape=(128, 128, 16))
    assert trained.setting == "seen-unseen" and trained.config == config
    assert trained.thresholds.provenance.startswith("validation split of seen categories (seed 2001, 3 tumor cases)")
    assert len(list((tmp_path / "cache").glob("*.npz"))) >= 6  # the refine cases' pseudo-healthy images, cached
    trained.save(tmp_path / "heads")
    assert TrainedResidualHead.load(tmp_path / "heads").thresholds == trained.thresholds


def test_lesion_free_cases_are_new_healthy_cases_of_the_regions_no_seen_category_lies_in():
    from diffugts_core.heads import SEEDS, HeadsConfig

    def heads_of(setting, seen):
        return type("Heads", (), {"setting": setting, "seen": seen, "config": HeadsConfig(healthy_per_region=4)})()

    shape = (32, 32, 16)
    assert residual_module.lesion_free_cases(heads_of("ct-mri", phantoms.CT_CATEGORIES), ResidualConfig(), shape) == []
    config = ResidualConfig(lesion_free_healthy=2)
    ct_mri = residual_module.lesion_free_cases(heads_of("ct-mri", phantoms.CT_CATEGORIES), config, shape)
    assert [(c.category, c.region, c.modality) for c in ct_mri] == [("healthy", "brain", "MRI")] * 2
    # the refine split's own healthy cases are indices 0-3: these are others, of the same seed
    own = phantoms.generate_case("healthy", 3, SEEDS["refine"], shape, region="brain")
    assert ct_mri[0].case_id != own.case_id and not np.array_equal(ct_mri[0].image, own.image)
    assert np.array_equal(ct_mri[0].image, phantoms.generate_case("healthy", 4, SEEDS["refine"], shape,
                                                                  region="brain").image)
    no_lung = tuple(c for c in phantoms.CT_CATEGORIES if c != "lung")  # loo-lung: the thorax holds no seen category
    regions = [c.region for c in residual_module.lesion_free_cases(heads_of("loo-lung", no_lung), config, shape)]
    assert regions == ["thorax", "thorax", "brain", "brain"]
    assert all(c.tumor.sum() == 0 for c in ct_mri)


def test_a_residual_head_saved_before_lesion_free_cases_existed_loads_as_trained_without_them():
    saved = asdict(ResidualConfig(lesion_free_healthy=5))
    del saved["lesion_free_healthy"]
    assert ResidualConfig.from_dict(saved).lesion_free_healthy == 0
    assert ResidualConfig.from_dict(asdict(ResidualConfig(lesion_free_healthy=5))).lesion_free_healthy == 5
