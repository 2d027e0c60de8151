"""Benchmarks that print figures (never asserted in timed unit tests: these machines are noisy).

``speed_benchmark``: the default pipeline on 128x128x64 PhantomBench CT cases, per-stage time and peak memory, and the
ROI-window vs whole-slice inpainting paths side by side on the same cases in one run (time ratio, DSC of both).
"""

from __future__ import annotations

import resource
import time
from dataclasses import replace

import numpy as np

from . import phantoms
from .aova import CATEGORY_ORGAN
from .metrics import dice

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
    default = pipeline.residual
    paths = {path: replace(default, config=replace(default.config, inpaint=replace(default.config.inpaint, roi=roi)))
             for path, roi in (("roi", True), ("full_slice", False))}
    default_path = "roi" if default.config.inpaint.roi else "full_slice"
    rows = []
    for i in range(cases):
        category = SPEED_CATEGORIES[i % len(SPEED_CATEGORIES)]
        case = phantoms.generate_case(category, i // len(SPEED_CATEGORIES), SPEED_SEED, shape)
        tumor = case.tumor > 0
        row = {"case": case.case_id, "category": category}
        for path, residual in paths.items():
            pipeline.residual = residual
            result = pipeline.segment_grid(case.image, case.spacing, CATEGORY_ORGAN[category], modality=case.modality)
            row[path] = {"timings_s": result.timings, "total_s": sum(result.timings.values()),
                         "dsc": dice(result.refined, tumor), "roi_voxels": int(result.residuals.roi.sum()),
                         "roi_slices": int(result.residuals.roi.any((0, 1)).sum())}
        pipeline.residual = default
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
        "dsc_mean": {"roi": mean("roi", "dsc"), "full_slice": mean("full_slice", "dsc")},
        "peak_memory_mb": peak_memory_mb(),
        "settings": {"inpaint": vars(default.config.inpaint), "margin_mm": default.config.margin_mm},
    }


def format_speed_report(report: dict) -> str:
    lines = [f"speed benchmark: {len(report['cases'])} PhantomBench CT cases of {'x'.join(map(str, report['shape']))} "
             f"(seed {SPEED_SEED}), device {report['device']}; model + heads loaded in {report['load_s']:.1f} s",
             f"per stage, default pipeline ({report['default_path']} inpainting), mean over cases:"]
    lines += [f"  {stage:26s} {seconds:7.2f} s" for stage, seconds in report["stages_mean_s"].items()]
    lines.append(f"  {'total':26s} {report['total_mean_s'][report['default_path']]:7.2f} s per case")
    lines.append("inpainting path    inpainting s   total s    DSC   (per case: ROI voxels/slices, DSC)")
    for path in ("roi", "full_slice"):
        cases = ", ".join(f"{r['case']} {r[path]['roi_voxels']}/{r[path]['roi_slices']} {r[path]['dsc']:.3f}"
                          for r in report["cases"])
        lines.append(f"  {path:16s} {report['inpainting_mean_s'][path]:12.2f} {report['total_mean_s'][path]:9.2f} "
                     f"{report['dsc_mean'][path]:6.3f}   ({cases})")
    lines.append(f"ROI-window inpainting is {report['inpainting_speedup']:.2f}x as fast as whole-slice; DSC difference "
                 f"{100 * (report['dsc_mean']['roi'] - report['dsc_mean']['full_slice']):+.1f} points")
    lines.append(f"peak memory (process RSS): {report['peak_memory_mb']:.0f} MB")
    return "\n".join(lines)
