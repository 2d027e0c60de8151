"""Benchmarks that print figures (never asserted in timed unit tests: these machines are noisy).

``speed_benchmark``: the default pipeline on 128x128x64 PhantomBench CT cases, per-stage time and peak memory, and the
ROI-window vs whole-slice inpainting paths side by side on the same cases in one run (time ratio, DSC of both).
``window_study``: how much context a window needs: time and pseudo-healthy error of windows of several contexts.
``zero_shot_benchmark``: the paper's table on PhantomBench: every method (the reconstruction baseline, the ablation
rows, DiffuGTS, a non-generative fill) on every unseen test case of a setting, with every threshold's provenance.
"""

from __future__ import annotations

import csv
import json
import resource
import time
from dataclasses import asdict, dataclass, replace
from io import StringIO
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import phantoms
from .aova import CATEGORY_ORGAN
from .heads import SEEDS, detect_case, find_regions, role_categories, run_aova, split_cases
from .inpaint import healthy_conditioning, reconstruct, ring_fill
from .io import write_text_atomic
from .metrics import detection_auroc, dice, surface_dice
from .residual import (coarse_roi, final_mask, head_inputs, inpaint_region, pixel_residual, refined_probability,
                       residuals_of, scaled_residual)

SPEED_SEED = 4000  # a PhantomBench seed no training, validation or test split uses
SPEED_CATEGORIES = ("hepatic_vessel", "liver", "kidney")


def peak_memory_mb() -> float:
    """The process's peak resident memory so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed_benchmark(cases: int = 3, *, shape=(128, 128, 64), device="auto") -> dict:
    from .pipeline import DiffuGTSPipeline

    start = time.perf_counter()
    pipeline = DiffuGTSPipeline.from_pretrained(device=device)
    load_s = time.perf_counter() - start
    default = pipeline.residual.config.inpaint
    paths = {path: replace(default, roi=roi) for path, roi in (("roi", True), ("full_slice", False))}
    default_path = "roi" if default.roi else "full_slice"
    rows = []
    for i in range(cases):
        category = SPEED_CATEGORIES[i % len(SPEED_CATEGORIES)]
        case = phantoms.generate_case(category, i // len(SPEED_CATEGORIES), SPEED_SEED, shape)
        tumor = case.tumor > 0
        row = {"case": case.case_id, "category": category}
        for path, inpaint in paths.items():
            result = pipeline.segment_grid(case.image, case.spacing, CATEGORY_ORGAN[category], modality=case.modality,
                                           inpaint=inpaint)
            roi = result.residuals.roi
            row[path] = {"timings_s": result.timings, "total_s": sum(result.timings.values()),
                         "dsc": dice(result.refined, tumor), "roi_voxels": int(roi.sum()),
                         # the phantom keeps its healthy image: how far H is from the truth where it was inpainted
                         "mae_hu": float(np.abs(result.residuals.healthy - case.healthy)[roi].mean()),
                         "roi_slices": int(result.residuals.roi.any((0, 1)).sum())}
        row["codec_s"] = codec_seconds(pipeline.backbone, case.image, case.modality, result.residuals.roi,
                                       default.batch_size)
        rows.append(row)
    stages = list(rows[0][default_path]["timings_s"])
    mean = lambda path, key: float(np.mean([r[path][key] for r in rows]))  # noqa: E731
    inpaint = {path: float(np.mean([r[path]["timings_s"]["inpainting"] for r in rows])) for path in paths}
    return {
        "shape": list(shape), "cases": rows, "load_s": load_s, "device": str(pipeline.backbone.device),
        "default_path": default_path,
        "stages_mean_s": {s: float(np.mean([r[default_path]["timings_s"][s] for r in rows])) for s in stages},
        "total_mean_s": {path: mean(path, "total_s") for path in paths},
        "inpainting_mean_s": inpaint, "inpainting_speedup": inpaint["full_slice"] / max(inpaint["roi"], 1e-9),
        "codec_mean_s": float(np.mean([r["codec_s"] for r in rows])),
        "dsc_mean": {path: mean(path, "dsc") for path in paths},
        "mae_hu_mean": {path: mean(path, "mae_hu") for path in paths},
        "peak_memory_mb": peak_memory_mb(),
        "settings": {"inpaint": vars(default), "margin_mm": pipeline.residual.config.margin_mm},
    }


@torch.no_grad()
def codec_seconds(backbone, image: np.ndarray, modality: str, roi: np.ndarray, batch_size: int) -> float:
    """Encoding and decoding the slices that hold ROI, whole: what both inpainting paths pay. Windows can only save
    the denoising; a decoder whose normalisation sees the whole slice cannot decode a window alone to the same
    pixels."""
    slices = backbone.volume_to_slices(backbone.intensity(modality, image).forward(image))[roi.any((0, 1))]
    start = time.perf_counter()
    for i in range(0, len(slices), batch_size):
        backbone.decode(backbone.encode(slices[i:i + batch_size]))
    return time.perf_counter() - start


WINDOW_VARIANTS = ((6, 8), (4, 4), (3, 4), (2, 4))  # (latent cells of context, window sides a multiple of)


def window_study(pipeline, *, per_category: int = 2, variants=WINDOW_VARIANTS, steps: int | None = None) -> dict:
    """Whole slices against ROI windows of several contexts, on the validation split of the seen categories (never a
    test case): inpainting time, and how far H is from the phantom's own healthy image (MAE, HU) inside the ROI and
    inside the part of the tumor the ROI covers. The ROI is the pipeline's (every candidate region, enlarged)."""
    heads, config = pipeline.heads, pipeline.residual.config
    base = replace(config.inpaint, steps=steps or config.inpaint.steps)
    paths = {"whole slices": replace(base, roi=False)}
    paths |= {f"windows: context {c}, sides x{m}": replace(base, roi=True, context=c, window_multiple=m)
              for c, m in variants}
    split = replace(heads.config, validation_per_category=per_category)
    cases = [c for c in split_cases(heads.setting, "validation", split) if c.category != "healthy"]
    rows = []
    for case in cases:
        organ = CATEGORY_ORGAN[case.category]
        aova = run_aova(heads, pipeline.backbone, pipeline.text_encoder, case.image, case.modality, organ)
        roi = coarse_roi(find_regions(heads, aova, heads.thresholds), case.spacing, config.margin_mm)
        tumor = (case.tumor > 0) & roi
        for path, inpaint in paths.items():
            start = time.perf_counter()
            healthy, _ = inpaint_region(pipeline.backbone, pipeline.text_encoder, case.image, case.modality,
                                        phantoms.CATEGORY_REGION.get(organ, "abdomen"), organ, roi, inpaint)
            error = np.abs(healthy - case.healthy)
            rows.append({"case": case.case_id, "path": path, "seconds": time.perf_counter() - start,
                         "mae_roi_hu": float(error[roi].mean()) if roi.any() else float("nan"),
                         "mae_tumor_hu": float(error[tumor].mean()) if tumor.any() else float("nan")})
    whole = sum(r["seconds"] for r in rows if r["path"] == "whole slices")
    summary = []
    for path in paths:
        mine = [r for r in rows if r["path"] == path]
        seconds = sum(r["seconds"] for r in mine)
        summary.append({"path": path, "seconds": seconds, "speedup": whole / max(seconds, 1e-9),
                        "mae_roi_hu": float(np.nanmean([r["mae_roi_hu"] for r in mine])),
                        "mae_tumor_hu": float(np.nanmean([r["mae_tumor_hu"] for r in mine]))})
    return {"cases": [c.case_id for c in cases], "steps": base.steps, "paths": summary, "per_case": rows}


