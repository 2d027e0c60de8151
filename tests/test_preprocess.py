"""Every spatial step is invertible: a mask made in processing space overlays the input voxel for voxel."""

import nibabel as nib
import numpy as np
import pytest

from diffugts_core.io import InputError, Volume, load_volume, save_volume
from diffugts_core.metrics import dice as dice_score
from diffugts_core.preprocess import SpatialConfig, normalize_mri, plan_spatial, unwindow_ct, window_ct
from diffugts_core.vocabulary import ORGAN_LABELS

RAS = np.diag([1.5, 1.5, 3.0, 1.0])
LPS = np.diag([-1.5, -1.5, 3.0, 1.0])


def oblique_affine():
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    permute = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]])  # axes stored as (S, R, -A): a sagittal-ish file
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permute @ np.diag([1.2, 0.8, 2.5])
    affine[:3, 3] = [-40, 12, 7]
    return affine


AFFINES = {"RAS": RAS, "LPS": LPS, "oblique": oblique_affine()}
CONFIGS = {
    "orientation only": SpatialConfig(),
    "pad to multiple of 16": SpatialConfig(divisible_by=16),
    "resample to half spacing + pad": SpatialConfig(target_spacing=(0.5, 0.5, 0.5), divisible_by=8),
    "fixed shape (crop and pad)": SpatialConfig(target_shape=(20, 40, 16)),
}


def blob(shape, centre, radius):
    grid = np.indices(shape).astype(float)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2).astype(np.uint8)


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("affine_name", AFFINES)
def test_mask_roundtrip_voxel_for_voxel(tmp_path, affine_name, config_name):
    shape = (24, 30, 18)
    mask = blob(shape, (11, 14, 8), 5) | blob(shape, (4, 24, 12), 2)
    save_volume(mask, AFFINES[affine_name], tmp_path / "in.nii.gz")
    volume = load_volume(tmp_path / "in.nii.gz", dtype=np.uint8)
    plan = plan_spatial(volume, CONFIGS[config_name])
    processed = plan.apply(volume.array, order=0)
    assert processed.shape == plan.shape and processed.sum() > 0
    back = plan.invert(processed, kind="mask")
    if config_name == "fixed shape (crop and pad)":  # the crop cuts part of the volume: the rest comes back exactly
        kept = plan.invert(np.ones(plan.shape, np.uint8), kind="mask").astype(bool)
        assert kept.any() and not kept.all()
        np.testing.assert_array_equal(back[kept], mask[kept])
        assert not back[~kept].any() and processed.sum() == mask[kept].sum()
        mask = np.where(kept, mask, 0)
    np.testing.assert_array_equal(back, mask)
    save_volume(back, volume.affine, tmp_path / "out.nii.gz")
    written = nib.load(str(tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(written.affine, volume.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)


@pytest.mark.parametrize("affine_name", AFFINES)
def test_processing_space_is_ras_and_keeps_world_positions(affine_name):
    shape = (24, 30, 18)
    volume = Volume(np.zeros(shape, np.float32), AFFINES[affine_name])
    plan = plan_spatial(volume, SpatialConfig(target_spacing=(1.0, 1.0, 1.0), divisible_by=8))
    assert nib.orientations.aff2axcodes(plan.affine) == ("R", "A", "S")
    marker = np.zeros(shape, np.float32)
    marker[5, 20, 9] = 1.0
    processed = plan.apply(marker, order=1)
    centre_processed = np.array(np.unravel_index(processed.argmax(), processed.shape), float)
    world_in = volume.affine @ np.array([5, 20, 9, 1.0])
    world_processed = plan.affine @ np.append(centre_processed, 1.0)
    # the brightest voxel of the resampled marker lies within one processing voxel of the original
    assert np.linalg.norm(world_in[:3] - world_processed[:3]) <= np.linalg.norm(plan.spacing) + 1e-6


def test_labels_roundtrip_through_upsampling():
    labels = np.zeros((10, 12, 8), np.uint8)
    labels[2:6, 3:9, 1:5] = 4
    labels[6:9, 3:5, 2:7] = 7
    volume = Volume(labels, LPS)
    plan = plan_spatial(volume, SpatialConfig(target_spacing=(0.75, 0.75, 1.0)))
    np.testing.assert_array_equal(plan.invert(plan.apply(labels, order=0), kind="labels"), labels)


def test_divisible_padding_shape():
    plan = plan_spatial(Volume(np.zeros((30, 33, 17)), RAS), SpatialConfig(divisible_by=(16, 16, 8)))
    assert plan.shape == (32, 48, 24)


def test_ct_windows():
    hu = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0])
    np.testing.assert_allclose(window_ct(hu, "maisi"), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(window_ct(np.array([-160.0, 40.0, 240.0]), "soft_tissue"), [0, 0.5, 1])
    np.testing.assert_allclose(unwindow_ct(window_ct(np.array([-500.0, 20.0]))), [-500.0, 20.0], atol=1e-3)
    with pytest.raises(ValueError, match="unknown CT window"):
        window_ct(hu, "brain")


def test_mri_percentile_normalisation():
    image = np.concatenate([np.zeros(100), np.linspace(1, 200, 200)]).astype(np.float32).reshape(10, 10, 3)
    out = normalize_mri(image, 0, 100)
    assert out.min() == 0 and out.max() == 1
    assert out.reshape(-1)[-1] == 1 and out.reshape(-1)[100] == 0


def test_body_mask_fills_the_lungs_and_leaves_the_air_outside():
    from diffugts_core.data import phantoms
    from diffugts_core.preprocess import body_mask

    case = phantoms.generate_case("healthy", 0, 1, (64, 64, 32), region="thorax")
    body = body_mask(case.image, "CT")
    lungs = np.isin(case.organs, [ORGAN_LABELS["lung_right"], ORGAN_LABELS["lung_left"]])
    assert body[lungs].mean() > 0.99  # air inside the chest is body
    assert (body == (case.organs > 0)).mean() > 0.98
    assert not body[0, 0, :].any()  # the corner of the field of view is outside air


def test_model_grid_plan_resamples_to_the_model_spacing_and_slice_size():
    from diffugts_core.preprocess import MODEL_SPACING_MM, model_grid_plan

    volume = Volume(np.zeros((300, 260, 40), np.float32), np.diag([-1.0, -1.0, 2.0, 1.0]))  # LPS, 1 x 1 x 2 mm
    plan = model_grid_plan(volume, "CT")
    assert plan.shape == (128, 128, 20)  # 300 mm / 2.5 = 120 -> padded to 128; 80 mm / 4 = 20 slices
    np.testing.assert_allclose(plan.spacing, MODEL_SPACING_MM["CT"], rtol=0.02)
    assert nib.orientations.aff2axcodes(plan.affine) == ("R", "A", "S")
    mask = blob(volume.shape, (150, 130, 20), 20)
    back = plan.invert(plan.apply(mask, order=0), kind="mask")
    assert back.shape == volume.shape and dice_score(back, mask) > 0.9
    with pytest.raises(InputError, match="CT or MRI"):
        model_grid_plan(volume, "PET")
