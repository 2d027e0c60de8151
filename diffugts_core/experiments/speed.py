"""Speed and window studies that print figures (never asserted in timed unit tests: these machines are noisy).

``speed_benchmark``: the default pipeline on 128x128x64 PhantomBench CT cases, per-stage time and peak memory, and the
ROI-window vs whole-slice inpainting paths side by side on the same cases in one run (time ratio, DSC of both).
``window_study``: how much context a window needs: time and pseudo-healthy error of windows of several contexts.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from ..data import phantoms
from ..aova import run_aova
from ..detect import find_regions
from ..data.splits import split_cases
from ..metrics import dice
from ..inpaint import coarse_roi, inpaint_region
from ..runtime import peak_memory_mb
from ..vocabulary import CATEGORY_ORGAN, organ_body_region

SPEED_SEED = 4000  # a PhantomBench seed no training, validation or test split uses
SPEED_CATEGORIES = ("hepatic_vessel", "liver", "kidney")


def speed_benchmark(cases: int = 3, *, shape=(128, 128, 64), device="auto") -> dict:
    from ..pipeline import DiffuGTSPipeline

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
        roi = coarse_roi(find_regions(heads, aova, heads.thresholds), case.spacing, config.margin_mm,
                         config.organ_reach)
        tumor = (case.tumor > 0) & roi
        for path, inpaint in paths.items():
            start = time.perf_counter()
            healthy, _ = inpaint_region(pipeline.backbone, pipeline.text_encoder, case.image, case.modality,
                                        organ_body_region(organ), organ, roi, inpaint)
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