def format_window_study(report: dict) -> str:
    lines = [f"ROI windows vs whole slices: {len(report['cases'])} validation cases of the seen categories "
             f"({', '.join(report['cases'])}), {report['steps']} DDIM steps; MAE of H against the healthy image",
             f"{'path':32s} {'seconds':>8s} {'speed-up':>8s} {'MAE ROI HU':>10s} {'MAE tumor HU':>12s}"]
    lines += [f"{r['path']:32s} {r['seconds']:8.1f} {r['speedup']:7.2f}x {r['mae_roi_hu']:10.1f} "
              f"{r['mae_tumor_hu']:12.1f}" for r in report["paths"]]
    return "\n".join(lines)


def format_speed_report(report: dict) -> str:
    lines = [f"speed benchmark: {len(report['cases'])} PhantomBench CT cases of {'x'.join(map(str, report['shape']))} "
             f"(seed {SPEED_SEED}), device {report['device']}; model + heads loaded in {report['load_s']:.1f} s",
             f"per stage, default pipeline ({report['default_path']} inpainting), mean over cases:"]
    lines += [f"  {stage:26s} {seconds:7.2f} s" for stage, seconds in report["stages_mean_s"].items()]
    lines.append(f"  {'total':26s} {report['total_mean_s'][report['default_path']]:7.2f} s per case")
    lines.append("inpainting path    inpainting s   total s    DSC  MAE HU   (per case: DSC)")
    for path in ("roi", "full_slice"):
        cases = ", ".join(f"{r['case']} {r[path]['dsc']:.3f}" for r in report["cases"])
        lines.append(f"  {path:16s} {report['inpainting_mean_s'][path]:12.2f} {report['total_mean_s'][path]:9.2f} "
                     f"{report['dsc_mean'][path]:6.3f} {report['mae_hu_mean'][path]:7.1f}   ({cases})")
    lines.append("  (MAE HU: H against the phantom's own healthy image, inside the ROI; ROI voxels/slices per case: "
                 + ", ".join(f"{r['roi']['roi_voxels']}/{r['roi']['roi_slices']}" for r in report["cases"]) + ")")
    lines.append(f"ROI-window inpainting is {report['inpainting_speedup']:.2f}x as fast as whole-slice; DSC difference "
                 f"{100 * (report['dsc_mean']['roi'] - report['dsc_mean']['full_slice']):+.1f} points")
    codec, whole = report["codec_mean_s"], report["inpainting_mean_s"]["full_slice"]
    lines.append(f"both paths encode and decode the ROI's slices whole: {codec:.2f} s of the {whole:.2f} s; so even "
                 f"windows that cost nothing would be at most {whole / max(codec, 1e-9):.2f}x as fast")
    lines.append(f"peak memory (process RSS): {report['peak_memory_mb']:.0f} MB")
    return "\n".join(lines)


