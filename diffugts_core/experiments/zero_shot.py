"""The zero-shot benchmark: the paper's table on PhantomBench. Every method (the reconstruction baseline, the ablation
rows, DiffuGTS, a non-generative fill) on every unseen test case of a setting, with every threshold's provenance, and
the supervised upper bound beside it. Calibration rows, apart from the methods, say which stage loses what.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from io import StringIO
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..detect import detect_case
from ..data.splits import SEEDS, role_categories, split_cases
from ..inpaint import enlarge_mask, healthy_conditioning, reconstruct, ring_fill
from ..io import write_text_atomic
from ..metrics import detection_auroc, dice, surface_dice
from ..residual import final_mask, head_inputs, pixel_residual, refined_probability, residuals_of, scaled_residual
from ..runtime import peak_memory_mb
from ..vocabulary import CATEGORY_ORGAN, CT_CATEGORIES, category_region, organ_body_region

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
# calibration rows: not zero-shot, each is handed what a stage of the method has to find (the tumor category's labels,
# the organ, the healthy image); set apart from METHODS in results.json and the table, never in a method's mean
CALIBRATION = {
    "specialist": "Supervised specialist (BasicUNet 2.5D, trained on the category)",
    "oracle_roi": "DiffuGTS, true organ region as ROI",
    "oracle_healthy": "DiffuGTS, true healthy image as H",
}
RESIDUAL_GRID = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)  # fitted on validation
# share of each tumor inside a region of interest: the full method's, and (with the calibration rows) the true organ's
COVERAGES = ("roi_tumor_coverage", "oracle_roi_tumor_coverage")
QUICK_TEST_PER_CATEGORY = 2  # CI size: minutes on 2 cores
# the CI size's calibration rows: the oracle ROI (a second whole-organ inpainting, 2-4x a case's own) only at full size
QUICK_CALIBRATION = ("specialist", "oracle_healthy")
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
    calibration: tuple[str, ...] = tuple(CALIBRATION)

    def __post_init__(self):
        self.calibration = tuple(self.calibration)
        unknown = [row for row in self.calibration if row not in CALIBRATION]
        if unknown:
            raise ValueError(f"unknown calibration rows {unknown}: choose from {', '.join(CALIBRATION)}")


def case_masks(pipeline, case, config: ZeroShotConfig, thresholds: dict | None = None, *,
               specialist=None) -> tuple[dict, dict, dict]:
    """Every method on one case: (masks by method, or None where a threshold is still to be fitted; the score maps of
    the fitted methods with the region they may mark; facts about the case). With the category's ``specialist``
    (``training.specialist.TrainedSpecialist``), the calibration rows that ``config.calibration`` names too."""
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
    # the baseline: every slice of the organ region reconstructed from noise with the healthy prompt
    cond, uncond = healthy_conditioning(pipeline.text_encoder, case.modality,
                                        organ_body_region(organ), organ)
    reconstructed = reconstruct(backbone, case.image, case.modality, organ_region.any((0, 1)), cond, uncond,
                                strength=config.reconstruction_strength, config=replace(inpaint, seed=config.seed))
    scores = {"reconstruction": (pixel_residual(backbone, case.image, reconstructed, case.modality), organ_region),
              "pixel_residual": (scaled_residual(result.residuals.pixel, roi), roi)}  # as inside the fusion
    fitted = thresholds or {}
    masks = {
        "aova": candidates, "detection": result.detection.kept,
        "feature_residual": final_mask(result.fusion, residual.thresholds.fusion, roi, min_voxels),
        "full": result.refined,
        # the ablation: the same head on a pseudo-healthy image with no anatomy in it
        "nongenerative_fill": head_mask(pipeline, case, roi, ring_fill(case.image, roi), result.aova.anomaly),
        **{method: final_mask(score, fitted[method], region, min_voxels) if method in fitted else None
           for method, (score, region) in scores.items()},
    }
    facts = {"case_score": result.detection.case_score, "seconds": sum(result.timings.values()),
             "roi_tumor_coverage": tumor_coverage(roi, case.tumor)}
    if specialist is not None:
        organ_roi = oracle_roi(case, residual.config.margin_mm)
        rows = {  # each row hands one stage what it has to find: the rows below the full method say what it lost
            "specialist": lambda: specialist.segment(case.image, case.modality),
            "oracle_roi": lambda: pipeline.segment_grid(case.image, case.spacing, organ, modality=case.modality,
                                                        seed=config.seed, inpaint=inpaint, roi=organ_roi).refined,
            "oracle_healthy": lambda: head_mask(pipeline, case, roi, case.healthy, result.aova.anomaly),  # no inpainting
        }
        masks |= {row: rows[row]() for row in config.calibration}
        facts["oracle_roi_tumor_coverage"] = tumor_coverage(organ_roi, case.tumor)
    return masks, scores, facts


def head_mask(pipeline, case, roi: np.ndarray, healthy: np.ndarray, anomaly: np.ndarray) -> np.ndarray:
    """The residual head's mask when ``healthy`` stands for the pseudo-healthy image in ``roi`` (one sample, so no
    spread): the non-generative fill and the oracle pseudo-healthy row."""
    residual = pipeline.residual_head(case.modality)
    residuals = residuals_of(pipeline.backbone, case.image, case.modality, roi, healthy,
                             np.zeros(roi.shape, np.float32))
    probability = refined_probability(residual.head, head_inputs(pipeline.backbone, case.image, case.modality,
                                                                 residuals, anomaly), roi)
    return final_mask(probability, residual.thresholds.head, roi, residual.config.min_voxels)


def oracle_roi(case, margin_mm: float) -> np.ndarray:
    """The true region of the case's organ (its organ labels), enlarged by the pipeline's margin as ``coarse_roi``
    enlarges the candidate regions."""
    return enlarge_mask(case.organ_mask(), case.spacing, margin_mm)


def tumor_coverage(roi: np.ndarray, tumor: np.ndarray) -> float:
    """The share of the tumor's voxels inside the region of interest: what refinement can reach at most."""
    tumor = np.asarray(tumor) > 0
    return float((roi & tumor).sum() / max(int(tumor.sum()), 1))


