"""The refinement stage measured on PhantomBench: AOVA-only, the training-free fusion and the full method per unseen
category, with the pseudo-healthy image's HU inside the tumor."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from tqdm.auto import tqdm

from ..data.splits import role_categories, split_cases
from ..metrics import dice, surface_dice
from ..pipeline import DiffuGTSPipeline
from ..residual import final_mask
from ..vocabulary import CATEGORY_ORGAN, category_modality


def evaluate_refinement(pipeline: DiffuGTSPipeline, *, test_per_category: int = 4, role: str = "unseen",
                        tolerance_mm: float = 2.0, inpaint_steps: int | None = None,
                        progress: bool = False) -> tuple[list[dict], list[dict]]:
    """AOVA-only, training-free fusion and the full method on the setting's unseen test cases: (per category, per case).
    ``inpaint_steps``: DDIM steps of the inpainting (None: the residual head's; fewer for a quick look only).

    Per case also: the mean HU of the input, of H and of the surrounding healthy organ inside the tumor (the part of
    the tumor inside the ROI: outside it H is the input by construction), and how much of the tumor the ROI covers."""
    heads = pipeline.heads
    config = replace(heads.config, test_per_category=test_per_category)
    cases = [c for c in split_cases(heads.setting, "test", config, test_role=role) if c.category != "healthy"]
    per_case = []
    for case in tqdm(cases, desc=f"refinement {heads.setting}", disable=not progress):
        residual_head = pipeline.residual_head(case.modality)
        inpaint = None if inpaint_steps is None else replace(residual_head.config.inpaint, steps=inpaint_steps)
        result = pipeline.segment_grid(case.image, case.spacing, CATEGORY_ORGAN[case.category], modality=case.modality,
                                       inpaint=inpaint)
        tumor = case.tumor > 0
        fusion = final_mask(result.fusion, residual_head.thresholds.fusion, result.residuals.roi,
                            residual_head.config.min_voxels)
        covered = tumor & result.residuals.roi
        organ = case.organ_mask(case.category) & ~tumor
        row = {"case": case.case_id, "category": case.category,
               "roi_tumor_coverage": float(covered.sum() / tumor.sum()),
               "hu_input_in_tumor": _mean_inside(case.image, covered),
               "hu_healthy_in_tumor": _mean_inside(result.residuals.healthy, covered),
               "hu_organ": float(case.image[organ].mean()), "seconds": sum(result.timings.values())}
        for method, mask in (("aova", result.detection.kept), ("fusion", fusion), ("full", result.refined)):
            row[f"dsc_{method}"] = dice(mask, tumor)
            row[f"nsd_{method}"] = surface_dice(mask, tumor, case.spacing, tolerance_mm)
        per_case.append(row)
    rows = []
    for category in role_categories(heads.setting, role):
        mine = [r for r in per_case if r["category"] == category]
        if not mine:
            continue
        refinement = pipeline.residual_head(category_modality(category)).thresholds
        row = {"setting": heads.setting, "category": category, "role": role, "cases": len(mine),
               "thresholds": {"detection": heads.thresholds.provenance, "refinement": refinement.provenance}}
        for key in mine[0]:
            if key not in ("case", "category"):
                row[key] = float(np.nanmean([r[key] for r in mine])) if any(np.isfinite(r[key]) for r in mine) \
                    else float("nan")
        rows.append(row)
    return rows, per_case


def _mean_inside(volume: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``volume`` inside ``mask``; NaN for an empty mask (a tumor the ROI does not reach)."""
    return float(volume[mask].mean()) if mask.any() else float("nan")