# ---- the zero-shot benchmark: the paper's table on PhantomBench ----------------------------------

# rows of the table, in the paper's order of ablation; each is a mask per case
METHODS = {
    "reconstruction": "Reconstruction baseline (DDPM-MAD recipe)",
    "aova": "AOVA only (S > threshold)",
    "detection": "+ region detection",
    "pixel_residual": "+ pixel residual (R_p, training-free)",
    "feature_residual": "+ feature residual (R_p + R_f fusion, training-free)",
    "full": "DiffuGTS (residual head)",
    "nongenerative_fill": "Non-generative fill (ring mean instead of diffusion)",
}
RESIDUAL_GRID = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)  # fitted on validation
QUICK_TEST_PER_CATEGORY = 2  # CI size: minutes on 2 cores
# per unseen category: with a per-case DSC spread of about 0.1 here, 12 cases put a category mean's standard error near
# 0.03, in about 15 min per setting on 2 cores
FULL_TEST_PER_CATEGORY = 12


@dataclass
class ZeroShotConfig:
    setting: str = "seen-unseen"
    test_per_category: int = FULL_TEST_PER_CATEGORY
    validation_per_category: int = 2
    tolerance_mm: float = 2.0  # NSD tolerance
    reconstruction_strength: float = 0.5  # share of the noise schedule the baseline noises to
    seed: int = 0
    inpaint_steps: int | None = None  # None: the pipeline's own (fewer only for tests)


def case_masks(pipeline, case, config: ZeroShotConfig, thresholds: dict | None = None) -> tuple[dict, dict, dict]:
    """Every method on one case: (masks by method, or None where a threshold is still to be fitted; the score maps of
    the fitted methods with the region they may mark; facts about the case)."""
    organ = CATEGORY_ORGAN[case.category]
    residual = pipeline.residual_head(case.modality)
    inpaint = replace(residual.config.inpaint, steps=config.inpaint_steps or residual.config.inpaint.steps)
    result = pipeline.segment_grid(case.image, case.spacing, organ, modality=case.modality, seed=config.seed,
                                   inpaint=inpaint)
    backbone, roi, min_voxels = pipeline.backbone, result.residuals.roi, residual.config.min_voxels
    organ_region = result.detection.organ_region
    candidates = np.zeros(roi.shape, bool)
    for region in result.detection.regions:
        candidates |= region.mask
    # the ablation: the same head on a pseudo-healthy image with no anatomy in it
    filled = ring_fill(case.image, roi)
    fill = residuals_of(backbone, case.image, case.modality, roi, filled, np.zeros(roi.shape, np.float32))
    fill_probability = refined_probability(residual.head, head_inputs(backbone, case.image, case.modality, fill,
                                                                      result.aova.anomaly), roi)
    # the baseline: every slice of the organ region reconstructed from noise with the healthy prompt
    cond, uncond = healthy_conditioning(pipeline.text_encoder, case.modality,
                                        phantoms.CATEGORY_REGION.get(organ, "abdomen"), organ)
    reconstructed = reconstruct(backbone, case.image, case.modality, organ_region.any((0, 1)), cond, uncond,
                                strength=config.reconstruction_strength, config=replace(inpaint, seed=config.seed))
    scores = {"reconstruction": (pixel_residual(backbone, case.image, reconstructed, case.modality), organ_region),
              "pixel_residual": (scaled_residual(result.residuals.pixel, roi), roi)}  # as inside the fusion
    fitted = thresholds or {}
    masks = {
        "aova": candidates, "detection": result.detection.kept,
        "feature_residual": final_mask(result.fusion, residual.thresholds.fusion, roi, min_voxels),
        "full": result.refined,
        "nongenerative_fill": final_mask(fill_probability, residual.thresholds.head, roi, min_voxels),
        **{method: final_mask(score, fitted[method], region, min_voxels) if method in fitted else None
           for method, (score, region) in scores.items()},
    }
    facts = {"case_score": result.detection.case_score, "seconds": sum(result.timings.values()),
             "roi_tumor_coverage": float((roi & (case.tumor > 0)).sum() / max(int(case.tumor.sum()), 1))}
    return masks, scores, facts