def case_row(case, masks: dict, facts: dict, tolerance_mm: float) -> dict:
    """One test case's line of results.json: DSC and NSD of every method's mask, rounded as stored."""
    tumor = case.tumor > 0
    row = {"case": case.case_id, "category": case.category, "tumor_voxels": int(tumor.sum()),
           **{key: round(facts[key], 4) for key in COVERAGES if key in facts}}
    for method, mask in masks.items():
        row[f"dsc_{method}"] = round(dice(mask, tumor), 4)
        row[f"nsd_{method}"] = round(surface_dice(mask, tumor, case.spacing, tolerance_mm), 4)
    return row


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


def zero_shot_benchmark(config: ZeroShotConfig = ZeroShotConfig(), *, pipeline=None, specialists: dict | None = None,
                        progress: bool = False) -> dict:
    """Every method on every unseen test case of a setting: per-case and per-category DSC and NSD, detection AUROC,
    thresholds and their provenance, and the calibration rows apart (``specialists``: each unseen category's
    supervised specialist; default ``training.recipes.specialist_for``, the shipped one or one trained now).
    Deterministic for a seed (timings are returned apart, under "timing")."""
    from ..pipeline import DiffuGTSPipeline
    from ..training.recipes import specialist_for

    start = time.perf_counter()
    pipeline = pipeline or DiffuGTSPipeline.from_pretrained()
    heads = pipeline.heads
    if heads.setting != config.setting:
        raise ValueError(f"the pipeline's heads are for {heads.setting}, the benchmark asks for {config.setting}")
    unseen = role_categories(config.setting, "unseen")
    specialists = specialists or {category: specialist_for(category, progress=progress) for category in unseen}
    thresholds = fit_residual_thresholds(pipeline, config, progress)
    split = replace(heads.config, test_per_category=config.test_per_category)
    cases = list(split_cases(config.setting, "test", split))
    per_case, scores, seconds = [], [], []
    for case in tqdm(cases, desc=f"test {config.setting}", disable=not progress):
        if case.category == "healthy":  # negatives of the detection AUROC, once per organ of the region
            for category in unseen:
                if category_region(category) == case.region:
                    detection = detect_case(heads, pipeline.backbone, pipeline.text_encoder, case.image,
                                            case.modality, CATEGORY_ORGAN[category])
                    scores.append({"category": category, "score": detection.case_score, "label": 0})
            continue
        masks, _, facts = case_masks(pipeline, case, config, thresholds["values"],
                                     specialist=specialists[case.category])
        per_case.append(case_row(case, masks, facts, config.tolerance_mm))
        scores.append({"category": case.category, "score": facts["case_score"], "label": 1})
        seconds.append(facts["seconds"])
    categories = []
    for category in unseen:
        mine = [r for r in per_case if r["category"] == category]
        labelled = [s for s in scores if s["category"] == category]
        entry = {"category": category, "cases": len(mine),
                 "auroc": round(detection_auroc([s["score"] for s in labelled], [s["label"] for s in labelled]), 4)
                 if len({s["label"] for s in labelled}) == 2 else None,
                 **{key: round(float(np.mean([r[key] for r in mine])), 4) for key in COVERAGES}}
        for method in (*METHODS, *config.calibration):
            entry[f"dsc_{method}"] = round(float(np.mean([r[f"dsc_{method}"] for r in mine])), 4)
            entry[f"nsd_{method}"] = round(float(np.mean([r[f"nsd_{method}"] for r in mine])), 4)
        categories.append(entry)
    mean = {f"{metric}_{method}": round(float(np.mean([c[f"{metric}_{method}"] for c in categories])), 4)
            for method in (*METHODS, *config.calibration) for metric in ("dsc", "nsd")}
    return {
        "setting": config.setting, "seen": list(heads.seen), "unseen": list(unseen),
        "config": asdict(config), "seeds": {"test": SEEDS["test"], "validation": SEEDS["validation"]},
        "methods": METHODS, "calibration": {row: CALIBRATION[row] for row in config.calibration}, "categories": categories, "mean_unseen": mean,
        "per_case": per_case, "thresholds": {**pipeline_thresholds(pipeline), "fitted_here": thresholds},
        "weights_sha256": pipeline.weights_sha256(),
        "specialists": specialist_summaries({category: specialists[category] for category in unseen}),
        "timing": {"wall_s": round(time.perf_counter() - start, 1),
                   "mean_case_pipeline_s": round(float(np.mean(seconds)), 2) if seconds else None,
                   "peak_memory_mb": round(peak_memory_mb(), 1), "device": str(pipeline.backbone.device),
                   "specialist_training_s": {c: specialists[c].training_s for c in unseen}},
    }


