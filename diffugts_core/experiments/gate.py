"""The regression gate: the quick benchmark's metrics against a committed baseline, per test case, per unseen category
and on the mean, within stated tolerances; and re-recording that baseline.
"""

from __future__ import annotations

import json
from pathlib import Path


from ..io import write_text_atomic

GATED_MEASURES = ("dsc", "nsd")
ABOVE_ON_THE_MEAN = ("aova", "reconstruction", "nongenerative_fill")  # what the full method must beat on mean DSC


def regression_metrics(results: dict) -> dict:
    """What the regression gate compares: mean unseen DSC and NSD per method, per category DSC and NSD per method
    and detection AUROC, and the full method's DSC and NSD per test case. The calibration rows (``calibration``, not
    among the methods) are not gated: they measure the stages, not the method."""
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