def fit_residual_thresholds(pipeline, config: ZeroShotConfig, progress: bool = False) -> dict:
    """The reconstruction and pixel-residual thresholds with the best mean DSC on the validation split of the seen
    categories (never on test cases)."""
    heads = pipeline.heads
    split = replace(heads.config, validation_per_category=config.validation_per_category)
    cases = [c for c in split_cases(config.setting, "validation", split) if c.category != "healthy"]
    scored = [(case, case_masks(pipeline, case, config)[1])
              for case in tqdm(cases, desc="validation", disable=not progress)]
    min_voxels = pipeline.residual.config.min_voxels
    fitted, provenance = {}, {}
    for method in ("reconstruction", "pixel_residual"):
        means = {t: float(np.mean([dice(final_mask(scores[method][0], t, scores[method][1], min_voxels), case.tumor)
                                   for case, scores in scored])) for t in RESIDUAL_GRID}
        fitted[method] = max(means, key=means.get)
        provenance[method] = (f"validation split of seen categories (seed {SEEDS['validation']}, {len(cases)} tumor "
                              f"cases): mean DSC {means[fitted[method]]:.3f}")
    return {"values": fitted, "provenance": provenance}


def zero_shot_benchmark(config: ZeroShotConfig = ZeroShotConfig(), *, pipeline=None, progress: bool = False) -> dict:
    """Every method on every unseen test case of a setting: per-case and per-category DSC and NSD, detection AUROC,
    thresholds and their provenance. Deterministic for a seed (timings are returned apart, under "timing")."""
    from .pipeline import DiffuGTSPipeline

    start = time.perf_counter()
    pipeline = pipeline or DiffuGTSPipeline.from_pretrained()
    heads = pipeline.heads
    if heads.setting != config.setting:
        raise ValueError(f"the pipeline's heads are for {heads.setting}, the benchmark asks for {config.setting}")
    thresholds = fit_residual_thresholds(pipeline, config, progress)
    split = replace(heads.config, test_per_category=config.test_per_category)
    cases = list(split_cases(config.setting, "test", split))
    unseen = role_categories(config.setting, "unseen")
    per_case, scores, seconds = [], [], []
    for case in tqdm(cases, desc=f"test {config.setting}", disable=not progress):
        if case.category == "healthy":  # negatives of the detection AUROC, once per organ of the region
            for category in unseen:
                if phantoms.CATEGORY_REGION.get(category, "abdomen") == case.region:
                    detection = detect_case(heads, pipeline.backbone, pipeline.text_encoder, case.image,
                                            case.modality, CATEGORY_ORGAN[category])
                    scores.append({"category": category, "score": detection.case_score, "label": 0})
            continue
        masks, _, facts = case_masks(pipeline, case, config, thresholds["values"])
        tumor = case.tumor > 0
        row = {"case": case.case_id, "category": case.category, "tumor_voxels": int(tumor.sum()),
               "roi_tumor_coverage": round(facts["roi_tumor_coverage"], 4)}
        for method, mask in masks.items():
            row[f"dsc_{method}"] = round(dice(mask, tumor), 4)
            row[f"nsd_{method}"] = round(surface_dice(mask, tumor, case.spacing, config.tolerance_mm), 4)
        per_case.append(row)
        scores.append({"category": case.category, "score": facts["case_score"], "label": 1})
        seconds.append(facts["seconds"])
    categories = []
    for category in unseen:
        mine = [r for r in per_case if r["category"] == category]
        labelled = [s for s in scores if s["category"] == category]
        entry = {"category": category, "cases": len(mine),
                 "auroc": round(detection_auroc([s["score"] for s in labelled], [s["label"] for s in labelled]), 4)
                 if len({s["label"] for s in labelled}) == 2 else None}
        for method in METHODS:
            entry[f"dsc_{method}"] = round(float(np.mean([r[f"dsc_{method}"] for r in mine])), 4)
            entry[f"nsd_{method}"] = round(float(np.mean([r[f"nsd_{method}"] for r in mine])), 4)
        categories.append(entry)
    mean = {f"{metric}_{method}": round(float(np.mean([c[f"{metric}_{method}"] for c in categories])), 4)
            for method in METHODS for metric in ("dsc", "nsd")}
    return {
        "setting": config.setting, "seen": list(heads.seen), "unseen": list(unseen),
        "config": asdict(config), "seeds": {"test": SEEDS["test"], "validation": SEEDS["validation"]},
        "methods": METHODS, "categories": categories, "mean_unseen": mean, "per_case": per_case,
        "thresholds": {**pipeline_thresholds(pipeline), "fitted_here": thresholds},
        "weights_sha256": pipeline.weights_sha256(),
        "timing": {"wall_s": round(time.perf_counter() - start, 1),
                   "mean_case_pipeline_s": round(float(np.mean(seconds)), 2) if seconds else None,
                   "peak_memory_mb": round(peak_memory_mb(), 1), "device": str(pipeline.backbone.device)},
    }