def specialist_summaries(specialists: dict) -> dict:
    """What results.json records of each category's specialist (its weights' sha256 among it), as JSON reads back."""
    return json.loads(json.dumps({category: specialist.summary() for category, specialist in specialists.items()}))


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


def reusable_results(folder: Path, config: ZeroShotConfig, pipeline, specialists: dict) -> dict | None:
    """The results.json a run of the same configuration, the same weights and the same specialists (by category) left
    in ``folder`` (None: run again), so that a long benchmark can add its upper-bound row, or go on after a stop,
    without running every method again."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    thresholds = json.loads(json.dumps(pipeline_thresholds(pipeline)))  # as the JSON round trip gives them
    brought = {k: v for k, v in results.get("thresholds", {}).items() if k != "fitted_here"}
    if results.get("config") != json.loads(json.dumps(asdict(config))) or results.get("weights_sha256") != pipeline.weights_sha256() or \
            brought != thresholds or results.get("specialists") != specialist_summaries(specialists):
        return None
    timing = path.with_name("timing.json")
    return {**results, "timing": json.loads(timing.read_text()) if timing.is_file() else {}}


# the supervised upper bound: for each category, heads trained with it seen (never with its test cases)
SUPERVISED = "supervised"
SUPERVISED_LABEL = "Supervised upper bound (heads trained with the category seen)"


def supervised_setting(category: str) -> str | None:
    """The setting whose heads give ``category``'s upper bound: the leave-one-out setting that holds out the next CT
    category (so the category is seen, as are four others). None for MRI brain: no setting trains on brain tumors."""
    if category not in CT_CATEGORIES:
        return None
    order = CT_CATEGORIES
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
    column comes from its own setting, so every column is zero-shot (the calibration rows stay apart). A row a run
    lacks is n/a in its columns."""
    methods, calibration = {}, {}
    for run in runs:
        methods.update(run["methods"])
        calibration.update(run.get("calibration", {}))
    blank = {f"{metric}_{method}": None for method in (*methods, *calibration) for metric in ("dsc", "nsd")}
    categories = [{**blank, **entry} for run in runs for entry in run["categories"]]
    mean = {key: mean_or_none([entry[key] for entry in categories]) for key in blank}
    supervised = {c: s for run in runs for c, s in run.get("supervised_heads", {}).items()}
    specialists = {c: s for run in runs for c, s in run.get("specialists", {}).items()}
    return {"setting": " + ".join(run["setting"] for run in runs),
            "seen": ["per column, every other category of its setting"], "unseen": [c["category"] for c in categories],
            "config": runs[0]["config"], "seeds": runs[0]["seeds"], "methods": methods, "calibration": calibration,
            "categories": categories, "mean_unseen": mean, **({"supervised_heads": supervised} if supervised else {}),
            **({"specialists": specialists} if specialists else {})}


