"""Segmentation and detection metrics: Dice, normalised surface Dice (NSD) and case-level AUROC.

Masks are 3D arrays; any nonzero voxel is foreground. Surface distances and the AUROC come from
MONAI, so the numbers match what MONAI-based papers report.

Empty-mask semantics, the same for Dice and NSD: when both masks are empty the score is 1.0
(nothing to find, nothing found); when exactly one is empty it is 0.0 (a missed tumor or a
false alarm). MONAI returns NaN for some of these cases; no NaN ever leaves this module.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_roc_auc, compute_surface_dice

from .io import InputError, check_same_grid, load_volume, nifti_files

SCORE_BOTH_EMPTY = 1.0
SCORE_ONE_EMPTY = 0.0
CASE_ID_SUFFIXES = ("_tumor", "_mask", "_pred", "_seg", "_label")


def _as_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred) != 0, np.asarray(ref) != 0
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} does not match reference shape {ref.shape}.")
    return pred, ref


def empty_mask_score(pred: np.ndarray, ref: np.ndarray) -> float | None:
    """The score fixed by the empty-mask semantics, or None when both masks have foreground."""
    pred_empty, ref_empty = not pred.any(), not ref.any()
    if pred_empty and ref_empty:
        return SCORE_BOTH_EMPTY
    if pred_empty or ref_empty:
        return SCORE_ONE_EMPTY
    return None


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient 2|P∩R| / (|P| + |R|) of two 3D masks."""
    pred, ref = _as_masks(pred, ref)
    fixed = empty_mask_score(pred, ref)
    if fixed is not None:
        return fixed
    overlap = np.logical_and(pred, ref).sum()
    return float(2.0 * overlap / (pred.sum() + ref.sum()))


def surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], tolerance_mm: float = 2.0
) -> float:
    """Normalised surface Dice: the fraction of both boundaries lying within ``tolerance_mm`` of the other.

    ``spacing`` is the voxel size in mm per array axis, so distances are physical.
    """
    pred, ref = _as_masks(pred, ref)
    fixed = empty_mask_score(pred, ref)
    if fixed is not None:
        return fixed
    with warnings.catch_warnings():
        # MONAI 1.6 passes a deprecated argument to itself on every call; not actionable here.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        nsd = compute_surface_dice(
            _one_hot(pred),
            _one_hot(ref),
            class_thresholds=[float(tolerance_mm)],
            include_background=False,
            spacing=[float(s) for s in spacing],
            # Boundary voxels are counted (MONAI's default). Subvoxel surface-area weighting only
            # matters to reproduce DeepMind surface-distance numbers, which this kit does not compare to.
            use_subvoxels=False,
        )
    score = float(nsd[0, 0])
    return SCORE_ONE_EMPTY if np.isnan(score) else score


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """(1, 2, *spatial) bool tensor: background channel, foreground channel."""
    return torch.from_numpy(np.stack([~mask, mask]))[None]


def detection_auroc(scores, labels) -> float:
    """Case-level detection AUROC of tumor scores against 0/1 labels; tied scores count 0.5."""
    scores, labels = _checked_scores(scores, labels)
    return float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(labels.astype(np.int64))))


def _checked_scores(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be 1D of equal length.")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (no tumor) or 1 (tumor), got values {np.unique(labels).tolist()}.")
    if len(np.unique(labels)) < 2:
        raise ValueError("AUROC is undefined: labels contain only one class; include tumor and tumor-free cases.")
    return scores, labels


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct score, from (0, 0) to (1, 1), for plotting."""
    scores, labels = _checked_scores(scores, labels)
    thresholds = np.unique(scores)[::-1]
    positives, negatives = labels.sum(), (1 - labels).sum()
    tpr = [0.0] + [float((labels[scores >= t] == 1).sum() / positives) for t in thresholds]
    fpr = [0.0] + [float((labels[scores >= t] == 0).sum() / negatives) for t in thresholds]
    return np.array(fpr), np.array(tpr)


@dataclass
class CaseMetrics:
    """Scores of one case; voxel counts tell tumor-positive cases (ref_voxels > 0) apart."""

    case_id: str
    dsc: float
    nsd: float
    tolerance_mm: float
    pred_voxels: int
    ref_voxels: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_pair(
    pred_path: str | os.PathLike, ref_path: str | os.PathLike, tolerance_mm: float = 2.0, case_id: str | None = None
) -> CaseMetrics:
    """Score a predicted mask file against a reference mask file on the same voxel grid."""
    reference = load_volume(ref_path, role="reference", dtype=np.int16)
    prediction = load_volume(pred_path, role="prediction", dtype=np.int16)
    check_same_grid(reference, prediction)
    pred, ref = prediction.array != 0, reference.array != 0
    return CaseMetrics(
        case_id=case_id or case_id_from_name(Path(ref_path).name),
        dsc=dice(pred, ref),
        nsd=surface_dice(pred, ref, reference.spacing, tolerance_mm),
        tolerance_mm=float(tolerance_mm),
        pred_voxels=int(pred.sum()),
        ref_voxels=int(ref.sum()),
    )


def case_id_from_name(name: str) -> str:
    """``liver_000_tumor.nii.gz`` and ``liver_000_pred.nii`` both give ``liver_000``."""
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
    for suffix in CASE_ID_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _masks_by_case(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{folder}: {role} folder not found; check the path.")
    by_case: dict[str, Path] = {}
    for path in nifti_files(folder):
        case_id = case_id_from_name(path.name)
        if case_id in by_case:
            raise InputError(f"{folder}: {by_case[case_id].name} and {path.name} are both case {case_id!r}; keep one.")
        by_case[case_id] = path
    return by_case


def evaluate_folders(
    pred_dir: str | os.PathLike, ref_dir: str | os.PathLike, tolerance_mm: float = 2.0
) -> list[CaseMetrics]:
    """Score every reference mask in ``ref_dir`` against its prediction in ``pred_dir``, paired by case id.

    A reference without a prediction is an error (a skipped case would inflate the mean);
    predictions without a reference are ignored.
    """
    preds = _masks_by_case(Path(pred_dir), "prediction")
    refs = _masks_by_case(Path(ref_dir), "reference")
    paired = [case_id for case_id in refs if case_id in preds]
    if not paired:
        raise InputError(
            f"no prediction in {pred_dir} matches a reference in {ref_dir} by case id; "
            f"predictions: {[p.name for p in list(preds.values())[:3]]}, "
            f"references: {[p.name for p in list(refs.values())[:3]]}."
        )
    missing = [case_id for case_id in refs if case_id not in preds]
    if missing:
        raise InputError(f"{pred_dir}: no prediction for {len(missing)} reference case(s): {missing[:5]}.")
    return [evaluate_pair(preds[case_id], refs[case_id], tolerance_mm, case_id) for case_id in paired]


def summarize(results: list[CaseMetrics]) -> dict:
    """Mean DSC and NSD over all given cases; filter to tumor-positive cases first if that is the cohort."""
    if not results:
        raise ValueError("no cases to summarize.")
    return {
        "cases": len(results),
        "mean_dsc": float(np.mean([r.dsc for r in results])),
        "mean_nsd": float(np.mean([r.nsd for r in results])),
        "tolerance_mm": results[0].tolerance_mm,
    }