def pipeline_thresholds(pipeline) -> dict:
    """The thresholds a pipeline brings (fitted when its heads were trained), with their provenance: "refinement" of
    the seen categories' residual head, "refinement_mri" of the MRI head where there is one."""
    heads = pipeline.heads
    used_by = ["full", "nongenerative_fill (head)", "feature_residual (fusion)"]
    refinement = {}
    for modality, residual in {None: pipeline.residual, **pipeline.modality_heads}.items():
        thresholds = residual.thresholds
        refinement[residual.stem(modality).replace("residual", "refinement")] = {
            "head": thresholds.head, "fusion": thresholds.fusion, "provenance": thresholds.provenance,
            "used_by": used_by if modality is None else [f"{method}, on {modality} cases" for method in used_by]}
    return {"detection": {**{k: v for k, v in vars(heads.thresholds).items() if k != "provenance"},
                          "provenance": heads.thresholds.provenance}, **refinement}


def reusable_results(folder: Path, config: ZeroShotConfig, pipeline) -> dict | None:
    """The results.json a run of the same configuration and the same weights left in ``folder`` (None: run again), so
    that a long benchmark can add its upper-bound row, or go on after a stop, without running every method again."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    thresholds = json.loads(json.dumps(pipeline_thresholds(pipeline)))  # as the JSON round trip gives them
    brought = {k: v for k, v in results.get("thresholds", {}).items() if k != "fitted_here"}
    if results.get("config") != asdict(config) or results.get("weights_sha256") != pipeline.weights_sha256() or \
            brought != thresholds:
        return None
    timing = path.with_name("timing.json")
    return {**results, "timing": json.loads(timing.read_text()) if timing.is_file() else {}}


# the supervised upper bound: for each category, heads trained with it seen (never with its test cases)
SUPERVISED = "supervised"
SUPERVISED_LABEL = "Supervised upper bound (heads trained with the category seen)"


def supervised_setting(category: str) -> str | None:
    """The setting whose heads give ``category``'s upper bound: the leave-one-out setting that holds out the next CT
    category (so the category is seen, as are four others). None for MRI brain: no setting trains on brain tumors."""
    if category not in phantoms.CT_CATEGORIES:
        return None
    order = phantoms.CT_CATEGORIES
    return f"loo-{order[(order.index(category) + 1) % len(order)]}"


def add_supervised_upper_bound(results: dict, config: ZeroShotConfig, pipeline_for, progress: bool = False) -> dict:
    """``results`` with the supervised row: the full method (residual head) on the same test cases, with the heads of
    ``supervised_setting(category)``, which ``pipeline_for(setting)`` loads. Categories no setting sees get None."""
    start = time.perf_counter()
    per_case = {row["case"]: dict(row) for row in results["per_case"]}
    categories, heads_of = [], {}
    for entry in results["categories"]:
        category, setting = entry["category"], supervised_setting(entry["category"])
        heads_of[category] = setting
        if setting is None:
            categories.append({**entry, f"dsc_{SUPERVISED}": None, f"nsd_{SUPERVISED}": None})
            continue
        pipeline = pipeline_for(setting)
        if category not in pipeline.heads.seen:
            raise ValueError(f"the heads for {category}'s upper bound ({setting}) did not see {category}")
        inpaint = pipeline.residual.config.inpaint
        inpaint = replace(inpaint, steps=config.inpaint_steps or inpaint.steps)
        split = replace(pipeline.heads.config, test_per_category=config.test_per_category)
        cases = [case for case in split_cases(setting, "test", split, test_role="seen") if case.category == category]
        for case in tqdm(cases, desc=f"upper bound {category}", disable=not progress):
            refined = pipeline.segment_grid(case.image, case.spacing, CATEGORY_ORGAN[category],
                                            modality=case.modality, seed=config.seed, inpaint=inpaint).refined
            per_case[case.case_id][f"dsc_{SUPERVISED}"] = round(dice(refined, case.tumor > 0), 4)
            per_case[case.case_id][f"nsd_{SUPERVISED}"] = round(
                surface_dice(refined, case.tumor > 0, case.spacing, config.tolerance_mm), 4)
        categories.append({**entry, **{
            f"{metric}_{SUPERVISED}": round(float(np.mean([per_case[case.case_id][f"{metric}_{SUPERVISED}"]
                                                           for case in cases])), 4) for metric in ("dsc", "nsd")}})
    means = {f"{metric}_{SUPERVISED}": mean_or_none([entry[f"{metric}_{SUPERVISED}"] for entry in categories])
             for metric in ("dsc", "nsd")}
    return {**results, "categories": categories, "mean_unseen": {**results["mean_unseen"], **means},
            "per_case": list(per_case.values()),
            "methods": {**results["methods"], SUPERVISED: SUPERVISED_LABEL},
            "supervised_heads": {c: s or "none: no setting trains on this category's tumors"
                                 for c, s in heads_of.items()},
            "timing": {**results.get("timing", {}), "supervised_wall_s": round(time.perf_counter() - start, 1)}}


def mean_or_none(values: list[float | None]) -> float | None:
    """The mean of a row's category cells, or None (n/a) when any cell is n/a: a mean over fewer categories would
    not be comparable with the other rows."""
    return None if None in values else round(float(np.mean(values)), 4)


def combine_settings(runs: list[dict]) -> dict:
    """One table from several settings' results, a column per unseen category: the leave-one-out table, where each
    column comes from its own setting, so every column is zero-shot. A row a run lacks is n/a in its columns."""
    methods = {}
    for run in runs:
        methods.update(run["methods"])
    blank = {f"{metric}_{method}": None for method in methods for metric in ("dsc", "nsd")}
    categories = [{**blank, **entry} for run in runs for entry in run["categories"]]
    mean = {key: mean_or_none([entry[key] for entry in categories]) for key in blank}
    supervised = {c: s for run in runs for c, s in run.get("supervised_heads", {}).items()}
    return {"setting": " + ".join(run["setting"] for run in runs),
            "seen": ["per column, every other category of its setting"], "unseen": [c["category"] for c in categories],
            "config": runs[0]["config"], "seeds": runs[0]["seeds"], "methods": methods, "categories": categories,
            "mean_unseen": mean, **({"supervised_heads": supervised} if supervised else {})}


def format_table(results: dict) -> str:
    """The paper's layout: methods as rows, DSC and NSD per unseen category, and their mean (in %)."""
    categories = results["unseen"]
    tolerance = results["config"]["tolerance_mm"]
    head = "| Method | " + " | ".join(f"{c} DSC | {c} NSD" for c in categories) + " | mean DSC | mean NSD |"
    lines = [f"Setting **{results['setting']}** (seen: {', '.join(results['seen'])}); "
             f"{results['categories'][0]['cases']} test cases per category "
             f"(PhantomBench seed {results['seeds']['test']}); "
             f"NSD at {tolerance:g} mm; values in %.", "", head, "|" + "---|" * (2 * len(categories) + 3)]
    by_category = {c["category"]: c for c in results["categories"]}
    for method, label in results["methods"].items():
        cells = [percent(by_category[c][f"{m}_{method}"]) for c in categories for m in ("dsc", "nsd")]
        mean = [percent(results["mean_unseen"][f"{m}_{method}"]) for m in ("dsc", "nsd")]
        lines.append(f"| {label} | " + " | ".join(cells + mean) + " |")
    auroc = ", ".join(f"{c['category']} {c['auroc']:.3f}" if c["auroc"] is not None else f"{c['category']} n/a"
                      for c in results["categories"])
    lines += ["", f"Detection AUROC (region-level case score, tumor vs healthy test cases): {auroc}."]
    if "supervised_heads" in results:
        heads = ", ".join(f"{category} {setting}" for category, setting in results["supervised_heads"].items())
        lines.append(f"Upper-bound heads: {heads}.")
    else:
        lines.append("Supervised upper bound: not run (it needs `--heads-cache DIR`, for heads trained with each "
                     "category seen).")
    return "\n".join(lines) + "\n"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def benchmark_settings(name: str) -> tuple[str, ...]:
    """``loo`` (every leave-one-category-out CT setting), ``seen-unseen``, ``mri`` (CT -> MRI), ``all``, or one
    setting by its own name."""
    from .heads import SETTINGS

    loo = tuple(s for s in SETTINGS if s.startswith("loo-"))
    groups = {"loo": loo, "mri": ("ct-mri",), "all": (*loo, "seen-unseen", "ct-mri")}
    if name in groups:
        return groups[name]
    if name in SETTINGS:
        return (name,)
    raise ValueError(f"unknown setting {name!r}; choose loo, seen-unseen, mri, all or one of {', '.join(SETTINGS)}")


