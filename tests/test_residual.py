"""Stage 5: ROI inpainting windows, residuals, the training-free fusion, the residual head and its training data."""

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from diffugts_core.data import phantoms
from diffugts_core import residual as residual_module
from diffugts_core import vocabulary
from diffugts_core.detect import Detection, Region
from diffugts_core.inpaint import InpaintConfig, coarse_roi, inpaint_region, inpaint_slices, lesion_windows
from diffugts_core.io import InputError
from diffugts_core.residual import (RefinementThresholds, ResidualConfig, ResidualHead, Residuals, TrainedResidualHead,
                                    feature_residual, final_mask, fusion_map, pixel_residual)
from diffugts_core.training import residual as training_residual
from diffugts_core.training.residual import _dice_bce

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
    assert head.parameter_count < 10_000  # small on purpose: a 0.13 M head overfitted (docs/findings/refinement.md)
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

    monkeypatch.setattr(training_residual, "split_cases", leaky)
    heads = type("Heads", (), {"setting": "seen-unseen", "seen": ("liver", "kidney", "pancreas"),
                               "config": HeadsConfig()})()
    with pytest.raises(RuntimeError, match="lung"):
        training_residual.train_residual_head(heads, None, None, progress=False)


def test_train_residual_head_on_a_small_refine_split_validates_its_thresholds(tmp_path):
    from diffugts_core.backbone import load_backbone
    from diffugts_core.heads import load_heads
    from diffugts_core.text import TextEncoder

    heads = load_heads()
    heads.config = replace(heads.config, train_per_category=1, healthy_per_region=1, validation_per_category=1)
    backbone, text_encoder = load_backbone(device="cpu"), TextEncoder.from_pretrained(device="cpu")
    config = ResidualConfig(steps=5, inpaint=InpaintConfig(steps=3))
    trained = training_residual.train_residual_head(heads, backbone, text_encoder, config, cache=tmp_path / "cache",
                                                  progress=False, shape=(128, 128, 16))
    assert trained.setting == "seen-unseen" and trained.config == config
    assert trained.thresholds.provenance.startswith("validation split of seen categories (seed 2001, 3 tumor cases)")
    assert len(list((tmp_path / "cache").glob("*.npz"))) >= 6  # the refine cases' pseudo-healthy images, cached
    trained.save(tmp_path / "heads")
    assert TrainedResidualHead.load(tmp_path / "heads").thresholds == trained.thresholds


def _heads_of(setting, seen):
    from diffugts_core.heads import HeadsConfig

    return type("Heads", (), {"setting": setting, "seen": seen, "config": HeadsConfig(healthy_per_region=4)})()


def test_a_modality_no_seen_category_is_in_gets_its_own_head_on_healthy_cases_only():
    from diffugts_core.data.splits import SEEDS

    shape = (32, 32, 16)
    ct_mri = _heads_of("ct-mri", vocabulary.CT_CATEGORIES)
    assert training_residual.modality_regions(ct_mri) == {"MRI": ("brain",)}
    assert training_residual.modality_regions(_heads_of("upper-bound", (*vocabulary.CT_CATEGORIES, "brain"))) == {}
    cases = training_residual.modality_cases(ct_mri, "MRI", "refine", 2, shape)
    assert [(c.category, c.region, c.modality) for c in cases] == [("healthy", "brain", "MRI")] * 2
    assert all(c.tumor.sum() == 0 for c in cases)  # no tumor of any category reaches the MRI head
    assert np.array_equal(cases[1].image, phantoms.generate_case("healthy", 1, SEEDS["refine"], shape,
                                                                 region="brain").image)
    validation = training_residual.modality_cases(ct_mri, "MRI", "validation", 1, shape)[0]
    assert not np.array_equal(validation.image, cases[0].image)  # another seed: validation is not training
    assert training_residual.train_modality_heads(ct_mri, None, None, ResidualConfig(modality_healthy=0),
                                                progress=False) == []


def test_train_modality_heads_writes_an_mri_head_thresholded_on_synthetic_anomalies(tmp_path):
    from diffugts_core.backbone import load_backbone
    from diffugts_core.heads import load_heads
    from diffugts_core.text import TextEncoder

    heads = load_heads()
    backbone, text_encoder = load_backbone(device="cpu"), TextEncoder.from_pretrained(device="cpu")
    config = ResidualConfig(steps=5, modality_healthy=1, modality_validation=1, inpaint=InpaintConfig(steps=3))
    (trained,) = training_residual.train_modality_heads(heads, backbone, text_encoder, config, progress=False,
                                                      shape=(128, 128, 16))
    assert (trained.modality, trained.setting, trained.config) == ("MRI", "seen-unseen", config)
    assert trained.thresholds.provenance.startswith(
        "synthetic anomalies in healthy MRI validation cases (seed 2001, 1 cases): mean DSC")
    trained.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["residual_mri.json", "residual_mri.safetensors"]
    loaded = residual_module.load_modality_heads(tmp_path)
    assert list(loaded) == ["MRI"] and loaded["MRI"].thresholds == trained.thresholds
    x = torch.randn(1, 5, 24, 24)
    assert torch.equal(loaded["MRI"].head(x), trained.head(x))


def test_residual_heads_saved_before_modality_heads_existed_still_load():
    saved = asdict(ResidualConfig())
    for key in ("modality_healthy", "modality_anomalies", "modality_validation"):
        del saved[key]
    assert ResidualConfig.from_dict(saved) == ResidualConfig()  # missing keys: the defaults
    assert ResidualConfig.from_dict({**saved, "lesion_free_healthy": 0, "lesion_free_anomalies": 3}) == ResidualConfig()
    with pytest.raises(InputError, match="--residual-only"):  # the superseded experiment is not silently reused
        ResidualConfig.from_dict({**saved, "lesion_free_healthy": 12})


def test_refinement_reaches_the_whole_organ_only_when_detection_flags_it():
    from diffugts_core.detect import Detection, Region

    anomaly = np.zeros((20, 20, 6), np.float32)
    organ_region = np.zeros(anomaly.shape, bool)
    organ_region[2:18, 2:18, 1:5] = True
    candidate = np.zeros(anomaly.shape, bool)
    candidate[4:6, 4:6, 2] = True
    flagged = Detection(anomaly, organ_region, [Region(candidate, 4, 0.8, 0.9)], kept=candidate.copy())
    unflagged = Detection(anomaly, organ_region, [Region(candidate, 4, 0.8, 0.1)], kept=np.zeros(anomaly.shape, bool))
    spacing = (1.0, 1.0, 1.0)
    assert np.array_equal(coarse_roi(flagged, spacing, 0.0), candidate)  # reach off: the candidates
    assert np.array_equal(coarse_roi(unflagged, spacing, 0.0, organ_reach=True), candidate)
    reached = coarse_roi(flagged, spacing, 0.0, organ_reach=True)
    assert np.array_equal(reached, organ_region | candidate)