def format_table(results: dict) -> str:
    """The paper's layout: methods as rows, DSC and NSD per unseen category, and their mean (in %); the calibration
    rows in a table of their own below, and the region of interest's tumor coverage."""
    tolerance = results["config"]["tolerance_mm"]
    lines = [f"Setting **{results['setting']}** (seen: {', '.join(results['seen'])}); "
             f"{results['categories'][0]['cases']} test cases per category "
             f"(PhantomBench seed {results['seeds']['test']}); "
             f"NSD at {tolerance:g} mm; values in %.", "", *table_rows(results, "Method", results["methods"])]
    if results.get("calibration"):
        lines += ["", "**Calibration rows** (not zero-shot: each is handed what one stage has to find, the tumor "
                  "category's labels, the organ, or the healthy image; they say which stage loses what):", "",
                  *table_rows(results, "Calibration row", results["calibration"])]
    coverage = ", ".join(f"{c['category']} {percent(c.get('roi_tumor_coverage'))} (true organ region "
                         f"{percent(c.get('oracle_roi_tumor_coverage'))})" for c in results["categories"])
    auroc = ", ".join(f"{c['category']} {c['auroc']:.3f}" if c["auroc"] is not None else f"{c['category']} n/a"
                      for c in results["categories"])
    lines += ["", f"ROI tumor coverage (share of the tumor inside the full method's region of interest, and inside the "
              f"oracle's, mean per category, %): {coverage}.",
              f"Detection AUROC (region-level case score, tumor vs healthy test cases): {auroc}."]
    if "supervised_heads" in results:
        heads = ", ".join(f"{category} {setting}" for category, setting in results["supervised_heads"].items())
        lines.append(f"Upper-bound heads: {heads}.")
    else:
        lines.append("Supervised upper bound: not run (it needs `--heads-cache DIR`, for heads trained with each "
                     "category seen).")
    if results.get("specialists"):
        fitted = ", ".join(f"{category} {s['threshold']:g} (validation DSC {percent(s['validation_dsc'])})"
                           for category, s in results["specialists"].items())
        lines.append(f"Specialists' thresholds, fitted on validation cases of their category: {fitted}.")
    return "\n".join(lines) + "\n"


def table_rows(results: dict, first: str, rows: dict[str, str]) -> list[str]:
    """A markdown table of ``rows`` (key -> label): DSC and NSD per unseen category, and their mean."""
    categories = results["unseen"]
    by_category = {c["category"]: c for c in results["categories"]}
    lines = [f"| {first} | " + " | ".join(f"{c} DSC | {c} NSD" for c in categories) + " | mean DSC | mean NSD |",
             "|" + "---|" * (2 * len(categories) + 3)]
    for method, label in rows.items():
        cells = [percent(by_category[c][f"{m}_{method}"]) for c in categories for m in ("dsc", "nsd")]
        mean = [percent(results["mean_unseen"][f"{m}_{method}"]) for m in ("dsc", "nsd")]
        lines.append(f"| {label} | " + " | ".join(cells + mean) + " |")
    return lines


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def benchmark_settings(name: str) -> tuple[str, ...]:
    """``loo`` (every leave-one-category-out CT setting), ``seen-unseen``, ``mri`` (CT -> MRI), ``all``, or one
    setting by its own name."""
    from ..data.splits import SETTINGS

    loo = tuple(s for s in SETTINGS if s.startswith("loo-"))
    groups = {"loo": loo, "mri": ("ct-mri",), "all": (*loo, "seen-unseen", "ct-mri")}
    if name in groups:
        return groups[name]
    if name in SETTINGS:
        return (name,)
    raise ValueError(f"unknown setting {name!r}; choose loo, seen-unseen, mri, all or one of {', '.join(SETTINGS)}")


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