def setting_pipeline(setting: str, heads_cache: Path | None, *, progress: bool = False):
    """The pipeline with the heads of ``setting``: the `train-heads` folder ``heads_cache/<setting>`` (the same cache
    as `evaluate-aova --heads-cache`), trained there first (AOVA heads, then the residual heads: the MRI head only
    where the setting's test cases are MRI) when it is missing or was trained with another configuration than the
    defaults; for seen -> unseen, the shipped heads unless that folder exists. The residual heads' pseudo-healthy
    training images are cached in ``heads_cache/pseudo_healthy``."""
    from .backbone import load_backbone
    from .heads import HeadsConfig, cached_heads, train_heads
    from .pipeline import DiffuGTSPipeline
    from .residual import (ResidualConfig, TrainedResidualHead, load_modality_heads, modality_regions,
                           train_modality_heads, train_residual_head)
    from .text import TextEncoder

    if setting == "seen-unseen" and (heads_cache is None or not (Path(heads_cache) / setting).is_dir()):
        return DiffuGTSPipeline.from_pretrained()
    if heads_cache is None:
        raise ValueError(f"setting {setting} needs its own heads: pass --heads-cache DIR, where they are trained once "
                         "(about 15 min per setting on 2 cores) and reused")
    folder = Path(heads_cache) / setting
    config = HeadsConfig(setting=setting)
    backbone = load_backbone()
    text_encoder = TextEncoder.from_pretrained(backbone.config.text_encoder)
    heads = cached_heads(folder, config)
    if heads is None:
        heads = train_heads(backbone, text_encoder, config, progress=progress)
        heads.save(folder)
        for stale in folder.glob("residual*.json"):  # residual heads of other AOVA heads do not carry over
            stale.unlink()
    cache = Path(heads_cache) / "pseudo_healthy"
    if not (folder / "residual.json").is_file() or TrainedResidualHead.load(folder).config != ResidualConfig():
        train_residual_head(heads, backbone, text_encoder, cache=cache, progress=progress).save(folder)
    needed = set(modality_regions(heads)) & evaluated_modalities(setting)  # MRI for ct-mri; none for the CT settings
    modality_heads = load_modality_heads(folder)
    if any(m not in modality_heads or modality_heads[m].config != ResidualConfig() for m in needed):
        for head in train_modality_heads(heads, backbone, text_encoder, cache=cache, progress=progress):
            head.save(folder)
    return DiffuGTSPipeline.from_pretrained(folder)


