"""Metrics against hand-computed answers.

The shifted-cube cases use a 4x4x4 cube (56 surface voxels: a 1-voxel shell) moved by one voxel
along axis 0. Of each cube's 56 surface voxels, 36 lie on the other cube's surface, 4 (the inner
face of the overlap's first slab) are one voxel from it along *any* axis, and 16 (the far face)
are one voxel from it only along the shift axis. Hence NSD = 72/112 = 9/14 when the tolerance
is below one voxel, and 80/112 = 5/7 when only the shift axis is coarser than the tolerance.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from diffugts_core.io import InputError
from diffugts_core.metrics import (
    CaseMetrics,
    case_id_from_name,
    detection_auroc,
    roc_curve,
    dice,
    evaluate_folders,
    evaluate_pair,
    summarize,
    surface_dice,
)

SHAPE = (10, 10, 10)
ISOTROPIC = (1.0, 1.0, 1.0)


def cube(start: int = 2, size: int = 4, axis_shift: int = 0, shift: int = 0) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    lo = [start] * 3
    lo[axis_shift] += shift
    mask[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = True
    return mask


def test_identical_masks_score_one():
    mask = cube()
    assert dice(mask, mask) == 1.0
    assert surface_dice(mask, mask, ISOTROPIC) == 1.0


def test_disjoint_far_apart_masks_score_zero():
    pred, ref = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    pred[:2, :2, :2] = True
    ref[7:, 7:, 7:] = True
    assert dice(pred, ref) == 0.0
    assert surface_dice(pred, ref, ISOTROPIC, tolerance_mm=2.0) == 0.0


def test_dice_hand_computed():
    pred, ref = np.zeros(SHAPE, np.int16), np.zeros(SHAPE, np.int16)
    pred[0, 0, 0:4] = 1  # 4 voxels
    ref[0, 0, 1:7] = 2  # 6 voxels, any nonzero label is foreground; overlap 3
    assert dice(pred, ref) == pytest.approx(2 * 3 / (4 + 6))


def test_dice_shape_mismatch_names_both_shapes():
    with pytest.raises(InputError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        dice(np.ones((4, 4, 4)), np.ones((4, 4, 5)))


def test_shifted_cube_isotropic_tolerance():
    pred, ref = cube(shift=1), cube()
    assert dice(pred, ref) == pytest.approx(2 * 48 / (64 + 64))
    assert surface_dice(pred, ref, ISOTROPIC, tolerance_mm=2.0) == 1.0
    assert surface_dice(pred, ref, ISOTROPIC, tolerance_mm=1.0) == 1.0  # distance <= tolerance counts
    assert surface_dice(pred, ref, ISOTROPIC, tolerance_mm=0.5) == pytest.approx(9 / 14)


def test_anisotropic_spacing_matters():
    pred, ref = cube(shift=1), cube()
    assert surface_dice(pred, ref, (3.0, 1.0, 1.0), tolerance_mm=2.0) == pytest.approx(5 / 7)
    assert surface_dice(pred, ref, (1.0, 3.0, 3.0), tolerance_mm=2.0) == 1.0


@pytest.mark.parametrize(
    "pred_empty, ref_empty, expected",
    [(True, True, 1.0), (True, False, 0.0), (False, True, 0.0)],
)
def test_empty_mask_semantics(pred_empty, ref_empty, expected):
    empty = np.zeros(SHAPE, bool)
    pred = empty if pred_empty else cube()
    ref = empty if ref_empty else cube()
    dsc, nsd = dice(pred, ref), surface_dice(pred, ref, ISOTROPIC)
    assert not math.isnan(dsc) and not math.isnan(nsd)
    assert (dsc, nsd) == (expected, expected)


def test_auroc_perfect_inverted_and_tied():
    labels = [0, 0, 1, 1]
    assert detection_auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert detection_auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert detection_auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5


def test_auroc_hand_computed():
    # positive-negative pairs won: (0.35>0.1), (0.8>0.1), (0.8>0.4); lost: (0.35<0.4) -> 3/4
    assert detection_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # one tied pair (0.5 vs 0.5) counts half: (1 + 0.5 + 1 + 1) / 4
    assert detection_auroc([0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.875)


def test_roc_curve_hand_computed_and_its_area_is_the_auroc():
    fpr, tpr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    # thresholds 0.8, 0.4, 0.35, 0.1: (0, .5), (.5, .5), (.5, 1), (1, 1)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(detection_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]))


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_auroc_single_class_raises(labels):
    with pytest.raises(ValueError, match="only one class"):
        detection_auroc([0.1, 0.5, 0.9], labels)


def test_case_id_from_name():
    assert case_id_from_name("liver_000_tumor.nii.gz") == "liver_000"
    assert case_id_from_name("liver_000_pred.nii") == "liver_000"
    assert case_id_from_name("liver_000.nii.gz") == "liver_000"


# Non-identity affine: spacing (1, 1, 2) mm, a flipped first axis and an offset.
AFFINE = np.array([[-1.0, 0, 0, 40], [0, 1, 0, -20], [0, 0, 2, 7], [0, 0, 0, 1]])


def write_mask(path, mask, affine=AFFINE):
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(path))
    return path


def test_evaluate_pair_uses_reference_spacing(tmp_path):
    # shift along axis 2 (2 mm): within 2 mm everywhere, but the far face misses a 1 mm tolerance
    ref = write_mask(tmp_path / "case_tumor.nii.gz", cube())
    pred = write_mask(tmp_path / "case_pred.nii.gz", cube(axis_shift=2, shift=1))
    result = evaluate_pair(pred, ref, tolerance_mm=1.0)
    assert result.case_id == "case"
    assert result.dsc == pytest.approx(0.75)
    assert result.nsd == pytest.approx(5 / 7)
    assert (result.pred_voxels, result.ref_voxels, result.tolerance_mm) == (64, 64, 1.0)
    assert evaluate_pair(pred, ref, tolerance_mm=2.0, case_id="named").to_dict() == {
        "case_id": "named", "dsc": 0.75, "nsd": 1.0, "tolerance_mm": 2.0, "pred_voxels": 64, "ref_voxels": 64,
    }


def test_evaluate_pair_shape_mismatch_raises(tmp_path):
    ref = write_mask(tmp_path / "ref.nii.gz", cube())
    pred = write_mask(tmp_path / "pred.nii.gz", np.zeros((10, 10, 11), bool))
    with pytest.raises(InputError, match="shape"):
        evaluate_pair(pred, ref)


def make_folders(tmp_path, ref_cases, pred_cases):
    ref_dir, pred_dir = tmp_path / "refs", tmp_path / "preds"
    ref_dir.mkdir()
    pred_dir.mkdir()
    for case_id, mask in ref_cases.items():
        write_mask(ref_dir / f"{case_id}_tumor.nii.gz", mask)
    for case_id, mask in pred_cases.items():
        write_mask(pred_dir / f"{case_id}_pred.nii.gz", mask)
    return pred_dir, ref_dir


def test_evaluate_folders_and_summarize(tmp_path):
    far = np.zeros(SHAPE, bool)
    far[8:, 8:, 8:] = True
    pred_dir, ref_dir = make_folders(
        tmp_path,
        ref_cases={"liver_000": cube(), "liver_001": cube()},
        pred_cases={"liver_000": cube(), "liver_001": far, "extra_999": cube()},  # extra is ignored
    )
    results = evaluate_folders(pred_dir, ref_dir, tolerance_mm=2.0)
    assert [(r.case_id, r.dsc, r.nsd) for r in results] == [("liver_000", 1.0, 1.0), ("liver_001", 0.0, 0.0)]
    assert summarize(results) == {"cases": 2, "mean_dsc": 0.5, "mean_nsd": 0.5, "tolerance_mm": 2.0}


def test_evaluate_folders_identical_names_pair(tmp_path):
    ref_dir, pred_dir = tmp_path / "refs", tmp_path / "preds"
    ref_dir.mkdir()
    pred_dir.mkdir()
    write_mask(ref_dir / "kidney_003.nii.gz", cube())
    write_mask(pred_dir / "kidney_003.nii.gz", cube())
    assert [r.case_id for r in evaluate_folders(pred_dir, ref_dir)] == ["kidney_003"]


def test_evaluate_folders_missing_prediction_raises(tmp_path):
    pred_dir, ref_dir = make_folders(
        tmp_path, ref_cases={"liver_000": cube(), "liver_001": cube()}, pred_cases={"liver_000": cube()}
    )
    with pytest.raises(InputError, match="liver_001"):
        evaluate_folders(pred_dir, ref_dir)


def test_evaluate_folders_no_pairs_lists_names(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path, ref_cases={"liver_000": cube()}, pred_cases={"lung_007": cube()})
    with pytest.raises(InputError, match="lung_007_pred.nii.gz.*liver_000_tumor.nii.gz"):
        evaluate_folders(pred_dir, ref_dir)


def test_evaluate_folders_missing_folder_raises(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        evaluate_folders(tmp_path / "nope", tmp_path)


def test_summarize_means_all_given_cases():
    results = [
        CaseMetrics("a", dsc=0.8, nsd=0.9, tolerance_mm=2.0, pred_voxels=10, ref_voxels=12),
        CaseMetrics("b", dsc=0.4, nsd=0.6, tolerance_mm=2.0, pred_voxels=5, ref_voxels=7),
        CaseMetrics("c", dsc=0.0, nsd=0.0, tolerance_mm=2.0, pred_voxels=0, ref_voxels=3),
    ]
    summary = summarize(results)
    assert summary["cases"] == 3
    assert summary["mean_dsc"] == pytest.approx(0.4)
    assert summary["mean_nsd"] == pytest.approx(0.5)
    assert summary["tolerance_mm"] == 2.0