def evaluated_modalities(setting: str) -> set[str]:
    """The modalities of a setting's unseen (test) categories."""
    return {phantoms.category_modality(category) for category in role_categories(setting, "unseen")}


def write_benchmark(results: dict, folder: Path) -> list[Path]:
    """results.json (deterministic for a seed), timing.json, table.md and per_case.csv, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    deterministic = {k: v for k, v in results.items() if k != "timing"}
    table = StringIO()
    fields = list(dict.fromkeys(key for row in results["per_case"] for key in row)) or ["case"]
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(results["per_case"])
    return [write_text_atomic(folder / "results.json", json.dumps(deterministic, indent=2) + "\n"),
            write_text_atomic(folder / "timing.json", json.dumps(results["timing"], indent=2) + "\n"),
            write_text_atomic(folder / "table.md", format_table(results)),
            write_text_atomic(folder / "per_case.csv", table.getvalue())]


# The paper's published DSC (%), for orientation only: real CT (MSD; KiTS23 for kidney), other models, other data.
PAPER_DSC = {
    "DiffuGTS": {"pancreas": 43.61, "lung": 42.94, "liver": 63.23, "colon": 38.72, "hepatic_vessel": 62.76,
                 "kidney": 59.80},
    "DDPM-MAD": {"pancreas": 28.52, "lung": 25.70, "liver": 43.54, "colon": 13.97, "hepatic_vessel": 39.57,
                 "kidney": 36.55},
}


GATED_MEASURES = ("dsc", "nsd")
ABOVE_ON_THE_MEAN = ("aova", "reconstruction", "nongenerative_fill")  # what the full method must beat on mean DSC


def regression_metrics(results: dict) -> dict:
    """What the regression gate compares: mean unseen DSC and NSD per method, per category DSC and NSD per method
    and detection AUROC, and the full method's DSC and NSD per test case."""
    methods = results["methods"]
    return {"setting": results["setting"], "test_per_category": results["config"]["test_per_category"],
            "seed": results["config"]["seed"],
            "mean_unseen": {measure: {method: results["mean_unseen"][f"{measure}_{method}"] for method in methods}
                            for measure in GATED_MEASURES},
            "by_category": {c["category"]: {"auroc": c["auroc"],
                                            **{measure: {method: c[f"{measure}_{method}"] for method in methods}
                                               for measure in GATED_MEASURES}}
                            for c in results["categories"]},
            "by_case": {c["case"]: {measure: c[f"{measure}_full"] for measure in GATED_MEASURES}
                        for c in results["per_case"]}}


def gate_failures(metrics: dict, baseline: dict) -> list[str]:
    """Why the regression gate fails (empty: it passes). ``baseline`` holds the golden ``metrics``, the tolerances
    (``tolerance``: "mean", "category", "case"), absolute ``floors`` of the full method's DSC per category, and the
    categories whose detection AUROC must stay at 0.5 or more (``auroc_at_least_half``).

    Fails when the full method's DSC or NSD falls by more than the tolerance on the mean, on any unseen category or on
    any test case; when it is not above AOVA-only, the reconstruction baseline and the non-generative fill on the
    mean DSC; when a category falls below its floor; when a listed category's AUROC falls below 0.5; and when a
    category or case of the baseline is missing. Rises never fail: re-record the baseline to ratchet them in."""
    golden = baseline["metrics"]
    if (metrics["setting"], metrics["test_per_category"]) != (golden["setting"], golden["test_per_category"]):
        return [f"the metrics ({metrics['setting']}, {metrics['test_per_category']} cases per category) and the "
                f"baseline ({golden['setting']}, {golden['test_per_category']}) are not of the same benchmark"]
    tolerance, failures = baseline["tolerance"], []

    def compare(where: str, now: float | None, before: float, allowed: float) -> None:
        if now is None:
            failures.append(f"{where}: missing (baseline {before:.4f})")
        elif now < before - allowed:
            failures.append(f"{where} fell from {before:.4f} to {now:.4f}, more than the tolerance {allowed}")

    for measure in GATED_MEASURES:
        compare(f"mean unseen {measure.upper()} of the full method", metrics["mean_unseen"][measure]["full"],
                golden["mean_unseen"][measure]["full"], tolerance["mean"])
        for category, before in golden["by_category"].items():
            now = metrics["by_category"].get(category, {}).get(measure, {}).get("full")
            compare(f"{category} {measure.upper()} of the full method", now, before[measure]["full"],
                    tolerance["category"])
        for case, before in golden["by_case"].items():
            compare(f"{case} {measure.upper()} of the full method", metrics["by_case"].get(case, {}).get(measure),
                    before[measure], tolerance["case"])
    full = metrics["mean_unseen"]["dsc"]["full"]
    for method in ABOVE_ON_THE_MEAN:
        other = metrics["mean_unseen"]["dsc"][method]
        if not full > other:
            failures.append(f"the full method ({full:.4f}) is not above {method} ({other:.4f}) on mean unseen DSC")
    for category, floor in baseline["floors"].items():
        now = metrics["by_category"].get(category, {}).get("dsc", {}).get("full", float("nan"))
        if not now >= floor:
            failures.append(f"{category} DSC of the full method ({now:.4f}) is below its floor {floor}")
    for category in baseline["auroc_at_least_half"]:
        auroc = metrics["by_category"].get(category, {}).get("auroc", float("nan"))
        if not auroc >= 0.5:
            failures.append(f"{category} detection AUROC ({auroc:.4f}) is below 0.5")
    return failures


def gated_figures(metrics: dict) -> dict[str, float]:
    """Every figure the gate reads, by a readable name (what a re-recorded baseline moves)."""
    figures = {}
    for measure in GATED_MEASURES:
        figures.update({f"mean {measure} {method}": value for method, value in metrics["mean_unseen"][measure].items()})
        for category, row in metrics["by_category"].items():
            figures[f"{category} {measure} full"] = row[measure]["full"]
        figures.update({f"{case} {measure} full": row[measure] for case, row in metrics["by_case"].items()})
    figures.update({f"{category} auroc": row["auroc"] for category, row in metrics["by_category"].items()})
    return figures


def record_baseline(results_path: Path, baseline_path: Path) -> list[str]:
    """Make ``results_path`` (a quick benchmark's results.json) the golden results: copy it beside the baseline as
    ``results_quick.json`` and put its metrics into the baseline (tolerances, floors and the AUROC list kept).
    Returns the gated figures that moved, one line each."""
    results_path, baseline_path = Path(results_path), Path(baseline_path)
    baseline = json.loads(baseline_path.read_text())
    metrics = regression_metrics(json.loads(results_path.read_text()))
    before, after = gated_figures(baseline["metrics"]), gated_figures(metrics)
    moved = [f"{name}: {before.get(name, float('nan')):.4f} -> {after.get(name, float('nan')):.4f}"
             for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
    write_text_atomic(baseline_path.with_name("results_quick.json"), results_path.read_text())
    write_text_atomic(baseline_path, json.dumps({**baseline, "metrics": metrics}, indent=2) + "\n")
    return moved
